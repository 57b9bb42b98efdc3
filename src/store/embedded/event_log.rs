//! The embedded store's events log: the built-in endpoint's partitions and the consumer groups'
//! checkpoints (service-api §9), in `<data_dir>/events.db`.
//!
//! Writes go through the log's own writer thread (`event_writer`), which stores each batch's
//! events of a partition as one chunk; reads use a pool of read-only connections of their own
//! and unpack the chunks they need. The registry file stays the source of truth for which
//! hubs exist: the writer checks it before writing for a hub, and `EmbeddedStore::delete_hub`
//! purges the log after deleting the hub there.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use iothubd_actors::model::event::{EventData, EventPosition, PartitionInfo, StoredEvent};
use iothubd_actors::store::StoreError;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::event_writer::{CHUNK_BYTES, LogOp, LogWriter, PartitionEvents, Request};
use super::readers::Readers;
use super::schema::{EVENT_LOG_MIGRATIONS, open_reader, open_writer, store_error};
use super::writer::closed;
use crate::store::event_codec::{ChunkReader, EventChunk};
use crate::store::{millis, partition_info, time_of};

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
        // Packed here, on the callers' threads, so the one writer thread only numbers and
        // writes. Parts stop at the size of a chunk, so the writer never has to split one.
        let mut parts: Vec<PartitionEvents> = Vec::new();
        let mut open_part: HashMap<u32, usize> = HashMap::new();
        // Each event's (partition, part, index in the part).
        let mut slots = Vec::with_capacity(events.len());
        for (partition, event) in events {
            let part = match open_part.get(&partition) {
                Some(&part) if parts[part].events.size() < CHUNK_BYTES => part,
                _ => {
                    parts.push(PartitionEvents { partition, events: EventChunk::new() });
                    open_part.insert(partition, parts.len() - 1);
                    parts.len() - 1
                }
            };
            slots.push((partition, part, parts[part].events.count()));
            parts[part].events.push(&event)?;
        }
        let placed = self.write(|reply| LogOp::Append { hub: hub.to_owned(), parts, reply }).await?;
        // One time conversion per part, not per event: its calendar arithmetic is not free.
        let placed: Vec<(i64, DateTime<Utc>)> =
            placed.into_iter().map(|p| (p.first_sequence, time_of(p.enqueued_ms))).collect();
        slots
            .into_iter()
            .map(|(partition, part, index)| {
                let &(first_sequence, enqueued_time) =
                    placed.get(part).ok_or_else(|| StoreError::Corrupt("a part of an append got no place".into()))?;
                Ok(EventPosition { partition, sequence_number: first_sequence + index, enqueued_time })
            })
            .collect()
    }

    pub(super) async fn read(
        &self,
        hub: &str,
        partition: u32,
        from_sequence: i64,
        max: usize,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let hub = hub.to_owned();
        self.readers
            .read(move |db| {
                // From the chunk holding `from_sequence` (or the first one, when it comes
                // before), rows are stepped only as far as `max` events need.
                let mut stmt = db
                    .prepare_cached(
                        "SELECT first_sequence, event_count, enqueued_ms, events FROM event_chunks
                         WHERE hub = ?1 AND partition_id = ?2 AND first_sequence >= ifnull(
                             (SELECT first_sequence FROM event_chunks
                              WHERE hub = ?1 AND partition_id = ?2 AND first_sequence <= ?3
                              ORDER BY first_sequence DESC LIMIT 1),
                             ?3)
                         ORDER BY first_sequence",
                    )
                    .map_err(store_error)?;
                let mut rows = stmt.query(params![hub, partition, from_sequence]).map_err(store_error)?;
                let mut events = Vec::new();
                while events.len() < max {
                    let Some(row) = rows.next().map_err(store_error)? else { break };
                    let (first_sequence, count, enqueued_ms): (i64, i64, i64) = (
                        row.get(0).map_err(store_error)?,
                        row.get(1).map_err(store_error)?,
                        row.get(2).map_err(store_error)?,
                    );
                    let blob = row.get_ref(3).and_then(|v| v.as_blob().map_err(Into::into)).map_err(store_error)?;
                    let mut chunk = ChunkReader::new(blob, count)?;
                    let skip = from_sequence.saturating_sub(first_sequence).max(0);
                    chunk.skip(skip)?;
                    let mut sequence_number = first_sequence.saturating_add(skip);
                    let enqueued_time = time_of(enqueued_ms);
                    while events.len() < max {
                        let Some(data) = chunk.next_event()? else { break };
                        events.push(StoredEvent {
                            position: EventPosition { partition, sequence_number, enqueued_time },
                            data,
                        });
                        sequence_number += 1;
                    }
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
                // Every event of a chunk has the chunk's enqueued time, so the first event at or
                // after `time` opens the first chunk at or after it. Past the last retained
                // event, the answer is the next sequence number.
                if let Some(found) =
                    first_chunk_at_or_after(&tx, &hub, partition, millis(time)).map_err(store_error)??
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
        // Step by step, each its own short write, so appends interleave with a long expiry.
        loop {
            let step = self.write(|reply| LogOp::ExpireStep { hub: hub.to_owned(), before_ms, reply }).await?;
            total += step.events;
            if !step.more {
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

/// The first sequence number of the first chunk of a partition enqueued at or after `at_ms`;
/// `None` when there is none (every retained chunk is older, or none is retained). The outer
/// error is SQLite's.
///
/// A binary search over the retained range: it is gap-free and enqueued times never decrease
/// along it, so each probe — the chunk holding the middle sequence number, one seek in
/// `event_chunks_by_sequence` — halves it; about 30 probes for a billion events. `Corrupt` when
/// a probed chunk does not fit the range, which could otherwise stall the search.
pub(super) fn first_chunk_at_or_after(
    db: &Connection,
    hub: &str,
    partition: u32,
    at_ms: i64,
) -> rusqlite::Result<Result<Option<i64>, StoreError>> {
    let corrupt = || Ok(Err(StoreError::Corrupt(format!("the chunks of partition {partition} of {hub} overlap"))));
    let (Some(mut low), Some(last)) =
        (first_retained(db, hub, partition)?, chunk_at_or_before(db, hub, partition, i64::MAX)?)
    else {
        return Ok(Ok(None));
    };
    let Some(end) = last.first_sequence.checked_add(last.event_count) else { return corrupt() };
    // Every chunk before `low` is older than `at_ms`; the one starting at `high`, if any, is not.
    let mut high = end;
    while low < high {
        let Some(mid) = high.checked_sub(low).map(|width| low + width / 2) else { return corrupt() };
        let Some(chunk) = chunk_at_or_before(db, hub, partition, mid)? else { return corrupt() };
        let after = chunk.first_sequence.checked_add(chunk.event_count).unwrap_or(i64::MIN);
        if chunk.first_sequence < low || after <= mid || after > high {
            return corrupt();
        }
        if chunk.enqueued_ms >= at_ms {
            high = chunk.first_sequence;
        } else {
            low = after;
        }
    }
    Ok(Ok((low < end).then_some(low)))
}

/// The columns of a chunk's row besides its events.
struct ChunkHead {
    first_sequence: i64,
    event_count: i64,
    enqueued_ms: i64,
}

/// The chunk of a partition holding `sequence`, or else the last one before it.
fn chunk_at_or_before(
    db: &Connection,
    hub: &str,
    partition: u32,
    sequence: i64,
) -> rusqlite::Result<Option<ChunkHead>> {
    db.prepare_cached(
        "SELECT first_sequence, event_count, enqueued_ms FROM event_chunks
         WHERE hub = ?1 AND partition_id = ?2 AND first_sequence <= ?3
         ORDER BY first_sequence DESC LIMIT 1",
    )?
    .query_row(params![hub, partition, sequence], |row| {
        Ok(ChunkHead { first_sequence: row.get(0)?, event_count: row.get(1)?, enqueued_ms: row.get(2)? })
    })
    .optional()
}

/// The first retained sequence number of a partition, if it retains any.
fn first_retained(db: &Connection, hub: &str, partition: u32) -> rusqlite::Result<Option<i64>> {
    db.prepare_cached(
        "SELECT first_sequence FROM event_chunks WHERE hub = ?1 AND partition_id = ?2
         ORDER BY first_sequence LIMIT 1",
    )?
    .query_row(params![hub, partition], |row| row.get(0))
    .optional()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use iothubd_actors::model::event::AnnotationValue;

    use super::super::schema::MIGRATIONS;
    use super::*;
    use crate::store::event_codec::encode_meta;

    const REGISTRY_FILE: &str = "iothubd.db";

    /// A data directory whose registry holds the hub `alpha`.
    fn data_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let registry = open_writer(&dir.path().join(REGISTRY_FILE), MIGRATIONS).expect("the registry");
        registry.execute("INSERT INTO hubs VALUES ('alpha', 'alpha.example.net', 'e1', '{}')", []).expect("a hub");
        dir
    }

    fn log_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join(EVENT_LOG_FILE)
    }

    fn open_log(dir: &tempfile::TempDir) -> EventLog {
        EventLog::open(&log_path(dir), &dir.path().join(REGISTRY_FILE), 64, 64, 2).expect("the events log")
    }

    /// A second connection to the log file, to look under the store.
    fn raw(dir: &tempfile::TempDir) -> Connection {
        Connection::open(log_path(dir)).expect("the log file")
    }

    fn event(i: usize, body_len: usize) -> EventData {
        EventData {
            body: vec![u8::try_from(i % 251).expect("a byte"); body_len],
            annotations: vec![("n".into(), AnnotationValue::Long(i64::try_from(i).expect("small")))],
            ..Default::default()
        }
    }

    /// Each chunk row of a partition: `(first_sequence, event_count, blob size)`.
    fn chunks(db: &Connection, partition: u32) -> Vec<(i64, i64, usize)> {
        db.prepare(
            "SELECT first_sequence, event_count, length(events) FROM event_chunks
             WHERE hub = 'alpha' AND partition_id = ?1 ORDER BY first_sequence",
        )
        .and_then(|mut stmt| stmt.query_map([partition], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
        .expect("chunk rows")
    }

    fn data(events: &[StoredEvent]) -> Vec<EventData> {
        events.iter().map(|e| e.data.clone()).collect()
    }

    #[tokio::test]
    async fn an_append_is_one_chunk_per_partition() {
        let dir = data_dir();
        let log = open_log(&dir);
        let appended: Vec<(u32, EventData)> = (0..15).map(|i| (u32::from(i % 3 == 0), event(i, 40))).collect();
        let positions = log.append("alpha", appended.clone()).await.expect("appended");
        log.append("alpha", vec![(1, event(99, 40))]).await.expect("appended");
        assert_eq!(chunks(&raw(&dir), 0).iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(), [(0, 10)]);
        assert_eq!(chunks(&raw(&dir), 1).iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(), [(0, 5), (5, 1)]);
        let read = log.read("alpha", 1, 0, 100).await.expect("read");
        assert_eq!(
            read.iter().map(|e| e.position).collect::<Vec<_>>()[..5],
            positions.iter().step_by(3).copied().collect::<Vec<_>>()
        );
        log.close().await.expect("closed");
    }

    #[tokio::test]
    async fn large_appends_are_cut_into_chunks_of_about_chunk_bytes() {
        let dir = data_dir();
        let log = open_log(&dir);
        let appended: Vec<EventData> = (0..300).map(|i| event(i, 1000)).collect();
        log.append("alpha", appended.iter().map(|e| (0, e.clone())).collect()).await.expect("appended");
        let rows = chunks(&raw(&dir), 0);
        assert!(rows.len() >= 4, "300 KB in chunks of 64 KiB: {rows:?}");
        assert!(rows.iter().all(|&(_, _, size)| size < CHUNK_BYTES + 1100), "{rows:?}");
        assert!(rows.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0), "gap-free: {rows:?}");
        assert_eq!(data(&log.read("alpha", 0, 0, 1000).await.expect("read")), appended);
        let across = log.read("alpha", 0, rows[1].0 - 2, 5).await.expect("read");
        assert_eq!(
            across.iter().map(|e| e.position.sequence_number).collect::<Vec<_>>(),
            (rows[1].0 - 2..rows[1].0 + 3).collect::<Vec<_>>()
        );
        log.close().await.expect("closed");
    }

    #[tokio::test]
    async fn a_damaged_chunk_reads_as_corrupt() {
        let dir = data_dir();
        let log = open_log(&dir);
        log.append("alpha", (0..4).map(|i| (0, event(i, 10))).collect()).await.expect("appended");
        let db = raw(&dir);
        for damage in [
            "UPDATE event_chunks SET events = substr(events, 1, 30)",
            "UPDATE event_chunks SET event_count = -1",
            "UPDATE event_chunks SET events = x'02'",
        ] {
            db.execute(damage, []).expect("damaged");
            assert!(matches!(log.read("alpha", 0, 0, 10).await, Err(StoreError::Corrupt(_))), "{damage}");
        }
        log.close().await.expect("closed");
    }

    #[tokio::test]
    async fn a_time_is_found_among_many_chunks() {
        let dir = data_dir();
        let log = open_log(&dir);
        let mut positions = Vec::new();
        for i in 0..120 {
            positions
                .extend(log.append("alpha", (0..i % 4 + 1).map(|j| (0, event(j, 10))).collect()).await.expect("ok"));
            if i % 8 == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
        assert_eq!(chunks(&raw(&dir), 0).len(), 120, "one chunk per append");
        let next = i64::try_from(positions.len()).expect("small");
        let first_at_or_after =
            |time| positions.iter().find(|p| p.enqueued_time >= time).map_or(next, |p| p.sequence_number);
        let mut times: Vec<DateTime<Utc>> = positions.iter().map(|p| p.enqueued_time).collect();
        times.dedup();
        for time in times
            .iter()
            .flat_map(|&t| [t - chrono::TimeDelta::milliseconds(1), t, t + chrono::TimeDelta::milliseconds(1)])
        {
            assert_eq!(log.sequence_at("alpha", 0, time).await, Ok(first_at_or_after(time)), "at {time}");
        }
        log.close().await.expect("closed");
    }

    #[tokio::test]
    async fn overlapping_chunks_are_corrupt_to_a_time_lookup_not_a_hang() {
        let dir = data_dir();
        let log = open_log(&dir);
        let mut times = Vec::new();
        for _ in 0..3 {
            times.push(
                log.append("alpha", vec![(0, event(1, 10)), (0, event(2, 10))]).await.expect("ok")[0].enqueued_time,
            );
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        raw(&dir).execute("UPDATE event_chunks SET event_count = 100 WHERE first_sequence = 0", []).expect("damaged");
        assert!(matches!(log.sequence_at("alpha", 0, times[1]).await, Err(StoreError::Corrupt(_))));
        assert!(matches!(log.expire("alpha", times[1]).await, Err(StoreError::Corrupt(_))));
        log.close().await.expect("closed");
    }

    /// A log written before chunks (events log schema version 1) keeps its events, numbers,
    /// times and checkpoints when opened by this build.
    #[tokio::test]
    async fn per_event_rows_of_schema_1_are_moved_into_chunks() {
        let dir = data_dir();
        let v1 = open_writer(&log_path(&dir), &EVENT_LOG_MIGRATIONS[..1]).expect("a version 1 log");
        // Partition 0: 0..=2 expired; 3..=5 committed together, then 6..=7, then 8..=9.
        // Partition 1: 300 events of 1 KB from one commit, more than one chunk holds.
        let mut old = Vec::new();
        for sequence in 3..10 {
            old.push((
                0,
                sequence,
                if sequence < 6 {
                    1_000
                } else if sequence < 8 {
                    2_000
                } else {
                    3_000
                },
                20,
            ));
        }
        for sequence in 0..300 {
            old.push((1, sequence, 5_000, 1_000));
        }
        let mut insert = v1.prepare("INSERT INTO events VALUES ('alpha', ?1, ?2, ?3, ?4, ?5)").expect("statement");
        let mut expected: HashMap<u32, Vec<StoredEvent>> = HashMap::new();
        for &(partition, sequence_number, enqueued_ms, body_len) in &old {
            let data = event(usize::try_from(sequence_number).expect("small"), body_len);
            insert
                .execute(params![partition, sequence_number, enqueued_ms, data.body, encode_meta(&data)])
                .expect("a row");
            let position = EventPosition { partition, sequence_number, enqueued_time: time_of(enqueued_ms) };
            expected.entry(partition).or_default().push(StoredEvent { position, data });
        }
        drop(insert);
        v1.execute_batch(
            "INSERT INTO event_partitions VALUES ('alpha', 0, 10, 3000), ('alpha', 1, 300, 5000);
             INSERT INTO event_checkpoints VALUES ('alpha', '$Default', 0, 7);",
        )
        .expect("counters and a checkpoint");
        drop(v1);

        let log = open_log(&dir);
        let db = raw(&dir);
        let version: usize = db.pragma_query_value(None, "user_version", |row| row.get(0)).expect("version");
        assert_eq!(version, EVENT_LOG_MIGRATIONS.len());
        let tables: i64 =
            db.query_row("SELECT count(*) FROM sqlite_schema WHERE name = 'events'", [], |r| r.get(0)).expect("schema");
        assert_eq!(tables, 0, "the per-event table is gone");
        assert_eq!(
            chunks(&db, 0).iter().map(|c| (c.0, c.1)).collect::<Vec<_>>(),
            [(3, 3), (6, 2), (8, 2)],
            "one per commit"
        );
        assert!(chunks(&db, 1).len() >= 4, "cut at the chunk size");

        assert_eq!(log.read("alpha", 0, 0, 100).await.as_ref(), Ok(&expected[&0]));
        assert_eq!(log.read("alpha", 1, 0, 1000).await.as_ref(), Ok(&expected[&1]));
        assert_eq!(log.read("alpha", 0, 5, 2).await.as_deref(), Ok(&expected[&0][2..4]), "across two chunks");
        assert_eq!(log.sequence_at("alpha", 0, time_of(1_500)).await, Ok(6));
        assert_eq!(log.sequence_at("alpha", 0, time_of(3_001)).await, Ok(10));
        let info = log.partition_info("alpha", 0).await.expect("info");
        assert_eq!((info.begin_sequence_number, info.last_sequence_number), (3, 9));
        assert_eq!(info.last_enqueued_time, time_of(3_000));
        assert_eq!(log.get_checkpoint("alpha", "$Default", 0).await, Ok(Some(7)));
        let next = log.append("alpha", vec![(0, event(10, 20))]).await.expect("appended");
        assert_eq!(next[0].sequence_number, 10, "numbering continues");
        log.close().await.expect("closed");
    }
}
