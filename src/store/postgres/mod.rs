//! The PostgreSQL store: the production backend (DESIGN.md §4), through a deadpool connection
//! pool of `store.pool_size` connections.
//!
//! Every write commits before it returns (PostgreSQL's own WAL flush makes it durable). Writes
//! guarded by an ETag are one `UPDATE … WHERE etag = $n`, so a concurrent writer cannot slip in
//! between the comparison and the write. Writes whose rows depend on another row (a module on
//! its device, a hub's data on the hub) lock that row first, so a concurrent delete either sees
//! the new row or makes the write fail with `NotFound` — never leaves an orphan.
//!
//! Connections are plain TCP (`NoTls`): the database is expected on a private network.
//!
//! Twins live on their identity's row; a twin write is one `UPDATE … WHERE twin_version IS NOT
//! DISTINCT FROM $expected`. The events log (appends, reads, retention, checkpoints) is in
//! `events`; cloud-to-device queues and feedback are in `c2d`.

mod c2d;
mod events;
mod schema;

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use iothubd_actors::model::c2d::{C2dMessage, FeedbackRecord};
use iothubd_actors::model::event::{EventData, EventPosition, PartitionInfo, StoredEvent};
use iothubd_actors::model::hub::HubDescription;
use iothubd_actors::model::identity::{Identity, IdentityKey};
use iothubd_actors::model::twin::Twin;
use iothubd_actors::store::{DeviceStatistics, Store, StoreError};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::{HUB_SCOPED_TABLES, decode, encode, missing_or_stale, module_column, statistics, twin_version};
use crate::config::StoreConfig;

/// The tables of a hub's events log in PostgreSQL, emptied with the hub like
/// [`HUB_SCOPED_TABLES`]. (The embedded store keeps its log, in a layout of its own, in a file
/// of its own: `embedded::event_writer`.)
///
/// `event_partitions` comes first: in PostgreSQL, deleting its rows waits for the appends that
/// hold them locked, so the `events` delete that follows sees their rows, and later appends
/// find the hub gone.
const EVENT_LOG_TABLES: &[&str] = &["event_partitions", "events", "event_checkpoints"];

/// How long opening a connection may take before the request fails with `Unavailable`, rather
/// than hanging while the database is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PostgresStore {
    pool: Pool,
    appender: events::Appender,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl PostgresStore {
    /// Connects to `store.postgres_url` and applies pending migrations.
    pub async fn open(cfg: &StoreConfig) -> anyhow::Result<Self> {
        let pg: tokio_postgres::Config =
            cfg.postgres_url.parse().context("store.postgres_url is not a valid PostgreSQL URL")?;
        let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .context("building the PostgreSQL connection pool")?;
        schema::migrate(&pool).await?;
        let appender = events::Appender::start(pool.clone());
        Ok(Self { pool, appender })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, StoreError> {
        pooled(&self.pool).await
    }
}

/// A connection from `pool`; `Unavailable` once the pool is closed or the database unreachable.
async fn pooled(pool: &Pool) -> Result<deadpool_postgres::Client, StoreError> {
    pool.get().await.map_err(|e| match e {
        PoolError::Closed => StoreError::Unavailable("the store is closed".into()),
        other => StoreError::Unavailable(describe(&other)),
    })
}

/// An error with its causes: tokio-postgres puts the server's message in the source.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

/// A key taken is `Conflict`; a missing referenced hub is `NotFound`; anything else means the
/// operation did not happen (`Unavailable`).
fn store_error(e: tokio_postgres::Error) -> StoreError {
    match e.code() {
        Some(code) if *code == SqlState::UNIQUE_VIOLATION => StoreError::Conflict,
        Some(code) if *code == SqlState::FOREIGN_KEY_VIOLATION => StoreError::NotFound,
        _ => StoreError::Unavailable(describe(&e)),
    }
}

async fn execute(db: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
    let statement = db.prepare_cached(sql).await.map_err(store_error)?;
    db.execute(&statement, params).await.map_err(store_error)
}

async fn query(db: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StoreError> {
    let statement = db.prepare_cached(sql).await.map_err(store_error)?;
    db.query(&statement, params).await.map_err(store_error)
}

async fn query_opt(db: &impl GenericClient, sql: &str, params: Params<'_>) -> Result<Option<Row>, StoreError> {
    let statement = db.prepare_cached(sql).await.map_err(store_error)?;
    db.query_opt(&statement, params).await.map_err(store_error)
}

fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, index: usize) -> Result<T, StoreError> {
    row.try_get(index).map_err(|e| StoreError::Corrupt(describe(&e)))
}

/// Decodes column 0, the `doc::text` of a row.
fn doc<T: serde::de::DeserializeOwned>(what: &str, row: &Row) -> Result<T, StoreError> {
    decode(what, column::<&str>(row, 0)?)
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create_hub(&self, hub: &HubDescription) -> Result<(), StoreError> {
        let doc = encode(hub)?;
        let db = self.client().await?;
        execute(
            &db,
            "INSERT INTO hubs (name, host_name, etag, doc) VALUES ($1, $2, $3, $4::text::jsonb)",
            &[&hub.name, &hub.properties.host_name, &hub.etag, &doc],
        )
        .await
        .map(drop)
    }

    async fn replace_hub(&self, hub: &HubDescription, expected_etag: Option<&str>) -> Result<(), StoreError> {
        let doc = encode(hub)?;
        let db = self.client().await?;
        let changed = execute(
            &db,
            "UPDATE hubs SET host_name = $2, etag = $3, doc = $4::text::jsonb
             WHERE name = $1 AND ($5::text IS NULL OR etag = $5)",
            &[&hub.name, &hub.properties.host_name, &hub.etag, &doc, &expected_etag],
        )
        .await?;
        if changed == 0 {
            let current = query_opt(&db, "SELECT etag FROM hubs WHERE name = $1", &[&hub.name]).await?;
            return Err(missing_or_stale(current.map(|row| column(&row, 0)).transpose()?));
        }
        Ok(())
    }

    async fn get_hub(&self, name: &str) -> Result<Option<HubDescription>, StoreError> {
        let db = self.client().await?;
        let row = query_opt(&db, "SELECT doc::text FROM hubs WHERE name = $1", &[&name]).await?;
        row.map(|row| doc("hub document", &row)).transpose()
    }

    async fn list_hubs(&self) -> Result<Vec<HubDescription>, StoreError> {
        let db = self.client().await?;
        let rows = query(&db, "SELECT doc::text FROM hubs ORDER BY name", &[]).await?;
        rows.iter().map(|row| doc("hub document", row)).collect()
    }

    async fn delete_hub(&self, name: &str) -> Result<(), StoreError> {
        let mut db = self.client().await?;
        let tx = db.transaction().await.map_err(store_error)?;
        // Locking the hub row makes concurrent identity inserts (whose foreign-key check needs a
        // share lock on it) wait, then fail with `NotFound` once the hub is gone.
        if query_opt(&tx, "SELECT 1 FROM hubs WHERE name = $1 FOR UPDATE", &[&name]).await?.is_none() {
            return Err(StoreError::NotFound);
        }
        for table in EVENT_LOG_TABLES.iter().chain(HUB_SCOPED_TABLES) {
            execute(&tx, &format!("DELETE FROM {table} WHERE hub = $1"), &[&name]).await?;
        }
        execute(&tx, "DELETE FROM hubs WHERE name = $1", &[&name]).await?;
        tx.commit().await.map_err(store_error)
    }

    async fn create_identity(&self, hub: &str, identity: &Identity) -> Result<(), StoreError> {
        const INSERT: &str = "INSERT INTO identities (hub, device_id, module_id, status, etag, doc)
                              VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)";
        let doc = encode(identity)?;
        let device_id = &identity.key.device_id;
        let module_id = module_column(identity.key.module_id.as_deref());
        let params: Params<'_> = &[&hub, device_id, &module_id, &identity.status.as_str(), &identity.etag, &doc];
        let mut db = self.client().await?;
        if module_id.is_empty() {
            // The foreign key on `hub` answers `NotFound` for a missing hub.
            return execute(&db, INSERT, params).await.map(drop);
        }
        // A module needs its device; the share lock keeps the device from being deleted (and
        // so its modules swept) before this insert commits.
        let tx = db.transaction().await.map_err(store_error)?;
        let device = query_opt(
            &tx,
            "SELECT 1 FROM identities WHERE hub = $1 AND device_id = $2 AND module_id = '' FOR SHARE",
            &[&hub, device_id],
        )
        .await?;
        if device.is_none() {
            return Err(StoreError::NotFound);
        }
        execute(&tx, INSERT, params).await?;
        tx.commit().await.map_err(store_error)
    }

    async fn replace_identity(
        &self,
        hub: &str,
        identity: &Identity,
        expected_etag: Option<&str>,
    ) -> Result<(), StoreError> {
        let doc = encode(identity)?;
        let (device_id, module_id) = (&identity.key.device_id, module_column(identity.key.module_id.as_deref()));
        let db = self.client().await?;
        let changed = execute(
            &db,
            "UPDATE identities SET status = $4, etag = $5, doc = $6::text::jsonb
             WHERE hub = $1 AND device_id = $2 AND module_id = $3 AND ($7::text IS NULL OR etag = $7)",
            &[&hub, device_id, &module_id, &identity.status.as_str(), &identity.etag, &doc, &expected_etag],
        )
        .await?;
        if changed == 0 {
            let current = query_opt(
                &db,
                "SELECT etag FROM identities WHERE hub = $1 AND device_id = $2 AND module_id = $3",
                &[&hub, device_id, &module_id],
            )
            .await?;
            return Err(missing_or_stale(current.map(|row| column(&row, 0)).transpose()?));
        }
        Ok(())
    }

    async fn get_identity(&self, hub: &str, key: &IdentityKey) -> Result<Option<Identity>, StoreError> {
        let module_id = module_column(key.module_id.as_deref());
        let db = self.client().await?;
        let row = query_opt(
            &db,
            "SELECT doc::text FROM identities WHERE hub = $1 AND device_id = $2 AND module_id = $3",
            &[&hub, &key.device_id, &module_id],
        )
        .await?;
        row.map(|row| doc("identity document", &row)).transpose()
    }

    async fn delete_identity(
        &self,
        hub: &str,
        key: &IdentityKey,
        expected_etag: Option<&str>,
    ) -> Result<Identity, StoreError> {
        let module_id = module_column(key.module_id.as_deref());
        let mut db = self.client().await?;
        let tx = db.transaction().await.map_err(store_error)?;
        // The row lock makes a concurrent module create of this device wait for the delete
        // (then fail with NotFound) or, if it locked first, be swept by the DELETE below.
        let current = query_opt(
            &tx,
            "SELECT doc::text, etag FROM identities WHERE hub = $1 AND device_id = $2 AND module_id = $3
             FOR UPDATE",
            &[&hub, &key.device_id, &module_id],
        )
        .await?
        .ok_or(StoreError::NotFound)?;
        let etag: &str = column(&current, 1)?;
        if expected_etag.is_some_and(|expected| expected != etag) {
            return Err(StoreError::PreconditionFailed);
        }
        let removed: Identity = doc("identity document", &current)?;
        // For a device (module_id = '') this removes its modules as well.
        execute(
            &tx,
            "DELETE FROM identities WHERE hub = $1 AND device_id = $2 AND (module_id = $3 OR $3 = '')",
            &[&hub, &key.device_id, &module_id],
        )
        .await?;
        tx.commit().await.map_err(store_error)?;
        Ok(removed)
    }

    async fn list_devices(&self, hub: &str, after: Option<&str>, limit: usize) -> Result<Vec<Identity>, StoreError> {
        // '' sorts before every device ID (IDs are never empty), so it stands for "from the start".
        let after = after.unwrap_or("");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let db = self.client().await?;
        let rows = query(
            &db,
            "SELECT doc::text FROM identities WHERE hub = $1 AND module_id = '' AND device_id > $2
             ORDER BY device_id LIMIT $3",
            &[&hub, &after, &limit],
        )
        .await?;
        rows.iter().map(|row| doc("identity document", row)).collect()
    }

    async fn list_modules(&self, hub: &str, device_id: &str) -> Result<Vec<Identity>, StoreError> {
        let db = self.client().await?;
        let rows = query(
            &db,
            "SELECT doc::text FROM identities WHERE hub = $1 AND device_id = $2 AND module_id <> ''
             ORDER BY module_id",
            &[&hub, &device_id],
        )
        .await?;
        rows.iter().map(|row| doc("identity document", row)).collect()
    }

    async fn device_statistics(&self, hub: &str) -> Result<DeviceStatistics, StoreError> {
        let db = self.client().await?;
        let rows = query(
            &db,
            "SELECT status, count(*) FROM identities WHERE hub = $1 AND module_id = '' GROUP BY status",
            &[&hub],
        )
        .await?;
        let counts = rows.iter().map(|row| Ok((column::<String>(row, 0)?, column::<i64>(row, 1)?)));
        Ok(statistics(counts.collect::<Result<Vec<_>, StoreError>>()?))
    }

    async fn get_twin(&self, hub: &str, key: &IdentityKey) -> Result<Option<Twin>, StoreError> {
        let module_id = module_column(key.module_id.as_deref());
        let db = self.client().await?;
        let row = query_opt(
            &db,
            "SELECT twin::text FROM identities WHERE hub = $1 AND device_id = $2 AND module_id = $3",
            &[&hub, &key.device_id, &module_id],
        )
        .await?
        .ok_or(StoreError::NotFound)?;
        column::<Option<&str>>(&row, 0)?.map(|twin| decode("twin document", twin)).transpose()
    }

    async fn replace_twin(
        &self,
        hub: &str,
        key: &IdentityKey,
        twin: &Twin,
        expected_version: Option<u64>,
    ) -> Result<(), StoreError> {
        let doc = encode(twin)?;
        let version = twin_version(twin.version())?;
        let expected_version = expected_version.map(twin_version).transpose()?;
        let module_id = module_column(key.module_id.as_deref());
        let db = self.client().await?;
        let changed = execute(
            &db,
            "UPDATE identities SET twin = $4::text::jsonb, twin_version = $5
             WHERE hub = $1 AND device_id = $2 AND module_id = $3 AND twin_version IS NOT DISTINCT FROM $6",
            &[&hub, &key.device_id, &module_id, &doc, &version, &expected_version],
        )
        .await?;
        if changed == 0 {
            let current = query_opt(
                &db,
                "SELECT etag FROM identities WHERE hub = $1 AND device_id = $2 AND module_id = $3",
                &[&hub, &key.device_id, &module_id],
            )
            .await?;
            return Err(missing_or_stale(current.map(|row| column(&row, 0)).transpose()?));
        }
        Ok(())
    }

    async fn append_events(&self, hub: &str, events: Vec<(u32, EventData)>) -> Result<Vec<EventPosition>, StoreError> {
        self.appender.append(hub, events).await
    }

    async fn read_events(
        &self,
        hub: &str,
        partition: u32,
        from_sequence: i64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        events::read(self, hub, partition, from_sequence, max).await
    }

    async fn sequence_at(&self, hub: &str, partition: u32, time: DateTime<Utc>) -> Result<i64, StoreError> {
        events::sequence_at(self, hub, partition, time).await
    }

    async fn partition_info(&self, hub: &str, partition: u32) -> Result<PartitionInfo, StoreError> {
        events::info(self, hub, partition).await
    }

    async fn expire_events(&self, hub: &str, before: DateTime<Utc>) -> Result<u64, StoreError> {
        events::expire(self, hub, before).await
    }

    async fn get_checkpoint(&self, hub: &str, consumer_group: &str, partition: u32) -> Result<Option<i64>, StoreError> {
        events::get_checkpoint(self, hub, consumer_group, partition).await
    }

    async fn set_checkpoint(
        &self,
        hub: &str,
        consumer_group: &str,
        partition: u32,
        sequence_number: i64,
    ) -> Result<(), StoreError> {
        events::set_checkpoint(self, hub, consumer_group, partition, sequence_number).await
    }

    async fn c2d_queue(&self, hub: &str, key: &IdentityKey) -> Result<Vec<C2dMessage>, StoreError> {
        c2d::queue(self, hub, key).await
    }

    async fn c2d_put(&self, hub: &str, key: &IdentityKey, message: &C2dMessage) -> Result<(), StoreError> {
        c2d::put(self, hub, key, message).await
    }

    async fn c2d_remove(
        &self,
        hub: &str,
        key: &IdentityKey,
        sequence_numbers: &[u64],
        feedback: &[FeedbackRecord],
    ) -> Result<(), StoreError> {
        c2d::remove(self, hub, key, sequence_numbers, feedback).await
    }

    async fn feedback_batch(&self, hub: &str, max: usize) -> Result<Vec<(u64, FeedbackRecord)>, StoreError> {
        c2d::feedback_batch(self, hub, max).await
    }

    async fn feedback_remove(&self, hub: &str, ids: &[u64]) -> Result<(), StoreError> {
        c2d::feedback_remove(self, hub, ids).await
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Every write committed before it returned; closing only refuses what comes next.
        self.pool.close();
        Ok(())
    }
}
