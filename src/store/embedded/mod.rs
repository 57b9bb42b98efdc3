//! The embedded store: SQLite in `<data_dir>/iothubd.db`, so a fresh machine runs iothubd
//! without setting up a database (DESIGN.md §4, §10).
//!
//! - `writer`: the one writer thread; group commit, one savepoint per write.
//! - `readers`: read-only connections used on blocking threads.
//! - `schema`: tables, migrations (`PRAGMA user_version`), connection settings, error mapping.

mod readers;
mod schema;
mod writer;

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use iothubd_actors::model::hub::HubDescription;
use iothubd_actors::model::identity::{Identity, IdentityKey};
use iothubd_actors::store::{DeviceStatistics, Store, StoreError};
use rusqlite::{Connection, OptionalExtension, Params};

use self::readers::Readers;
use self::schema::store_error;
use self::writer::{HubRow, IdentityRow, WriteOp, WriterHandle};
use super::{decode, encode, module_column, statistics};
use crate::config::StoreConfig;

/// The database file inside `data_dir`.
pub const DATABASE_FILE: &str = "iothubd.db";

pub struct EmbeddedStore {
    writer: WriterHandle,
    readers: Arc<Readers>,
}

impl EmbeddedStore {
    /// Opens `<data_dir>/iothubd.db`, creating the directory and the schema as needed.
    pub async fn open(data_dir: &Path, cfg: &StoreConfig) -> anyhow::Result<Self> {
        let dir = data_dir.to_owned();
        let (queue_capacity, max_batch) = (cfg.queue_capacity, cfg.max_batch);
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(DATABASE_FILE);
            // The writer creates and migrates the file before any reader opens it.
            let writer = WriterHandle::start(&path, queue_capacity, max_batch)?;
            let readers = Readers::open(&path, reader_count())?;
            Ok(Self { writer, readers })
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
        self.writer.write(WriteOp::CreateHub(hub_row(hub)?)).await.map(drop)
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
        self.writer.write(WriteOp::DeleteHub { name: name.to_owned() }).await.map(drop)
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

    async fn close(&self) -> Result<(), StoreError> {
        self.readers.close();
        self.writer.close().await
    }
}
