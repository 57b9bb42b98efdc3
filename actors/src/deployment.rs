//! The deployment: every hub of this process (the resource-provider analogue, DESIGN.md §5).
//!
//! It loads hubs from the store at start, starts one supervised `HubActor` per hub on an
//! arbiter chosen by hash of the hub name, and carries out the operator API's hub lifecycle:
//! create, update, delete (which deletes the hub's data).

use std::sync::Arc;

use actix::{ArbiterHandle, Supervisor};

use crate::directory::{HubDirectory, HubHandle, HubShared, Limits, arbiter_for};
use crate::hub::HubActor;
use crate::messages::{StopHub, UpdateHubSettings};
use crate::model::hub::{HubDescription, HubError};
use crate::model::identity::new_etag;
use crate::router::RouterActor;
use crate::store::{Store, StoreError};

/// Why a hub lifecycle request failed; mapped by the operator API.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HubAdminError {
    #[error(transparent)]
    Invalid(#[from] HubError),
    #[error("a hub with this name or host name already exists")]
    AlreadyExists,
    #[error("no such hub")]
    NotFound,
    #[error("the ETag does not match the hub's current one")]
    PreconditionFailed,
    #[error("{0}")]
    Store(StoreError),
    #[error("the hub's actor is not running")]
    ActorGone,
}

impl From<StoreError> for HubAdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => Self::AlreadyExists,
            StoreError::NotFound => Self::NotFound,
            StoreError::PreconditionFailed => Self::PreconditionFailed,
            other => Self::Store(other),
        }
    }
}

#[derive(Clone)]
pub struct Deployment {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    directory: HubDirectory,
    arbiters: Arc<[ArbiterHandle]>,
    limits: Limits,
}

impl Deployment {
    /// Loads every stored hub and starts its actor, with the default limits. Must run inside
    /// the actix System.
    pub async fn start(store: Arc<dyn Store>, arbiters: Vec<ArbiterHandle>) -> Result<Self, StoreError> {
        Self::start_with_limits(store, arbiters, Limits::default()).await
    }

    /// As [`Deployment::start`], with the given limits.
    pub async fn start_with_limits(
        store: Arc<dyn Store>,
        arbiters: Vec<ArbiterHandle>,
        limits: Limits,
    ) -> Result<Self, StoreError> {
        let inner = Inner { store, directory: HubDirectory::default(), arbiters: arbiters.into(), limits };
        let deployment = Self { inner: Arc::new(inner) };
        for hub in deployment.inner.store.list_hubs().await? {
            deployment.spawn(hub);
        }
        Ok(deployment)
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    pub fn directory(&self) -> &HubDirectory {
        &self.inner.directory
    }

    fn spawn(&self, description: HubDescription) -> HubHandle {
        let shared = Arc::new(HubShared::new(
            description,
            self.inner.arbiters.clone(),
            self.inner.store.clone(),
            self.inner.limits,
        ));
        let store = self.inner.store.clone();
        let actor_shared = shared.clone();
        let addr = match arbiter_for(&self.inner.arbiters, shared.name()) {
            Some(arbiter) => Supervisor::start_in_arbiter(&arbiter, move |_| HubActor::new(actor_shared, store)),
            None => Supervisor::start(move |_| HubActor::new(actor_shared, store)),
        };
        let (router_hub, router_store) = (shared.clone(), self.inner.store.clone());
        let make_router = move |_: &mut actix::Context<RouterActor>| RouterActor::new(router_hub, router_store);
        let router = match arbiter_for(&self.inner.arbiters, shared.name()) {
            Some(arbiter) => Supervisor::start_in_arbiter(&arbiter, make_router),
            None => Supervisor::start(make_router),
        };
        shared.set_router(router);
        let handle = HubHandle { shared, addr };
        self.inner.directory.insert(handle.clone());
        handle
    }

    /// Creates a hub (defaults filled, limits checked) and starts its actor.
    pub async fn create_hub(&self, mut description: HubDescription) -> Result<HubDescription, HubAdminError> {
        description.normalize()?;
        description.etag = new_etag();
        if self.directory().get(&description.name).is_some() {
            return Err(HubAdminError::AlreadyExists);
        }
        self.inner.store.create_hub(&description).await?;
        self.spawn(description.clone());
        Ok(description)
    }

    /// Replaces a hub's settings. Partition count is fixed at creation (service-api §9).
    pub async fn update_hub(
        &self,
        mut description: HubDescription,
        if_match: Option<String>,
    ) -> Result<HubDescription, HubAdminError> {
        description.normalize()?;
        let handle = self.directory().get(&description.name).ok_or(HubAdminError::NotFound)?;
        let current = handle.description();
        let fixed = current.properties.event_hub_endpoints.events.partition_count;
        if description.properties.event_hub_endpoints.events.partition_count != fixed {
            return Err(HubError(format!("partitionCount is fixed at creation ({fixed})")).into());
        }
        let old_host = current.properties.host_name.clone();
        let new_host = description.properties.host_name.clone();
        if old_host != new_host && self.directory().is_hub_host(&new_host) {
            return Err(HubAdminError::AlreadyExists);
        }
        let updated = handle
            .addr
            .send(UpdateHubSettings { description, if_match })
            .await
            .map_err(|_| HubAdminError::ActorGone)??;
        self.directory().rehost(handle.name(), &old_host, &new_host);
        Ok(updated)
    }

    /// Deletes a hub and all its data; its actor stops after in-flight writes.
    pub async fn delete_hub(&self, name: &str) -> Result<(), HubAdminError> {
        let handle = self.directory().remove(name).ok_or(HubAdminError::NotFound)?;
        handle.addr.do_send(StopHub);
        if let Err(e) = self.inner.store.delete_hub(name).await {
            // Nothing was deleted: bring the hub back as it was.
            self.spawn((*handle.description()).clone());
            return Err(e.into());
        }
        Ok(())
    }

    /// Stops every hub actor (graceful shutdown); the store is closed by the caller.
    pub fn stop(&self) {
        for hub in self.directory().all() {
            hub.addr.do_send(StopHub);
        }
    }
}
