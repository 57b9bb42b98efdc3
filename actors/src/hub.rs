//! `HubActor`: one per hub. It owns the hub's settings and is the only writer of its
//! identity registry, so that later every registry change can be told to the identity's
//! device actor (a disabled device loses its session) and to the router (lifecycle events)
//! in one place.
//!
//! Writes run concurrently (each handler returns a future); the store makes each one atomic.

use std::sync::Arc;

use actix::prelude::*;

use crate::directory::HubShared;
use crate::import::{ImportItem, ImportMode};
use crate::messages::{ImportIdentities, RegistryError, RegistryWrite, StopHub, UpdateHubSettings};
use crate::model::hub::HubDescription;
use crate::model::identity::{Identity, IdentityKey, new_etag};
use crate::store::{Store, StoreError};

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

impl Actor for HubActor {
    type Context = Context<Self>;
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

async fn write(store: Arc<dyn Store>, hub: String, msg: RegistryWrite) -> Result<Identity, RegistryError> {
    match msg {
        RegistryWrite::Create { key, spec } => {
            let identity = Identity::create(key.clone(), spec)?;
            store.create_identity(&hub, &identity).await.map_err(|e| match e {
                // Creating a module: "not found" is about its device.
                StoreError::NotFound => RegistryError::NotFound(IdentityKey::device(key.device_id.clone())),
                other => store_error(&key, other),
            })?;
            Ok(identity)
        }
        RegistryWrite::Replace { key, spec, if_match } => {
            let current = store
                .get_identity(&hub, &key)
                .await
                .map_err(RegistryError::Store)?
                .ok_or_else(|| RegistryError::NotFound(key.clone()))?;
            if condition(&if_match).is_some_and(|etag| etag != current.etag) {
                return Err(RegistryError::PreconditionFailed(key));
            }
            let next = current.replaced(spec)?;
            // Guard on the ETag we read, so a concurrent writer between the read and this
            // write makes this one fail instead of being silently overwritten.
            store.replace_identity(&hub, &next, Some(&current.etag)).await.map_err(|e| store_error(&key, e))?;
            Ok(next)
        }
        RegistryWrite::Delete { key, if_match } => {
            store.delete_identity(&hub, &key, condition(&if_match)).await.map_err(|e| store_error(&key, e))
        }
    }
}

/// One import item as registry writes (service-api §3, bulk import modes).
async fn import_one(store: Arc<dyn Store>, hub: String, item: ImportItem) -> Result<(), RegistryError> {
    use ImportMode as M;
    let ImportItem { key, mode, etag, spec } = item;
    if mode.matches_etag() && etag.is_none() {
        return Err(RegistryError::ETagRequired(key));
    }
    let checked = if mode.matches_etag() { etag } else { None };
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
            Err(RegistryError::UnsupportedImportMode { key, mode: mode.name() })
        }
    };
    written.map(|_| ())
}

impl Handler<ImportIdentities> for HubActor {
    type Result = ResponseFuture<Vec<Result<(), RegistryError>>>;

    fn handle(&mut self, msg: ImportIdentities, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let hub = self.shared.name().to_owned();
        let stopping = self.stopping;
        Box::pin(async move {
            let mut results = Vec::with_capacity(msg.0.len());
            for item in msg.0 {
                results.push(if stopping {
                    Err(RegistryError::HubStopped)
                } else {
                    import_one(store.clone(), hub.clone(), item).await
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
        let store = self.store.clone();
        let hub = self.shared.name().to_owned();
        Box::pin(write(store, hub, msg))
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

impl Handler<StopHub> for HubActor {
    type Result = ();

    fn handle(&mut self, _: StopHub, ctx: &mut Context<Self>) {
        self.stopping = true;
        ctx.stop();
    }
}
