//! The cloud-to-device queue of a `DeviceActor` (device-protocol §2.8, §3, §5.1; service-api §8).
//!
//! A message is *Enqueued* until a delivery locks it (*Invisible*): an HTTPS receive locks it
//! for its lock timeout, an MQTT session until its PUBACK or its disconnect. Completing
//! removes it (`Success` feedback); rejecting, expiring, being abandoned `maxDeliveryCount`
//! times or being purged dead-letters it (`Rejected`, `Expired`, `DeliveryCountExceeded`,
//! `Purged`). A lapsed lock or a dropped MQTT session makes it Enqueued again without counting
//! a delivery — only an explicit abandon counts (§5.1); the next MQTT delivery carries DUP=1.
//!
//! Durable: the message once enqueued, its removal together with its feedback record (one
//! write), and its delivery count. Locks live in memory: after a restart every message is
//! Enqueued again, so delivery is at least once and nothing acknowledged is lost.
//!
//! Every operation is atomic per identity (`AtomicResponse`): the queue is loaded on first use,
//! expired messages are dead-lettered, the operation changes the queue in memory and its
//! writes go to the store before the reply. A failed write discards the in-memory queue, so the
//! next operation starts again from what is stored.
//!
//! An MQTT session subscribed to `devices/{d}/messages/devicebound/#` gets up to [`WINDOW`]
//! messages at a time, oldest first; each PUBACK settles one and lets the next go. Messages for
//! an offline device wait for it until they expire — the queue needs no special case for that.

use std::collections::VecDeque;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::DeviceActor;
use crate::messages::{
    C2dDelivery, C2dFailure, C2dOutcome, OutgoingC2d, PurgeC2d, ReceiveC2d, SendC2d, SessionCommand, SettleC2d,
};
use crate::model::c2d::{C2dLock, C2dMessage, FeedbackRecord, FeedbackStatus};
use crate::model::hub::MAX_C2D_TTL;
use crate::model::identity::IdentityKey;
use crate::store::{Store, StoreError};

/// Messages one MQTT session may hold unacknowledged.
pub const WINDOW: usize = 8;

/// The queue as the actor holds it while live.
pub(super) struct Queue {
    /// In sequence order.
    entries: VecDeque<Entry>,
    /// Of the identity, for feedback records.
    generation_id: String,
    next_sequence: u64,
}

struct Entry {
    message: C2dMessage,
    /// The MQTT session (connection id) holding the lock until its PUBACK, if any.
    session: Option<u64>,
    /// Delivered before and not settled: the next MQTT delivery is a redelivery (DUP=1).
    delivered: bool,
}

impl Entry {
    fn expired(&self, now: DateTime<Utc>) -> bool {
        self.message.expiry_time <= now
    }

    fn receivable(&self, now: DateTime<Utc>) -> bool {
        !self.expired(now)
            && match &self.message.lock {
                None => true,
                Some(lock) => self.session.is_none() && lock.locked_until <= now,
            }
    }

    fn lock(&mut self, until: DateTime<Utc>, session: Option<u64>) -> String {
        let token = uuid::Uuid::new_v4().to_string();
        self.message.lock = Some(C2dLock { token: token.clone(), locked_until: until });
        self.session = session;
        token
    }

    fn unlock(&mut self) {
        self.message.lock = None;
        self.session = None;
    }
}

/// The hub's C2D settings as one operation sees them.
struct Settings {
    depth: usize,
    default_ttl: Duration,
    max_delivery_count: u32,
}

/// What an operation must write, and what it works with.
struct Op<'a> {
    key: &'a IdentityKey,
    settings: &'a Settings,
    now: DateTime<Utc>,
    put: Vec<C2dMessage>,
    remove: Vec<u64>,
    feedback: Vec<FeedbackRecord>,
}

impl Queue {
    async fn load(store: &dyn Store, hub: &str, key: &IdentityKey) -> Result<Self, C2dFailure> {
        let identity = store
            .get_identity(hub, key)
            .await
            .map_err(|e| failure(key, e))?
            .ok_or(C2dFailure::NotFound(key.clone()))?;
        let messages = store.c2d_queue(hub, key).await.map_err(|e| failure(key, e))?;
        // Sequence numbers increase across the actor's lifetimes: never below the clock (µs),
        // never below what is stored.
        let floor = Utc::now().timestamp_micros().max(0) as u64;
        let next_sequence = messages.iter().map(|m| m.sequence_number + 1).max().unwrap_or(0).max(floor);
        let entries = messages
            .into_iter()
            .map(|mut message| {
                message.lock = None;
                Entry { message, session: None, delivered: false }
            })
            .collect();
        Ok(Self { entries, generation_id: identity.generation_id, next_sequence })
    }

    fn position(&self, lock_token: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.message.lock.as_ref().is_some_and(|l| l.token == lock_token))
    }

    /// Removes entry `index`, with its feedback record when its `iothub-ack` asks for one.
    fn finish(&mut self, index: usize, status: FeedbackStatus, op: &mut Op<'_>) {
        let Some(entry) = self.entries.remove(index) else { return };
        let message = entry.message;
        op.remove.push(message.sequence_number);
        if message.ack.wants(status) {
            op.feedback.push(FeedbackRecord {
                original_message_id: message.message_id,
                device_generation_id: self.generation_id.clone(),
                device_id: op.key.device_id.clone(),
                module_id: op.key.module_id.clone(),
                enqueued_time_utc: op.now,
                status,
                description: description(status).to_owned(),
            });
        }
    }

    /// Dead-letters every expired message.
    fn sweep(&mut self, op: &mut Op<'_>) {
        while let Some(index) = self.entries.iter().position(|e| e.expired(op.now)) {
            self.finish(index, FeedbackStatus::Expired, op);
        }
    }

    fn enqueue(&mut self, outgoing: OutgoingC2d, op: &mut Op<'_>) -> Result<u64, C2dFailure> {
        if self.entries.len() >= op.settings.depth {
            return Err(C2dFailure::QueueFull { key: op.key.clone(), max: op.settings.depth });
        }
        let sequence_number = self.next_sequence;
        self.next_sequence += 1;
        let longest = op.now + chrono::Duration::from_std(MAX_C2D_TTL).unwrap_or(chrono::Duration::days(2));
        let default =
            op.now + chrono::Duration::from_std(op.settings.default_ttl).unwrap_or(chrono::Duration::hours(1));
        let message = C2dMessage {
            sequence_number,
            message_id: outgoing.message_id,
            correlation_id: outgoing.correlation_id,
            user_id: outgoing.user_id,
            content_type: outgoing.content_type,
            content_encoding: outgoing.content_encoding,
            expiry_time: outgoing.expiry_time.unwrap_or(default).min(longest),
            ack: outgoing.ack,
            properties: outgoing.properties,
            body: outgoing.body,
            enqueued_time: op.now,
            delivery_count: 0,
            lock: None,
        };
        op.put.push(message.clone());
        self.entries.push_back(Entry { message, session: None, delivered: false });
        Ok(sequence_number)
    }

    fn settle(&mut self, lock_token: &str, outcome: C2dOutcome, op: &mut Op<'_>) -> Result<(), C2dFailure> {
        let index = self.position(lock_token).ok_or(C2dFailure::LockLost)?;
        let entry = &mut self.entries[index];
        if entry.session.is_none() && entry.message.lock.as_ref().is_some_and(|l| l.locked_until <= op.now) {
            return Err(C2dFailure::LockLost);
        }
        match outcome {
            C2dOutcome::Complete => self.finish(index, FeedbackStatus::Success, op),
            C2dOutcome::Reject => self.finish(index, FeedbackStatus::Rejected, op),
            C2dOutcome::Abandon => {
                entry.unlock();
                entry.message.delivery_count += 1;
                if entry.message.delivery_count >= op.settings.max_delivery_count {
                    self.finish(index, FeedbackStatus::DeliveryCountExceeded, op);
                } else {
                    op.put.push(entry.message.clone());
                }
            }
        }
        Ok(())
    }

    fn purge(&mut self, op: &mut Op<'_>) -> usize {
        let count = self.entries.len();
        while !self.entries.is_empty() {
            self.finish(0, FeedbackStatus::Purged, op);
        }
        count
    }

    /// Makes the messages held by MQTT session `connection_id` Enqueued again.
    pub(super) fn release_session(&mut self, connection_id: u64) {
        for entry in self.entries.iter_mut().filter(|e| e.session == Some(connection_id)) {
            entry.unlock();
        }
    }

    fn earliest_expiry(&self) -> Option<DateTime<Utc>> {
        self.entries.iter().map(|e| e.message.expiry_time).min()
    }
}

/// The `description` of a feedback record.
fn description(status: FeedbackStatus) -> &'static str {
    match status {
        FeedbackStatus::Success => "Success",
        FeedbackStatus::Expired => "Message expired",
        FeedbackStatus::DeliveryCountExceeded => "Message delivery count exceeded",
        FeedbackStatus::Rejected => "Message rejected",
        FeedbackStatus::Purged => "Message purged",
    }
}

fn failure(key: &IdentityKey, e: StoreError) -> C2dFailure {
    match e {
        StoreError::NotFound => C2dFailure::NotFound(key.clone()),
        other => C2dFailure::Store(other),
    }
}

/// Carries out an operation's writes: removals with their feedback in one write, then puts.
async fn write(store: &dyn Store, hub: &str, op: Op<'_>) -> Result<(), C2dFailure> {
    if !op.remove.is_empty() || !op.feedback.is_empty() {
        store.c2d_remove(hub, op.key, &op.remove, &op.feedback).await.map_err(|e| failure(op.key, e))?;
    }
    for message in op.put.iter().filter(|m| !op.remove.contains(&m.sequence_number)) {
        store.c2d_put(hub, op.key, message).await.map_err(|e| failure(op.key, e))?;
    }
    Ok(())
}

impl DeviceActor {
    /// Runs `change` on the loaded queue (expired messages dead-lettered first), writes what it
    /// changed, and replies; the mailbox waits meanwhile (see the module doc).
    fn with_queue<T, F>(&mut self, change: F) -> ResponseActFuture<Self, Result<T, C2dFailure>>
    where
        T: 'static,
        F: FnOnce(&mut Queue, &mut Op<'_>) -> Result<T, C2dFailure> + 'static,
    {
        let cached = self.c2d.take();
        let (store, hub, key) = (self.store.clone(), self.hub.name().to_owned(), self.key.clone());
        let description = self.hub.description();
        let c2d = &description.properties.cloud_to_device;
        let settings = Settings {
            depth: self.hub.limits().c2d_queue_depth,
            default_ttl: c2d.default_ttl(),
            max_delivery_count: c2d.max_delivery_count,
        };
        let work = async move {
            let mut queue = match cached {
                Some(queue) => queue,
                None => Box::new(Queue::load(&*store, &hub, &key).await?),
            };
            let mut op = Op {
                key: &key,
                settings: &settings,
                now: Utc::now(),
                put: Vec::new(),
                remove: Vec::new(),
                feedback: Vec::new(),
            };
            queue.sweep(&mut op);
            let reply = change(&mut queue, &mut op);
            write(&*store, &hub, op).await?;
            Ok((queue, reply))
        };
        Box::pin(work.into_actor(self).map(
            |result: Result<(Box<Queue>, Result<T, C2dFailure>), C2dFailure>, actor, ctx| match result {
                Ok((queue, reply)) => {
                    actor.c2d = Some(queue);
                    actor.pump_c2d(ctx);
                    actor.arm_c2d_expiry(ctx);
                    reply
                }
                Err(e) => {
                    if let C2dFailure::NotFound(_) = e {
                        actor.stop_if_unknown(ctx);
                    }
                    Err(e)
                }
            },
        ))
    }

    /// Sends Enqueued messages to the attached session while it is subscribed and has room.
    pub(super) fn pump_c2d(&mut self, ctx: &mut Context<Self>) {
        let (Some(session), Some(queue), true) = (&self.session, self.c2d.as_mut(), self.c2d_subscribed) else {
            return;
        };
        let connection_id = session.connection_id;
        let now = Utc::now();
        let at_most_once = self.c2d_at_most_once;
        let mut held = queue.entries.iter().filter(|e| e.session == Some(connection_id)).count();
        // MQTT locks last until PUBACK or disconnect; the time only matters to HTTPS receivers.
        let until = now + chrono::Duration::days(3650);
        for entry in queue.entries.iter_mut() {
            if held >= WINDOW {
                break;
            }
            if !entry.receivable(now) {
                continue;
            }
            let lock_token = entry.lock(until, Some(connection_id));
            let delivery = C2dDelivery {
                key: self.key.clone(),
                message: entry.message.clone(),
                lock_token,
                redelivery: entry.delivered,
                at_most_once,
            };
            if session.outbound.try_send(SessionCommand::C2d(Box::new(delivery))).is_err() {
                // The session's command queue is full: its next PUBACK pumps again, or — with
                // none in flight — a retry shortly (a closed session detaches meanwhile).
                entry.unlock();
                if held == 0 {
                    ctx.run_later(Duration::from_millis(20), |actor, ctx| actor.pump_c2d(ctx));
                }
                break;
            }
            entry.delivered = true;
            held += 1;
        }
    }

    /// Loads the queue (if needed) and pumps it: after a session attached or subscribed.
    pub(super) fn start_c2d(&mut self, ctx: &mut Context<Self>) {
        if self.session.is_none() || !self.c2d_subscribed {
            return;
        }
        if self.c2d.is_some() {
            self.pump_c2d(ctx);
        } else {
            ctx.notify(TidyC2d);
        }
    }

    /// A timer at the earliest expiry, which dead-letters what expired (feedback `Expired`)
    /// while the actor is live; a passivated actor does it when next loaded.
    fn arm_c2d_expiry(&mut self, ctx: &mut Context<Self>) {
        if let Some(timer) = self.c2d_expiry.take() {
            ctx.cancel_future(timer);
        }
        let Some(earliest) = self.c2d.as_ref().and_then(|q| q.earliest_expiry()) else { return };
        let delay = (earliest - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(1);
        self.c2d_expiry = Some(ctx.run_later(delay, |actor, ctx| {
            actor.c2d_expiry = None;
            ctx.notify(TidyC2d);
        }));
    }

    /// The queue and its timer are dropped (the identity was revoked: reload from the store).
    pub(super) fn forget_c2d(&mut self, ctx: &mut Context<Self>) {
        self.c2d = None;
        if let Some(timer) = self.c2d_expiry.take() {
            ctx.cancel_future(timer);
        }
    }
}

/// Sent by the actor to itself: load the queue, dead-letter what expired, pump.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
struct TidyC2d;

impl Handler<TidyC2d> for DeviceActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: TidyC2d, _: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(Box::pin(self.with_queue(|_, _| Ok(())).map(|result, actor, _| {
            if let Err(e) = result {
                tracing::warn!(identity = %actor.key, error = %e, "cloud-to-device queue not loaded");
            }
        })))
    }
}

impl Handler<SendC2d> for DeviceActor {
    type Result = AtomicResponse<Self, Result<u64, C2dFailure>>;

    fn handle(&mut self, msg: SendC2d, _: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.with_queue(move |queue, op| queue.enqueue(*msg.0, op)))
    }
}

impl Handler<ReceiveC2d> for DeviceActor {
    type Result = AtomicResponse<Self, Result<Option<C2dMessage>, C2dFailure>>;

    fn handle(&mut self, msg: ReceiveC2d, _: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.with_queue(move |queue, op| {
            let until = op.now + chrono::Duration::from_std(msg.lock_timeout).unwrap_or(chrono::Duration::minutes(1));
            let Some(entry) = queue.entries.iter_mut().find(|e| e.receivable(op.now)) else { return Ok(None) };
            entry.lock(until, None);
            entry.delivered = true;
            Ok(Some(entry.message.clone()))
        }))
    }
}

impl Handler<SettleC2d> for DeviceActor {
    type Result = AtomicResponse<Self, Result<(), C2dFailure>>;

    fn handle(&mut self, msg: SettleC2d, _: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.with_queue(move |queue, op| queue.settle(&msg.lock_token, msg.outcome, op)))
    }
}

impl Handler<PurgeC2d> for DeviceActor {
    type Result = AtomicResponse<Self, Result<usize, C2dFailure>>;

    fn handle(&mut self, _: PurgeC2d, _: &mut Context<Self>) -> Self::Result {
        AtomicResponse::new(self.with_queue(|queue, op| Ok(queue.purge(op))))
    }
}
