//! The two implementations of [`Store`] (DESIGN.md §4) and the choice between them.
//!
//! - [`embedded`]: SQLite in `<data_dir>/iothubd.db` (registry) and `<data_dir>/events.db`
//!   (events log), the default; no setup. Each file has one writer thread that commits many
//!   writes with one fsync (group commit); reads run on pools of read-only connections.
//! - [`postgres`]: PostgreSQL through a connection pool, for deployments that want a server.
//!
//! Both keep the same schema — `hubs(name, host_name, etag, doc)` and
//! `identities(hub, device_id, module_id, status, etag, doc, twin, twin_version)`, where `doc` and
//! `twin` are the serde_json form of the model types and `module_id` is `''` for a device;
//! `event_partitions(hub, partition_id, next_sequence, last_enqueued_ms)` and
//! `event_checkpoints(hub, consumer_group, partition_id, sequence_number)` for the events log;
//! cloud-to-device queues in `c2d_messages(hub, device_id, module_id, sequence_number, doc,
//! body)` (deleted with their identity by a cascading foreign key) and feedback in
//! `feedback(hub, id, doc)`, numbered from `feedback_counters(hub, next_id)` — with versioned
//! migrations run at open, and both pass `tests/store_suite/`. The events themselves differ:
//! PostgreSQL keeps one row per event in `events(hub, partition_id, sequence_number,
//! enqueued_ms, body, meta)`; the embedded store, whose single writer thread pays for every
//! row, keeps each commit's events of a partition as one chunk in `event_chunks(hub,
//! partition_id, first_sequence, event_count, enqueued_ms, events)`. Both use the
//! [`event_codec`] form for an event's metadata, and the embedded store its chunk form.
//!
//! Within a partition, enqueued times never decrease as sequence numbers grow (each backend
//! takes the later of the clock and the partition's last enqueued time), so "first event at or
//! after a time" is a binary search over sequence numbers (over chunks, in the embedded store)
//! and needs no index on time.

mod event_codec;

pub mod embedded;
pub mod postgres;

use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use iothubd_actors::model::c2d::C2dMessage;
use iothubd_actors::model::event::PartitionInfo;
use iothubd_actors::model::identity::IdentityStatus;
use iothubd_actors::store::{DeviceStatistics, Store, StoreError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, StoreBackend};

/// Every registry table, besides `hubs`, holding data a hub owns; each has a `hub` column.
/// Deleting a hub empties them in this order, then deletes the hub row — so a table referencing
/// another one must come before it.
const HUB_SCOPED_TABLES: &[&str] = &["c2d_messages", "feedback", "feedback_counters", "identities"];

/// Opens the backend `store.backend` names, creating or migrating its schema.
pub async fn open(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = match cfg.store.backend {
        StoreBackend::Embedded => Arc::new(
            embedded::EmbeddedStore::open(&cfg.data_dir, &cfg.store)
                .await
                .with_context(|| format!("opening the embedded store in {}", cfg.data_dir.display()))?,
        ),
        // The URL is left out of the message: it may carry a password.
        StoreBackend::Postgres => {
            Arc::new(postgres::PostgresStore::open(&cfg.store).await.context("opening the PostgreSQL store")?)
        }
    };
    Ok(store)
}

/// The stored form of a model value (`doc`).
fn encode<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("cannot encode document: {e}")))
}

/// A model value from its stored form; `what` names the row for the error.
fn decode<T: DeserializeOwned>(what: &str, doc: &str) -> Result<T, StoreError> {
    serde_json::from_str(doc).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// The `twin_version` column of a twin's `version()`.
fn twin_version(version: u64) -> Result<i64, StoreError> {
    i64::try_from(version).map_err(|_| StoreError::Corrupt(format!("twin version {version} is out of range")))
}

/// The `module_id` column of an identity: `''` for a device, so the primary key has no NULL.
fn module_column(module_id: Option<&str>) -> &str {
    module_id.unwrap_or("")
}

/// The answer to a conditional write that changed no row, given the current ETag (if any).
fn missing_or_stale(current_etag: Option<String>) -> StoreError {
    match current_etag {
        Some(_) => StoreError::PreconditionFailed,
        None => StoreError::NotFound,
    }
}

/// Device statistics from `(status, count)` pairs of devices grouped by their `status` column.
fn statistics(counts: impl IntoIterator<Item = (String, i64)>) -> DeviceStatistics {
    let mut stats = DeviceStatistics::default();
    for (status, count) in counts {
        let count = u64::try_from(count).unwrap_or(0);
        stats.total_device_count += count;
        if status == IdentityStatus::Enabled.as_str() {
            stats.enabled_device_count += count;
        } else if status == IdentityStatus::Disabled.as_str() {
            stats.disabled_device_count += count;
        }
    }
    stats
}

/// A partition's READ answer (service-api §9) from its counter row — `(next_sequence,
/// last_enqueued_ms)`, absent when nothing was ever appended — and its first retained sequence
/// number, absent when nothing is retained.
fn partition_info(counters: Option<(i64, i64)>, first_retained: Option<i64>) -> PartitionInfo {
    let (next_sequence, last_enqueued_ms) = counters.unwrap_or((0, 0));
    PartitionInfo {
        begin_sequence_number: first_retained.unwrap_or(-1),
        last_sequence_number: next_sequence - 1,
        last_enqueued_time: time_of(last_enqueued_ms),
        is_empty: first_retained.is_none(),
    }
}

/// The stored form of an enqueued time: milliseconds since the Unix epoch.
fn millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

/// An enqueued time from its stored form; out-of-range values (never written) read as the epoch.
fn time_of(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// A cloud-to-device message's stored form: `(sequence_number, doc, body)`. The body is kept
/// apart, as raw bytes, because JSON would store a 64 KB body as a 250 KB array of numbers.
fn c2d_row(message: &C2dMessage) -> Result<(i64, String, Vec<u8>), StoreError> {
    let sequence_number = i64::try_from(message.sequence_number)
        .map_err(|_| StoreError::Corrupt(format!("sequence number {} is out of range", message.sequence_number)))?;
    let mut header = message.clone();
    let body = std::mem::take(&mut header.body);
    Ok((sequence_number, encode(&header)?, body))
}

/// A cloud-to-device message from its stored `doc` and `body` (see [`c2d_row`]).
fn c2d_message(doc: &str, body: Vec<u8>) -> Result<C2dMessage, StoreError> {
    let mut message: C2dMessage = decode("cloud-to-device message", doc)?;
    message.body = body;
    Ok(message)
}

/// The stored form of sequence numbers or feedback ids to remove. Values beyond `i64` cannot
/// have been stored, so they are dropped: removing an absent key is not an error.
fn stored_keys(keys: &[u64]) -> Vec<i64> {
    keys.iter().filter_map(|&key| i64::try_from(key).ok()).collect()
}

/// A feedback id read back from its `id` column.
fn feedback_id(id: i64) -> Result<u64, StoreError> {
    u64::try_from(id).map_err(|_| StoreError::Corrupt(format!("feedback id {id} is negative")))
}
