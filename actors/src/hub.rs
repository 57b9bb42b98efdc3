//! `HubActor`: one per hub. It owns the hub's settings and is the only writer of its
//! identity registry, so that later every registry change can be told to the identity's
//! device actor (a disabled device loses its session) and to the router (lifecycle events)
//! in one place.
//!
//! Writes run concurrently (each handler returns a future); the store makes each one atomic.

use std::sync::Arc;

use actix::prelude::*;

use crate::directory::HubShared;
use crate::import::{ImportItem, ImportMode, TwinImport};
use crate::messages::{
    ImportIdentities, RegistryError, RegistryWrite, RevokeSession, SetCheckpoint, StopHub, UpdateHubSettings,
};
use crate::messages::{TwinFailure, UpdateTwin};
use crate::model::hub::HubDescription;
use crate::model::identity::ConnectionView;
use crate::model::identity::{Identity, IdentityKey, new_etag};
use crate::model::twin::{Twin, TwinIdentity};
use crate::router::{EventSource, SystemEvent};
use crate::store::{Store, StoreError};
use chrono::Utc;

pub struct HubActor {
    shared: Arc<HubShared>,
    store: Arc<dyn Store>,
    stopping: bool,
}

impl HubActor {
    pub fn new(shared: Arc<HubShared>, store: Arc<dyn Store>) -> Self {
        Self { shared, store, stopping: false }
    }
}

/// How often a hub deletes events older than its retention (service-api §9).
const RETENTION_SWEEP: std::time::Duration = std::time::Duration::from_secs(60);

impl Actor for HubActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(RETENTION_SWEEP, |actor, _| {
            let (store, shared) = (actor.store.clone(), actor.shared.clone());
            let days = shared.description().properties.event_hub_endpoints.events.retention_time_in_days;
            actix::spawn(async move {
                let before = Utc::now() - chrono::Duration::days(i64::from(days));
                if let Err(e) = store.expire_events(shared.name(), before).await {
                    tracing::warn!(hub = shared.name(), error = %e, "retention sweep failed; retrying next minute");
                }
            });
        });
    }
}

/// A supervised restart keeps serving: all state is in `HubShared` and the store.
impl Supervised for HubActor {}

fn store_error(key: &IdentityKey, e: StoreError) -> RegistryError {
    match e {
        StoreError::NotFound => RegistryError::NotFound(key.clone()),
        StoreError::Conflict => RegistryError::AlreadyExists(key.clone()),
        StoreError::PreconditionFailed => RegistryError::PreconditionFailed(key.clone()),
        other => RegistryError::Store(other),
    }
}

/// `*` and absent both mean "unconditional" (service-api §0).
fn condition(if_match: &Option<String>) -> Option<&str> {
    if_match.as_deref().filter(|e| *e != "*")
}

/// Tells live sessions of `key` (and, for a device, of its modules) that they lost access.
fn revoke_sessions(hub: &HubShared, key: &IdentityKey) {
    if let Some(actor) = hub.live_device(key) {
        actor.do_send(RevokeSession);
    }
    if !key.is_module() {
        for module in hub.live_modules_of(&key.device_id) {
            module.do_send(RevokeSession);
        }
    }
}

/// One registry write, then its consequences: live sessions of a disabled or deleted identity
/// end, and creations and deletions are lifecycle events (service-api §11).
async fn write(store: Arc<dyn Store>, shared: Arc<HubShared>, msg: RegistryWrite) -> Result<Identity, RegistryError> {
    let op_type = match &msg {
        RegistryWrite::Create { .. } => Some("createDeviceIdentity"),
        RegistryWrite::Delete { .. } => Some("deleteDeviceIdentity"),
        RegistryWrite::Replace { .. } => None,
    };
    let deleting = matches!(msg, RegistryWrite::Delete { .. });
    let written = write_to_store(&*store, shared.name(), msg).await?;
    if deleting || !written.is_enabled() {
        revoke_sessions(&shared, &written.key);
    }
    if let Some(op_type) = op_type {
        shared.route(lifecycle_event(&written, op_type));
    }
    Ok(written)
}

/// A lifecycle event: the identity's twin snapshot as the body (service-api §11).
fn lifecycle_event(identity: &Identity, op_type: &'static str) -> SystemEvent {
    let twin = Twin::new(identity.created_time);
    let view = twin.service_json(&TwinIdentity::new(identity, &ConnectionView::default(), ""));
    let mut body = serde_json::Map::new();
    for field in ["deviceId", "moduleId", "etag", "version", "properties"] {
        if let Some(v) = view.get(field) {
            body.insert(field.to_owned(), v.clone());
        }
    }
    SystemEvent {
        source: EventSource::DeviceLifecycle,
        key: identity.key.clone(),
        op_type,
        body: serde_json::Value::Object(body),
        properties: Vec::new(),
    }
}

async fn write_to_store(store: &dyn Store, hub: &str, msg: RegistryWrite) -> Result<Identity, RegistryError> {
    match msg {
        RegistryWrite::Create { key, spec } => {
            let identity = Identity::create(key.clone(), spec)?;
            store.create_identity(hub, &identity).await.map_err(|e| match e {
                // Creating a module: "not found" is about its device.
                StoreError::NotFound => RegistryError::NotFound(IdentityKey::device(key.device_id.clone())),
                other => store_error(&key, other),
            })?;
            Ok(identity)
        }
        RegistryWrite::Replace { key, spec, if_match } => {
            let current = store
                .get_identity(hub, &key)
                .await
                .map_err(RegistryError::Store)?
                .ok_or_else(|| RegistryError::NotFound(key.clone()))?;
            if condition(&if_match).is_some_and(|etag| etag != current.etag) {
                return Err(RegistryError::PreconditionFailed(key));
            }
            let next = current.replaced(spec)?;
            // Guard on the ETag we read, so a concurrent writer between the read and this
            // write makes this one fail instead of being silently overwritten.
            store.replace_identity(hub, &next, Some(&current.etag)).await.map_err(|e| store_error(&key, e))?;
            Ok(next)
        }
        RegistryWrite::Delete { key, if_match } => {
            store.delete_identity(hub, &key, condition(&if_match)).await.map_err(|e| store_error(&key, e))
        }
    }
}

/// One import item as registry writes (service-api §3, bulk import modes).
async fn import_one(store: Arc<dyn Store>, shared: Arc<HubShared>, item: ImportItem) -> Result<(), RegistryError> {
    use ImportMode as M;
    let ImportItem { key, mode, etag, spec, twin } = item;
    if mode.matches_etag() && etag.is_none() {
        return Err(RegistryError::ETagRequired(key));
    }
    let checked = if mode.matches_etag() { etag } else { None };
    let hub = shared.clone();
    let written = match mode {
        M::Create => write(store, hub, RegistryWrite::Create { key, spec }).await,
        M::Update | M::UpdateIfMatchETag => {
            write(store, hub, RegistryWrite::Replace { key, spec, if_match: checked }).await
        }
        M::CreateOrUpdate | M::CreateOrUpdateIfMatchETag => {
            let create = RegistryWrite::Create { key: key.clone(), spec: spec.clone() };
            match write(store.clone(), hub.clone(), create).await {
                Err(RegistryError::AlreadyExists(_)) => {
                    write(store, hub, RegistryWrite::Replace { key, spec, if_match: checked }).await
                }
                other => other,
            }
        }
        M::Delete | M::DeleteIfMatchETag => write(store, hub, RegistryWrite::Delete { key, if_match: checked }).await,
        M::UpdateTwin | M::UpdateTwinIfMatchETag => {
            let twin_etag = match (mode, twin.etag.clone()) {
                (M::UpdateTwinIfMatchETag, None) => return Err(RegistryError::TwinETagRequired(key)),
                (M::UpdateTwinIfMatchETag, etag) => etag,
                _ => None,
            };
            return patch_twin(&shared, &key, twin, twin_etag.as_deref()).await;
        }
    };
    let written = written?;
    if !twin.is_empty() && !matches!(mode, M::Delete | M::DeleteIfMatchETag) {
        patch_twin(&shared, &written.key, twin, None).await?;
    }
    Ok(())
}

/// Applies an import item's twin content as a twin PATCH, through the identity's
/// `DeviceActor` (the one writer of its twin), checking `twinETag` when given.
async fn patch_twin(
    shared: &Arc<HubShared>,
    key: &IdentityKey,
    content: TwinImport,
    twin_etag: Option<&str>,
) -> Result<(), RegistryError> {
    let update = UpdateTwin {
        tags: content.tags,
        desired: content.desired,
        replace: false,
        if_match: twin_etag.map(str::to_owned),
    };
    let reply = shared.device(key).send(update).await.map_err(|_| RegistryError::HubStopped)?;
    match reply {
        Ok(_) => Ok(()),
        Err(TwinFailure::NotFound(k)) => Err(RegistryError::NotFound(k)),
        Err(TwinFailure::PreconditionFailed) => Err(RegistryError::PreconditionFailed(key.clone())),
        Err(TwinFailure::Invalid(reason)) => Err(RegistryError::InvalidTwin { key: key.clone(), reason }),
        Err(TwinFailure::Store(e)) => Err(RegistryError::Store(e)),
    }
}

impl Handler<ImportIdentities> for HubActor {
    type Result = ResponseFuture<Vec<Result<(), RegistryError>>>;

    fn handle(&mut self, msg: ImportIdentities, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let shared = self.shared.clone();
        let stopping = self.stopping;
        Box::pin(async move {
            let mut results = Vec::with_capacity(msg.0.len());
            for item in msg.0 {
                results.push(if stopping {
                    Err(RegistryError::HubStopped)
                } else {
                    import_one(store.clone(), shared.clone(), item).await
                });
            }
            results
        })
    }
}

impl Handler<RegistryWrite> for HubActor {
    type Result = ResponseFuture<Result<Identity, RegistryError>>;

    fn handle(&mut self, msg: RegistryWrite, _: &mut Context<Self>) -> Self::Result {
        if self.stopping {
            return Box::pin(async { Err(RegistryError::HubStopped) });
        }
        Box::pin(write(self.store.clone(), self.shared.clone(), msg))
    }
}

impl Handler<UpdateHubSettings> for HubActor {
    type Result = ResponseActFuture<Self, Result<HubDescription, StoreError>>;

    fn handle(&mut self, msg: UpdateHubSettings, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let mut next = msg.description;
        next.etag = new_etag();
        let fut = async move {
            store.replace_hub(&next, msg.if_match.as_deref().filter(|e| *e != "*")).await?;
            Ok(next)
        };
        Box::pin(fut.into_actor(self).map(|res, actor, _| {
            if let Ok(description) = &res {
                actor.shared.set_description(description.clone());
            }
            res
        }))
    }
}

impl Handler<SetCheckpoint> for HubActor {
    type Result = ResponseFuture<Result<(), StoreError>>;

    fn handle(&mut self, msg: SetCheckpoint, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let hub = self.shared.name().to_owned();
        Box::pin(
            async move { store.set_checkpoint(&hub, &msg.consumer_group, msg.partition, msg.sequence_number).await },
        )
    }
}

impl Handler<StopHub> for HubActor {
    type Result = ();

    fn handle(&mut self, _: StopHub, ctx: &mut Context<Self>) {
        self.stopping = true;
        ctx.stop();
    }
}
