//! One MQTT connection after its CONNACK: a single task that reads packets, answers them,
//! publishes what the device's actor sends, and ends the session on a protocol error, a
//! silent client, an expired token or a newer connection.
//!
//! The task is a plain state machine polled by [`run`]: no per-connection read buffer (bytes
//! are read through the poll's stack, only a partial frame is kept), no write buffer between
//! bursts ([`Outbox`]), one timer for keep-alive and token expiry. That is what lets one process
//! hold many idle devices, and what keeps a PUBLISH to PUBACK one read and one write
//! (DESIGN.md §3). Inbound packets are handled in [`super::inbound`], the actor's commands in
//! [`super::outbound`].
//!
//! PUBACKs follow PUBLISH order (device-protocol §2.3, MQTT §4.6): each PUBLISH becomes a
//! [`Work`] item at the back of `inflight`, and only the front one is answered, once done.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::num::NonZeroU16;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix::Addr;
use futures::StreamExt;
use iothubd_actors::device::DeviceActor;
use iothubd_actors::directory::HubShared;
use iothubd_actors::ingest::{Appended, Ingest, Sender};
use iothubd_actors::messages::{DetachSession, DisconnectReason, SessionCommand};
use ntex::util::Bytes;
use tokio::time::{Instant, Sleep};

use super::frame::{Outbox, decode, frame_len};
use super::telemetry::MAX_MESSAGE_SIZE;
use super::topic::Subscription;
use super::transport::Transport;
use super::twin::TwinReply;

/// Most subscriptions one connection may hold (device-protocol §2.3).
pub const MAX_SUBSCRIPTIONS: usize = 5;
/// Largest frame a device may send: a maximum-size message plus room for its topic and bag.
pub const MAX_FRAME: usize = MAX_MESSAGE_SIZE + 16 * 1024;
/// Inbound PUBLISHes one connection may have in progress; reading pauses at this many.
const MAX_INFLIGHT: usize = 128;
/// Bytes read per `read` call, into a buffer on the poll's stack.
const READ_CHUNK: usize = 8 * 1024;
/// Bytes read in one poll before yielding to the other connections of the thread.
const READ_BUDGET: usize = 64 * 1024;
/// Encoded bytes the socket has not taken yet above which the session stops reading and
/// taking commands (backpressure: a slow reader cannot make the hub buffer without bound).
const OUTBOX_HIGH_WATER: usize = 256 * 1024;

/// A PUBLISH being processed; answered (PUBACK, twin response) when it reaches the front of
/// `inflight` and is done.
pub(super) enum Work {
    /// Telemetry: done once its batch is durable.
    Telemetry { packet_id: Option<NonZeroU16>, appended: Appended },
    /// A twin GET or reported PATCH: done when the actor answered.
    Twin { packet_id: Option<NonZeroU16>, rid: String, reply: Pin<Box<dyn Future<Output = TwinReply>>> },
    /// Nothing to wait for (a method response, handed to the actor already).
    Done { packet_id: Option<NonZeroU16> },
}

/// A Will from CONNECT (device-protocol §2.3): sent as telemetry when the connection ends
/// without DISCONNECT. The topic is the device's own telemetry topic, checked at CONNECT.
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
}

/// Why the session loop stopped; the reason itself is in `Session::reason`.
pub(super) struct Ended;

pub struct Session {
    pub(super) hub: Arc<HubShared>,
    pub(super) sender: Sender,
    pub(super) ingest: Ingest,
    pub(super) connection_id: u64,
    pub(super) actor: Addr<DeviceActor>,
    pub(super) subscriptions: Vec<Subscription>,
    /// The C2D subscription was granted at QoS 0: deliveries are settled when sent.
    pub(super) c2d_at_most_once: bool,
    /// PUBLISHes in arrival order, answered from the front.
    pub(super) inflight: VecDeque<Work>,
    /// C2D deliveries published at QoS 1 and not acknowledged yet: packet id → lock token.
    pub(super) unacked_c2d: Vec<(NonZeroU16, String)>,
    pub(super) next_packet_id: u16,
    pub(super) commands: flume::r#async::RecvStream<'static, SessionCommand>,
    /// The actor still holds the sending side.
    pub(super) commands_open: bool,
    /// Bytes of a frame not complete yet; empty (unallocated) between frames.
    pending: Vec<u8>,
    pub(super) out: Outbox,
    /// 1.5 × the client's keep-alive (capped); `None` = no keep-alive.
    idle_limit: Option<Duration>,
    last_seen: Instant,
    token_expiry: Option<Instant>,
    /// Why the connection ends, for the `deviceDisconnected` event; set by whoever ends it.
    pub(super) reason: DisconnectReason,
    pub(super) will: Option<Box<Will>>,
}

/// Everything a session starts with, from a successful CONNECT.
pub struct Attached {
    pub hub: Arc<HubShared>,
    pub sender: Sender,
    pub ingest: Ingest,
    pub connection_id: u64,
    pub actor: Addr<DeviceActor>,
    pub commands: flume::Receiver<SessionCommand>,
    pub idle_limit: Option<Duration>,
    /// How long the SAS token stays valid; `None` for X.509.
    pub token_lifetime: Option<Duration>,
    pub will: Option<Box<Will>>,
}

impl Session {
    /// `pending` are bytes the client sent right after CONNECT, read with it.
    pub fn new(attached: Attached, pending: Vec<u8>) -> Self {
        let now = Instant::now();
        Self {
            hub: attached.hub,
            sender: attached.sender,
            ingest: attached.ingest,
            connection_id: attached.connection_id,
            actor: attached.actor,
            subscriptions: Vec::new(),
            c2d_at_most_once: false,
            inflight: VecDeque::new(),
            unacked_c2d: Vec::new(),
            next_packet_id: 0,
            commands: attached.commands.into_stream(),
            commands_open: true,
            pending,
            out: Outbox::default(),
            idle_limit: attached.idle_limit,
            last_seen: now,
            token_expiry: attached.token_lifetime.map(|d| now + d),
            reason: DisconnectReason::ConnectionLost,
            will: attached.will,
        }
    }

    /// Ends the session as a protocol violation: logged at debug (a device's bug, not ours).
    pub(super) fn refuse(&mut self, why: impl std::fmt::Display) -> Ended {
        tracing::debug!(identity = %self.sender.key, "MQTT session closed: {why}");
        self.reason = DisconnectReason::ProtocolError;
        Ended
    }

    /// When the timer must next look: the keep-alive limit or the token's expiry.
    fn next_deadline(&self) -> Instant {
        let idle = self.idle_limit.map(|limit| self.last_seen + limit);
        match (idle, self.token_expiry) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            // Nothing to watch: a day, re-armed as long as the connection lives.
            (None, None) => Instant::now() + Duration::from_secs(86_400),
        }
    }

    /// Drives the connection until it ends.
    fn poll_session(&mut self, cx: &mut Context<'_>, io: &mut Transport, mut timer: Pin<&mut Sleep>) -> Poll<()> {
        match self.poll_io(cx, io) {
            Poll::Ready(Ended) => return Poll::Ready(()),
            Poll::Pending => {}
        }
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if self.token_expiry.is_some_and(|expiry| expiry <= now) {
                // SDKs reconnect with a fresh token (device-protocol §1.3).
                self.reason = DisconnectReason::TokenExpired;
                return Poll::Ready(());
            }
            if self.idle_limit.is_some_and(|limit| self.last_seen + limit <= now) {
                tracing::debug!(identity = %self.sender.key, "MQTT session closed: silent for 1.5 keep-alives");
                return Poll::Ready(());
            }
            let next = self.next_deadline();
            timer.as_mut().reset(next);
        }
        Poll::Pending
    }

    fn poll_io(&mut self, cx: &mut Context<'_>, io: &mut Transport) -> Poll<Ended> {
        let mut budget = READ_BUDGET;
        // Once per poll, not per read: the channel's waker brings the task back for more.
        if let Err(ended) = self.poll_commands(cx) {
            return Poll::Ready(ended);
        }
        loop {
            if let Err(ended) = self.poll_inflight(cx) {
                return Poll::Ready(ended);
            }
            let mut read = false;
            if self.inflight.len() < MAX_INFLIGHT && self.out.len() < OUTBOX_HIGH_WATER {
                match self.poll_read(cx, io) {
                    Poll::Ready(Ok(n)) => {
                        read = true;
                        budget = budget.saturating_sub(n);
                    }
                    Poll::Ready(Err(ended)) => {
                        // Answer what is answerable before closing (e.g. PINGRESP, acks).
                        let _ = self.out.poll_write(cx, io);
                        return Poll::Ready(ended);
                    }
                    Poll::Pending => {}
                }
            }
            if let Poll::Ready(Err(e)) = self.out.poll_write(cx, io) {
                tracing::debug!(identity = %self.sender.key, error = %e, "MQTT write failed");
                return Poll::Ready(Ended);
            }
            if !read {
                return Poll::Pending;
            }
            if budget == 0 {
                // Fair to the thread's other connections: come back after them.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    /// The actor's commands, while the socket keeps up.
    fn poll_commands(&mut self, cx: &mut Context<'_>) -> Result<(), Ended> {
        while self.commands_open && self.out.len() < OUTBOX_HIGH_WATER {
            match self.commands.poll_next_unpin(cx) {
                Poll::Ready(Some(command)) => self.command(command)?,
                // The actor let go of this session; only the token or the client ends it now.
                Poll::Ready(None) => self.commands_open = false,
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// Answers finished PUBLISHes, front first.
    fn poll_inflight(&mut self, cx: &mut Context<'_>) -> Result<(), Ended> {
        while let Some(work) = self.inflight.front_mut() {
            match work {
                Work::Telemetry { packet_id, appended } => match Pin::new(appended).poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Ok(_)) => {
                        if let Some(id) = *packet_id {
                            self.out.puback(id);
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        // Not durable: no PUBACK. Closing makes the device send it again.
                        tracing::warn!(identity = %self.sender.key, error = %e, "telemetry not stored");
                        return Err(Ended);
                    }
                },
                Work::Twin { packet_id, rid, reply } => match reply.as_mut().poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(reply) => {
                        if let Some(id) = *packet_id {
                            self.out.puback(id);
                        }
                        // Twin responses go at QoS 0 (the Node SDK subscribes at 0; §2.3).
                        let (topic, body) = reply.into_publish(rid);
                        self.out.publish(topic, None, false, Bytes::from(body));
                    }
                },
                Work::Done { packet_id } => {
                    if let Some(id) = *packet_id {
                        self.out.puback(id);
                    }
                }
            }
            self.inflight.pop_front();
        }
        Ok(())
    }

    /// Reads what the socket has and handles every complete frame in it; ready with the bytes
    /// read, or with the session's end (end of stream, a read error, a protocol violation).
    fn poll_read(&mut self, cx: &mut Context<'_>, io: &mut Transport) -> Poll<Result<usize, Ended>> {
        let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let read = match io.poll_read(cx, &mut chunk) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(read)) if read.filled().is_empty() => return Poll::Ready(Err(Ended)),
            Poll::Ready(Ok(read)) => read,
            Poll::Ready(Err(e)) => {
                tracing::debug!(identity = %self.sender.key, error = %e, "MQTT read failed");
                return Poll::Ready(Err(Ended));
            }
        };
        let read = read.filled();
        let n = read.len();
        // Any packet resets the keep-alive clock (device-protocol §2.1).
        self.last_seen = Instant::now();
        if self.pending.is_empty() {
            let used = self.frames(read)?;
            self.pending.extend_from_slice(&read[used..]);
        } else {
            let mut bytes = std::mem::take(&mut self.pending);
            bytes.extend_from_slice(read);
            let used = self.frames(&bytes)?;
            if used < bytes.len() {
                bytes.drain(..used);
                self.pending = bytes;
            }
        }
        Poll::Ready(Ok(n))
    }

    /// Handles the complete frames at the start of `bytes`; returns how many bytes they took.
    pub(super) fn frames(&mut self, bytes: &[u8]) -> Result<usize, Ended> {
        let mut at = 0;
        loop {
            let len = match frame_len(&bytes[at..], MAX_FRAME) {
                Ok(Some(len)) if bytes.len() - at >= len => len,
                Ok(_) => return Ok(at),
                Err(e) => return Err(self.refuse(e)),
            };
            let decoded = decode(&bytes[at..at + len]).map_err(|e| self.refuse(format!("malformed packet: {e}")))?;
            at += len;
            self.packet(decoded)?;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.actor.do_send(DetachSession { connection_id: self.connection_id, reason: self.reason });
    }
}

/// Runs a session until the connection ends, then sends its Will when it ended without
/// DISCONNECT, and detaches from the actor (on drop).
pub async fn run(mut session: Session, mut io: Transport) {
    let timer = tokio::time::sleep_until(session.next_deadline());
    tokio::pin!(timer);
    std::future::poll_fn(|cx| session.poll_session(cx, &mut io, timer.as_mut())).await;
    drop(io);
    // MQTT §3.1.2.5: the Will goes out when the connection ends any way but DISCONNECT; not
    // for an identity disabled or deleted meanwhile.
    let fires = !matches!(session.reason, DisconnectReason::ClientDisconnect | DisconnectReason::IdentityRevoked);
    if let Some(will) = session.will.take().filter(|_| fires) {
        session.send_will(*will).await;
    }
}
