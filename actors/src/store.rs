//! The `Store` trait: the only way anything reaches persistent state (DESIGN.md §4, §7).
//!
//! Two implementations live in the `iothubd` crate (`store::embedded`, `store::postgres`) and
//! pass one shared test suite. Every write method returns only once the write is durable
//! (committed and fsync'd): callers acknowledge clients after it returns, never before.
//!
//! ETags are produced by the model (`model::identity::new_etag`); the store only compares an
//! expected ETag with the stored one, atomically with the write it guards.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::hub::HubDescription;
use crate::model::identity::{Identity, IdentityKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A create found the key taken.
    #[error("already exists")]
    Conflict,
    /// The target (or, for a module, its device) does not exist.
    #[error("not found")]
    NotFound,
    /// The expected ETag does not match the stored one.
    #[error("etag mismatch")]
    PreconditionFailed,
    /// The backend cannot be reached or refused the operation; nothing was written.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// Counts for `GET /statistics/devices` (devices only, not modules).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatistics {
    pub total_device_count: u64,
    pub enabled_device_count: u64,
    pub disabled_device_count: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"embedded"` or `"postgres"`, for logs and metrics labels.
    fn backend(&self) -> &'static str;

    /// Creates a hub; `Conflict` when the name or the host name is taken.
    async fn create_hub(&self, hub: &HubDescription) -> Result<(), StoreError>;
    /// Replaces a hub; `expected_etag` guards against lost updates. `NotFound`, `PreconditionFailed`.
    async fn replace_hub(&self, hub: &HubDescription, expected_etag: Option<&str>) -> Result<(), StoreError>;
    async fn get_hub(&self, name: &str) -> Result<Option<HubDescription>, StoreError>;
    /// All hubs, ordered by name.
    async fn list_hubs(&self) -> Result<Vec<HubDescription>, StoreError>;
    /// Deletes a hub and every piece of data it owns. `NotFound` when absent.
    async fn delete_hub(&self, name: &str) -> Result<(), StoreError>;

    /// Creates an identity. `Conflict` when it exists; for a module, `NotFound` when its device
    /// does not exist.
    async fn create_identity(&self, hub: &str, identity: &Identity) -> Result<(), StoreError>;
    /// Replaces an existing identity. `NotFound`; `PreconditionFailed` when `expected_etag` is
    /// given and differs from the stored ETag.
    async fn replace_identity(
        &self,
        hub: &str,
        identity: &Identity,
        expected_etag: Option<&str>,
    ) -> Result<(), StoreError>;
    async fn get_identity(&self, hub: &str, key: &IdentityKey) -> Result<Option<Identity>, StoreError>;
    /// Deletes an identity and returns it; deleting a device deletes its modules too.
    /// `NotFound`; `PreconditionFailed` as for replace.
    async fn delete_identity(
        &self,
        hub: &str,
        key: &IdentityKey,
        expected_etag: Option<&str>,
    ) -> Result<Identity, StoreError>;
    /// Devices (not modules) ordered by device ID, starting after `after`, at most `limit`.
    async fn list_devices(&self, hub: &str, after: Option<&str>, limit: usize) -> Result<Vec<Identity>, StoreError>;
    /// The modules of one device, ordered by module ID.
    async fn list_modules(&self, hub: &str, device_id: &str) -> Result<Vec<Identity>, StoreError>;
    async fn device_statistics(&self, hub: &str) -> Result<DeviceStatistics, StoreError>;

    /// Makes everything written so far durable and stops accepting writes (graceful shutdown).
    async fn close(&self) -> Result<(), StoreError>;
}
