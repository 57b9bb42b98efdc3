//! What every device task shares, in one `Arc`: the [`Fleet`] (settings of the run, the
//! connect [`Pacer`], the [`Stats`]), the [`ReadySet`] of devices the service load may address,
//! and the [`RunPhase`] through which the controller ends the run.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::time::Duration;

use ntex_mqtt::v3::codec::QoS;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::https::HttpsDevices;
use super::mqtt::TlsTarget;
use super::payload::PayloadTemplate;
use super::scenario::Mode;
use super::service::Stamp;
use super::stats::Stats;

/// Hands out connect times `1 / rate` apart, over every device and reconnect: a token bucket
/// with a burst of one.
pub struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    pub fn new(per_second: f64) -> Self {
        Self { interval: Duration::from_secs_f64(1.0 / per_second), next: Mutex::new(Instant::now()) }
    }

    /// The time at which the caller may connect.
    pub fn slot(&self) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let slot = (*next).max(Instant::now());
        *next = slot + self.interval;
        slot
    }
}

/// The Azure side of a device: the hub's host name, and what device keys derive from.
pub struct HubDevices {
    pub host: String,
    pub seed: String,
    /// Expiry (Unix seconds) of every device token: the end of the run plus an hour.
    pub token_expiry: u64,
}

/// What every device task shares (one `Arc`).
pub struct Fleet {
    pub mode: Mode,
    pub target: SocketAddr,
    pub tls: Option<TlsTarget>,
    pub source_addrs: Vec<IpAddr>,
    /// `Some` in Azure mode.
    pub hub: Option<HubDevices>,
    /// `Some` with `--transport https`: devices run [`super::https::run`], not MQTT.
    pub https: Option<HttpsDevices>,
    pub prefix: String,
    pub qos: QoS,
    /// Telemetry interval per device; `None` = no telemetry.
    pub send_every: Option<Duration>,
    pub in_flight: Option<usize>,
    pub twin_every: Option<Duration>,
    /// Twin storm: reported PATCHes each device keeps unanswered (`--twin-in-flight`).
    pub twin_in_flight: Option<usize>,
    /// Mean time between churn disconnects of one device; `None` = no churn.
    pub churn_every: Option<f64>,
    pub keep_alive: u16,
    pub methods: bool,
    pub c2d: bool,
    pub payload: PayloadTemplate,
    pub property_bag: String,
    pub pacer: Pacer,
    pub stats: Stats,
    pub phase: RunPhase,
    /// Which devices are connected and subscribed.
    pub ready: ReadySet,
    /// Marks this run's service C2D messages ([`Stamp`]), told apart from older ones still queued.
    pub run_id: u64,
}

/// The devices of the shard that are connected with their subscriptions granted (or an HTTPS
/// device answered): the ones the service load addresses. One byte per device.
pub struct ReadySet {
    first: u32,
    flags: Vec<AtomicBool>,
    count: AtomicU32,
}

impl ReadySet {
    /// Devices `first..first + len`, none ready.
    pub fn new(first: u32, len: u32) -> Self {
        Self { first, flags: (0..len).map(|_| AtomicBool::new(false)).collect(), count: AtomicU32::new(0) }
    }

    pub fn set(&self, index: u32, ready: bool) {
        let Some(flag) = index.checked_sub(self.first).and_then(|i| self.flags.get(i as usize)) else {
            return;
        };
        if flag.swap(ready, Ordering::Relaxed) != ready {
            if ready {
                self.count.fetch_add(1, Ordering::Relaxed);
            } else {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Every device of the shard is ready.
    pub fn all(&self) -> bool {
        self.count.load(Ordering::Relaxed) as usize == self.flags.len()
    }

    /// The first ready device at or after `cursor` (round the shard once), and moves `cursor`
    /// past it: round-robin over the ready devices.
    pub fn next(&self, cursor: &mut usize) -> Option<u32> {
        let len = self.flags.len();
        for step in 0..len {
            let i = (*cursor + step) % len;
            if self.flags[i].load(Ordering::Relaxed) {
                *cursor = (i + 1) % len;
                return u32::try_from(i).ok().map(|i| self.first + i);
            }
        }
        None
    }
}

/// How a run ends, in two steps, so that the last acks are not measured behind the broker's
/// work of closing every connection at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Running = 0,
    /// No new messages; connected devices wait for the answers still due, and stay connected.
    Draining = 1,
    /// Devices send DISCONNECT and end.
    Closing = 2,
}

/// Devices wait for a phase change on one of this many `Notify`s (by device index): each wait
/// registers with its `Notify` under a lock, and spreading them keeps that lock uncontended.
const PHASE_SHARDS: usize = 8;

/// The run's current [`Phase`], and the signal that it changed.
#[derive(Default)]
pub struct RunPhase {
    current: AtomicU8,
    changed: [Notify; PHASE_SHARDS],
}

impl RunPhase {
    /// Moves the run to `phase` and wakes every device.
    pub fn enter(&self, phase: Phase) {
        self.current.store(phase as u8, Ordering::SeqCst);
        for signal in &self.changed {
            signal.notify_waiters();
        }
    }

    pub fn get(&self) -> Phase {
        match self.current.load(Ordering::SeqCst) {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Closing,
        }
    }

    /// Resolves at the next phase change after this call. Taken *before* reading the phase, a
    /// change between the two still completes it (`Notified` counts `notify_waiters` calls made
    /// after its creation).
    pub(super) fn changed(&self, index: u32) -> tokio::sync::futures::Notified<'_> {
        self.changed[index as usize % PHASE_SHARDS].notified()
    }
}

impl Fleet {
    /// In rate mode, a telemetry schedule a second or more behind `now` (its window full)
    /// skips the missed messages — counted — to the next slot after `now` rather than burst
    /// them when the acks come back. Closed-loop (`--in-flight`) schedules are left alone.
    pub fn skip_missed(&self, due: Instant, now: Instant) -> Instant {
        let interval = self.send_every.unwrap_or_default();
        if self.in_flight.is_some() || interval.is_zero() || due + Duration::from_secs(1) > now {
            return due;
        }
        let missed = ((now - due).as_secs_f64() / interval.as_secs_f64()).floor() + 1.0;
        Stats::add(&self.stats.counters.telemetry_skipped, missed as u64);
        due + interval.mul_f64(missed)
    }

    pub(super) fn device_id(&self, index: u32) -> String {
        format!("{}{index}", self.prefix)
    }

    /// A device received a C2D message: counted, and when it is one of this run's service
    /// messages, delivered with its send → receive latency.
    pub(super) fn c2d_received(&self, payload: &[u8]) {
        Stats::add(&self.stats.counters.c2d_received, 1);
        if let Some(stamp) = Stamp::parse(payload).filter(|s| s.run == self.run_id) {
            self.stats.c2d_delivered(stamp.age());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_spaces_connects_by_the_rate() {
        let pacer = Pacer::new(100.0);
        let a = pacer.slot();
        let b = pacer.slot();
        assert_eq!(b - a, Duration::from_millis(10));
    }

    #[test]
    fn ready_devices_are_addressed_round_robin() {
        let ready = ReadySet::new(10, 4);
        let mut cursor = 0;
        assert_eq!(ready.next(&mut cursor), None);
        ready.set(11, true);
        ready.set(13, true);
        ready.set(13, true);
        ready.set(99, true);
        let picks: Vec<_> = (0..3).filter_map(|_| ready.next(&mut cursor)).collect();
        assert_eq!(picks, [11, 13, 11]);
        assert!(!ready.all());
        ready.set(10, true);
        ready.set(12, true);
        assert!(ready.all());
        ready.set(12, false);
        assert!(!ready.all());
    }
}
