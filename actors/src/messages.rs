//! The vocabulary between front-ends and actors. Reading this file teaches the system.
//!
//! Each message says who sends it and what its reply means. Front-ends (HTTP today; MQTT and
//! AMQP sessions next) build these from wire requests; actors answer in domain terms, and the
//! front-end maps the answer to its protocol (HTTP status + `iothub-errorcode`, CONNACK, …).

use actix::Message;

use crate::import::ImportItem;
use crate::model::hub::HubDescription;
use crate::model::identity::{Identity, IdentityError, IdentityKey, IdentitySpec};
use crate::store::StoreError;

/// One identity-registry write. Sent by the registry REST (service-api §3) and by the bulk
/// import to the hub's `HubActor`; the reply is the identity as written (or as deleted).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Identity, RegistryError>")]
pub enum RegistryWrite {
    /// Create only; `AlreadyExists` when taken.
    Create { key: IdentityKey, spec: IdentitySpec },
    /// Replace mutable fields; `if_match` = `None` means unconditional (`*`).
    Replace { key: IdentityKey, spec: IdentitySpec, if_match: Option<String> },
    /// Delete (a device takes its modules along); `if_match` as for `Replace`.
    Delete { key: IdentityKey, if_match: Option<String> },
}

/// Why a registry write failed, in domain terms.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} not found")]
    NotFound(IdentityKey),
    #[error("{0} already exists")]
    AlreadyExists(IdentityKey),
    #[error("the ETag does not match the current one of {0}")]
    PreconditionFailed(IdentityKey),
    #[error(transparent)]
    Invalid(#[from] IdentityError),
    #[error("{0}")]
    Store(StoreError),
    /// An `…IfMatchETag` import item without an `eTag`.
    #[error("the import mode of {0} needs an eTag")]
    ETagRequired(IdentityKey),
    /// The import mode needs twins, which this hub does not store yet.
    #[error("import mode {mode} of {key} is not supported by this hub yet")]
    UnsupportedImportMode { key: IdentityKey, mode: &'static str },
    /// The hub is being deleted or shut down.
    #[error("the hub is not accepting registry writes")]
    HubStopped,
}

/// Bulk `POST /devices` or the operator import → `HubActor`: apply items in order. The reply
/// has one result per item, in the same order; one failing item does not stop the others.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Vec<Result<(), RegistryError>>")]
pub struct ImportIdentities(pub Vec<ImportItem>);

/// Operator API → `HubActor`: replace the hub's settings (already normalized). The reply is
/// the stored description with its new ETag.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<HubDescription, StoreError>")]
pub struct UpdateHubSettings {
    pub description: HubDescription,
    pub if_match: Option<String>,
}

/// Deployment → `HubActor`: the hub is deleted or the process stops; finish in-flight writes
/// and stop.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct StopHub;
