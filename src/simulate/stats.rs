//! What a run measures, shared by every device task: counters, latency histograms and the
//! connect storm's window (the per-second timeline made from them is [`super::timeline`]).
//!
//! Counters are atomics bumped with `Relaxed` ordering (each is read on its own; nothing is
//! inferred from the order of two counters). Latencies go into `hdrhistogram` histograms
//! behind one mutex: a record is a few nanoseconds, so at tens of thousands of acks a second
//! the lock is uncontended in practice, and a whole-run histogram plus an interval histogram
//! (reset every sample) give both the final percentiles and the percentiles over time.
//! Latencies are in microseconds, from 1 µs to 10 minutes, at 2 significant digits (1 %).

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram holds (µs); larger values are recorded as this.
const MAX_LATENCY_US: u64 = 600_000_000;
/// How many distinct error texts the report keeps, as examples of what went wrong.
const ERROR_SAMPLES: usize = 20;

/// Why something failed, as the report groups failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TCP connection was refused, reset or timed out, or a local address could not be bound.
    TcpConnect,
    /// The TLS handshake failed (certificate, name, protocol).
    Tls,
    /// CONNACK with a non-zero return code (see `connack_refused` for the codes).
    ConnackRefused,
    /// No CONNACK within the connect timeout.
    ConnectTimeout,
    /// The broker sent bytes that are not MQTT 3.1.1, or a packet a client does not expect.
    Protocol,
    /// The broker closed an established connection.
    ClosedByBroker,
    /// Reading or writing an established connection failed.
    Io,
    /// A SUBSCRIBE filter was refused (SUBACK 0x80).
    SubscribeRefused,
    /// A reported-properties PATCH was answered with a status ≥ 300.
    TwinRejected,
    /// A PUBACK for a packet id that was not in flight.
    UnexpectedAck,
    /// An HTTPS request answered with an unexpected status: a device's (`--transport https`) or
    /// the service's (REST method call or C2D send, with the hub's `iothub-errorcode`).
    HttpStatus,
    /// A direct method not answered within its response timeout (the hub's 504, or no answer
    /// on the raw service's response topic).
    MethodTimeout,
    /// A direct method answered with a status other than 200.
    MethodFailed,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::TcpConnect,
        ErrorKind::Tls,
        ErrorKind::ConnackRefused,
        ErrorKind::ConnectTimeout,
        ErrorKind::Protocol,
        ErrorKind::ClosedByBroker,
        ErrorKind::Io,
        ErrorKind::SubscribeRefused,
        ErrorKind::TwinRejected,
        ErrorKind::UnexpectedAck,
        ErrorKind::HttpStatus,
        ErrorKind::MethodTimeout,
        ErrorKind::MethodFailed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::TcpConnect => "tcp_connect",
            ErrorKind::Tls => "tls",
            ErrorKind::ConnackRefused => "connack_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::Protocol => "protocol",
            ErrorKind::ClosedByBroker => "closed_by_broker",
            ErrorKind::Io => "io",
            ErrorKind::SubscribeRefused => "subscribe_refused",
            ErrorKind::TwinRejected => "twin_rejected",
            ErrorKind::UnexpectedAck => "unexpected_ack",
            ErrorKind::HttpStatus => "http_status",
            ErrorKind::MethodTimeout => "method_timeout",
            ErrorKind::MethodFailed => "method_failed",
        }
    }
}

/// The run's counters. `*_sent` counts packets written; `*_acked` the answers received.
#[derive(Debug, Default)]
pub struct Counters {
    /// TCP connects started (first connections, reconnects after errors, churn).
    pub connect_attempts: AtomicU64,
    /// Connections that got CONNACK 0.
    pub connects: AtomicU64,
    /// Established connections lost to an error (not churn, not the end of the run).
    pub disconnects: AtomicU64,
    /// Connections closed on purpose by `--churn` (each followed by a reconnect).
    pub churn_disconnects: AtomicU64,
    pub telemetry_sent: AtomicU64,
    /// PUBACKs of telemetry (QoS 1 only).
    pub telemetry_acked: AtomicU64,
    /// Telemetry not sent because the device was more than a second behind its schedule with
    /// its in-flight window full (the broker did not keep up).
    pub telemetry_skipped: AtomicU64,
    pub twin_sent: AtomicU64,
    /// `$iothub/twin/res/204` answers.
    pub twin_acked: AtomicU64,
    /// Direct-method requests received (each answered with status 200).
    pub methods_answered: AtomicU64,
    /// Cloud-to-device messages received (QoS 1 ones completed with PUBACK).
    pub c2d_received: AtomicU64,
    /// Service side: direct-method calls made (`--method-rate`, `--method-in-flight`).
    pub methods_called: AtomicU64,
    /// Calls answered with status 200 by their device.
    pub methods_succeeded: AtomicU64,
    /// Service side: C2D messages sent (`--c2d-rate`, `--c2d-in-flight`).
    pub c2d_sent: AtomicU64,
    /// Sends the hub answered 204 (durable in the device's queue) or the broker PUBACKed.
    pub c2d_accepted: AtomicU64,
    /// This run's service messages among `c2d_received`.
    pub c2d_delivered: AtomicU64,
    /// Service operations not made at their time: the window was full or no device was ready.
    pub service_skipped: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Snapshot {
    pub connect_attempts: u64,
    pub connects: u64,
    pub disconnects: u64,
    pub churn_disconnects: u64,
    pub telemetry_sent: u64,
    pub telemetry_acked: u64,
    pub telemetry_skipped: u64,
    pub twin_sent: u64,
    pub twin_acked: u64,
    pub methods_answered: u64,
    pub c2d_received: u64,
    pub methods_called: u64,
    pub methods_succeeded: u64,
    pub c2d_sent: u64,
    pub c2d_accepted: u64,
    pub c2d_delivered: u64,
    pub service_skipped: u64,
    pub errors: u64,
    /// Devices connected at that moment.
    pub online: u64,
    /// Most devices connected at once so far.
    pub peak_online: u64,
}

struct Latencies {
    ack: Histogram<u64>,
    ack_interval: Histogram<u64>,
    connect: Histogram<u64>,
    twin: Histogram<u64>,
    method: Histogram<u64>,
    c2d: Histogram<u64>,
}

/// The connect storm: each device's first connection, from the first CONNECT written to the
/// CONNACK that brought the last device online for the first time (µs since [`Stats::new`]).
struct Storm {
    first_connect_us: AtomicU64,
    last_first_connack_us: AtomicU64,
    devices: AtomicU64,
}

/// The connect storm's figures: devices connected, the window, and their quotient.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectStorm {
    /// Devices that connected at least once.
    pub devices: u64,
    /// Seconds from the first CONNECT written to the last first CONNACK read.
    pub window_s: f64,
    pub per_s: f64,
}

/// Everything measured, shared (in an `Arc`) by the device tasks, the ticker and the report.
pub struct Stats {
    pub counters: Counters,
    /// What the latencies and the storm's times are measured from.
    epoch: Instant,
    storm: Storm,
    /// µs since `epoch` when the service load began; `u64::MAX` before.
    service_started_us: AtomicU64,
    online: AtomicI64,
    /// QoS 1 telemetry and twin PATCHes written and not yet answered, over the fleet.
    awaiting: AtomicI64,
    peak_online: AtomicU64,
    errors: [AtomicU64; ErrorKind::ALL.len()],
    /// CONNACK return codes 1-5 (index = code; 0 unused).
    connack_refused: [AtomicU64; 6],
    error_samples: Mutex<Vec<String>>,
    latencies: Mutex<Latencies>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("constant bounds: low ≥ 1, high ≥ 2 × low, 2 digits")
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    pub fn new() -> Self {
        Self {
            counters: Counters::default(),
            epoch: Instant::now(),
            storm: Storm {
                first_connect_us: AtomicU64::new(u64::MAX),
                last_first_connack_us: AtomicU64::new(0),
                devices: AtomicU64::new(0),
            },
            service_started_us: AtomicU64::new(u64::MAX),
            online: AtomicI64::new(0),
            awaiting: AtomicI64::new(0),
            peak_online: AtomicU64::new(0),
            errors: Default::default(),
            connack_refused: Default::default(),
            error_samples: Mutex::new(Vec::new()),
            latencies: Mutex::new(Latencies {
                ack: histogram(),
                ack_interval: histogram(),
                connect: histogram(),
                twin: histogram(),
                method: histogram(),
                c2d: histogram(),
            }),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// A device got CONNACK 0 after `took` (TCP + TLS + CONNECT).
    pub fn connected(&self, took: Duration) {
        self.counters.connects.fetch_add(1, Relaxed);
        let now = self.online.fetch_add(1, Relaxed) + 1;
        self.peak_online.fetch_max(u64::try_from(now).unwrap_or(0), Relaxed);
        self.with_latencies(|l| l.connect.saturating_record(micros(took)));
    }

    /// A device wrote a CONNECT.
    pub fn connect_sent(&self) {
        self.storm.first_connect_us.fetch_min(self.since_epoch_us(), Relaxed);
    }

    /// A device got the CONNACK of its first connection of the run.
    pub fn first_connected(&self) {
        self.storm.devices.fetch_add(1, Relaxed);
        self.storm.last_first_connack_us.fetch_max(self.since_epoch_us(), Relaxed);
    }

    /// The connect storm so far; `None` before a device connected.
    pub fn connect_storm(&self) -> Option<ConnectStorm> {
        let devices = self.storm.devices.load(Relaxed);
        let first = self.storm.first_connect_us.load(Relaxed);
        let last = self.storm.last_first_connack_us.load(Relaxed);
        storm_figures(devices, first, last)
    }

    /// The service load begins now.
    pub fn service_started(&self) {
        self.service_started_us.store(self.since_epoch_us(), Relaxed);
    }

    /// Seconds since [`Stats::new`] when the service load began.
    pub fn service_started_at(&self) -> Option<f64> {
        let us = self.service_started_us.load(Relaxed);
        (us != u64::MAX).then(|| us as f64 / 1e6)
    }

    /// When the stats began: the start of the run.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    fn since_epoch_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1)
    }

    /// An HTTPS device got its first answer: counted as connected, with no connect latency
    /// (its requests share the fleet's pooled connections).
    pub fn went_online(&self) {
        self.counters.connects.fetch_add(1, Relaxed);
        let now = self.online.fetch_add(1, Relaxed) + 1;
        self.peak_online.fetch_max(u64::try_from(now).unwrap_or(0), Relaxed);
    }

    /// A connected device's connection ended (for whatever reason).
    pub fn went_offline(&self) {
        self.online.fetch_sub(1, Relaxed);
    }

    /// `n` more messages wait for their answer (PUBACK, twin response).
    pub fn awaiting_answers(&self, n: usize) {
        self.awaiting.fetch_add(n as i64, Relaxed);
    }

    /// `n` awaited answers came, or never will (their connection is gone).
    pub fn answered(&self, n: usize) {
        self.awaiting.fetch_sub(n as i64, Relaxed);
    }

    /// Messages still waiting for an answer over the fleet, and this run's accepted C2D
    /// messages no device has received yet.
    pub fn awaiting(&self) -> u64 {
        let c = &self.counters;
        let undelivered = c.c2d_accepted.load(Relaxed).saturating_sub(c.c2d_delivered.load(Relaxed));
        u64::try_from(self.awaiting.load(Relaxed)).unwrap_or(0) + undelivered
    }

    pub fn online(&self) -> u64 {
        u64::try_from(self.online.load(Relaxed)).unwrap_or(0)
    }

    pub fn telemetry_acked(&self, latency: Duration) {
        self.counters.telemetry_acked.fetch_add(1, Relaxed);
        let us = micros(latency);
        self.with_latencies(|l| {
            l.ack.saturating_record(us);
            l.ack_interval.saturating_record(us);
        });
    }

    pub fn twin_acked(&self, latency: Duration) {
        self.counters.twin_acked.fetch_add(1, Relaxed);
        self.with_latencies(|l| l.twin.saturating_record(micros(latency)));
    }

    /// A direct-method call answered 200, `latency` after it was made (as the service sees it).
    pub fn method_succeeded(&self, latency: Duration) {
        self.counters.methods_succeeded.fetch_add(1, Relaxed);
        self.with_latencies(|l| l.method.saturating_record(micros(latency)));
    }

    /// One of this run's C2D messages reached its device, `latency` after it was sent.
    pub fn c2d_delivered(&self, latency: Duration) {
        self.counters.c2d_delivered.fetch_add(1, Relaxed);
        self.with_latencies(|l| l.c2d.saturating_record(micros(latency)));
    }

    /// Counts a failure; keeps its text as an example when it is new and there is room.
    pub fn error(&self, kind: ErrorKind, detail: impl FnOnce() -> String) {
        if let Some(slot) = ErrorKind::ALL.iter().position(|k| *k == kind).and_then(|i| self.errors.get(i)) {
            slot.fetch_add(1, Relaxed);
        }
        let mut samples = self.error_samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < ERROR_SAMPLES {
            let text = format!("{}: {}", kind.name(), detail());
            if !samples.contains(&text) {
                samples.push(text);
            }
        }
    }

    /// Counts a CONNACK refusal by its return code (the error itself is counted by [`Self::error`]).
    pub fn connack_code(&self, code: u8) {
        if let Some(slot) = self.connack_refused.get(usize::from(code)) {
            slot.fetch_add(1, Relaxed);
        }
    }

    fn with_latencies(&self, f: impl FnOnce(&mut Latencies)) {
        f(&mut self.latencies.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counters;
        Snapshot {
            connect_attempts: c.connect_attempts.load(Relaxed),
            connects: c.connects.load(Relaxed),
            disconnects: c.disconnects.load(Relaxed),
            churn_disconnects: c.churn_disconnects.load(Relaxed),
            telemetry_sent: c.telemetry_sent.load(Relaxed),
            telemetry_acked: c.telemetry_acked.load(Relaxed),
            telemetry_skipped: c.telemetry_skipped.load(Relaxed),
            twin_sent: c.twin_sent.load(Relaxed),
            twin_acked: c.twin_acked.load(Relaxed),
            methods_answered: c.methods_answered.load(Relaxed),
            c2d_received: c.c2d_received.load(Relaxed),
            methods_called: c.methods_called.load(Relaxed),
            methods_succeeded: c.methods_succeeded.load(Relaxed),
            c2d_sent: c.c2d_sent.load(Relaxed),
            c2d_accepted: c.c2d_accepted.load(Relaxed),
            c2d_delivered: c.c2d_delivered.load(Relaxed),
            service_skipped: c.service_skipped.load(Relaxed),
            errors: self.errors.iter().map(|e| e.load(Relaxed)).sum(),
            online: self.online(),
            peak_online: self.peak_online.load(Relaxed),
        }
    }

    /// Errors by kind (only kinds that happened), and CONNACK refusals by code.
    pub fn error_breakdown(&self) -> ErrorBreakdown {
        let kinds = ErrorKind::ALL
            .iter()
            .zip(&self.errors)
            .map(|(k, n)| (k.name(), n.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let codes = (0u8..)
            .zip(&self.connack_refused)
            .map(|(code, n)| (code, n.load(Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        (kinds, codes)
    }

    pub fn error_samples(&self) -> Vec<String> {
        self.error_samples.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whole-run latency summaries: telemetry acks, connects, twin PATCHes, method calls, C2D.
    pub fn latency_summaries(&self) -> LatencyReport {
        let l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        LatencyReport {
            ack: Summary::of(&l.ack),
            connect: Summary::of(&l.connect),
            twin: Summary::of(&l.twin),
            method: Summary::of(&l.method),
            c2d: Summary::of(&l.c2d),
            ack_histogram: buckets(&l.ack),
        }
    }

    /// Percentiles of the acks since the previous call (p50, p99 in ms), then starts afresh.
    pub(super) fn take_interval(&self) -> (Option<f64>, Option<f64>) {
        let mut l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        let h = &mut l.ack_interval;
        let result = if h.is_empty() {
            (None, None)
        } else {
            (Some(ms(h.value_at_quantile(0.5))), Some(ms(h.value_at_quantile(0.99))))
        };
        h.reset();
        result
    }
}

/// `devices` connected between `first_us` and `last_us`: the storm's window and rate.
fn storm_figures(devices: u64, first_us: u64, last_us: u64) -> Option<ConnectStorm> {
    if devices == 0 || first_us == u64::MAX {
        return None;
    }
    // One device alone has a window of its own connect; never divide by less than 1 µs.
    let window_s = last_us.saturating_sub(first_us).max(1) as f64 / 1e6;
    Some(ConnectStorm { devices, window_s, per_s: devices as f64 / window_s })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).clamp(1, MAX_LATENCY_US)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Error counts by kind name, and CONNACK refusals by return code.
pub type ErrorBreakdown = (Vec<(&'static str, u64)>, Vec<(u8, u64)>);

/// Percentiles of one histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Summary {
    fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        Some(Self {
            count: h.len(),
            min_ms: ms(h.min()),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        })
    }
}

/// One bar of the latency histogram: acks with a latency ≤ `le_ms` and above the previous bar's.
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub le_ms: f64,
    pub count: u64,
}

/// Buckets growing by √2 from 50 µs, up to the largest value seen.
fn buckets(h: &Histogram<u64>) -> Vec<Bucket> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_log(50, std::f64::consts::SQRT_2)
        .map(|v| Bucket { le_ms: ms(v.value_iterated_to()), count: v.count_since_last_iteration() })
        .collect()
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencyReport {
    /// Telemetry PUBLISH → PUBACK.
    pub ack: Option<Summary>,
    /// TCP connect → CONNACK (TLS handshake included).
    pub connect: Option<Summary>,
    /// Reported PATCH → `$iothub/twin/res/204` (raw: twin request → the responder's answer).
    pub twin: Option<Summary>,
    /// Direct-method call → answer, at the service (REST request → response; raw: request
    /// PUBLISH written → answer read).
    pub method: Option<Summary>,
    /// C2D send (service) → received by the device.
    pub c2d: Option<Summary>,
    pub ack_histogram: Vec<Bucket>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_feed_the_whole_run_and_the_interval_percentiles() {
        let stats = Stats::new();
        for ms in 1..=100 {
            stats.telemetry_acked(Duration::from_millis(ms));
        }
        let (p50, p99) = stats.take_interval();
        assert!(p50.is_some_and(|p| (49.0..=51.0).contains(&p)), "{p50:?}");
        assert!(p99.is_some_and(|p| (98.0..=100.5).contains(&p)), "{p99:?}");
        assert_eq!(stats.take_interval(), (None, None), "the interval restarts");
        let summary = stats.latency_summaries();
        assert_eq!(summary.ack.map(|s| s.count), Some(100));
        assert_eq!(summary.ack_histogram.iter().map(|b| b.count).sum::<u64>(), 100);
    }

    #[test]
    fn errors_are_counted_by_kind_with_a_few_examples() {
        let stats = Stats::new();
        for _ in 0..2 {
            stats.connack_code(5);
            stats.error(ErrorKind::ConnackRefused, || "CONNACK return code 5".into());
        }
        stats.error(ErrorKind::Io, || "reset".into());
        let (kinds, codes) = stats.error_breakdown();
        assert_eq!(kinds, [("connack_refused", 2), ("io", 1)]);
        assert_eq!(codes, [(5, 2)]);
        assert_eq!(stats.error_samples(), ["connack_refused: CONNACK return code 5", "io: reset"]);
        assert_eq!(stats.snapshot().errors, 3);
    }

    #[test]
    fn the_connect_storm_spans_first_connect_to_last_first_connack() {
        assert!(storm_figures(0, u64::MAX, 0).is_none());
        let storm = storm_figures(10_000, 250_000, 2_250_000).expect("a storm");
        assert_eq!((storm.devices, storm.window_s, storm.per_s), (10_000, 2.0, 5_000.0));
        assert_eq!(storm_figures(1, 7, 7).map(|s| s.window_s), Some(1e-6));
    }

    #[test]
    fn undelivered_c2d_messages_are_awaited() {
        let stats = Stats::new();
        Stats::add(&stats.counters.c2d_accepted, 3);
        stats.c2d_delivered(Duration::from_millis(2));
        assert_eq!(stats.awaiting(), 2);
        stats.awaiting_answers(1);
        assert_eq!(stats.awaiting(), 3);
        assert_eq!(stats.latency_summaries().c2d.map(|s| s.count), Some(1));
    }
}
