//! The embedded store: SQLite in `<data_dir>/iothubd.db` (hubs, identities, twins) and
//! `<data_dir>/events.db` (the events log), so a fresh machine runs iothubd without setting up
//! a database (DESIGN.md §4, §10).
//!
//! - `writer`: the registry's one writer thread; group commit, one savepoint per write.
//! - `c2d`: cloud-to-device queues and feedback, in the registry file (written by `writer`).
//! - `event_log`, `event_writer`: the events log, with a writer thread and readers of its own
//!   so that the telemetry firehose and registry writes never queue behind each other.
//! - `readers`: read-only connections used on blocking threads.
//! - `schema`: tables, migrations (`PRAGMA user_version`), connection settings, error mapping.

mod c2d;
mod event_log;
mod event_writer;
mod readers;
mod schema;
mod writer;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use iothubd_actors::model::c2d::{C2dMessage, FeedbackRecord};
use iothubd_actors::model::event::{EventData, EventPosition, PartitionInfo, StoredEvent};
use iothubd_actors::model::hub::HubDescription;
use iothubd_actors::model::identity::{Identity, IdentityKey};
use iothubd_actors::model::twin::Twin;
use iothubd_actors::store::{DeviceStatistics, Store, StoreError};
use rusqlite::{Connection, OptionalExtension, Params};
use tokio::sync::Mutex;

use self::c2d::{C2dOp, QueueKey};
pub use self::event_log::EVENT_LOG_FILE;
use self::event_log::EventLog;
use self::readers::Readers;
use self::schema::store_error;
use self::writer::{HubRow, IdentityRow, WriteOp, WriterHandle};
use super::{c2d_row, decode, encode, module_column, statistics, stored_keys};
use crate::config::StoreConfig;

/// The registry database file inside `data_dir`.
pub const DATABASE_FILE: &str = "iothubd.db";

pub struct EmbeddedStore {
    writer: WriterHandle,
    readers: Arc<Readers>,
    events: EventLog,
    /// Held while a hub is created or deleted: a hub's deletion spans both files (registry,
    /// then log), and a same-named hub created in between would lose its first events to the
    /// purge.
    hub_lifecycle: Mutex<()>,
}

impl EmbeddedStore {
    /// Opens `<data_dir>/iothubd.db` and `<data_dir>/events.db`, creating the directory and the
    /// schemas as needed.
    pub async fn open(data_dir: &Path, cfg: &StoreConfig) -> anyhow::Result<Self> {
        let dir = data_dir.to_owned();
        let (queue_capacity, max_batch) = (cfg.queue_capacity, cfg.max_batch);
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(DATABASE_FILE);
            // The writer creates and migrates the file before any reader opens it.
            let writer = WriterHandle::start(&path, queue_capacity, max_batch)?;
            let readers = Readers::open(&path, reader_count())?;
            let events = EventLog::open(&dir.join(EVENT_LOG_FILE), &path, queue_capacity, max_batch, reader_count())?;
            Ok(Self { writer, readers, events, hub_lifecycle: Mutex::new(()) })
        })
        .await?
    }
}

/// Reads are short point and range queries: about one connection per core keeps every core busy.
fn reader_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
}

fn hub_row(hub: &HubDescription) -> Result<HubRow, StoreError> {
    Ok(HubRow {
        name: hub.name.clone(),
        host_name: hub.properties.host_name.clone(),
        etag: hub.etag.clone(),
        doc: encode(hub)?,
    })
}

fn identity_row(hub: &str, identity: &Identity) -> Result<IdentityRow, StoreError> {
    Ok(IdentityRow {
        hub: hub.to_owned(),
        device_id: identity.key.device_id.clone(),
        module_id: module_column(identity.key.module_id.as_deref()).to_owned(),
        status: identity.status.as_str(),
        etag: identity.etag.clone(),
        doc: encode(identity)?,
    })
}

/// The `doc` column of the one row `sql` selects, if any.
fn one_doc(db: &Connection, sql: &str, params: impl Params) -> Result<Option<String>, StoreError> {
    db.prepare_cached(sql).and_then(|mut stmt| stmt.query_row(params, |row| row.get(0)).optional()).map_err(store_error)
}

/// The `doc` column of every row `sql` selects, in order.
fn all_docs(db: &Connection, sql: &str, params: impl Params) -> Result<Vec<String>, StoreError> {
    db.prepare_cached(sql).and_then(|mut stmt| stmt.query_map(params, |row| row.get(0))?.collect()).map_err(store_error)
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn create_hub(&self, hub: &HubDescription) -> Result<(), StoreError> {
        let row = hub_row(hub)?;
        let _lifecycle = self.hub_lifecycle.lock().await;
        self.writer.write(WriteOp::CreateHub(row)).await.map(drop)
    }

    async fn replace_hub(&self, hub: &HubDescription, expected_etag: Option<&str>) -> Result<(), StoreError> {
        let op = WriteOp::ReplaceHub { row: hub_row(hub)?, expected_etag: expected_etag.map(str::to_owned) };
        self.writer.write(op).await.map(drop)
    }

    async fn get_hub(&self, name: &str) -> Result<Option<HubDescription>, StoreError> {
        let name = name.to_owned();
        self.readers
            .read(move |db| {
                let doc = one_doc(db, "SELECT doc FROM hubs WHERE name = ?1", [&name])?;
                doc.map(|doc| decode("hub document", &doc)).transpose()
            })
            .await
    }

    async fn list_hubs(&self) -> Result<Vec<HubDescription>, StoreError> {
        self.readers
            .read(|db| {
                let docs = all_docs(db, "SELECT doc FROM hubs ORDER BY name", [])?;
                docs.iter().map(|doc| decode("hub document", doc)).collect()
            })
            .await
    }

    async fn delete_hub(&self, name: &str) -> Result<(), StoreError> {
        let _lifecycle = self.hub_lifecycle.lock().await;
        // Registry first: from its commit on, the log refuses new events for the hub, so the
        // purge after it leaves nothing behind. A crash in between leaves the log rows, which
        // the log's writer purges at the next start.
        self.writer.write(WriteOp::DeleteHub { name: name.to_owned() }).await?;
        self.events.purge(name).await
    }

    async fn create_identity(&self, hub: &str, identity: &Identity) -> Result<(), StoreError> {
        self.writer.write(WriteOp::CreateIdentity(identity_row(hub, identity)?)).await.map(drop)
    }

    async fn replace_identity(
        &self,
        hub: &str,
        identity: &Identity,
        expected_etag: Option<&str>,
    ) -> Result<(), StoreError> {
        let op = WriteOp::ReplaceIdentity {
            row: identity_row(hub, identity)?,
            expected_etag: expected_etag.map(str::to_owned),
        };
        self.writer.write(op).await.map(drop)
    }

    async fn get_identity(&self, hub: &str, key: &IdentityKey) -> Result<Option<Identity>, StoreError> {
        let (hub, device_id) = (hub.to_owned(), key.device_id.clone());
        let module_id = module_column(key.module_id.as_deref()).to_owned();
        self.readers
            .read(move |db| {
                let doc = one_doc(
                    db,
                    "SELECT doc FROM identities WHERE hub = ?1 AND device_id = ?2 AND module_id = ?3",
                    [&hub, &device_id, &module_id],
                )?;
                doc.map(|doc| decode("identity document", &doc)).transpose()
            })
            .await
    }

    async fn delete_identity(
        &self,
        hub: &str,
        key: &IdentityKey,
        expected_etag: Option<&str>,
    ) -> Result<Identity, StoreError> {
        let op = WriteOp::DeleteIdentity {
            hub: hub.to_owned(),
            device_id: key.device_id.clone(),
            module_id: module_column(key.module_id.as_deref()).to_owned(),
            expected_etag: expected_etag.map(str::to_owned),
        };
        let removed = self.writer.write(op).await?;
        let doc = removed.ok_or_else(|| StoreError::Corrupt("a delete returned no document".into()))?;
        decode("identity document", &doc)
    }

    async fn list_devices(&self, hub: &str, after: Option<&str>, limit: usize) -> Result<Vec<Identity>, StoreError> {
        // '' sorts before every device ID (IDs are never empty), so it stands for "from the start".
        let (hub, after) = (hub.to_owned(), after.unwrap_or("").to_owned());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.readers
            .read(move |db| {
                let docs = all_docs(
                    db,
                    "SELECT doc FROM identities WHERE hub = ?1 AND module_id = '' AND device_id > ?2
                     ORDER BY device_id LIMIT ?3",
                    rusqlite::params![hub, after, limit],
                )?;
                docs.iter().map(|doc| decode("identity document", doc)).collect()
            })
            .await
    }

    async fn list_modules(&self, hub: &str, device_id: &str) -> Result<Vec<Identity>, StoreError> {
        let (hub, device_id) = (hub.to_owned(), device_id.to_owned());
        self.readers
            .read(move |db| {
                let docs = all_docs(
                    db,
                    "SELECT doc FROM identities WHERE hub = ?1 AND device_id = ?2 AND module_id <> ''
                     ORDER BY module_id",
                    [&hub, &device_id],
                )?;
                docs.iter().map(|doc| decode("identity document", doc)).collect()
            })
            .await
    }

    async fn device_statistics(&self, hub: &str) -> Result<DeviceStatistics, StoreError> {
        let hub = hub.to_owned();
        self.readers
            .read(move |db| {
                let counts = db
                    .prepare_cached(
                        "SELECT status, count(*) FROM identities WHERE hub = ?1 AND module_id = ''
                         GROUP BY status",
                    )
                    .and_then(|mut stmt| {
                        stmt.query_map([&hub], |row| Ok((row.get(0)?, row.get(1)?)))?.collect::<Result<Vec<_>, _>>()
                    })
                    .map_err(store_error)?;
                Ok(statistics(counts))
            })
            .await
    }

    async fn get_twin(&self, hub: &str, key: &IdentityKey) -> Result<Option<Twin>, StoreError> {
        let (hub, device_id) = (hub.to_owned(), key.device_id.clone());
        let module_id = module_column(key.module_id.as_deref()).to_owned();
        self.readers
            .read(move |db| {
                let row: Option<Option<String>> = db
                    .prepare_cached("SELECT twin FROM identities WHERE hub = ?1 AND device_id = ?2 AND module_id = ?3")
                    .and_then(|mut stmt| stmt.query_row([&hub, &device_id, &module_id], |row| row.get(0)).optional())
                    .map_err(store_error)?;
                let twin = row.ok_or(StoreError::NotFound)?;
                twin.map(|doc| decode("twin document", &doc)).transpose()
            })
            .await
    }

    async fn replace_twin(
        &self,
        hub: &str,
        key: &IdentityKey,
        twin: &Twin,
        expected_version: Option<u64>,
    ) -> Result<(), StoreError> {
        let op = WriteOp::ReplaceTwin {
            hub: hub.to_owned(),
            device_id: key.device_id.clone(),
            module_id: module_column(key.module_id.as_deref()).to_owned(),
            doc: encode(twin)?,
            version: super::twin_version(twin.version())?,
            expected_version: expected_version.map(super::twin_version).transpose()?,
        };
        self.writer.write(op).await.map(drop)
    }

    async fn append_events(&self, hub: &str, events: Vec<(u32, EventData)>) -> Result<Vec<EventPosition>, StoreError> {
        self.events.append(hub, events).await
    }

    async fn read_events(
        &self,
        hub: &str,
        partition: u32,
        from_sequence: i64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.events.read(hub, partition, from_sequence, max).await
    }

    async fn sequence_at(&self, hub: &str, partition: u32, time: DateTime<Utc>) -> Result<i64, StoreError> {
        self.events.sequence_at(hub, partition, time).await
    }

    async fn partition_info(&self, hub: &str, partition: u32) -> Result<PartitionInfo, StoreError> {
        self.events.partition_info(hub, partition).await
    }

    async fn expire_events(&self, hub: &str, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.events.expire(hub, before).await
    }

    async fn get_checkpoint(&self, hub: &str, consumer_group: &str, partition: u32) -> Result<Option<i64>, StoreError> {
        self.events.get_checkpoint(hub, consumer_group, partition).await
    }

    async fn set_checkpoint(
        &self,
        hub: &str,
        consumer_group: &str,
        partition: u32,
        sequence_number: i64,
    ) -> Result<(), StoreError> {
        self.events.set_checkpoint(hub, consumer_group, partition, sequence_number).await
    }

    async fn c2d_queue(&self, hub: &str, key: &IdentityKey) -> Result<Vec<C2dMessage>, StoreError> {
        let queue = QueueKey::new(hub, key);
        self.readers.read(move |db| c2d::queue(db, &queue)).await
    }

    async fn c2d_put(&self, hub: &str, key: &IdentityKey, message: &C2dMessage) -> Result<(), StoreError> {
        let (sequence_number, doc, body) = c2d_row(message)?;
        let op = C2dOp::Put { queue: QueueKey::new(hub, key), sequence_number, doc, body };
        self.writer.write(WriteOp::C2d(op)).await.map(drop)
    }

    async fn c2d_remove(
        &self,
        hub: &str,
        key: &IdentityKey,
        sequence_numbers: &[u64],
        feedback: &[FeedbackRecord],
    ) -> Result<(), StoreError> {
        let op = C2dOp::Remove {
            queue: QueueKey::new(hub, key),
            sequence_numbers: stored_keys(sequence_numbers),
            feedback: feedback.iter().map(encode).collect::<Result<_, _>>()?,
        };
        self.writer.write(WriteOp::C2d(op)).await.map(drop)
    }

    async fn feedback_batch(&self, hub: &str, max: usize) -> Result<Vec<(u64, FeedbackRecord)>, StoreError> {
        let hub = hub.to_owned();
        self.readers.read(move |db| c2d::feedback_batch(db, &hub, max)).await
    }

    async fn feedback_remove(&self, hub: &str, ids: &[u64]) -> Result<(), StoreError> {
        let op = C2dOp::RemoveFeedback { hub: hub.to_owned(), ids: stored_keys(ids) };
        self.writer.write(WriteOp::C2d(op)).await.map(drop)
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.readers.close();
        let events = self.events.close().await;
        self.writer.close().await.and(events)
    }
}
