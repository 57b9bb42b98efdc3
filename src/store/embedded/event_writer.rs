//! The single writer of the events log file (`events.db`): D2C telemetry's one durable write.
//!
//! Telemetry appends one event per MQTT PUBLISH from thousands of sessions at once, and each
//! PUBACK waits for durability (DESIGN.md §3), so this thread commits whatever has queued up
//! meanwhile in one transaction — one fsync for hundreds of events. It has a file and a queue
//! of its own so that the firehose never delays registry writes, nor they it.
//!
//! A batch stores each partition's events as one row of `event_chunks`, not one row per event:
//! the first sequence number, the count, the enqueued time they all share (the batch's), and
//! one blob packing every event's body and metadata (`event_codec`). Per-row costs — b-tree
//! descents, page splits, record compares — were most of the writer's time with a row per
//! ~300-byte event; a chunk pays them once for hundreds. Callers pack their events per
//! partition on their own threads; here the parts of a batch are numbered and joined into the
//! partition's open chunk, which is written when it reaches [`CHUNK_BYTES`] or at commit.
//!
//! Sequence numbers are assigned here, from per-partition counters held in memory (loaded at
//! start) and persisted in `event_partitions` in the same transaction as the chunks. An append
//! writes no savepoint: nothing in it can be refused once its hub is known to exist, so a
//! failure is SQLite's and fails the whole batch — after which the open chunks are dropped and
//! the counters reloaded from the file, the only source of truth.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use iothubd_actors::store::StoreError;
use rusqlite::{Connection, OptionalExtension, Statement, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::event_log::first_chunk_at_or_after;
use crate::store::event_codec::EventChunk;

/// The size at which a chunk is closed (a single larger event makes a chunk of its own). Large
/// enough that per-row costs vanish (about 200 telemetry messages of 256 bytes), small enough
/// that a read starting at an event in the middle of a chunk reads little more than it returns.
pub(super) const CHUNK_BYTES: usize = 64 * 1024;

/// Chunks removed by one retention step: expiry of a large backlog proceeds in steps of about
/// 2 MiB, so appends keep flowing between them instead of waiting behind one huge delete.
const EXPIRY_STEP_CHUNKS: i64 = 32;

/// The log's tables, each with a `hub` column, emptied when a hub is deleted.
const LOG_TABLES: &[&str] = &["event_partitions", "event_chunks", "event_checkpoints"];

/// Consecutive events of an append bound for one partition, packed on the caller's thread.
pub(super) struct PartitionEvents {
    pub partition: u32,
    pub events: EventChunk,
}

/// Where the events of a [`PartitionEvents`] landed: sequence numbers from `first_sequence`
/// on, all enqueued at `enqueued_ms`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placed {
    pub first_sequence: i64,
    pub enqueued_ms: i64,
}

/// What one retention step removed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Expired {
    pub events: u64,
    /// The step stopped at its budget, so more may be due.
    pub more: bool,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// One write to the log, as the `Store` methods of the same names describe it.
pub(super) enum LogOp {
    /// Answers a [`Placed`] per part, in order.
    Append {
        hub: String,
        parts: Vec<PartitionEvents>,
        reply: Reply<Vec<Placed>>,
    },
    SetCheckpoint {
        hub: String,
        consumer_group: String,
        partition: u32,
        sequence_number: i64,
        reply: Reply<()>,
    },
    /// Deletes up to [`EXPIRY_STEP_CHUNKS`] of the hub's chunks enqueued before `before_ms`,
    /// oldest first.
    ExpireStep {
        hub: String,
        before_ms: i64,
        reply: Reply<Expired>,
    },
    /// Deletes everything of a hub that the registry no longer holds.
    Purge {
        hub: String,
        reply: Reply<()>,
    },
}

pub(super) enum Request {
    Write(LogOp),
    /// Stop accepting writes, commit what is queued, close the file, then answer.
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// A write's answer, held until its batch has committed.
enum Pending {
    Placed(Reply<Vec<Placed>>, Result<Vec<Placed>, StoreError>),
    Expired(Reply<Expired>, Result<Expired, StoreError>),
    Done(Reply<()>, Result<(), StoreError>),
}

impl Pending {
    /// Answers the caller; with `failed`, the batch did not commit and the answer is that error.
    fn send(self, failed: Option<&StoreError>) {
        // A caller that gave up waiting no longer needs the answer; the write stands.
        match self {
            Self::Placed(reply, outcome) => drop(reply.send(failed.map_or(outcome, |e| Err(e.clone())))),
            Self::Expired(reply, outcome) => drop(reply.send(failed.map_or(outcome, |e| Err(e.clone())))),
            Self::Done(reply, outcome) => drop(reply.send(failed.map_or(outcome, |e| Err(e.clone())))),
        }
    }
}

/// What one op answers: the outer error is SQLite's and loses the whole batch, the inner one a
/// refusal decided here.
type Applied<T> = rusqlite::Result<Result<T, StoreError>>;

/// A partition's counters, as in its `event_partitions` row, and what the current batch holds
/// for it.
#[derive(Default)]
struct Counter {
    next_sequence: i64,
    last_enqueued_ms: i64,
    /// Changed by the current batch, so its row must be written.
    dirty: bool,
    /// The chunk the current batch is filling, written when full or before the commit.
    open: Option<OpenChunk>,
}

/// A chunk not written yet: its events are numbered from `first_sequence` and were all
/// enqueued at `enqueued_ms`.
struct OpenChunk {
    first_sequence: i64,
    enqueued_ms: i64,
    events: EventChunk,
}

pub(super) struct LogWriter {
    conn: Connection,
    state: LogState,
}

/// Everything the writer keeps besides its connection (a separate struct so that it can be
/// changed while a transaction borrows the connection).
struct LogState {
    /// Read-only connection to the registry file, to check that a hub exists.
    registry: Connection,
    /// Hubs seen to exist; a hub leaves only through `Purge`, which follows its deletion.
    known_hubs: HashSet<String>,
    counters: HashMap<String, HashMap<u32, Counter>>,
    /// The partitions whose counters the current batch changed (and which may have an open
    /// chunk).
    dirty: Vec<(String, u32)>,
}

const INSERT_CHUNK: &str =
    "INSERT INTO event_chunks (hub, partition_id, first_sequence, event_count, enqueued_ms, events)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

impl LogWriter {
    /// Takes the open connections, purges what belongs to hubs deleted while a purge was
    /// pending (a crash between the registry delete and the purge), and loads the counters.
    pub(super) fn new(mut conn: Connection, registry: Connection) -> anyhow::Result<Self> {
        let hubs: HashSet<String> =
            registry.prepare("SELECT name FROM hubs")?.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
        let logged: Vec<String> = conn
            .prepare("SELECT hub FROM event_partitions UNION SELECT hub FROM event_checkpoints")?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        let orphans: Vec<String> = logged.into_iter().filter(|hub| !hubs.contains(hub)).collect();
        if !orphans.is_empty() {
            tracing::warn!(hubs = ?orphans, "purging the events of hubs deleted before the last shutdown");
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for hub in &orphans {
                purge(&tx, hub)?;
            }
            tx.commit()?;
        }
        let counters = load_counters(&conn)?;
        Ok(Self { conn, state: LogState { registry, known_hubs: hubs, counters, dirty: Vec::new() } })
    }

    pub(super) fn run(mut self, mut requests: mpsc::Receiver<Request>, max_batch: usize) {
        let mut batch = Vec::with_capacity(max_batch);
        let mut close_waiters = Vec::new();
        // Returns 0 only once the queue is closed and empty: writes queued before a `Close`
        // still commit.
        while requests.blocking_recv_many(&mut batch, max_batch) > 0 {
            let mut ops = Vec::with_capacity(batch.len());
            for request in batch.drain(..) {
                match request {
                    Request::Write(op) => ops.push(op),
                    Request::Close(reply) => {
                        requests.close();
                        close_waiters.push(reply);
                    }
                }
            }
            if !ops.is_empty() {
                self.commit_batch(ops);
            }
        }
        let closed = self.conn.close().map_err(|(_, e)| StoreError::Unavailable(e.to_string()));
        for waiter in close_waiters {
            let _ = waiter.send(closed.clone());
        }
    }

    fn commit_batch(&mut self, ops: Vec<LogOp>) {
        let mut answers = Vec::with_capacity(ops.len());
        let failure = self.apply_all(ops, &mut answers).err().map(|e| {
            tracing::error!(error = %e, writes = answers.len(), "events log commit failed");
            // Chunks still open hold events that were not written; the counters moved for them:
            // back to the file's.
            self.state.forget_batch();
            match load_counters(&self.conn) {
                Ok(counters) => self.state.counters = counters,
                Err(e) => tracing::error!(error = %e, "reloading the events log counters failed"),
            }
            StoreError::Unavailable(e.to_string())
        });
        for answer in answers {
            answer.send(failure.as_ref());
        }
    }

    /// Applies every op in one transaction. Each op leaves its answer in `answers`; they stand
    /// only if this returns `Ok` (the transaction committed).
    fn apply_all(&mut self, ops: Vec<LogOp>, answers: &mut Vec<Pending>) -> rusqlite::Result<()> {
        let now_ms = Utc::now().timestamp_millis();
        let state = &mut self.state;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(INSERT_CHUNK)?;
            let mut failure = None;
            for op in ops {
                // Once the batch is lost, the remaining ops are only answered (with the failure).
                let answer = match op {
                    LogOp::Append { hub, parts, reply } => {
                        let applied = unless_failed(&failure, || state.append(&mut insert, &hub, parts, now_ms));
                        Pending::Placed(reply, settled(applied, &mut failure))
                    }
                    LogOp::SetCheckpoint { hub, consumer_group, partition, sequence_number, reply } => {
                        let applied = unless_failed(&failure, || {
                            state.set_checkpoint(&tx, &hub, &consumer_group, partition, sequence_number)
                        });
                        Pending::Done(reply, settled(applied, &mut failure))
                    }
                    LogOp::ExpireStep { hub, before_ms, reply } => {
                        let applied = unless_failed(&failure, || {
                            // What this batch appended before the step is subject to it too.
                            state.write_open_chunks(&mut insert)?;
                            state.expire_step(&tx, &hub, before_ms)
                        });
                        Pending::Expired(reply, settled(applied, &mut failure))
                    }
                    LogOp::Purge { hub, reply } => {
                        let applied = unless_failed(&failure, || {
                            state.known_hubs.remove(&hub);
                            state.counters.remove(&hub);
                            purge(&tx, &hub).map(Ok)
                        });
                        Pending::Done(reply, settled(applied, &mut failure))
                    }
                };
                answers.push(answer);
            }
            if let Some(e) = failure {
                return Err(e);
            }
            state.write_open_chunks(&mut insert)?;
            state.persist_counters(&tx)?;
        }
        tx.commit()
    }
}

/// Runs `op` unless the batch is already lost.
fn unless_failed<T>(failure: &Option<rusqlite::Error>, op: impl FnOnce() -> Applied<T>) -> Option<Applied<T>> {
    failure.is_none().then(op)
}

/// The caller's answer to an op; a SQLite error becomes the batch's failure. When the batch is
/// lost (here or earlier) the answer given is replaced with that failure anyway.
fn settled<T>(applied: Option<Applied<T>>, failure: &mut Option<rusqlite::Error>) -> Result<T, StoreError> {
    match applied {
        Some(Ok(outcome)) => outcome,
        Some(Err(e)) => {
            let answer = Err(StoreError::Unavailable(e.to_string()));
            *failure = Some(e);
            answer
        }
        None => Err(StoreError::Unavailable("the batch failed".into())),
    }
}

impl LogState {
    fn append(
        &mut self,
        insert: &mut Statement<'_>,
        hub: &str,
        parts: Vec<PartitionEvents>,
        now_ms: i64,
    ) -> Applied<Vec<Placed>> {
        if !self.hub_exists(hub)? {
            return Ok(Err(StoreError::NotFound));
        }
        let partitions = self.counters.entry(hub.to_owned()).or_default();
        let mut placed = Vec::with_capacity(parts.len());
        for PartitionEvents { partition, events } in parts {
            let counter = partitions.entry(partition).or_default();
            // Never earlier than the partition's last event, so that time order follows
            // sequence order even if the clock steps back.
            let enqueued_ms = now_ms.max(counter.last_enqueued_ms);
            let first_sequence = counter.next_sequence;
            counter.next_sequence += events.count();
            counter.last_enqueued_ms = enqueued_ms;
            if !counter.dirty {
                counter.dirty = true;
                self.dirty.push((hub.to_owned(), partition));
            }
            match &mut counter.open {
                // Within a batch the time is the same; checked all the same, as a chunk has one.
                Some(open) if open.enqueued_ms == enqueued_ms && open.events.size() + events.size() <= CHUNK_BYTES => {
                    open.events.append(&events);
                }
                slot => {
                    if let Some(full) = slot.take() {
                        insert_chunk(insert, hub, partition, &full)?;
                    }
                    // Room for the parts still to come up front: grown by doubling instead, as
                    // hundreds of one-event parts join, reallocation showed in profiles.
                    let mut events = events;
                    events.reserve(CHUNK_BYTES.saturating_sub(events.size()));
                    *slot = Some(OpenChunk { first_sequence, enqueued_ms, events });
                }
            }
            placed.push(Placed { first_sequence, enqueued_ms });
        }
        Ok(Ok(placed))
    }

    /// Writes the chunks the batch has open.
    fn write_open_chunks(&mut self, insert: &mut Statement<'_>) -> rusqlite::Result<()> {
        for (hub, partition) in &self.dirty {
            // A partition purged after its append in the same batch has no counter left.
            let open = self.counters.get_mut(hub).and_then(|c| c.get_mut(partition)).and_then(|c| c.open.take());
            if let Some(chunk) = open {
                insert_chunk(insert, hub, *partition, &chunk)?;
            }
        }
        Ok(())
    }

    /// Forgets what the current batch changed, its open chunks included.
    fn forget_batch(&mut self) {
        for (hub, partition) in self.dirty.drain(..) {
            if let Some(counter) = self.counters.get_mut(&hub).and_then(|c| c.get_mut(&partition)) {
                counter.open = None;
                counter.dirty = false;
            }
        }
    }

    /// Writes the counter rows the batch changed.
    fn persist_counters(&mut self, db: &Connection) -> rusqlite::Result<()> {
        let mut upsert = db.prepare_cached(
            "INSERT INTO event_partitions (hub, partition_id, next_sequence, last_enqueued_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (hub, partition_id)
             DO UPDATE SET next_sequence = excluded.next_sequence, last_enqueued_ms = excluded.last_enqueued_ms",
        )?;
        for (hub, partition) in self.dirty.drain(..) {
            // A partition purged after its append in the same batch has no counter left.
            let Some(counter) = self.counters.get_mut(&hub).and_then(|c| c.get_mut(&partition)) else {
                continue;
            };
            counter.dirty = false;
            upsert.execute(params![hub, partition, counter.next_sequence, counter.last_enqueued_ms])?;
        }
        Ok(())
    }

    fn set_checkpoint(
        &mut self,
        db: &Connection,
        hub: &str,
        consumer_group: &str,
        partition: u32,
        sequence_number: i64,
    ) -> Applied<()> {
        if !self.hub_exists(hub)? {
            return Ok(Err(StoreError::NotFound));
        }
        db.prepare_cached(
            "INSERT INTO event_checkpoints (hub, consumer_group, partition_id, sequence_number)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (hub, consumer_group, partition_id) DO UPDATE SET sequence_number = excluded.sequence_number",
        )?
        .execute(params![hub, consumer_group, partition, sequence_number])?;
        Ok(Ok(()))
    }

    /// Deletes, partition after partition, the oldest chunks enqueued before `before_ms`, at
    /// most [`EXPIRY_STEP_CHUNKS`] in all. A chunk goes whole once its newest event is past
    /// retention, and is kept whole until then; as every event of a chunk has the chunk's
    /// enqueued time, that is exactly when each of its events is. Oldest first (enqueued times
    /// follow sequence order), so what is retained stays a gap-free range.
    fn expire_step(&mut self, db: &Connection, hub: &str, before_ms: i64) -> Applied<Expired> {
        let partitions: Vec<u32> = self.counters.get(hub).map(|c| c.keys().copied().collect()).unwrap_or_default();
        let mut delete = db.prepare_cached(
            "DELETE FROM event_chunks WHERE rowid IN (
                 SELECT rowid FROM event_chunks WHERE hub = ?1 AND partition_id = ?2 AND first_sequence < ?3
                 ORDER BY first_sequence LIMIT ?4)
             RETURNING event_count",
        )?;
        let mut budget = EXPIRY_STEP_CHUNKS;
        let mut events = 0;
        for partition in partitions {
            if budget == 0 {
                break;
            }
            // Everything before the first chunk that is not due, or everything.
            let cut = match first_chunk_at_or_after(db, hub, partition, before_ms)? {
                Ok(cut) => cut.unwrap_or(i64::MAX),
                Err(e) => return Ok(Err(e)),
            };
            let mut removed = delete.query(params![hub, partition, cut, budget])?;
            while let Some(row) = removed.next()? {
                budget -= 1;
                // A damaged count only misstates the total; the chunk is gone either way.
                events += u64::try_from(row.get::<_, i64>(0)?).unwrap_or(0);
            }
        }
        Ok(Ok(Expired { events, more: budget == 0 }))
    }

    fn hub_exists(&mut self, hub: &str) -> rusqlite::Result<bool> {
        if self.known_hubs.contains(hub) {
            return Ok(true);
        }
        let exists = self
            .registry
            .prepare_cached("SELECT 1 FROM hubs WHERE name = ?1")?
            .query_row([hub], |_| Ok(()))
            .optional()?;
        if exists.is_some() {
            self.known_hubs.insert(hub.to_owned());
        }
        Ok(exists.is_some())
    }
}

fn insert_chunk(insert: &mut Statement<'_>, hub: &str, partition: u32, chunk: &OpenChunk) -> rusqlite::Result<()> {
    let events = &chunk.events;
    insert.execute(params![hub, partition, chunk.first_sequence, events.count(), chunk.enqueued_ms, events.blob()])?;
    Ok(())
}

/// Deletes every row of a hub from the log's tables.
fn purge(db: &Connection, hub: &str) -> rusqlite::Result<()> {
    for table in LOG_TABLES {
        db.prepare_cached(&format!("DELETE FROM {table} WHERE hub = ?1"))?.execute([hub])?;
    }
    Ok(())
}

fn load_counters(db: &Connection) -> rusqlite::Result<HashMap<String, HashMap<u32, Counter>>> {
    let mut counters: HashMap<String, HashMap<u32, Counter>> = HashMap::new();
    let mut stmt = db.prepare("SELECT hub, partition_id, next_sequence, last_enqueued_ms FROM event_partitions")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let counter = Counter { next_sequence: row.get(2)?, last_enqueued_ms: row.get(3)?, ..Counter::default() };
        counters.entry(row.get(0)?).or_default().insert(row.get(1)?, counter);
    }
    Ok(counters)
}
