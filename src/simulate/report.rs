//! The end of a run: one [`Report`] value, printed as a summary, written as `report.json` (the
//! numbers, for scripts and comparisons) and `report.html` (the same with plots, see
//! [`super::html`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

use super::scenario::Scenario;
use super::stats::{ConnectStorm, LatencyReport, Snapshot, Stats};
use super::timeline::Sample;

/// The process' resident memory around connecting the devices.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// RSS before any device task existed (after provisioning).
    pub rss_before_kib: u64,
    /// RSS with `devices_at_sample` devices connected.
    pub rss_connected_kib: u64,
    pub devices_at_sample: u64,
    /// (rss_connected − rss_before) / devices: what one connected device costs the simulator,
    /// socket buffers (kernel memory) aside. Idle only when the run had --rate 0; measure with
    /// --skip-provision, as memory freed after provisioning is reused and lowers the figure.
    pub per_device_kib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShardReport {
    pub index: u32,
    pub count: u32,
    pub first_device: u32,
    pub devices: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// RLIMIT_NOFILE after raising the soft limit to the hard one.
    pub open_files: u64,
    /// Local addresses connections were bound to (empty: the kernel chose).
    pub source_addrs: Vec<String>,
}

/// The run's counts: the final counters plus what is derived from them.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    #[serde(flatten)]
    pub totals: Snapshot,
    /// QoS 1 telemetry written but never acknowledged (in flight when the run ended, or lost
    /// with a connection).
    pub telemetry_unacked: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Telemetry acknowledged per second over the sending time (QoS 0: sent per second).
    pub mean_per_s: f64,
    /// The same, from the second every device was online to the end of sending.
    pub steady_per_s: Option<f64>,
    /// Highest one-second rate.
    pub peak_per_s: f64,
    pub sent_per_s: f64,
}

/// The rate of one kind of operation over its window.
#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    /// Operations completed (answered, delivered).
    pub done: u64,
    /// Per second over the window.
    pub mean_per_s: f64,
    /// Per second over the whole seconds of the window once the load was in full swing.
    pub steady_per_s: Option<f64>,
    /// Highest one-second rate.
    pub peak_per_s: f64,
}

/// Twin PATCHes (device side), method calls and C2D messages (service side).
#[derive(Debug, Clone, Serialize)]
pub struct Operations {
    /// Seconds into the run when the service load began (every device ready).
    pub service_started_at_s: Option<f64>,
    /// Reported PATCHes answered 2xx, over the sending time (steady: once all were online).
    pub twin: Option<Rate>,
    /// Method calls answered 200, from the service's start to the end of sending.
    pub methods: Option<Rate>,
    /// This run's C2D messages received by devices, over the same window.
    pub c2d: Option<Rate>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub started_at: String,
    /// Seconds from the first device task to the end of the drain.
    pub elapsed_s: f64,
    /// Seconds devices were sending (until --duration or Ctrl-C).
    pub sending_s: f64,
    pub interrupted: bool,
    pub target: String,
    pub hub_host: Option<String>,
    pub scenario: Value,
    pub shard: ShardReport,
    pub limits: Limits,
    pub counts: Counts,
    /// Errors by kind (see `stats::ErrorKind`).
    pub errors: BTreeMap<String, u64>,
    /// CONNACK refusals by return code (device-protocol §2.2).
    pub connack_refused: BTreeMap<String, u64>,
    pub error_samples: Vec<String>,
    pub throughput: Throughput,
    /// Seconds into the run when every device was first online (a once-a-second sample).
    pub all_online_at_s: Option<f64>,
    /// Every device's first connection: first CONNECT written → last first CONNACK read.
    pub connect_storm: Option<ConnectStorm>,
    pub operations: Operations,
    pub latency: LatencyReport,
    pub memory: Memory,
    pub timeline: Vec<Sample>,
}

/// What [`Report::new`] is made from.
pub struct Inputs<'a> {
    pub scenario: &'a Scenario,
    pub target: SocketAddr,
    pub hub_host: Option<String>,
    pub first_device: u32,
    pub shard_devices: u32,
    pub open_files: u64,
    pub source_addrs: &'a [IpAddr],
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub elapsed: Duration,
    pub sending: Duration,
    pub interrupted: bool,
    pub stats: &'a Stats,
    pub memory: Memory,
    pub all_online_at: Option<f64>,
    pub timeline: Vec<Sample>,
}

impl Report {
    pub fn new(i: Inputs<'_>) -> Self {
        let totals = i.stats.snapshot();
        let qos1 = u8::from(i.scenario.qos) == 1;
        let done = |s: &Sample| if qos1 { s.acked_per_s } else { s.sent_per_s };
        let sending_s = i.sending.as_secs_f64().max(1e-3);
        let delivered = if qos1 { totals.telemetry_acked } else { totals.telemetry_sent };
        // Rates over a fraction of a second (the last sample of a run) are noise, not peaks.
        let whole = |s: &&Sample| s.span_s >= 0.5;
        let steady: Vec<f64> = match i.all_online_at {
            Some(t0) => i
                .timeline
                .iter()
                .filter(whole)
                .filter(|s| s.t_s > t0 + 0.5 && s.t_s <= sending_s + 0.5)
                .map(done)
                .collect(),
            None => Vec::new(),
        };
        let rate = |done: u64, from: f64, per_s: fn(&Sample) -> f64, steady_from: Option<f64>| {
            // Samples wholly inside the window: begun at or after its start, ended by the end
            // of sending (within the half second the last sample may run over).
            let inside = |s: &&Sample, from: f64| s.t_s - s.span_s >= from - 1e-3 && s.t_s <= sending_s + 0.5;
            let steady: Vec<f64> = match steady_from {
                Some(t0) => i.timeline.iter().filter(whole).filter(|s| inside(s, t0)).map(per_s).collect(),
                None => Vec::new(),
            };
            Rate {
                done,
                mean_per_s: done as f64 / (sending_s - from).max(1e-3),
                steady_per_s: (!steady.is_empty()).then(|| steady.iter().sum::<f64>() / steady.len() as f64),
                peak_per_s: i.timeline.iter().filter(whole).map(per_s).fold(0.0, f64::max),
            }
        };
        let service_started = i.stats.service_started_at();
        let service_rate = |sent: u64, done: u64, per_s: fn(&Sample) -> f64| {
            let from = service_started.filter(|_| sent > 0)?;
            Some(rate(done, from, per_s, Some(from)))
        };
        let operations = Operations {
            service_started_at_s: service_started,
            twin: (totals.twin_sent > 0).then(|| rate(totals.twin_acked, 0.0, |s| s.twin_acked_per_s, i.all_online_at)),
            methods: service_rate(totals.methods_called, totals.methods_succeeded, |s| s.methods_per_s),
            c2d: service_rate(totals.c2d_sent, totals.c2d_delivered, |s| s.c2d_delivered_per_s),
        };
        let (kinds, codes) = i.stats.error_breakdown();
        let mut memory = i.memory;
        if memory.devices_at_sample > 0 && memory.rss_connected_kib > 0 {
            memory.per_device_kib = Some(
                memory.rss_connected_kib.saturating_sub(memory.rss_before_kib) as f64 / memory.devices_at_sample as f64,
            );
        }
        Report {
            tool: "iothubd simulate",
            version: env!("CARGO_PKG_VERSION"),
            started_at: i.started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            elapsed_s: i.elapsed.as_secs_f64(),
            sending_s,
            interrupted: i.interrupted,
            target: i.target.to_string(),
            hub_host: i.hub_host,
            scenario: i.scenario.describe(),
            shard: ShardReport {
                index: i.scenario.shard.index,
                count: i.scenario.shard.count,
                first_device: i.first_device,
                devices: i.shard_devices,
            },
            limits: Limits {
                open_files: i.open_files,
                source_addrs: i.source_addrs.iter().map(ToString::to_string).collect(),
            },
            counts: Counts {
                totals,
                telemetry_unacked: if qos1 { totals.telemetry_sent.saturating_sub(totals.telemetry_acked) } else { 0 },
            },
            errors: kinds.into_iter().map(|(k, n)| (k.to_owned(), n)).collect(),
            connack_refused: codes.into_iter().map(|(c, n)| (c.to_string(), n)).collect(),
            error_samples: i.stats.error_samples(),
            throughput: Throughput {
                mean_per_s: delivered as f64 / sending_s,
                steady_per_s: (!steady.is_empty()).then(|| steady.iter().sum::<f64>() / steady.len() as f64),
                peak_per_s: i.timeline.iter().filter(whole).map(done).fold(0.0, f64::max),
                sent_per_s: totals.telemetry_sent as f64 / sending_s,
            },
            all_online_at_s: i.all_online_at,
            connect_storm: i.stats.connect_storm(),
            operations,
            latency: i.stats.latency_summaries(),
            memory,
            timeline: i.timeline,
        }
    }

    /// The summary printed at the end of a run.
    pub fn summary(&self) -> String {
        let c = &self.counts.totals;
        let mut lines = vec![format!(
            "iothubd simulate: {} devices ({}{}) against {}{} for {:.1}s{}",
            self.shard.devices,
            self.scenario["mode"].as_str().unwrap_or(""),
            match self.scenario["transport"].as_str() {
                Some("https") => ", HTTPS",
                _ if self.scenario["tls"] == true => ", MQTT over TLS",
                _ => ", MQTT",
            },
            self.target,
            self.hub_host.as_deref().map(|h| format!(" ({h})")).unwrap_or_default(),
            self.sending_s,
            if self.interrupted { ", interrupted" } else { "" },
        )];
        lines.push(format!(
            "  connections  {} connected (peak {} online, {} at the end) of {} attempts; {} dropped, {} churned",
            c.connects, c.peak_online, c.online, c.connect_attempts, c.disconnects, c.churn_disconnects
        ));
        if let Some(t) = self.all_online_at_s {
            lines.push(format!("               all {} devices online after {t:.1}s", self.shard.devices));
        }
        if let Some(storm) = &self.connect_storm {
            lines.push(format!(
                "               {} first connections in {:.3}s (first CONNECT → last CONNACK): {:.0} connects/s",
                storm.devices, storm.window_s, storm.per_s
            ));
        }
        lines.push(format!(
            "  telemetry    {} sent, {} acked, {} unacked, {} skipped · {:.0} msg/s mean{} · peak {:.0} msg/s",
            c.telemetry_sent,
            c.telemetry_acked,
            self.counts.telemetry_unacked,
            c.telemetry_skipped,
            self.throughput.mean_per_s,
            self.throughput.steady_per_s.map(|s| format!(", {s:.0} steady")).unwrap_or_default(),
            self.throughput.peak_per_s,
        ));
        let l = &self.latency;
        for (name, summary) in
            [("ack", &l.ack), ("connect", &l.connect), ("twin", &l.twin), ("method", &l.method), ("c2d", &l.c2d)]
        {
            if let Some(s) = summary {
                lines.push(format!(
                    "  {name:<12} latency p50 {:.2} ms · p90 {:.2} · p99 {:.2} · p99.9 {:.2} · max {:.2} ({} samples)",
                    s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms, s.count
                ));
            }
        }
        let per_s = |r: &Option<Rate>| match r {
            Some(r) => format!(
                " ({:.0}/s{})",
                r.mean_per_s,
                r.steady_per_s.map(|s| format!(", {s:.0} steady")).unwrap_or_default()
            ),
            None => String::new(),
        };
        let ops = &self.operations;
        if c.twin_sent > 0 || c.methods_answered > 0 || c.c2d_received > 0 {
            lines.push(format!(
                "  device       twin PATCH {} sent, {} answered{} · methods answered {} · C2D received {}",
                c.twin_sent,
                c.twin_acked,
                per_s(&ops.twin),
                c.methods_answered,
                c.c2d_received
            ));
        }
        if c.methods_called > 0 || c.c2d_sent > 0 || c.service_skipped > 0 {
            lines.push(format!(
                "  service      from {}: methods {} called, {} answered 200{} · C2D {} sent, {} accepted, {} delivered{} · {} skipped",
                ops.service_started_at_s.map(|t| format!("{t:.1}s")).unwrap_or_else(|| "-".into()),
                c.methods_called,
                c.methods_succeeded,
                per_s(&ops.methods),
                c.c2d_sent,
                c.c2d_accepted,
                c.c2d_delivered,
                per_s(&ops.c2d),
                c.service_skipped,
            ));
        } else if ops.service_started_at_s.is_none()
            && ["methods", "c2d"].iter().any(|k| !self.scenario["service"][k].is_null())
        {
            lines
                .push("  service      did not start: not every device was ready (connected and subscribed)".to_owned());
        }
        if let Some(kib) = self.memory.per_device_kib {
            lines.push(format!(
                "  memory       RSS {} → {} KiB with {} devices connected: {kib:.2} KiB per device",
                self.memory.rss_before_kib, self.memory.rss_connected_kib, self.memory.devices_at_sample
            ));
        }
        if self.errors.is_empty() {
            lines.push("  errors       none".to_owned());
        } else {
            let kinds: Vec<String> = self.errors.iter().map(|(k, n)| format!("{k} {n}")).collect();
            lines.push(format!("  errors       {}", kinds.join(", ")));
            for sample in self.error_samples.iter().take(5) {
                lines.push(format!("               e.g. {sample}"));
            }
        }
        lines.join("\n")
    }

    /// Writes `report.json` and `report.html` into `dir` (created if needed).
    pub fn write(&self, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the report directory {}", dir.display()))?;
        let json = dir.join("report.json");
        let text = serde_json::to_string_pretty(self).context("report as JSON")?;
        std::fs::write(&json, text).with_context(|| format!("cannot write {}", json.display()))?;
        let html = dir.join("report.html");
        std::fs::write(&html, super::html::render(self)).with_context(|| format!("cannot write {}", html.display()))?;
        Ok((json, html))
    }
}
