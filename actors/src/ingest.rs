//! The telemetry ingest path: a device's message, stamped with what the hub knows of the
//! sender (service-api §9, device-protocol §6), appended to its hub's events log.
//!
//! Telemetry does not hop through the `DeviceActor`: the stamps are fixed when the session
//! authenticates ([`Sender`]), so a session hands messages straight to the store's group commit
//! and acknowledges them when it returns — no cross-thread actor hop on the hottest path
//! (DESIGN.md §3). The messages of all sessions on one thread are handed over together, once
//! per turn of its event loop ([`Ingest`]), because the cross-thread wake-ups of a store call
//! per message cost more than the store itself. The actor still owns everything stateful about
//! the device.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::directory::HubShared;
use crate::model::event::{AnnotationValue, EventData, EventPosition, partition_of};
use crate::model::identity::{AuthenticationType, Identity, IdentityKey};
use crate::store::{Store, StoreError};

/// Who sent a message, as stamped on it: fixed for the life of a session. The stamped values
/// are shared with every message's annotations rather than copied into each.
#[derive(Debug, Clone)]
pub struct Sender {
    pub key: IdentityKey,
    device_id: Arc<str>,
    module_id: Option<Arc<str>>,
    generation_id: Arc<str>,
    /// `iothub-connection-auth-method`, JSON text.
    auth_method: Arc<str>,
    /// PnP model id from CONNECT (`dt-dataschema`).
    model_id: Option<Arc<str>>,
    partition: u32,
}

/// How a session authenticated, for `iothub-connection-auth-method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A token signed with the identity's own key.
    IdentitySas,
    /// A token of a hub policy with DeviceConnect.
    PolicySas,
    /// A client certificate.
    X509(AuthenticationType),
}

impl Sender {
    pub fn new(hub: &HubShared, identity: &Identity, method: AuthMethod, model_id: Option<String>) -> Self {
        let scope = match method {
            AuthMethod::PolicySas => "hub",
            _ if identity.key.is_module() => "module",
            _ => "device",
        };
        let kind = match method {
            AuthMethod::IdentitySas | AuthMethod::PolicySas => "sas",
            AuthMethod::X509(_) => "x509",
        };
        let auth_method = serde_json::json!({
            "scope": scope, "type": kind, "issuer": "iothub", "acceptingIpFilterRule": null,
        })
        .to_string()
        .into();
        let partitions = hub.description().properties.event_hub_endpoints.events.partition_count;
        Self {
            key: identity.key.clone(),
            device_id: identity.key.device_id.as_str().into(),
            module_id: identity.key.module_id.as_deref().map(Into::into),
            generation_id: identity.generation_id.as_str().into(),
            auth_method,
            model_id: model_id.map(Into::into),
            // Modules use their device's ID (service-api §9).
            partition: partition_of(&identity.key.device_id, partitions),
        }
    }

    /// The hub's annotations on a telemetry message from this sender.
    fn stamp(&self, data: &mut EventData) {
        // Not chrono's `Utc::now()`: its calendar conversion shows in the ingest profile.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let a = &mut data.annotations;
        a.reserve(7);
        a.push(("iothub-connection-device-id".into(), AnnotationValue::String(self.device_id.clone())));
        if let Some(m) = &self.module_id {
            a.push(("iothub-connection-module-id".into(), AnnotationValue::String(m.clone())));
        }
        a.push(("iothub-connection-auth-method".into(), AnnotationValue::String(self.auth_method.clone())));
        a.push(("iothub-connection-auth-generation-id".into(), AnnotationValue::String(self.generation_id.clone())));
        a.push(("iothub-enqueuedtime".into(), AnnotationValue::Timestamp(now)));
        a.push(("iothub-message-source".into(), AnnotationValue::String(telemetry_source())));
        if let Some(model) = &self.model_id {
            a.push(("dt-dataschema".into(), AnnotationValue::String(model.clone())));
        }
    }
}

/// `Telemetry`, the `iothub-message-source` of every device message, shared per thread.
fn telemetry_source() -> Arc<str> {
    thread_local! {
        static TELEMETRY: Arc<str> = Arc::from("Telemetry");
    }
    TELEMETRY.with(Arc::clone)
}

/// Appends telemetry to hub logs. Cheap to clone; shared by every session.
///
/// Sessions on one thread share their appends: the first message for a hub in a turn of the
/// thread's event loop opens a [`Batch`] and spawns the task that appends it, and every message
/// stamped before that task runs joins it. One store call (and, for the embedded store, one
/// cross-thread wake-up each way) then carries what all the thread's sessions sent in that turn
/// instead of one per message; each message still completes only once its batch is durable.
#[derive(Clone)]
pub struct Ingest {
    store: Arc<dyn Store>,
}

thread_local! {
    /// This thread's batches whose append has not started yet: at most one per (store, hub).
    static OPEN: RefCell<Vec<Rc<Batch>>> = const { RefCell::new(Vec::new()) };
}

/// Messages of one hub, stamped on one thread, appended together.
struct Batch {
    store: Arc<dyn Store>,
    hub: Arc<HubShared>,
    events: RefCell<Vec<(u32, EventData)>>,
    /// The waiting messages, by index in `events`.
    waiters: RefCell<Vec<Option<Waker>>>,
    /// Set once the append returned.
    outcome: RefCell<Option<Result<Vec<EventPosition>, StoreError>>>,
}

impl Batch {
    /// Takes this batch out of `OPEN` (later messages start another) and appends it.
    async fn append(self: Rc<Self>) {
        OPEN.with_borrow_mut(|open| open.retain(|b| !Rc::ptr_eq(b, &self)));
        let events = std::mem::take(&mut *self.events.borrow_mut());
        let count = events.len();
        let outcome = match self.store.append_events(self.hub.name(), events).await {
            Ok(positions) if positions.len() == count => {
                self.hub.signal_events_appended();
                Ok(positions)
            }
            Ok(_) => Err(StoreError::Corrupt("the store returned too few positions for an append".into())),
            Err(e) => Err(e),
        };
        *self.outcome.borrow_mut() = Some(outcome);
        for waker in self.waiters.borrow_mut().drain(..).flatten() {
            waker.wake();
        }
    }

    /// The outcome for the message at `index`, once the append returned.
    fn poll_outcome(&self, index: usize, cx: &mut Context<'_>) -> Poll<Result<EventPosition, StoreError>> {
        match &*self.outcome.borrow() {
            Some(Ok(positions)) => Poll::Ready(Ok(positions[index])),
            Some(Err(e)) => Poll::Ready(Err(e.clone())),
            None => {
                let mut waiters = self.waiters.borrow_mut();
                match &mut waiters[index] {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    slot => *slot = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Ingest {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Stamps `data` and adds it to this thread's open batch for the hub; the returned
    /// [`Appended`] completes once the batch is durable. Must run on a thread with a local task
    /// set (the MQTT workers, actix arbiters): the batch's append is a local task. Not an
    /// `async fn`: the message joins its batch now, and sessions keep the concrete future in
    /// their in-flight queue without boxing it.
    pub fn telemetry(&self, hub: &Arc<HubShared>, sender: &Sender, mut data: EventData) -> Appended {
        sender.stamp(&mut data);
        OPEN.with_borrow_mut(|open| {
            let found = open.iter().find(|b| Arc::ptr_eq(&b.store, &self.store) && Arc::ptr_eq(&b.hub, hub));
            let batch = match found {
                Some(b) => b.clone(),
                None => {
                    let batch = Rc::new(Batch {
                        store: self.store.clone(),
                        hub: hub.clone(),
                        events: RefCell::new(Vec::new()),
                        waiters: RefCell::new(Vec::new()),
                        outcome: RefCell::new(None),
                    });
                    open.push(batch.clone());
                    // Runs after the tasks already woken in this turn, which may join.
                    actix::spawn(batch.clone().append());
                    batch
                }
            };
            let mut events = batch.events.borrow_mut();
            events.push((sender.partition, data));
            batch.waiters.borrow_mut().push(None);
            let index = events.len() - 1;
            drop(events);
            Appended { batch, index }
        })
    }
}

/// One message's share of a batch append: ready with its position once the batch is durable.
pub struct Appended {
    batch: Rc<Batch>,
    index: usize,
}

impl Future for Appended {
    type Output = Result<EventPosition, StoreError>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.batch.poll_outcome(self.index, cx)
    }
}
