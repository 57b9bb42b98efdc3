//! `DeviceActor`: one per device or module identity, activated on demand (a session attaching,
//! later a service call), passivated when it has no session and nothing to do (DESIGN.md §2).
//!
//! It owns the identity's session slot — one live session per identity, the newer one wins and
//! the older is told to close (device-protocol §2.3) — and its twin ([`twin`]), loaded on first
//! use and written through to the store on every change; its pending direct-method calls
//! ([`methods`]); and its cloud-to-device queue ([`c2d`]).

pub mod c2d;
pub mod methods;
mod twin;

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use crate::directory::HubShared;
use crate::messages::{
    AttachOutcome, AttachSession, CloseReason, DetachSession, DisconnectReason, RevokeSession, SessionCommand,
};
use crate::model::identity::IdentityKey;
use crate::model::twin::Twin;
use crate::router::{EventSource, SystemEvent};
use crate::store::Store;

/// How long an actor with no session stays in memory before it stops.
pub const PASSIVATE_AFTER: Duration = Duration::from_secs(60);

struct AttachedSession {
    connection_id: u64,
    outbound: flume::Sender<SessionCommand>,
}

pub struct DeviceActor {
    hub: Arc<HubShared>,
    key: IdentityKey,
    store: Arc<dyn Store>,
    /// The twin as last read or written; `None` until first used.
    twin: Option<Twin>,
    /// Direct-method calls sent to the session, by `$rid`.
    pending: std::collections::HashMap<String, methods::Pending>,
    /// Direct-method calls waiting for the device to come online.
    waiting: Vec<methods::Waiting>,
    next_rid: u64,
    next_waiting: u64,
    /// What the attached session subscribed to (device-protocol §2.5).
    methods_subscribed: bool,
    desired_subscribed: bool,
    c2d_subscribed: bool,
    /// The C2D subscription's granted QoS is 0 (kept with a persistent session, like the filter).
    c2d_at_most_once: bool,
    /// The cloud-to-device queue; `None` until first used (boxed: idle actors stay small).
    c2d: Option<Box<c2d::Queue>>,
    /// Fires at the queue's earliest expiry.
    c2d_expiry: Option<SpawnHandle>,
    session: Option<AttachedSession>,
    /// A persistent (clean session 0) session existed before; its subscriptions are kept.
    persistent_state: bool,
    idle_timer: Option<SpawnHandle>,
}

impl DeviceActor {
    pub fn new(hub: Arc<HubShared>, key: IdentityKey, store: Arc<dyn Store>) -> Self {
        Self {
            hub,
            key,
            store,
            twin: None,
            pending: Default::default(),
            waiting: Vec::new(),
            next_rid: 0,
            next_waiting: 0,
            methods_subscribed: false,
            desired_subscribed: false,
            c2d_subscribed: false,
            c2d_at_most_once: false,
            c2d: None,
            c2d_expiry: None,
            session: None,
            persistent_state: false,
            idle_timer: None,
        }
    }

    fn arm_idle_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(t) = self.idle_timer.take() {
            ctx.cancel_future(t);
        }
        self.idle_timer = Some(ctx.run_later(PASSIVATE_AFTER, |actor, ctx| {
            if actor.session.is_none() && actor.pending.is_empty() && actor.waiting.is_empty() {
                ctx.stop();
            } else if actor.session.is_none() {
                actor.arm_idle_timer(ctx);
            }
        }));
    }

    fn close_session(&mut self, reason: CloseReason) {
        if let Some(old) = self.session.take() {
            if let Some(queue) = self.c2d.as_mut() {
                queue.release_session(old.connection_id);
            }
            // A full queue means the session is already stuck; it is closed by its own
            // keep-alive then. The slot is freed either way.
            let _ = old.outbound.try_send(SessionCommand::Close(reason));
            self.hub.session_detached();
            let reason = match reason {
                CloseReason::NewerSession => DisconnectReason::TakenOver,
                CloseReason::IdentityRevoked => DisconnectReason::IdentityRevoked,
            };
            self.connection_event("deviceDisconnected", Some(reason));
        }
    }

    /// `deviceConnected` / `deviceDisconnected` to the router (service-api §11).
    fn connection_event(&self, op_type: &'static str, reason: Option<DisconnectReason>) {
        let sequence = self.hub.next_connection_sequence();
        self.hub.route(SystemEvent {
            source: EventSource::DeviceConnectionState,
            key: self.key.clone(),
            op_type,
            body: serde_json::json!({ "sequenceNumber": sequence }),
            properties: reason.map(|r| ("disconnectReason".to_owned(), r.as_str().to_owned())).into_iter().collect(),
        });
    }
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.arm_idle_timer(ctx);
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.close_session(CloseReason::IdentityRevoked);
        self.hub.forget_device(&self.key, &ctx.address());
    }
}

/// A restart keeps the actor's address; the session slot survives in memory.
impl Supervised for DeviceActor {}

impl Handler<AttachSession> for DeviceActor {
    type Result = MessageResult<AttachSession>;

    fn handle(&mut self, msg: AttachSession, ctx: &mut Context<Self>) -> Self::Result {
        self.close_session(CloseReason::NewerSession);
        let session_present = !msg.clean_session && self.persistent_state;
        self.persistent_state = !msg.clean_session;
        if !session_present {
            // A new session starts with no subscriptions; a kept one keeps them (§2.8).
            self.methods_subscribed = false;
            self.desired_subscribed = false;
            self.c2d_subscribed = false;
        }
        self.session = Some(AttachedSession { connection_id: msg.connection_id, outbound: msg.outbound });
        self.hub.session_attached();
        self.connection_event("deviceConnected", None);
        self.release_waiting(ctx);
        self.start_c2d(ctx);
        if let Some(t) = self.idle_timer.take() {
            ctx.cancel_future(t);
        }
        MessageResult(AttachOutcome { session_present })
    }
}

impl Handler<DetachSession> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: DetachSession, ctx: &mut Context<Self>) {
        if self.session.as_ref().is_some_and(|s| s.connection_id == msg.connection_id) {
            self.session = None;
            if let Some(queue) = self.c2d.as_mut() {
                queue.release_session(msg.connection_id);
            }
            self.hub.session_detached();
            tracing::debug!(identity = %self.key, reason = ?msg.reason, "session detached");
            self.connection_event("deviceDisconnected", Some(msg.reason));
            self.arm_idle_timer(ctx);
        }
    }
}

impl Handler<RevokeSession> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _: RevokeSession, ctx: &mut Context<Self>) {
        self.close_session(CloseReason::IdentityRevoked);
        self.persistent_state = false;
        // A deleted identity's queue is gone from the store; a disabled one's is reloaded.
        self.forget_c2d(ctx);
        self.arm_idle_timer(ctx);
    }
}
