//! The two implementations of [`Store`] (DESIGN.md §4) and the choice between them.
//!
//! - [`embedded`]: SQLite in `<data_dir>/iothubd.db`, the default; no setup. One writer thread
//!   commits many writes with one fsync (group commit); reads run on a pool of read-only
//!   connections.
//! - [`postgres`]: PostgreSQL through a connection pool, for deployments that want a server.
//!
//! Both keep the same schema — `hubs(name, host_name, etag, doc)` and
//! `identities(hub, device_id, module_id, status, etag, doc)`, where `doc` is the serde_json form
//! of the model type and `module_id` is `''` for a device — with versioned migrations run at
//! open, and both pass `tests/store_suite.rs`.

pub mod embedded;
pub mod postgres;

use std::sync::Arc;

use anyhow::Context;
use iothubd_actors::model::identity::IdentityStatus;
use iothubd_actors::store::{DeviceStatistics, Store, StoreError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Config, StoreBackend};

/// Every table, besides `hubs`, holding data a hub owns; each has a `hub` column. Deleting a hub
/// empties them in this order, then deletes the hub row — so a table referencing another one
/// must come before it.
const HUB_SCOPED_TABLES: &[&str] = &["identities"];

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
