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

use chrono::{DateTime, Utc};

use crate::model::c2d::{C2dMessage, FeedbackRecord};
use crate::model::event::{EventData, EventPosition, PartitionInfo, StoredEvent};
use crate::model::hub::HubDescription;
use crate::model::identity::{Identity, IdentityKey};
use crate::model::twin::Twin;

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

    /// The identity's twin as last written; `Ok(None)` when it was never written (the twin is
    /// then a new one); `NotFound` when the identity does not exist. Twins are deleted with
    /// their identity.
    async fn get_twin(&self, hub: &str, key: &IdentityKey) -> Result<Option<Twin>, StoreError>;
    /// Writes the twin. `expected_version`: `None` = only if never written before, `Some(v)` =
    /// only if the stored twin's `version()` is `v`; otherwise `PreconditionFailed`.
    /// `NotFound` when the identity does not exist.
    async fn replace_twin(
        &self,
        hub: &str,
        key: &IdentityKey,
        twin: &Twin,
        expected_version: Option<u64>,
    ) -> Result<(), StoreError>;

    /// Appends events to the hub's log, durably: one commit (one fsync) for many concurrent
    /// callers (group commit). Each event goes to the partition given with it; sequence numbers
    /// are assigned per partition from 0, in append order; the enqueued time is the commit
    /// batch's time. Returns the positions in the order of `events`. `NotFound` for no such hub.
    async fn append_events(&self, hub: &str, events: Vec<(u32, EventData)>) -> Result<Vec<EventPosition>, StoreError>;
    /// Up to `max` events of a partition with sequence number >= `from_sequence`, in order.
    async fn read_events(
        &self,
        hub: &str,
        partition: u32,
        from_sequence: i64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError>;
    /// The first sequence number whose enqueued time is >= `time` (the next one to be
    /// assigned when there is none yet).
    async fn sequence_at(&self, hub: &str, partition: u32, time: DateTime<Utc>) -> Result<i64, StoreError>;
    async fn partition_info(&self, hub: &str, partition: u32) -> Result<PartitionInfo, StoreError>;
    /// Deletes events enqueued before `before` (retention); returns how many were deleted.
    /// Sequence numbers are never reused.
    async fn expire_events(&self, hub: &str, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// A consumer group's stored checkpoint of a partition: the last sequence number it
    /// processed.
    async fn get_checkpoint(&self, hub: &str, consumer_group: &str, partition: u32) -> Result<Option<i64>, StoreError>;
    async fn set_checkpoint(
        &self,
        hub: &str,
        consumer_group: &str,
        partition: u32,
        sequence_number: i64,
    ) -> Result<(), StoreError>;

    /// The identity's cloud-to-device queue in sequence order. `NotFound` when the identity does
    /// not exist. Queues are deleted with their identity and hub.
    async fn c2d_queue(&self, hub: &str, key: &IdentityKey) -> Result<Vec<C2dMessage>, StoreError>;
    /// Adds a message, or replaces the one with the same sequence number (lock, delivery count).
    /// `NotFound` when the identity does not exist.
    async fn c2d_put(&self, hub: &str, key: &IdentityKey, message: &C2dMessage) -> Result<(), StoreError>;
    /// Removes messages from the queue and appends feedback records to the hub's feedback queue,
    /// in one durable write (a removed message and its feedback are never apart). Sequence
    /// numbers not in the queue are ignored.
    async fn c2d_remove(
        &self,
        hub: &str,
        key: &IdentityKey,
        sequence_numbers: &[u64],
        feedback: &[FeedbackRecord],
    ) -> Result<(), StoreError>;
    /// Up to `max` of the hub's oldest feedback records, each with its id (increasing).
    async fn feedback_batch(&self, hub: &str, max: usize) -> Result<Vec<(u64, FeedbackRecord)>, StoreError>;
    /// Removes feedback records the service has taken (ids not present are ignored).
    async fn feedback_remove(&self, hub: &str, ids: &[u64]) -> Result<(), StoreError>;

    /// Makes everything written so far durable and stops accepting writes (graceful shutdown).
    async fn close(&self) -> Result<(), StoreError>;
}
