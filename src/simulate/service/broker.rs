//! The service side in raw mode: MQTT clients of the broker that play the hub's part (the
//! topics are in [`crate::simulate::topics`]).
//!
//! - [`ServiceClient`]: one connection, client id `{prefix}service-{shard}`, subscribed to
//!   `sim/+/methods/res/#` (QoS 0). A method call publishes `sim/{i}/methods/req/{rid}` (QoS 0)
//!   and completes when the device's `sim/{i}/methods/res/{rid}` arrives — the round trip is
//!   measured here, from the request written to the answer read — or fails after
//!   [`METHOD_TIMEOUT`]. A C2D send publishes the [`super::Stamp`] to `sim/{i}/c2d` at QoS 1
//!   and is accepted by the broker's PUBACK. Operations reach the connection's task over a
//!   channel and are written in batches.
//! - [`TwinResponder`]: one connection, client id `{prefix}twin-responder-{shard}`, subscribed
//!   to `sim/+/twin/req/#` at QoS 1, answering every device's twin request on
//!   `sim/{i}/twin/res/{rid}` (QoS 0).
//!
//! Why this is the fair counterpart of the hub: the hub does the service's part in-process and
//! durably — a method call is held by the device's actor, a C2D message is in the device's
//! durable queue before its 204, a reported PATCH is written before its 204. A plain broker has
//! no such part, so an external client must play it, which costs the broker one more PUBLISH in
//! and out per operation: the least any design on a plain broker needs. Both clients connect
//! (SUBACK received) before the devices start, and reconnect after a failure.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use ntex::util::Bytes;
use ntex_mqtt::v3::codec::QoS;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use super::{Failure, METHOD_TIMEOUT, Operation};
use crate::simulate::fleet::{Fleet, Phase};
use crate::simulate::mqtt::{Connection, Incoming, OpenError, Outbox, Transport};
use crate::simulate::stats::ErrorKind;
use crate::simulate::topics::{self, RAW_METHOD_RESPONSES, RAW_TWIN_REQUESTS, ToService};

/// TCP connect, CONNECT → CONNACK and SUBSCRIBE → SUBACK must take less than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Wait before reconnecting a lost service connection.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Operations waiting for the service connection's task.
const QUEUE: usize = 1024;
/// Most operations encoded into one write.
const BATCH: usize = 256;

fn io(e: std::io::Error) -> Failure {
    (ErrorKind::Io, e.to_string())
}

fn protocol(e: impl std::fmt::Display) -> Failure {
    (ErrorKind::Protocol, e.to_string())
}

/// One connection of a service client, with its keep-alive.
struct Link {
    conn: Connection,
    keep_alive: Duration,
    last_write: Instant,
    ping_sent: Option<Instant>,
}

impl Link {
    /// TCP, CONNECT as `client_id` (clean session), SUBSCRIBE `filter`; done at the SUBACK.
    async fn open(fleet: &Fleet, client_id: &str, filter: &str, qos: QoS) -> Result<Self, Failure> {
        match tokio::time::timeout(CONNECT_TIMEOUT, Self::handshake(fleet, client_id, filter, qos)).await {
            Ok(r) => r,
            Err(_) => Err((ErrorKind::ConnectTimeout, format!("no SUBACK within {}s", CONNECT_TIMEOUT.as_secs()))),
        }
    }

    async fn handshake(fleet: &Fleet, client_id: &str, filter: &str, qos: QoS) -> Result<Self, Failure> {
        let transport = Transport::open(fleet.target, None, None).await.map_err(|e| match e {
            OpenError::Tcp(e) | OpenError::Tls(e) => (ErrorKind::TcpConnect, format!("{}: {e}", fleet.target)),
        })?;
        let mut conn = Connection::new(transport);
        let mut out = Outbox::new();
        // MQTT 3.1.1 §3.1.4: a client may send more packets before the CONNACK.
        out.connect(client_id, None, None, fleet.keep_alive).map_err(io)?;
        out.subscribe(1, vec![(filter.to_owned(), qos)]).map_err(io)?;
        conn.send(&mut out).await.map_err(io)?;
        let mut connected = false;
        loop {
            while let Some(packet) = conn.next_packet().map_err(protocol)? {
                match packet {
                    Incoming::ConnAck(0) => connected = true,
                    Incoming::ConnAck(code) => {
                        return Err((ErrorKind::ConnackRefused, format!("CONNACK return code {code}")));
                    }
                    Incoming::SubAck { refused: 0 } if connected => {
                        let keep_alive = Duration::from_secs(u64::from(fleet.keep_alive));
                        return Ok(Self { conn, keep_alive, last_write: Instant::now(), ping_sent: None });
                    }
                    Incoming::SubAck { .. } => return Err((ErrorKind::SubscribeRefused, format!("{filter} refused"))),
                    other => return Err((ErrorKind::Protocol, format!("{other:?} before SUBACK"))),
                }
            }
            match poll_fn(|cx| conn.poll_fill(cx)).await {
                Ok(0) => return Err((ErrorKind::ClosedByBroker, "closed before SUBACK".into())),
                Ok(_) => {}
                Err(e) => return Err(io(e)),
            }
        }
    }

    /// When the keep-alive next needs a look.
    fn wake_at(&self) -> Instant {
        match self.ping_sent {
            Some(sent) => sent + self.keep_alive,
            None => self.last_write + self.keep_alive.mul_f64(0.75),
        }
    }

    /// A PINGREQ when the link has been quiet; an error when the last one went unanswered.
    fn keep_alive(&mut self, now: Instant, out: &mut Outbox) -> Result<(), Failure> {
        match self.ping_sent {
            Some(sent) if now >= sent + self.keep_alive => Err((ErrorKind::Io, "no PINGRESP".into())),
            None if out.is_empty() && now >= self.last_write + self.keep_alive.mul_f64(0.75) => {
                out.ping().map_err(io)?;
                self.ping_sent = Some(now);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn flush(&mut self, out: &mut Outbox) -> Result<(), Failure> {
        if !out.is_empty() {
            self.conn.send(out).await.map_err(io)?;
            self.last_write = Instant::now();
        }
        Ok(())
    }

    /// Waits for bytes from the broker (or a frame already read).
    async fn fill(&mut self) -> Result<(), Failure> {
        if self.conn.has_frame() {
            return Ok(());
        }
        match poll_fn(|cx| self.conn.poll_fill(cx)).await {
            Ok(0) => Err((ErrorKind::ClosedByBroker, "the broker closed the service connection".into())),
            Ok(_) => Ok(()),
            Err(e) => Err(io(e)),
        }
    }

    async fn disconnect(mut self) {
        // DISCONNECT is a courtesy: the connection closes either way.
        let mut out = Outbox::new();
        if out.disconnect().is_ok() {
            let _ = self.conn.send(&mut out).await;
        }
    }
}

/// An operation for the service connection's task, with where its answer goes.
enum Command {
    Method { index: u32, reply: oneshot::Sender<Result<Duration, Failure>> },
    C2d { index: u32, body: Bytes, reply: oneshot::Sender<Result<(), Failure>> },
}

impl Command {
    fn fail(self, why: Failure) {
        // The caller may be gone (the run closed): then nobody is left to tell.
        match self {
            Command::Method { reply, .. } => {
                let _ = reply.send(Err(why));
            }
            Command::C2d { reply, .. } => {
                let _ = reply.send(Err(why));
            }
        }
    }
}

fn why_lost() -> Failure {
    (ErrorKind::Io, "the raw service client stopped".into())
}

/// The raw service: method calls and C2D sends through one MQTT connection.
pub struct ServiceClient {
    commands: mpsc::Sender<Command>,
}

impl ServiceClient {
    /// Connects as `client_id`, subscribed to the method answers; returns the client and the
    /// task that serves it until the run closes.
    pub async fn start(
        fleet: Arc<Fleet>,
        client_id: String,
    ) -> anyhow::Result<(Self, impl Future<Output = ()> + Send + 'static)> {
        let link = Link::open(&fleet, &client_id, RAW_METHOD_RESPONSES, QoS::AtMostOnce)
            .await
            .map_err(|(_, e)| anyhow!("the raw service client cannot connect to {}: {e}", fleet.target))?;
        let (commands, queue) = mpsc::channel(QUEUE);
        Ok((Self { commands }, serve(fleet, client_id, link, queue)))
    }

    pub(super) fn call_method(&self, index: u32) -> Operation<'static, Duration> {
        let commands = self.commands.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            commands.send(Command::Method { index, reply }).await.map_err(|_| why_lost())?;
            answer.await.map_err(|_| why_lost())?
        })
    }

    pub(super) fn send_c2d(&self, index: u32, body: Bytes) -> Operation<'static, ()> {
        let commands = self.commands.clone();
        Box::pin(async move {
            let (reply, answer) = oneshot::channel();
            commands.send(Command::C2d { index, body, reply }).await.map_err(|_| why_lost())?;
            answer.await.map_err(|_| why_lost())?
        })
    }
}

/// The service connection's task: serves `queue` over `link`, reconnecting after a failure
/// (operations made meanwhile fail at once), until the run closes.
async fn serve(fleet: Arc<Fleet>, client_id: String, link: Link, mut queue: mpsc::Receiver<Command>) {
    let mut link = Some(link);
    loop {
        if let Some(open) = link.take() {
            let mut calls = Calls::default();
            let ended = calls.serve(&fleet, open, &mut queue).await;
            let why = match ended {
                Ok(()) => return,
                Err(failure) => failure,
            };
            fleet.stats.error(why.0, || format!("raw service client: {}", why.1));
            calls.fail_all(&why);
        }
        let reopen = async {
            tokio::time::sleep(RECONNECT_AFTER).await;
            Link::open(&fleet, &client_id, RAW_METHOD_RESPONSES, QoS::AtMostOnce).await
        };
        match refusing(&fleet, &mut queue, reopen).await {
            None => return,
            Some(Ok(open)) => link = Some(open),
            Some(Err((kind, detail))) => fleet.stats.error(kind, || format!("raw service client: {detail}")),
        }
    }
}

/// Runs `work`, failing every operation queued meanwhile (no connection carries them), unless
/// the run closes first (`None`).
async fn refusing<T>(fleet: &Fleet, queue: &mut mpsc::Receiver<Command>, work: impl Future<Output = T>) -> Option<T> {
    tokio::pin!(work);
    loop {
        let phase_change = fleet.phase.changed(0);
        if fleet.phase.get() == Phase::Closing {
            return None;
        }
        tokio::select! {
            r = &mut work => return Some(r),
            command = queue.recv() => match command {
                Some(c) => c.fail((ErrorKind::Io, "the raw service client is reconnecting".into())),
                None => return None,
            },
            _ = phase_change => {}
        }
    }
}

/// The operations the service connection has in flight.
#[derive(Default)]
struct Calls {
    /// Method calls by `$rid`: when written, where the answer goes.
    methods: HashMap<u32, (Instant, oneshot::Sender<Result<Duration, Failure>>)>,
    /// Method `$rid`s in the order written, for the timeouts (answered ones are skipped).
    order: VecDeque<(u32, Instant)>,
    /// C2D sends by packet id, waiting for the broker's PUBACK.
    c2d: HashMap<u16, oneshot::Sender<Result<(), Failure>>>,
    last_rid: u32,
    last_packet_id: u16,
}

impl Calls {
    /// Serves until the run closes (`Ok`) or the connection fails.
    async fn serve(
        &mut self,
        fleet: &Fleet,
        mut link: Link,
        queue: &mut mpsc::Receiver<Command>,
    ) -> Result<(), Failure> {
        loop {
            let phase_change = fleet.phase.changed(0);
            if fleet.phase.get() == Phase::Closing {
                link.disconnect().await;
                return Ok(());
            }
            let mut out = Outbox::new();
            let wake_at = self.next_timeout().map_or(link.wake_at(), |t| t.min(link.wake_at()));
            tokio::select! {
                command = queue.recv() => {
                    let Some(command) = command else {
                        link.disconnect().await;
                        return Ok(());
                    };
                    self.write(command, &mut out)?;
                    for _ in 1..BATCH {
                        match queue.try_recv() {
                            Ok(command) => self.write(command, &mut out)?,
                            Err(_) => break,
                        }
                    }
                }
                filled = link.fill() => {
                    filled?;
                    self.read(&mut link, &mut out)?;
                }
                _ = sleep_until(wake_at) => {}
                _ = phase_change => {}
            }
            let now = Instant::now();
            self.expire(now);
            link.keep_alive(now, &mut out)?;
            link.flush(&mut out).await?;
        }
    }

    fn write(&mut self, command: Command, out: &mut Outbox) -> Result<(), Failure> {
        match command {
            Command::Method { index, reply } => {
                let mut rid = self.last_rid.wrapping_add(1);
                while self.methods.contains_key(&rid) {
                    rid = rid.wrapping_add(1);
                }
                self.last_rid = rid;
                out.publish(topics::raw_method_request(index, rid), QoS::AtMostOnce, 0, Bytes::from_static(b"{}"))
                    .map_err(io)?;
                let now = Instant::now();
                self.methods.insert(rid, (now, reply));
                self.order.push_back((rid, now));
            }
            Command::C2d { index, body, reply } => {
                let mut id = self.last_packet_id.checked_add(1).unwrap_or(1);
                while self.c2d.contains_key(&id) {
                    id = id.checked_add(1).unwrap_or(1);
                }
                self.last_packet_id = id;
                out.publish(topics::raw_c2d(index), QoS::AtLeastOnce, id, body).map_err(io)?;
                self.c2d.insert(id, reply);
            }
        }
        Ok(())
    }

    fn read(&mut self, link: &mut Link, out: &mut Outbox) -> Result<(), Failure> {
        while let Some(packet) = link.conn.next_packet().map_err(protocol)? {
            match packet {
                Incoming::PubAck(id) => {
                    if let Some(reply) = self.c2d.remove(&id) {
                        let _ = reply.send(Ok(()));
                    }
                }
                Incoming::Publish { topic, qos, packet_id, .. } => {
                    if qos != QoS::AtMostOnce
                        && let Some(id) = packet_id
                    {
                        out.puback(id).map_err(io)?;
                    }
                    if let ToService::MethodAnswer { rid, .. } = topics::to_service(&topic)
                        && let Some((sent, reply)) = self.methods.remove(&rid)
                    {
                        let _ = reply.send(Ok(sent.elapsed()));
                    }
                }
                Incoming::PingResp => link.ping_sent = None,
                Incoming::SubAck { .. } => {}
                Incoming::ConnAck(_) => return Err(protocol("a second CONNACK")),
                Incoming::Unexpected(what) => return Err(protocol(format!("the broker sent {what}"))),
            }
        }
        Ok(())
    }

    /// When the oldest unanswered method call times out.
    fn next_timeout(&mut self) -> Option<Instant> {
        while let Some((rid, _)) = self.order.front() {
            if self.methods.contains_key(rid) {
                break;
            }
            self.order.pop_front();
        }
        self.order.front().map(|(_, sent)| *sent + METHOD_TIMEOUT)
    }

    /// Fails the method calls unanswered for [`METHOD_TIMEOUT`].
    fn expire(&mut self, now: Instant) {
        while let Some(&(rid, sent)) = self.order.front() {
            if now < sent + METHOD_TIMEOUT {
                break;
            }
            self.order.pop_front();
            if let Some((_, reply)) = self.methods.remove(&rid) {
                let why = format!("no answer on sim/+/methods/res/{rid} within {}s", METHOD_TIMEOUT.as_secs());
                let _ = reply.send(Err((ErrorKind::MethodTimeout, why)));
            }
        }
    }

    /// The connection is gone: nothing in flight will be answered.
    fn fail_all(&mut self, why: &Failure) {
        for (_, (_, reply)) in self.methods.drain() {
            let _ = reply.send(Err(why.clone()));
        }
        for (_, reply) in self.c2d.drain() {
            let _ = reply.send(Err(why.clone()));
        }
        self.order.clear();
    }
}

/// The raw twin responder: answers every device's twin request, as the hub answers a reported
/// PATCH with 204.
pub struct TwinResponder {
    fleet: Arc<Fleet>,
    client_id: String,
    link: Link,
}

impl TwinResponder {
    /// Connects as `client_id`, subscribed to every device's twin requests.
    pub async fn start(fleet: Arc<Fleet>, client_id: String) -> anyhow::Result<Self> {
        let link = Link::open(&fleet, &client_id, RAW_TWIN_REQUESTS, QoS::AtLeastOnce)
            .await
            .map_err(|(_, e)| anyhow!("the raw twin responder cannot connect to {}: {e}", fleet.target))?;
        Ok(Self { fleet, client_id, link })
    }

    /// Answers until the run closes, reconnecting after a failure.
    pub async fn run(self) {
        let Self { fleet, client_id, link } = self;
        let mut link = Some(link);
        loop {
            if let Some(open) = link.take() {
                match answer_twins(&fleet, open).await {
                    Ok(()) => return,
                    Err((kind, detail)) => fleet.stats.error(kind, || format!("raw twin responder: {detail}")),
                }
            }
            let phase_change = fleet.phase.changed(0);
            if fleet.phase.get() == Phase::Closing {
                return;
            }
            let reopen = async {
                tokio::time::sleep(RECONNECT_AFTER).await;
                Link::open(&fleet, &client_id, RAW_TWIN_REQUESTS, QoS::AtLeastOnce).await
            };
            tokio::select! {
                opened = reopen => match opened {
                    Ok(open) => link = Some(open),
                    Err((kind, detail)) => fleet.stats.error(kind, || format!("raw twin responder: {detail}")),
                },
                _ = phase_change => {}
            }
        }
    }
}

/// The responder's connection until the run closes (`Ok`) or the connection fails.
async fn answer_twins(fleet: &Fleet, mut link: Link) -> Result<(), Failure> {
    loop {
        let phase_change = fleet.phase.changed(0);
        if fleet.phase.get() == Phase::Closing {
            link.disconnect().await;
            return Ok(());
        }
        let mut out = Outbox::new();
        let wake_at = link.wake_at();
        tokio::select! {
            filled = link.fill() => {
                filled?;
                while let Some(packet) = link.conn.next_packet().map_err(protocol)? {
                    match packet {
                        Incoming::Publish { topic, qos, packet_id, .. } => {
                            if qos != QoS::AtMostOnce
                                && let Some(id) = packet_id
                            {
                                out.puback(id).map_err(io)?;
                            }
                            if let ToService::TwinRequest { index, rid } = topics::to_service(&topic) {
                                let answer = topics::raw_twin_response(index, rid);
                                out.publish(answer, QoS::AtMostOnce, 0, Bytes::new()).map_err(io)?;
                            }
                        }
                        Incoming::PingResp => link.ping_sent = None,
                        Incoming::PubAck(_) | Incoming::SubAck { .. } => {}
                        Incoming::ConnAck(_) => return Err(protocol("a second CONNACK")),
                        Incoming::Unexpected(what) => return Err(protocol(format!("the broker sent {what}"))),
                    }
                }
            }
            _ = sleep_until(wake_at) => {}
            _ = phase_change => {}
        }
        link.keep_alive(Instant::now(), &mut out)?;
        link.flush(&mut out).await?;
    }
}
