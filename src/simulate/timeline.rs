//! The run's timeline: a [`Sample`] a second, made from successive [`Snapshot`]s of the
//! [`Stats`] — rates over the second before it, and the ack percentiles of that second.

use std::time::Instant;

use serde::Serialize;

use super::stats::{Snapshot, Stats};

/// One point of the timeline: rates over the second before `t_s`.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the run started.
    pub t_s: f64,
    /// Seconds this sample covers (about 1; the last one of a run can be shorter).
    pub span_s: f64,
    pub online: u64,
    pub sent_per_s: f64,
    pub acked_per_s: f64,
    pub errors_per_s: f64,
    pub ack_p50_ms: Option<f64>,
    pub ack_p99_ms: Option<f64>,
    /// Reported PATCHes answered 2xx per second.
    pub twin_acked_per_s: f64,
    /// Direct-method calls answered 200 per second.
    pub methods_per_s: f64,
    /// This run's C2D messages received by devices per second.
    pub c2d_delivered_per_s: f64,
}

/// Turns successive snapshots into timeline samples.
pub struct Sampler {
    started: Instant,
    last: Snapshot,
    last_at: Instant,
}

impl Sampler {
    pub fn new(started: Instant) -> Self {
        Self { started, last: Snapshot::default(), last_at: started }
    }

    pub fn sample(&mut self, stats: &Stats) -> (Sample, Snapshot) {
        let now = Instant::now();
        let snap = stats.snapshot();
        let secs = now.duration_since(self.last_at).as_secs_f64().max(1e-3);
        let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let (p50, p99) = stats.take_interval();
        let sample = Sample {
            t_s: now.duration_since(self.started).as_secs_f64(),
            span_s: secs,
            online: snap.online,
            sent_per_s: rate(snap.telemetry_sent, self.last.telemetry_sent),
            acked_per_s: rate(snap.telemetry_acked, self.last.telemetry_acked),
            errors_per_s: rate(snap.errors, self.last.errors),
            ack_p50_ms: p50,
            ack_p99_ms: p99,
            twin_acked_per_s: rate(snap.twin_acked, self.last.twin_acked),
            methods_per_s: rate(snap.methods_succeeded, self.last.methods_succeeded),
            c2d_delivered_per_s: rate(snap.c2d_delivered, self.last.c2d_delivered),
        };
        self.last = snap;
        self.last_at = now;
        (sample, snap)
    }
}
