//! The state of one MQTT connection once CONNECT succeeded, and what happens when it ends.
//!
//! A session holds what it needs to stamp telemetry without asking anyone (`ingest::Sender`),
//! the address of its identity's `DeviceActor`, its subscriptions, and the chain that keeps
//! PUBACKs in PUBLISH order. Dropping it (the connection is gone, for whatever reason)
//! detaches it from the actor, with the reason recorded while it lived.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use actix::Addr;
use futures::channel::oneshot;
use iothubd_actors::device::DeviceActor;
use iothubd_actors::directory::HubShared;
use iothubd_actors::ingest::{Ingest, Sender};
use iothubd_actors::messages::{DetachSession, DisconnectReason};
use iothubd_actors::model::identity::IdentityKey;

use super::topic::Subscription;

/// Most subscriptions one connection may hold (device-protocol §2.3).
pub const MAX_SUBSCRIPTIONS: usize = 5;

/// What a session and its command task (`connect::handshake`) both need to see.
#[derive(Debug)]
pub struct SharedFlags {
    /// Why the connection ends, set by whoever ends it.
    pub reason: Cell<DisconnectReason>,
    /// The C2D subscription of this connection was granted at QoS 0.
    pub c2d_at_most_once: Cell<bool>,
}

impl SharedFlags {
    pub fn new() -> Rc<Self> {
        Rc::new(Self { reason: Cell::new(DisconnectReason::ConnectionLost), c2d_at_most_once: Cell::new(false) })
    }
}

pub struct MqttSession {
    pub hub: Arc<HubShared>,
    pub key: IdentityKey,
    pub sender: Sender,
    pub ingest: Ingest,
    pub connection_id: u64,
    pub actor: Addr<DeviceActor>,
    pub subscriptions: RefCell<Vec<Subscription>>,
    /// Shared with the session's command task.
    pub flags: Rc<SharedFlags>,
    /// Completion of the latest PUBLISH still in progress (see [`MqttSession::ack_in_order`]).
    last_publish: RefCell<Option<oneshot::Receiver<()>>>,
    /// Dropped with the session: tells the session's timers that the connection is gone.
    _closed: oneshot::Sender<()>,
}

impl MqttSession {
    pub fn new(
        hub: Arc<HubShared>,
        sender: Sender,
        ingest: Ingest,
        connection_id: u64,
        actor: Addr<DeviceActor>,
        flags: Rc<SharedFlags>,
        closed: oneshot::Sender<()>,
    ) -> Self {
        Self {
            hub,
            key: sender.key.clone(),
            sender,
            ingest,
            connection_id,
            actor,
            subscriptions: RefCell::new(Vec::new()),
            flags,
            last_publish: RefCell::new(None),
            _closed: closed,
        }
    }

    /// Runs `work` (which may finish in any order, e.g. appends batched by group commit) and
    /// returns its result only after every earlier PUBLISH of this connection has returned,
    /// because ntex-mqtt acknowledges in completion order while MQTT §4.6 (and the C# client)
    /// require PUBACKs in PUBLISH order (device-protocol §2.3).
    pub async fn ack_in_order<T>(&self, work: impl Future<Output = T>) -> T {
        let (done, mine) = oneshot::channel();
        let previous = self.last_publish.replace(Some(mine));
        let result = work.await;
        if let Some(previous) = previous {
            // Cancelled means the earlier one failed and the connection is closing: either
            // way it is no longer ahead of us.
            let _ = previous.await;
        }
        let _ = done.send(());
        result
    }
}

impl Drop for MqttSession {
    fn drop(&mut self) {
        self.actor.do_send(DetachSession { connection_id: self.connection_id, reason: self.flags.reason.get() });
    }
}
