//! The embedded store's events log: the built-in endpoint's partitions and the consumer groups'
//! checkpoints (service-api §9), in `<data_dir>/events.db`.
//!
//! Writes go through the log's own writer thread (`event_writer`); reads use a pool of
//! read-only connections of their own. The registry file stays the source of truth for which
//! hubs exist: the writer checks it before writing for a hub, and `EmbeddedStore::delete_hub`
//! purges the log after deleting the hub there.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use iothubd_actors::model::event::{EventData, EventPosition, PartitionInfo, StoredEvent};
use iothubd_actors::store::StoreError;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::event_writer::{EncodedEvent, LogOp, LogWriter, Request};
use super::readers::Readers;
use super::schema::{EVENT_LOG_MIGRATIONS, open_reader, open_writer, store_error};
use super::writer::closed;
use crate::store::event_codec::{decode_event, encode_meta};
use crate::store::{EXPIRY_CHUNK, FIRST_ENQUEUED_AT_OR_AFTER, millis, partition_info, time_of};

/// The events log file inside `data_dir`.
pub const EVENT_LOG_FILE: &str = "events.db";

pub(super) struct EventLog {
    queue: mpsc::Sender<Request>,
    readers: Arc<Readers>,
}

impl EventLog {
    /// Opens (creating and migrating) `log_path` and starts its writer; `registry_path` is the
    /// registry file, already migrated.
    pub(super) fn open(
        log_path: &Path,
        registry_path: &Path,
        queue_capacity: usize,
        max_batch: usize,
        readers: usize,
    ) -> anyhow::Result<Self> {
        let writer = LogWriter::new(open_writer(log_path, EVENT_LOG_MIGRATIONS)?, open_reader(registry_path)?)?;
        let (queue, requests) = mpsc::channel(queue_capacity);
        std::thread::Builder::new()
            .name("iothubd-events-writer".into())
            .spawn(move || writer.run(requests, max_batch))?;
        Ok(Self { queue, readers: Readers::open(log_path, readers)? })
    }

    /// Queues a write (waiting while the queue is full) and answers once it is committed.
    async fn write<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> LogOp,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Request::Write(op(reply))).await.map_err(|_| closed())?;
        answer.await.map_err(|_| StoreError::Unavailable("the events log writer stopped".into()))?
    }

    pub(super) async fn append(
        &self,
        hub: &str,
        events: Vec<(u32, EventData)>,
    ) -> Result<Vec<EventPosition>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Encoded here, on the callers' threads, so the one writer thread only writes.
        let events = events
            .into_iter()
            .map(|(partition, event)| {
                let meta = encode_meta(&event);
                EncodedEvent { partition, body: event.body, meta }
            })
            .collect();
        self.write(|reply| LogOp::Append { hub: hub.to_owned(), events, reply }).await
    }

    pub(super) async fn read(
        &self,
        hub: &str,
        partition: u32,
        from_sequence: i64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let hub = hub.to_owned();
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.readers
            .read(move |db| {
                let mut stmt = db
                    .prepare_cached(
                        "SELECT sequence_number, enqueued_ms, body, meta FROM events
                         WHERE hub = ?1 AND partition_id = ?2 AND sequence_number >= ?3
                         ORDER BY sequence_number LIMIT ?4",
                    )
                    .map_err(store_error)?;
                let mut rows = stmt.query(params![hub, partition, from_sequence, max]).map_err(store_error)?;
                let mut events = Vec::new();
                while let Some(row) = rows.next().map_err(store_error)? {
                    let (sequence_number, enqueued_ms): (i64, i64) =
                        (row.get(0).map_err(store_error)?, row.get(1).map_err(store_error)?);
                    let body: Vec<u8> = row.get(2).map_err(store_error)?;
                    let meta = row.get_ref(3).and_then(|v| v.as_blob().map_err(Into::into)).map_err(store_error)?;
                    events.push(StoredEvent {
                        position: EventPosition { partition, sequence_number, enqueued_time: time_of(enqueued_ms) },
                        data: decode_event(body, meta)?,
                    });
                }
                Ok(events)
            })
            .await
    }

    pub(super) async fn sequence_at(&self, hub: &str, partition: u32, time: DateTime<Utc>) -> Result<i64, StoreError> {
        let hub = hub.to_owned();
        self.readers
            .read(move |db| {
                // One snapshot for the search and the counters.
                let tx = db.unchecked_transaction().map_err(store_error)?;
                // Past the last retained event, the answer is the next sequence number: the
                // same, unless nothing is retained.
                if let Some(found) =
                    first_enqueued_at_or_after(&tx, &hub, partition, millis(time)).map_err(store_error)?
                {
                    return Ok(found);
                }
                Ok(counters(&tx, &hub, partition)?.map_or(0, |(next_sequence, _)| next_sequence))
            })
            .await
    }

    pub(super) async fn partition_info(&self, hub: &str, partition: u32) -> Result<PartitionInfo, StoreError> {
        let hub = hub.to_owned();
        self.readers
            .read(move |db| {
                let tx = db.unchecked_transaction().map_err(store_error)?;
                let counters = counters(&tx, &hub, partition)?;
                let first = first_retained(&tx, &hub, partition).map_err(store_error)?;
                Ok(partition_info(counters, first))
            })
            .await
    }

    pub(super) async fn expire(&self, hub: &str, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let before_ms = millis(before);
        let mut total = 0;
        // Chunk by chunk, each its own short write, so appends interleave with a long expiry.
        loop {
            let deleted = self.write(|reply| LogOp::ExpireChunk { hub: hub.to_owned(), before_ms, reply }).await?;
            total += deleted;
            if deleted < EXPIRY_CHUNK.unsigned_abs() {
                return Ok(total);
            }
        }
    }

    pub(super) async fn get_checkpoint(
        &self,
        hub: &str,
        consumer_group: &str,
        partition: u32,
    ) -> Result<Option<i64>, StoreError> {
        let (hub, consumer_group) = (hub.to_owned(), consumer_group.to_owned());
        self.readers
            .read(move |db| {
                db.prepare_cached(
                    "SELECT sequence_number FROM event_checkpoints
                     WHERE hub = ?1 AND consumer_group = ?2 AND partition_id = ?3",
                )
                .and_then(|mut stmt| {
                    stmt.query_row(params![hub, consumer_group, partition], |row| row.get(0)).optional()
                })
                .map_err(store_error)
            })
            .await
    }

    pub(super) async fn set_checkpoint(
        &self,
        hub: &str,
        consumer_group: &str,
        partition: u32,
        sequence_number: i64,
    ) -> Result<(), StoreError> {
        self.write(|reply| LogOp::SetCheckpoint {
            hub: hub.to_owned(),
            consumer_group: consumer_group.to_owned(),
            partition,
            sequence_number,
            reply,
        })
        .await
    }

    /// Deletes everything the log holds for a hub the registry no longer has.
    pub(super) async fn purge(&self, hub: &str) -> Result<(), StoreError> {
        self.write(|reply| LogOp::Purge { hub: hub.to_owned(), reply }).await
    }

    /// Commits what is queued, stops the writer and closes the readers.
    pub(super) async fn close(&self) -> Result<(), StoreError> {
        self.readers.close();
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Request::Close(reply)).await.is_err() {
            // Already closed or closing; every write acknowledged so far is durable already.
            return Ok(());
        }
        answer.await.unwrap_or_else(|_| Err(StoreError::Unavailable("the events log writer stopped".into())))
    }
}

/// A partition's `(next_sequence, last_enqueued_ms)`, if anything was ever appended to it.
fn counters(db: &Connection, hub: &str, partition: u32) -> Result<Option<(i64, i64)>, StoreError> {
    db.prepare_cached(
        "SELECT next_sequence, last_enqueued_ms FROM event_partitions WHERE hub = ?1 AND partition_id = ?2",
    )
    .and_then(|mut stmt| stmt.query_row(params![hub, partition], |row| Ok((row.get(0)?, row.get(1)?))).optional())
    .map_err(store_error)
}

/// The first retained sequence number of a partition enqueued at or after `at_ms`, or the last
/// retained one + 1 when all are older; `None` when none is retained.
pub(super) fn first_enqueued_at_or_after(
    db: &Connection,
    hub: &str,
    partition: u32,
    at_ms: i64,
) -> rusqlite::Result<Option<i64>> {
    db.prepare_cached(FIRST_ENQUEUED_AT_OR_AFTER)?
        .query_row(params![hub, partition, at_ms], |row| row.get(0))
        .optional()
}

/// The first retained sequence number of a partition, if it retains any.
pub(super) fn first_retained(db: &Connection, hub: &str, partition: u32) -> rusqlite::Result<Option<i64>> {
    db.prepare_cached(
        "SELECT sequence_number FROM events WHERE hub = ?1 AND partition_id = ?2 ORDER BY sequence_number LIMIT 1",
    )?
    .query_row(params![hub, partition], |row| row.get(0))
    .optional()
}
