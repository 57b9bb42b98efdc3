//! One connected device ([`Session`]): reads what the broker sends (acks, twin answers, method
//! requests, C2D messages), sends what has come due (telemetry, reported PATCHes, pings), leaves
//! for churn or the end of the run, and says why it ended ([`End`]).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::time::Duration;

use ntex::util::Bytes;
use ntex_mqtt::v3::codec::QoS;
use tokio::time::{Instant, sleep_until};

use super::{DRAIN, Failure, RATE_WINDOW, TWIN_WINDOW};
use crate::simulate::fleet::{Fleet, Phase};
use crate::simulate::mqtt::{Connection, Incoming, Outbox};
use crate::simulate::scenario::Mode;
use crate::simulate::stats::{ErrorKind, Stats};
use crate::simulate::topics::{self, ToDevice};

/// Why a session ended.
pub(super) enum End {
    /// The run is over.
    Stopped,
    /// `--churn` picked this device: reconnect now.
    Churn,
    /// The connection failed (already counted): reconnect after a backoff.
    Lost,
}

/// What woke the session up.
enum Wake {
    Read(std::io::Result<usize>),
    Timer,
    /// The run changed phase.
    Phase,
}

/// One connected device.
pub(super) struct Session<'a> {
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
        self.fleet.ready.set(self.index, false);
    }
}

/// A random time within one `period` from now: devices do not send in lock-step.
fn random_start(period: Duration) -> Instant {
    Instant::now() + period.mul_f64(rand::random::<f64>())
}

impl<'a> Session<'a> {
    pub(super) fn new(fleet: &'a Fleet, index: u32, conn: Connection) -> Self {
        let now = Instant::now();
        if !topics::subscribes(fleet) {
            fleet.ready.set(index, true);
        }
        Self {
            fleet,
            index,
            conn,
            last_packet_id: 1,
            in_flight: VecDeque::new(),
            twin_pending: VecDeque::new(),
            next_rid: 1,
            next_send: if fleet.in_flight.is_some() { Some(now) } else { fleet.send_every.map(random_start) },
            next_twin: if fleet.twin_in_flight.is_some() { Some(now) } else { fleet.twin_every.map(random_start) },
            // Exponential gaps: churn events form a Poisson process at the fleet's rate.
            churn_at: fleet
                .churn_every
                .map(|mean| now + Duration::from_secs_f64(-mean * (1.0 - rand::random::<f64>()).ln())),
            last_write: now,
            ping_sent: None,
            leaving: None,
        }
    }

    pub(super) async fn run(mut self, seq: &mut u64) -> End {
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
            match self.fleet.twin_in_flight {
                // Storm with the window full: the next PATCH goes when an answer comes.
                Some(window) if self.twin_pending.len() >= window => {}
                _ => at = at.min(t),
            }
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
                    // A raw twin request's PUBACK: its answer comes on the response topic.
                    None if self.fleet.mode == Mode::Raw
                        && self.twin_pending.iter().any(|(r, _)| *r == u32::from(id)) => {}
                    None => stats.error(ErrorKind::UnexpectedAck, || format!("PUBACK {id} matches no PUBLISH")),
                }
            }
            Incoming::SubAck { refused } => {
                if refused > 0 {
                    stats.error(ErrorKind::SubscribeRefused, || format!("{refused} filter(s) refused"));
                }
                self.fleet.ready.set(self.index, true);
            }
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

    /// A PUBLISH to the device: a twin answer, a method request or a C2D message.
    fn on_publish(&mut self, topic: &str, payload: Bytes, out: &mut Outbox) -> Result<(), Failure> {
        let fleet = self.fleet;
        let stats = &fleet.stats;
        match topics::to_device(fleet.mode, topic) {
            ToDevice::TwinAnswer { status, rid } => {
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
            }
            ToDevice::MethodRequest { name, rid } => {
                let body = serde_json::json!({ "device": fleet.device_id(self.index), "method": name });
                out.publish(
                    topics::method_response(fleet.mode, self.index, rid),
                    QoS::AtMostOnce,
                    0,
                    Bytes::from(body.to_string()),
                )
                .map_err(|e| (ErrorKind::Io, e.to_string()))?;
                Stats::add(&stats.counters.methods_answered, 1);
            }
            ToDevice::C2d => fleet.c2d_received(&payload),
            ToDevice::Other => {}
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
        let body = fleet.payload.render(&id, *seq, crate::simulate::unix_millis());
        let packet_id = if fleet.qos == QoS::AtLeastOnce { self.packet_id() } else { 0 };
        out.publish(topics::telemetry(fleet, self.index), fleet.qos, packet_id, Bytes::from(body))
            .map_err(|e| (ErrorKind::Io, e.to_string()))?;
        if fleet.qos == QoS::AtLeastOnce {
            self.in_flight.push_back((packet_id, Instant::now()));
            fleet.stats.awaiting_answers(1);
        }
        Stats::add(&fleet.stats.counters.telemetry_sent, 1);
        Ok(())
    }

    fn send_twin(&mut self, now: Instant, out: &mut Outbox) -> Result<(), Failure> {
        let fleet = self.fleet;
        let Some(due) = self.next_twin.filter(|due| *due <= now) else {
            return Ok(());
        };
        match fleet.twin_in_flight {
            // The storm keeps its window full: the next PATCH goes as an answer comes.
            Some(window) => {
                while self.twin_pending.len() < window {
                    self.patch_one(out)?;
                }
            }
            None => {
                // One PATCH per wake-up at most; a device far behind just sends the next one.
                self.next_twin = Some((due + fleet.twin_every.unwrap_or_default()).max(now));
                if self.twin_pending.len() < TWIN_WINDOW {
                    self.patch_one(out)?;
                }
            }
        }
        Ok(())
    }

    /// One reported PATCH (Azure: QoS 0 with a `$rid` of its own) or twin request (raw: QoS 1,
    /// the packet id as its rid, so the broker's PUBACK is told apart from telemetry's).
    fn patch_one(&mut self, out: &mut Outbox) -> Result<(), Failure> {
        let fleet = self.fleet;
        let (qos, packet_id, rid) = match fleet.mode {
            Mode::Raw => {
                let id = self.packet_id();
                (QoS::AtLeastOnce, id, u32::from(id))
            }
            Mode::Azure => {
                let rid = self.next_rid;
                self.next_rid = self.next_rid.wrapping_add(1);
                (QoS::AtMostOnce, 0, rid)
            }
        };
        let body = serde_json::json!({ "simulator": { "rid": rid, "ts": crate::simulate::unix_millis() } });
        out.publish(topics::twin_request(fleet.mode, self.index, rid), qos, packet_id, Bytes::from(body.to_string()))
            .map_err(|e| (ErrorKind::Io, e.to_string()))?;
        self.twin_pending.push_back((rid, Instant::now()));
        fleet.stats.awaiting_answers(1);
        Stats::add(&fleet.stats.counters.twin_sent, 1);
        Ok(())
    }
}
