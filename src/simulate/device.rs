//! One simulated device: a task that connects (paced by the fleet's connect rate), subscribes,
//! sends telemetry and reported-property PATCHes on schedule, answers direct methods, completes
//! C2D messages, pings, churns, reconnects after failures with backoff, and drains its in-flight
//! messages when the run stops.
//!
//! The task's whole state is its future: the `Session` (socket, the few timers, the packet
//! ids and send times still waiting for an answer) plus the `select!` of one read, one timer
//! and the run's phase signal. Connecting (TCP, TLS, CONNECT/CONNACK) runs in a boxed future so its
//! transient size — a TLS handshake is large — is heap memory only while it runs. Device IDs,
//! topics and tokens are formatted when needed, not kept. A device therefore costs its socket
//! and well under 2 KiB while idle (measured in the report, `memory`).
//!
//! Timing: telemetry is open-loop at `--rate` per device from a random start (devices do not
//! send in lock-step), at QoS 1 with at most [`RATE_WINDOW`] PUBLISHes unacknowledged; a
//! device more than a second behind its schedule skips the missed messages and counts them
//! (`telemetry_skipped`). `--in-flight N` is closed-loop instead: N unacknowledged, the next
//! sent when a PUBACK arrives. Latency is PUBLISH written → PUBACK read.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use ntex::util::Bytes;
use ntex_mqtt::v3::codec::QoS;
use tokio::time::{Instant, sleep_until};

use super::fleet::{Fleet, Phase};
use super::mqtt::{Connection, Incoming, OpenError, Outbox, Transport};
use super::provision::device_key;
use super::stats::{ErrorKind, Stats};
use crate::auth::sas;

/// Most QoS 1 telemetry PUBLISHes a device keeps unacknowledged in rate mode.
pub const RATE_WINDOW: usize = 64;
/// Most reported PATCHes a device keeps unanswered.
const TWIN_WINDOW: usize = 16;
/// TCP connect + TLS + CONNECT → CONNACK must take less than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the last answers are awaited: when the run drains, and before a churn disconnect.
pub const DRAIN: Duration = Duration::from_secs(5);
/// Reconnect backoff after a failure: doubling from the first to the last, ± 50 % jitter.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The api-version sent in the CONNECT username (device-protocol §2.1).
const API_VERSION: &str = "2021-04-12";

/// Why a session ended.
enum End {
    /// The run is over.
    Stopped,
    /// `--churn` picked this device: reconnect now.
    Churn,
    /// The connection failed (already counted): reconnect after a backoff.
    Lost,
}

/// Runs device `index` until the run stops.
pub async fn run(fleet: Arc<Fleet>, index: u32) {
    let mut seq = 0u64;
    let mut failures = 0u32;
    loop {
        let slot = fleet.pacer.slot();
        if while_running(&fleet, index, sleep_until(slot)).await.is_none() {
            return;
        }
        Stats::add(&fleet.stats.counters.connect_attempts, 1);
        let started = Instant::now();
        let Some(opened) = while_running(&fleet, index, Box::pin(open(&fleet, index))).await else {
            return;
        };
        match opened {
            Ok(conn) => {
                fleet.stats.connected(started.elapsed());
                let end = Session::new(&fleet, index, conn).run(&mut seq).await;
                fleet.stats.went_offline();
                match end {
                    End::Stopped => return,
                    End::Churn => {
                        failures = 0;
                        continue;
                    }
                    End::Lost => failures += 1,
                }
            }
            Err((kind, detail)) => {
                fleet.stats.error(kind, || detail);
                failures += 1;
            }
        }
        let backoff = BACKOFF_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(5)).min(BACKOFF_MAX);
        let backoff = backoff.mul_f64(0.5 + rand::random::<f64>());
        if while_running(&fleet, index, tokio::time::sleep(backoff)).await.is_none() {
            return;
        }
    }
}

/// Runs `work` unless the run leaves [`Phase::Running`] first (then `None`).
pub(super) async fn while_running<T>(fleet: &Fleet, index: u32, work: impl Future<Output = T>) -> Option<T> {
    let stop = fleet.phase.changed(index);
    if fleet.phase.get() != Phase::Running {
        return None;
    }
    tokio::select! {
        r = work => Some(r),
        _ = stop => None,
    }
}

type Failure = (ErrorKind, String);

/// TCP (+ TLS), CONNECT, CONNACK, SUBSCRIBE — within [`CONNECT_TIMEOUT`].
async fn open(fleet: &Fleet, index: u32) -> Result<Connection, Failure> {
    match tokio::time::timeout(CONNECT_TIMEOUT, handshake(fleet, index)).await {
        Ok(r) => r,
        Err(_) => Err((ErrorKind::ConnectTimeout, format!("no CONNACK within {}s", CONNECT_TIMEOUT.as_secs()))),
    }
}

async fn handshake(fleet: &Fleet, index: u32) -> Result<Connection, Failure> {
    let source = match fleet.source_addrs.len() {
        0 => None,
        n => fleet.source_addrs.get(index as usize % n).copied(),
    };
    let transport = Transport::open(fleet.target, source, fleet.tls.as_ref()).await.map_err(|e| match e {
        OpenError::Tcp(e) => (ErrorKind::TcpConnect, format!("{}: {e}", fleet.target)),
        OpenError::Tls(e) => (ErrorKind::Tls, e.to_string()),
    })?;
    let mut conn = Connection::new(transport);
    let id = fleet.device_id(index);
    let mut out = Outbox::new();
    let (username, password) = match &fleet.hub {
        None => (None, None),
        Some(hub) => {
            let token =
                sas::sign(&format!("{}/devices/{id}", hub.host), &device_key(&hub.seed, &id), hub.token_expiry, None)
                    .map_err(|e| (ErrorKind::Protocol, e.to_string()))?;
            let username = format!("{}/{id}/?api-version={API_VERSION}&DeviceClientType=iothubd-simulate", hub.host);
            (Some(username), Some(token))
        }
    };
    let io = |e: std::io::Error| (ErrorKind::Io, e.to_string());
    out.connect(&id, username, password, fleet.keep_alive).map_err(io)?;
    conn.send(&mut out).await.map_err(io)?;
    loop {
        match conn.next_packet().map_err(|e| (ErrorKind::Protocol, e.to_string()))? {
            Some(Incoming::ConnAck(0)) => break,
            Some(Incoming::ConnAck(code)) => {
                fleet.stats.connack_code(code);
                return Err((ErrorKind::ConnackRefused, format!("CONNACK return code {code}")));
            }
            Some(other) => return Err((ErrorKind::Protocol, format!("{other:?} before CONNACK"))),
            None => {}
        }
        match poll_fn(|cx| conn.poll_fill(cx)).await {
            Ok(0) => return Err((ErrorKind::ClosedByBroker, "closed before CONNACK".into())),
            Ok(_) => {}
            Err(e) => return Err(io(e)),
        }
    }
    let filters = subscriptions(fleet, &id);
    if !filters.is_empty() {
        out.subscribe(1, filters).map_err(io)?;
        conn.send(&mut out).await.map_err(io)?;
    }
    Ok(conn)
}

/// The filters a device subscribes to (device-protocol §2.5); none in raw mode.
fn subscriptions(fleet: &Fleet, id: &str) -> Vec<(String, QoS)> {
    let mut filters = Vec::new();
    if fleet.hub.is_none() {
        return filters;
    }
    if fleet.methods {
        filters.push(("$iothub/methods/POST/#".to_owned(), QoS::AtMostOnce));
    }
    if fleet.twin_every.is_some() {
        filters.push(("$iothub/twin/res/#".to_owned(), QoS::AtMostOnce));
    }
    if fleet.c2d {
        // QoS 1: the PUBACK is what completes a C2D message (§2.8).
        filters.push((format!("devices/{id}/messages/devicebound/#"), QoS::AtLeastOnce));
    }
    filters
}

/// What woke the session up.
enum Wake {
    Read(std::io::Result<usize>),
    Timer,
    /// The run changed phase.
    Phase,
}

/// One connected device.
struct Session<'a> {
    fleet: &'a Fleet,
    index: u32,
    conn: Connection,
    /// Packet id of the last PUBLISH or SUBSCRIBE (1 is the SUBSCRIBE sent at connect).
    last_packet_id: u16,
    /// Telemetry waiting for its PUBACK: packet id, time written.
    in_flight: VecDeque<(u16, Instant)>,
    /// Reported PATCHes waiting for their answer: `$rid`, time written.
    twin_pending: VecDeque<(u32, Instant)>,
    next_rid: u32,
    next_send: Option<Instant>,
    next_twin: Option<Instant>,
    churn_at: Option<Instant>,
    last_write: Instant,
    ping_sent: Option<Instant>,
    /// Leaving: nothing new is sent. For churn, the last answers are awaited until this time,
    /// then the device reconnects; when the run drains, the device waits for [`Phase::Closing`].
    leaving: Option<Leave>,
}

/// Why a session is leaving.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leave {
    /// The run is draining.
    Drain,
    /// Churn: reconnect once answered, or at `until`.
    Churn { until: Instant },
}

impl Drop for Session<'_> {
    /// Whatever was still awaited when the session ended will not be answered.
    fn drop(&mut self) {
        self.fleet.stats.answered(self.in_flight.len() + self.twin_pending.len());
    }
}

/// A random time within one `period` from now: devices do not send in lock-step.
fn random_start(period: Duration) -> Instant {
    Instant::now() + period.mul_f64(rand::random::<f64>())
}

impl<'a> Session<'a> {
    fn new(fleet: &'a Fleet, index: u32, conn: Connection) -> Self {
        let now = Instant::now();
        Self {
            fleet,
            index,
            conn,
            last_packet_id: 1,
            in_flight: VecDeque::new(),
            twin_pending: VecDeque::new(),
            next_rid: 1,
            next_send: if fleet.in_flight.is_some() { Some(now) } else { fleet.send_every.map(random_start) },
            next_twin: fleet.twin_every.map(random_start),
            // Exponential gaps: churn events form a Poisson process at the fleet's rate.
            churn_at: fleet
                .churn_every
                .map(|mean| now + Duration::from_secs_f64(-mean * (1.0 - rand::random::<f64>()).ln())),
            last_write: now,
            ping_sent: None,
            leaving: None,
        }
    }

    async fn run(mut self, seq: &mut u64) -> End {
        loop {
            let phase_change = self.fleet.phase.changed(self.index);
            match self.fleet.phase.get() {
                Phase::Running => {}
                Phase::Draining => {
                    self.leaving = Some(Leave::Drain);
                }
                Phase::Closing => {
                    // DISCONNECT is a courtesy: the connection closes either way.
                    let mut out = Outbox::new();
                    if out.disconnect().is_ok() {
                        let _ = self.conn.send(&mut out).await;
                    }
                    return End::Stopped;
                }
            }
            let wake = if self.conn.has_frame() {
                // Bytes read with the CONNACK, or left by a read that hit its budget.
                Wake::Read(Ok(1))
            } else {
                let wake_at = self.wake_at();
                tokio::select! {
                    r = poll_fn(|cx| self.conn.poll_fill(cx)) => Wake::Read(r),
                    _ = sleep_until(wake_at) => Wake::Timer,
                    _ = phase_change => Wake::Phase,
                }
            };
            // Made per wake-up, not kept: an outbox holds a page list, and an idle device
            // should hold nothing.
            let mut out = Outbox::new();
            let step = match wake {
                Wake::Read(Ok(0)) => Err((ErrorKind::ClosedByBroker, "the broker closed the connection".to_owned())),
                Wake::Read(Ok(_)) => self.read_packets(&mut out),
                Wake::Read(Err(e)) => Err((ErrorKind::Io, e.to_string())),
                Wake::Timer | Wake::Phase => Ok(()),
            };
            let step = step.and_then(|()| self.on_time(&mut out, seq));
            let end = match step {
                Ok(end) => end,
                Err((kind, detail)) => {
                    self.fleet.stats.error(kind, || detail);
                    Stats::add(&self.fleet.stats.counters.disconnects, 1);
                    return End::Lost;
                }
            };
            if end.is_some() {
                // DISCONNECT is a courtesy: churn reconnects either way.
                let _ = out.disconnect();
            }
            if !out.is_empty() {
                if let Err(e) = self.conn.send(&mut out).await {
                    if let Some(end) = end {
                        return end;
                    }
                    self.fleet.stats.error(ErrorKind::Io, || e.to_string());
                    Stats::add(&self.fleet.stats.counters.disconnects, 1);
                    return End::Lost;
                }
                self.last_write = Instant::now();
            }
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// The next moment something is due: telemetry, a PATCH, a ping, churn or the drain's end.
    fn wake_at(&self) -> Instant {
        let keep_alive = Duration::from_secs(u64::from(self.fleet.keep_alive));
        let mut at = match self.ping_sent {
            Some(sent) => sent + keep_alive,
            None => self.last_write + keep_alive.mul_f64(0.75),
        };
        match self.leaving {
            Some(Leave::Churn { until }) => return at.min(until),
            // Draining: nothing is due but pings; the end comes with the next phase.
            Some(Leave::Drain) => return at,
            None => {}
        }
        // With the window full nothing can go before an ack: in saturation mode acks alone
        // trigger sends; in rate mode wake a second late to count skipped messages.
        if let Some(t) = self.next_send {
            match (self.fleet.in_flight, self.window_full()) {
                (_, false) => at = at.min(t),
                (None, true) => at = at.min(t + Duration::from_secs(1)),
                (Some(_), true) => {}
            }
        }
        if let Some(t) = self.next_twin {
            at = at.min(t);
        }
        if let Some(t) = self.churn_at {
            at = at.min(t);
        }
        at
    }

    fn window_full(&self) -> bool {
        let window = self.fleet.in_flight.unwrap_or(RATE_WINDOW);
        self.fleet.qos == QoS::AtLeastOnce && self.in_flight.len() >= window
    }

    fn packet_id(&mut self) -> u16 {
        self.last_packet_id = self.last_packet_id.checked_add(1).unwrap_or(1);
        self.last_packet_id
    }

    /// Handles every complete packet read so far.
    fn read_packets(&mut self, out: &mut Outbox) -> Result<(), Failure> {
        while let Some(packet) = self.conn.next_packet().map_err(|e| (ErrorKind::Protocol, e.to_string()))? {
            self.on_packet(packet, out)?;
        }
        Ok(())
    }

    fn on_packet(&mut self, packet: Incoming, out: &mut Outbox) -> Result<(), Failure> {
        let stats = &self.fleet.stats;
        match packet {
            Incoming::PubAck(id) => {
                let at = match self.in_flight.front() {
                    Some((front, _)) if *front == id => Some(0),
                    _ => self.in_flight.iter().position(|(p, _)| *p == id),
                };
                match at.and_then(|i| self.in_flight.remove(i)) {
                    Some((_, sent)) => {
                        stats.answered(1);
                        stats.telemetry_acked(sent.elapsed());
                    }
                    None => stats.error(ErrorKind::UnexpectedAck, || format!("PUBACK {id} matches no PUBLISH")),
                }
            }
            Incoming::SubAck { refused } if refused > 0 => {
                stats.error(ErrorKind::SubscribeRefused, || format!("{refused} filter(s) refused"));
            }
            Incoming::SubAck { .. } => {}
            Incoming::PingResp => self.ping_sent = None,
            Incoming::Publish { topic, qos, packet_id, payload } => {
                if qos != QoS::AtMostOnce
                    && let Some(id) = packet_id
                {
                    out.puback(id).map_err(|e| (ErrorKind::Io, e.to_string()))?;
                }
                self.on_publish(&topic, payload, out)?;
            }
            Incoming::ConnAck(_) => return Err((ErrorKind::Protocol, "a second CONNACK".into())),
            Incoming::Unexpected(what) => return Err((ErrorKind::Protocol, format!("the broker sent {what}"))),
        }
        Ok(())
    }

    /// A PUBLISH from the hub: a twin answer, a method request or a C2D message (§2.5).
    fn on_publish(&mut self, topic: &str, _payload: Bytes, out: &mut Outbox) -> Result<(), Failure> {
        let stats = &self.fleet.stats;
        if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
            // `{status}/?$rid={rid}[&$version={v}]`
            let status: u16 = rest.split('/').next().and_then(|s| s.parse().ok()).unwrap_or(0);
            let rid: Option<u32> = rid_of(rest).and_then(|r| r.parse().ok());
            let pending = rid.and_then(|rid| self.twin_pending.iter().position(|(r, _)| *r == rid));
            let answer = pending.and_then(|i| self.twin_pending.remove(i));
            if answer.is_some() {
                stats.answered(1);
            }
            match answer {
                Some((_, sent)) if (200..300).contains(&status) => stats.twin_acked(sent.elapsed()),
                Some(_) => stats.error(ErrorKind::TwinRejected, || format!("reported PATCH answered {status}")),
                None => stats.error(ErrorKind::Protocol, || format!("twin answer for no request: {topic}")),
            }
        } else if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
            let rid = rid_of(rest).unwrap_or("");
            let method = rest.split('/').next().unwrap_or("");
            let body = serde_json::json!({ "device": self.fleet.device_id(self.index), "method": method });
            out.publish(
                format!("$iothub/methods/res/200/?$rid={rid}"),
                QoS::AtMostOnce,
                0,
                Bytes::from(body.to_string()),
            )
            .map_err(|e| (ErrorKind::Io, e.to_string()))?;
            Stats::add(&stats.counters.methods_answered, 1);
        } else if topic.contains("/messages/devicebound/") {
            Stats::add(&stats.counters.c2d_received, 1);
        }
        Ok(())
    }

    /// Whatever has come due: telemetry, twin PATCHes, the keep-alive ping, churn, the end.
    fn on_time(&mut self, out: &mut Outbox, seq: &mut u64) -> Result<Option<End>, Failure> {
        let now = Instant::now();
        let fleet = self.fleet;
        let keep_alive = Duration::from_secs(u64::from(fleet.keep_alive));
        if self.ping_sent.is_some_and(|sent| now >= sent + keep_alive) {
            return Err((ErrorKind::Io, format!("no PINGRESP within {}s", fleet.keep_alive)));
        }
        if self.leaving.is_none() && fleet.phase.get() != Phase::Running {
            // The run began draining since this wake-up: send nothing more.
            self.leaving = Some(Leave::Drain);
        }
        if self.leaving.is_none() && self.churn_at.is_some_and(|t| now >= t) {
            Stats::add(&fleet.stats.counters.churn_disconnects, 1);
            self.leaving = Some(Leave::Churn { until: now + DRAIN });
        }
        match self.leaving {
            Some(Leave::Churn { until }) => {
                if (self.in_flight.is_empty() && self.twin_pending.is_empty()) || now >= until {
                    return Ok(Some(End::Churn));
                }
            }
            Some(Leave::Drain) => {}
            None => {
                self.send_telemetry(now, out, seq)?;
                self.send_twin(now, out)?;
            }
        }
        if out.is_empty() && self.ping_sent.is_none() && now >= self.last_write + keep_alive.mul_f64(0.75) {
            out.ping().map_err(|e| (ErrorKind::Io, e.to_string()))?;
            self.ping_sent = Some(now);
        }
        Ok(None)
    }

    fn send_telemetry(&mut self, now: Instant, out: &mut Outbox, seq: &mut u64) -> Result<(), Failure> {
        let fleet = self.fleet;
        let Some(mut due) = self.next_send else {
            return Ok(());
        };
        let interval = fleet.send_every.unwrap_or_default();
        while due <= now && !self.window_full() {
            self.publish_one(out, seq)?;
            if fleet.in_flight.is_none() {
                due += interval;
            }
        }
        self.next_send = Some(fleet.skip_missed(due, now));
        Ok(())
    }

    fn publish_one(&mut self, out: &mut Outbox, seq: &mut u64) -> Result<(), Failure> {
        let fleet = self.fleet;
        *seq += 1;
        let id = fleet.device_id(self.index);
        let body = fleet.payload.render(&id, *seq, super::unix_millis());
        let packet_id = if fleet.qos == QoS::AtLeastOnce { self.packet_id() } else { 0 };
        out.publish(fleet.telemetry_topic(self.index), fleet.qos, packet_id, Bytes::from(body))
            .map_err(|e| (ErrorKind::Io, e.to_string()))?;
        if fleet.qos == QoS::AtLeastOnce {
            self.in_flight.push_back((packet_id, Instant::now()));
            fleet.stats.awaiting_answers(1);
        }
        Stats::add(&fleet.stats.counters.telemetry_sent, 1);
        Ok(())
    }

    fn send_twin(&mut self, now: Instant, out: &mut Outbox) -> Result<(), Failure> {
        let (Some(due), Some(every)) = (self.next_twin, self.fleet.twin_every) else {
            return Ok(());
        };
        if due > now {
            return Ok(());
        }
        // One PATCH per wake-up at most; a device far behind just sends the next one.
        self.next_twin = Some((due + every).max(now));
        if self.twin_pending.len() >= TWIN_WINDOW {
            return Ok(());
        }
        let rid = self.next_rid;
        self.next_rid = self.next_rid.wrapping_add(1);
        let body = serde_json::json!({ "simulator": { "rid": rid, "ts": super::unix_millis() } });
        out.publish(
            format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
            QoS::AtMostOnce,
            0,
            Bytes::from(body.to_string()),
        )
        .map_err(|e| (ErrorKind::Io, e.to_string()))?;
        self.twin_pending.push_back((rid, Instant::now()));
        self.fleet.stats.awaiting_answers(1);
        Stats::add(&self.fleet.stats.counters.twin_sent, 1);
        Ok(())
    }
}

/// The `$rid` of a twin or method topic's query: up to the next `&` (Node appends more).
fn rid_of(topic_rest: &str) -> Option<&str> {
    let (_, query) = topic_rest.split_once("?")?;
    query.split('&').find_map(|kv| kv.strip_prefix("$rid=").or_else(|| kv.strip_prefix("%24rid=")))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::super::fleet::{Pacer, RunPhase};
    use super::super::payload::PayloadTemplate;
    use super::super::scenario::Mode;
    use super::*;

    #[test]
    fn rids_are_read_from_twin_and_method_topics() {
        assert_eq!(rid_of("204/?$rid=17&$version=4"), Some("17"));
        assert_eq!(rid_of("reboot/?$rid=abc"), Some("abc"));
        assert_eq!(rid_of("reboot/"), None);
    }

    #[test]
    fn a_device_task_future_fits_in_one_kib() {
        let fleet = Arc::new(Fleet {
            mode: Mode::Azure,
            target: SocketAddr::from(([127, 0, 0, 1], 1)),
            tls: None,
            source_addrs: Vec::new(),
            hub: None,
            https: None,
            prefix: "sim-".into(),
            qos: QoS::AtLeastOnce,
            send_every: Some(Duration::from_secs(1)),
            in_flight: None,
            twin_every: None,
            churn_every: None,
            keep_alive: 60,
            methods: true,
            c2d: true,
            payload: PayloadTemplate::sized(256),
            property_bag: String::new(),
            pacer: Pacer::new(1.0),
            stats: Stats::new(),
            phase: RunPhase::default(),
        });
        let task = run(fleet, 0);
        let size = std::mem::size_of_val(&task);
        eprintln!("device task future: {size} bytes");
        assert!(size <= 1024, "the device future grew to {size} bytes");
    }
}
