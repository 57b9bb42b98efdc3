//! The service side of a run: what a load tester's back end does to the fleet — invoke direct
//! methods on the simulated devices (`--method-rate`, `--method-in-flight`) and send them C2D
//! messages (`--c2d-rate`, `--c2d-in-flight`) — measured as the service and the devices see it.
//!
//! - Against a hub ([`rest`]): its REST API, `POST /twins/{id}/methods` and
//!   `POST /devices/{id}/messages/deviceBound` (or, with `--c2d-batch N`, the batch send
//!   `POST /messages/deviceBound` of N messages), with a policy token of the connection string.
//! - In raw mode ([`broker`]): an MQTT service client of the broker plays the hub's part,
//!   publishing method requests and C2D messages to per-device topics and reading the answers
//!   (the topics are in [`super::topics`]); a twin responder answers the devices' twin requests.
//!
//! Decisions, and why:
//! - **The load begins once every device of the shard is ready** (connected, subscriptions
//!   granted): what is measured is N connected devices under the load, not the connect storm.
//!   Devices are addressed round-robin among the ready ones ([`super::fleet::ReadySet`]), so a
//!   device churning away is skipped rather than turned into an error.
//! - **Pacing** as for telemetry: open-loop at the rate, with at most [`RATE_WINDOW`] operations
//!   of a kind outstanding, a slot missed (window full, no device ready) or more than a second
//!   late being skipped and counted (`service_skipped`); or closed-loop with `--*-in-flight N`,
//!   the next operation made as one is answered. Rates are per process (each `--shard` drives
//!   its own devices), as `--connect-rate`.
//! - **Measured**: a method call from request to answer at the service; a C2D send's
//!   acceptance (the hub's 204 once the message is durable, the broker's PUBACK), then its
//!   delivery from send to receipt at the device, through a [`Stamp`] in the body (the send
//!   time and the run's id, so messages of an earlier run still queued at the hub are not
//!   counted as this run's). The drain at the end waits for accepted messages to arrive.

pub mod broker;
pub mod rest;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use ntex::util::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::{Instant, sleep_until};

use super::device::while_running;
use super::fleet::{Fleet, Phase};
use super::stats::{ErrorKind, Stats};

/// Most messages in one `--c2d-batch` (the hub's batch send takes up to 1,000).
pub const MAX_C2D_BATCH: usize = 1000;
/// Most operations of one kind outstanding in rate mode.
pub const RATE_WINDOW: usize = 256;
/// Largest `--*-in-flight`.
const MAX_IN_FLIGHT: u32 = 10_000;
/// How long a device has to answer a method call (the REST call's `responseTimeoutInSeconds`).
pub const METHOD_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the service checks whether every device is ready, before the load begins.
const READY_POLL: Duration = Duration::from_millis(50);
/// A slot later than this is skipped rather than made.
const LATE: Duration = Duration::from_secs(1);

/// Why an operation failed, as the report counts it.
pub type Failure = (ErrorKind, String);
/// An operation in progress: a method call (its round trip) or a C2D send (accepted).
pub type Operation<'a, T> = Pin<Box<dyn Future<Output = Result<T, Failure>> + Send + 'a>>;

/// How one kind of service operation is driven.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    Off,
    /// Operations per second over the devices of this process.
    Rate(f64),
    /// Operations kept outstanding; the next is made as one is answered.
    InFlight(usize),
}

impl Load {
    /// The load of `--{name}-rate` and `--{name}-in-flight` (which wins, as `--in-flight` does
    /// over `--rate`).
    pub fn of(name: &str, rate: Option<f64>, in_flight: Option<u32>) -> anyhow::Result<Self> {
        if let Some(n) = in_flight {
            if n == 0 || n > MAX_IN_FLIGHT {
                bail!("--{name}-in-flight must be between 1 and {MAX_IN_FLIGHT}");
            }
            return Ok(Load::InFlight(n as usize));
        }
        match rate {
            None => Ok(Load::Off),
            Some(r) if !r.is_finite() || r < 0.0 => bail!("--{name}-rate must be a number ≥ 0, not {r}"),
            Some(0.0) => Ok(Load::Off),
            Some(r) => Ok(Load::Rate(r)),
        }
    }

    pub fn is_on(self) -> bool {
        self != Load::Off
    }

    /// As the report's scenario shows it.
    pub fn describe(self) -> Value {
        match self {
            Load::Off => Value::Null,
            Load::Rate(r) => json!({ "rate": r }),
            Load::InFlight(n) => json!({ "in_flight": n }),
        }
    }
}

/// The service load of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServiceLoad {
    pub methods: Load,
    pub c2d: Load,
    /// C2D messages per send (1 = one request per message).
    pub c2d_batch: usize,
}

impl ServiceLoad {
    pub fn is_on(&self) -> bool {
        self.methods.is_on() || self.c2d.is_on()
    }
}

/// What a service C2D message carries, so the device can tell its latency and whether it is
/// one of this run's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub run: u64,
    pub seq: u64,
    /// Unix time of the send, µs.
    pub sent_us: u64,
}

impl Stamp {
    pub fn now(run: u64, seq: u64) -> Self {
        Self { run, seq, sent_us: super::unix_micros() }
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(json!({ "run": self.run, "seq": self.seq, "sent_us": self.sent_us }).to_string())
    }

    /// The stamp of a message body; `None` for any other body.
    pub fn parse(body: &[u8]) -> Option<Self> {
        serde_json::from_slice(body).ok()
    }

    /// Time since the send (both ends are this process' clock).
    pub fn age(&self) -> Duration {
        Duration::from_micros(super::unix_micros().saturating_sub(self.sent_us))
    }
}

/// Who carries the operations out.
pub enum Backend {
    /// The hub's REST API.
    Rest(rest::Rest),
    /// The raw service client of the broker.
    Broker(broker::ServiceClient),
}

impl Backend {
    fn call_method<'a>(&'a self, fleet: &'a Fleet, index: u32) -> Operation<'a, Duration> {
        match self {
            Backend::Rest(r) => r.call_method(fleet, index),
            Backend::Broker(b) => b.call_method(index),
        }
    }

    /// Sends one message per `(device, stamp)`: one request when there are several (the
    /// hub's batch send), or the PUBLISHes written together (raw mode); accepted when all are.
    fn send_c2d<'a>(&'a self, fleet: &'a Fleet, messages: Vec<(u32, Stamp)>) -> Operation<'a, ()> {
        match (self, messages.as_slice()) {
            (Backend::Rest(r), [(index, stamp)]) => r.send_c2d(fleet, *index, *stamp),
            (Backend::Rest(r), _) => r.send_c2d_batch(fleet, messages),
            (Backend::Broker(b), _) => {
                let sends: Vec<_> = messages.iter().map(|(index, stamp)| b.send_c2d(*index, stamp.body())).collect();
                Box::pin(async move { futures::future::try_join_all(sends).await.map(|_| ()) })
            }
        }
    }
}

/// An open-loop schedule: one slot every `interval` from `next`.
struct Schedule {
    interval: Duration,
    next: Instant,
}

impl Schedule {
    /// The slots come due by `now`: how many to make, and how many are over [`LATE`] and
    /// skipped. The schedule moves past them.
    fn take_due(&mut self, now: Instant) -> (u64, u64) {
        if self.next > now || self.interval.is_zero() {
            return (0, 0);
        }
        let slots = ((now - self.next).as_secs_f64() / self.interval.as_secs_f64()).floor() as u64 + 1;
        let late = match (now - self.next).checked_sub(LATE) {
            Some(over) => (over.as_secs_f64() / self.interval.as_secs_f64()).ceil() as u64,
            None => 0,
        };
        self.next += self.interval.mul_f64(slots as f64);
        (slots - late.min(slots), late.min(slots))
    }
}

/// One kind of operation under way.
struct Kind {
    load: Load,
    schedule: Option<Schedule>,
    outstanding: usize,
    /// Round-robin position among the devices.
    cursor: usize,
}

impl Kind {
    fn new(load: Load, now: Instant) -> Self {
        let schedule = match load {
            Load::Rate(r) => Some(Schedule { interval: Duration::from_secs_f64(1.0 / r), next: now }),
            _ => None,
        };
        Self { load, schedule, outstanding: 0, cursor: 0 }
    }

    /// How many operations to make now (the rest of the due slots counted as skipped), and
    /// when to look again.
    fn due(&mut self, now: Instant, stats: &Stats) -> (usize, Option<Instant>) {
        match (self.load, &mut self.schedule) {
            (Load::InFlight(n), _) => (n.saturating_sub(self.outstanding), None),
            (Load::Rate(_), Some(schedule)) => {
                let (due, late) = schedule.take_due(now);
                let room = RATE_WINDOW.saturating_sub(self.outstanding) as u64;
                Stats::add(&stats.counters.service_skipped, late + due.saturating_sub(room));
                (due.min(room) as usize, Some(schedule.next))
            }
            _ => (0, None),
        }
    }

    /// The devices the operations due now address, round-robin among the ready ones (counted
    /// as outstanding), and when to look again. A rate slot with no device ready is skipped; a
    /// window that cannot be filled is looked at again shortly.
    fn targets(&mut self, now: Instant, fleet: &Fleet) -> (Vec<u32>, Option<Instant>) {
        let (due, mut next) = self.due(now, &fleet.stats);
        let targets: Vec<u32> = (0..due).map_while(|_| fleet.ready.next(&mut self.cursor)).collect();
        if targets.len() < due {
            match self.load {
                Load::Rate(_) => Stats::add(&fleet.stats.counters.service_skipped, (due - targets.len()) as u64),
                _ => next = Some(now + READY_POLL),
            }
        }
        self.outstanding += targets.len();
        (targets, next)
    }
}

/// An answer to one operation.
enum Done {
    Method(Result<Duration, Failure>),
    /// A send of this many C2D messages.
    C2d(usize, Result<(), Failure>),
}

/// Runs the service load until the run closes: waits for every device to be ready, then makes
/// the operations of `load` through `backend`.
pub async fn run(fleet: Arc<Fleet>, load: ServiceLoad, backend: Backend) {
    while !fleet.ready.all() {
        if while_running(&fleet, 0, tokio::time::sleep(READY_POLL)).await.is_none() {
            return;
        }
    }
    fleet.stats.service_started();
    let stats = &fleet.stats;
    let now = Instant::now();
    let (mut methods, mut c2d) = (Kind::new(load.methods, now), Kind::new(load.c2d, now));
    let mut seq = 0u64;
    let mut pending: FuturesUnordered<Pin<Box<dyn Future<Output = Done> + Send + '_>>> = FuturesUnordered::new();
    loop {
        let phase_change = fleet.phase.changed(0);
        let phase = fleet.phase.get();
        if phase == Phase::Closing {
            stats.answered(pending.len());
            return;
        }
        let now = Instant::now();
        let mut wake_at = now + Duration::from_secs(3600);
        if phase == Phase::Running {
            let (targets, next) = methods.targets(now, &fleet);
            for index in targets {
                Stats::add(&stats.counters.methods_called, 1);
                stats.awaiting_answers(1);
                let call = backend.call_method(&fleet, index);
                pending.push(Box::pin(async move { Done::Method(call.await) }));
            }
            let (targets, next_c2d) = c2d.targets(now, &fleet);
            for batch in targets.chunks(load.c2d_batch) {
                let messages: Vec<(u32, Stamp)> = batch
                    .iter()
                    .map(|&index| {
                        seq += 1;
                        (index, Stamp::now(fleet.run_id, seq))
                    })
                    .collect();
                let count = messages.len();
                Stats::add(&stats.counters.c2d_sent, count as u64);
                stats.awaiting_answers(1);
                let send = backend.send_c2d(&fleet, messages);
                pending.push(Box::pin(async move { Done::C2d(count, send.await) }));
            }
            for at in [next, next_c2d].into_iter().flatten() {
                wake_at = wake_at.min(at);
            }
        }
        tokio::select! {
            Some(done) = pending.next(), if !pending.is_empty() => {
                stats.answered(1);
                match done {
                    Done::Method(result) => {
                        methods.outstanding -= 1;
                        match result {
                            Ok(latency) => stats.method_succeeded(latency),
                            Err((kind, detail)) => stats.error(kind, || detail),
                        }
                    }
                    Done::C2d(count, result) => {
                        c2d.outstanding -= count;
                        match result {
                            Ok(()) => Stats::add(&stats.counters.c2d_accepted, count as u64),
                            Err((kind, detail)) => stats.error(kind, || detail),
                        }
                    }
                }
            }
            _ = sleep_until(wake_at) => {}
            _ = phase_change => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_come_from_a_rate_or_a_window() {
        assert_eq!(Load::of("method", None, None).ok(), Some(Load::Off));
        assert_eq!(Load::of("method", Some(0.0), None).ok(), Some(Load::Off));
        assert_eq!(Load::of("method", Some(250.0), None).ok(), Some(Load::Rate(250.0)));
        assert_eq!(Load::of("c2d", Some(250.0), Some(64)).ok(), Some(Load::InFlight(64)));
        let err = |r, n| Load::of("c2d", r, n).expect_err("refused").to_string();
        assert!(err(Some(-1.0), None).contains("--c2d-rate"));
        assert!(err(None, Some(0)).contains("--c2d-in-flight"));
        assert!(err(None, Some(MAX_IN_FLIGHT + 1)).contains("--c2d-in-flight"));
    }

    #[test]
    fn a_schedule_makes_due_slots_and_skips_those_over_a_second_late() {
        let start = Instant::now();
        let mut s = Schedule { interval: Duration::from_millis(10), next: start };
        assert_eq!(s.take_due(start), (1, 0));
        assert_eq!(s.take_due(start + Duration::from_millis(5)), (0, 0));
        assert_eq!(s.take_due(start + Duration::from_millis(35)), (3, 0));
        assert_eq!(s.next, start + Duration::from_millis(40));
        // 1.5 s later: 151 slots due, the 50 more than a second late skipped.
        assert_eq!(s.take_due(start + Duration::from_millis(1540)), (101, 50));
        assert_eq!(s.next, start + Duration::from_millis(1550));
    }

    #[test]
    fn a_full_window_skips_rate_slots_and_in_flight_refills_it() {
        let stats = Stats::new();
        let now = Instant::now();
        let mut rate = Kind::new(Load::Rate(1000.0), now);
        rate.outstanding = RATE_WINDOW - 2;
        let (due, next) = rate.due(now + Duration::from_millis(4), &stats);
        assert_eq!((due, next), (2, Some(now + Duration::from_millis(5))));
        assert_eq!(stats.snapshot().service_skipped, 3);
        let mut window = Kind::new(Load::InFlight(8), now);
        window.outstanding = 5;
        assert_eq!(window.due(now, &stats), (3, None));
    }

    #[test]
    fn stamps_round_trip_and_other_bodies_are_not_stamps() {
        let stamp = Stamp::now(7, 3);
        assert_eq!(Stamp::parse(&stamp.body()), Some(stamp));
        assert_eq!(Stamp::parse(b"{\"on\":true}"), None);
        assert_eq!(Stamp::parse(b"\xff"), None);
        assert!(stamp.age() < Duration::from_secs(60));
    }
}
