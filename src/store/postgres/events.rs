//! The events log on PostgreSQL: the built-in endpoint's partitions and the consumer groups'
//! checkpoints (service-api §9).
//!
//! An append is one statement per partition: it upserts the partition's counter row — whose
//! row lock orders concurrent appenders to that partition, in this process or another, until
//! commit — and inserts the events numbered from the counter's old value, all rows of the
//! partition in one `INSERT … SELECT … FROM unnest(…)`. Appends to several partitions run in one
//! transaction and lock the counters in partition order, so two of them cannot deadlock.
//! Enqueued times come from the server's clock, never earlier than the partition's last one.
//!
//! Appends are group-committed in the process ([`Appender`]): one task commits, and every
//! append queued while a commit runs goes into the next one, so concurrent small appends share
//! a transaction (and a WAL flush) instead of queueing one commit each on a partition's counter
//! row. Appends that commit together succeed or fail together.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use futures::FutureExt as _;
use futures::future::join_all;
use iothubd_actors::model::event::{EventData, EventPosition, PartitionInfo, StoredEvent};
use iothubd_actors::store::StoreError;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::IsolationLevel;

use super::{PostgresStore, column, execute, pooled, query, query_opt, store_error};
use crate::store::event_codec::{decode_event, encode_meta};
use crate::store::{millis, partition_info, time_of};

/// For a partition (`$1` hub, `$2` partition), the first retained sequence number enqueued at
/// or after `$3` (ms): the last retained one + 1 when every retained event is older; no row
/// when none is retained.
///
/// A binary search over the retained range, which is gap-free and whose enqueued times never
/// decrease: about 20 point lookups on the key for a million events, in one statement (so one
/// snapshot), and no index on time for every append to maintain. PostgreSQL's `events` only:
/// the embedded store searches its chunks the same way (`embedded::event_log`).
const FIRST_ENQUEUED_AT_OR_AFTER: &str = "
    WITH RECURSIVE search (low, high) AS (
        SELECT (SELECT min(sequence_number) FROM events WHERE hub = $1 AND partition_id = $2),
               (SELECT max(sequence_number) FROM events WHERE hub = $1 AND partition_id = $2) + 1
        UNION ALL
        SELECT CASE WHEN e.enqueued_ms >= $3 THEN s.low ELSE e.sequence_number + 1 END,
               CASE WHEN e.enqueued_ms >= $3 THEN e.sequence_number ELSE s.high END
        FROM search s
        JOIN events e
          ON e.hub = $1 AND e.partition_id = $2 AND e.sequence_number = s.low + (s.high - s.low) / 2
        WHERE s.low < s.high
    )
    SELECT low FROM search WHERE low = high";

/// Events removed by one retention statement in PostgreSQL: expiry of a large backlog proceeds
/// in steps, so appends keep flowing between them instead of waiting behind one huge delete.
const EXPIRY_CHUNK: i64 = 4096;

/// Appends `$4`/`$5` (bodies, metas: `$3` events) to partition `$2` of hub `$1`; answers the
/// first sequence number and the enqueued time. A missing hub fails the counter's foreign key.
const APPEND: &str = "
    WITH counter AS (
        INSERT INTO event_partitions AS p (hub, partition_id, next_sequence, last_enqueued_ms)
        VALUES ($1, $2, $3::bigint, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
        ON CONFLICT (hub, partition_id) DO UPDATE
        SET next_sequence = p.next_sequence + excluded.next_sequence,
            last_enqueued_ms = greatest(p.last_enqueued_ms, excluded.last_enqueued_ms)
        RETURNING p.next_sequence - $3::bigint AS first_sequence, p.last_enqueued_ms
    ), appended AS (
        INSERT INTO events (hub, partition_id, sequence_number, enqueued_ms, body, meta)
        SELECT $1, $2, counter.first_sequence + e.ordinality - 1, counter.last_enqueued_ms, e.body, e.meta
        FROM counter, unnest($4::bytea[], $5::bytea[]) WITH ORDINALITY AS e (body, meta, ordinality)
    )
    SELECT first_sequence, last_enqueued_ms FROM counter";

/// A partition's bodies and metas in append order, with each event's index in the call.
#[derive(Default)]
struct PartitionBatch {
    indexes: Vec<usize>,
    bodies: Vec<Vec<u8>>,
    metas: Vec<Vec<u8>>,
}

/// Appends waiting for the commit task; bounded, so appenders wait when the database is slow.
const APPEND_QUEUE: usize = 1024;

/// Most events one group commit carries (an append larger than this commits alone).
const GROUP_EVENTS: usize = 8192;

/// The process's way into the events log: hands appends to the task that group-commits them.
pub(super) struct Appender {
    queue: mpsc::Sender<AppendJob>,
}

/// An event as the `events` table stores it: partition, body, encoded metadata.
type EncodedEvent = (u32, Vec<u8>, Vec<u8>);

struct AppendJob {
    hub: String,
    events: Vec<EncodedEvent>,
    reply: oneshot::Sender<Result<Vec<EventPosition>, StoreError>>,
}

impl Appender {
    /// Starts the commit task on the current tokio runtime; it ends once the store is dropped.
    pub(super) fn start(pool: Pool) -> Self {
        let (queue, jobs) = mpsc::channel(APPEND_QUEUE);
        tokio::spawn(commit_appends(pool, jobs));
        Self { queue }
    }

    /// Appends `events` (partition, event) to `hub`'s log; answers each event's position once
    /// committed.
    pub(super) async fn append(
        &self,
        hub: &str,
        events: Vec<(u32, EventData)>,
    ) -> Result<Vec<EventPosition>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        // Encoded here, on the callers' threads, so the one commit task only commits.
        let events = events
            .into_iter()
            .map(|(partition, event)| {
                let meta = encode_meta(&event);
                (partition, event.body, meta)
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        let job = AppendJob { hub: hub.to_owned(), events, reply };
        self.queue.send(job).await.map_err(|_| StoreError::Unavailable("the events log appender stopped".into()))?;
        answer.await.map_err(|_| StoreError::Unavailable("the events log commit was abandoned".into()))?
    }
}

/// Commits what queued while the previous commit ran, up to [`GROUP_EVENTS`] events: one
/// transaction per hub, the hubs' transactions at once.
async fn commit_appends(pool: Pool, mut jobs: mpsc::Receiver<AppendJob>) {
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut size = first.events.len();
        let mut by_hub: BTreeMap<String, Vec<AppendJob>> = BTreeMap::new();
        by_hub.entry(first.hub.clone()).or_default().push(first);
        while size < GROUP_EVENTS {
            let Ok(job) = jobs.try_recv() else { break };
            if size + job.events.len() > GROUP_EVENTS {
                next = Some(job);
                break;
            }
            size += job.events.len();
            by_hub.entry(job.hub.clone()).or_default().push(job);
        }
        let commits = by_hub.into_iter().map(|(hub, group)| commit_group(&pool, hub, group));
        // A panic answers its batch's callers with `Unavailable` (their reply senders drop)
        // instead of ending the task and, with it, every later append.
        if AssertUnwindSafe(join_all(commits)).catch_unwind().await.is_err() {
            tracing::error!("an events log commit panicked; its appends failed");
        }
    }
}

/// One hub's queued appends in one transaction; each caller gets its own events' positions.
async fn commit_group(pool: &Pool, hub: String, group: Vec<AppendJob>) {
    let mut events = Vec::with_capacity(group.iter().map(|job| job.events.len()).sum());
    let mut callers = Vec::with_capacity(group.len());
    for job in group {
        callers.push((job.events.len(), job.reply));
        events.extend(job.events);
    }
    match append_now(pool, &hub, events).await {
        Ok(positions) => {
            let mut rest = positions.into_iter();
            for (count, reply) in callers {
                let _ = reply.send(Ok(rest.by_ref().take(count).collect()));
            }
        }
        Err(e) => {
            for (_, reply) in callers {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Appends `events` in one transaction (one statement when they are all in one partition).
async fn append_now(pool: &Pool, hub: &str, events: Vec<EncodedEvent>) -> Result<Vec<EventPosition>, StoreError> {
    let count = events.len();
    let mut batches: BTreeMap<u32, PartitionBatch> = BTreeMap::new();
    for (index, (partition, body, meta)) in events.into_iter().enumerate() {
        let batch = batches.entry(partition).or_default();
        batch.metas.push(meta);
        batch.bodies.push(body);
        batch.indexes.push(index);
    }
    let mut positions = vec![None; count];
    let mut db = pooled(pool).await?;
    if batches.len() <= 1 {
        // One statement is atomic by itself: no explicit transaction, one round trip.
        for (partition, batch) in batches {
            append_partition(&db, hub, partition, batch, &mut positions).await?;
        }
    } else {
        let tx = db.transaction().await.map_err(store_error)?;
        for (partition, batch) in batches {
            append_partition(&tx, hub, partition, batch, &mut positions).await?;
        }
        tx.commit().await.map_err(store_error)?;
    }
    positions.into_iter().map(|p| p.ok_or_else(|| StoreError::Corrupt("an event got no position".into()))).collect()
}

/// Appends one partition's share of a call and fills in its positions.
async fn append_partition(
    db: &impl GenericClient,
    hub: &str,
    partition: u32,
    batch: PartitionBatch,
    positions: &mut [Option<EventPosition>],
) -> Result<(), StoreError> {
    let size = i64::try_from(batch.bodies.len()).unwrap_or(i64::MAX);
    let row = query_opt(db, APPEND, &[&hub, &i64::from(partition), &size, &batch.bodies, &batch.metas])
        .await?
        .ok_or_else(|| StoreError::Corrupt("an append returned no counter".into()))?;
    let (first, enqueued_ms): (i64, i64) = (column(&row, 0)?, column(&row, 1)?);
    let enqueued_time = time_of(enqueued_ms);
    for (offset, index) in (0_i64..).zip(batch.indexes) {
        if let Some(slot) = positions.get_mut(index) {
            *slot = Some(EventPosition { partition, sequence_number: first + offset, enqueued_time });
        }
    }
    Ok(())
}

pub(super) async fn read(
    store: &PostgresStore,
    hub: &str,
    partition: u32,
    from_sequence: i64,
    max: usize,
) -> Result<Vec<StoredEvent>, StoreError> {
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    let db = store.client().await?;
    let rows = query(
        &db,
        "SELECT sequence_number, enqueued_ms, body, meta FROM events
         WHERE hub = $1 AND partition_id = $2 AND sequence_number >= $3
         ORDER BY sequence_number LIMIT $4",
        &[&hub, &i64::from(partition), &from_sequence, &max],
    )
    .await?;
    rows.iter()
        .map(|row| {
            let position =
                EventPosition { partition, sequence_number: column(row, 0)?, enqueued_time: time_of(column(row, 1)?) };
            Ok(StoredEvent { position, data: decode_event(column(row, 2)?, column(row, 3)?)? })
        })
        .collect()
}

pub(super) async fn sequence_at(
    store: &PostgresStore,
    hub: &str,
    partition: u32,
    time: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let partition = i64::from(partition);
    let mut db = store.client().await?;
    // One snapshot for the search and the counters.
    let tx = db
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(store_error)?;
    let found = query_opt(&tx, FIRST_ENQUEUED_AT_OR_AFTER, &[&hub, &partition, &millis(time)]).await?;
    // Past the last retained event, the answer is the next sequence number: the same, unless
    // nothing is retained.
    if let Some(row) = found {
        return column(&row, 0);
    }
    let counters = counters(&tx, hub, partition).await?;
    tx.commit().await.map_err(store_error)?;
    Ok(counters.map_or(0, |(next_sequence, _)| next_sequence))
}

pub(super) async fn info(store: &PostgresStore, hub: &str, partition: u32) -> Result<PartitionInfo, StoreError> {
    let db = store.client().await?;
    // One statement, so one snapshot for the counters and the first retained event.
    let row = query_opt(
        &db,
        "SELECT p.next_sequence, p.last_enqueued_ms,
                (SELECT min(sequence_number) FROM events e WHERE e.hub = $1 AND e.partition_id = $2)
         FROM (SELECT 1) AS one
         LEFT JOIN event_partitions p ON p.hub = $1 AND p.partition_id = $2",
        &[&hub, &i64::from(partition)],
    )
    .await?
    .ok_or_else(|| StoreError::Corrupt("a partition query returned no row".into()))?;
    let next: Option<i64> = column(&row, 0)?;
    let last_ms: Option<i64> = column(&row, 1)?;
    Ok(partition_info(next.zip(last_ms), column(&row, 2)?))
}

/// Deletes the hub's events enqueued before `before`, partition by partition, in statements of
/// at most [`EXPIRY_CHUNK`] rows so that no long transaction holds up appends or vacuum.
pub(super) async fn expire(store: &PostgresStore, hub: &str, before: DateTime<Utc>) -> Result<u64, StoreError> {
    let db = store.client().await?;
    let partitions = query(&db, "SELECT partition_id FROM event_partitions WHERE hub = $1", &[&hub]).await?;
    let mut deleted = 0;
    for row in partitions {
        let partition: i64 = column(&row, 0)?;
        let Some(cut) = query_opt(&db, FIRST_ENQUEUED_AT_OR_AFTER, &[&hub, &partition, &millis(before)]).await? else {
            continue;
        };
        let cut: i64 = column(&cut, 0)?;
        loop {
            let removed = execute(
                &db,
                "DELETE FROM events WHERE hub = $1 AND partition_id = $2 AND sequence_number < least($3,
                     (SELECT min(sequence_number) FROM events WHERE hub = $1 AND partition_id = $2) + $4)",
                &[&hub, &partition, &cut, &EXPIRY_CHUNK],
            )
            .await?;
            deleted += removed;
            if removed < EXPIRY_CHUNK.unsigned_abs() {
                break;
            }
        }
    }
    Ok(deleted)
}

pub(super) async fn get_checkpoint(
    store: &PostgresStore,
    hub: &str,
    consumer_group: &str,
    partition: u32,
) -> Result<Option<i64>, StoreError> {
    let db = store.client().await?;
    let row = query_opt(
        &db,
        "SELECT sequence_number FROM event_checkpoints WHERE hub = $1 AND consumer_group = $2 AND partition_id = $3",
        &[&hub, &consumer_group, &i64::from(partition)],
    )
    .await?;
    row.map(|row| column(&row, 0)).transpose()
}

pub(super) async fn set_checkpoint(
    store: &PostgresStore,
    hub: &str,
    consumer_group: &str,
    partition: u32,
    sequence_number: i64,
) -> Result<(), StoreError> {
    let db = store.client().await?;
    // A missing hub fails the foreign key: `NotFound`.
    execute(
        &db,
        "INSERT INTO event_checkpoints (hub, consumer_group, partition_id, sequence_number) VALUES ($1, $2, $3, $4)
         ON CONFLICT (hub, consumer_group, partition_id) DO UPDATE SET sequence_number = excluded.sequence_number",
        &[&hub, &consumer_group, &i64::from(partition), &sequence_number],
    )
    .await
    .map(drop)
}

/// A partition's `(next_sequence, last_enqueued_ms)`, if anything was ever appended to it.
async fn counters(db: &impl GenericClient, hub: &str, partition: i64) -> Result<Option<(i64, i64)>, StoreError> {
    let row = query_opt(
        db,
        "SELECT next_sequence, last_enqueued_ms FROM event_partitions WHERE hub = $1 AND partition_id = $2",
        &[&hub, &partition],
    )
    .await?;
    row.map(|row| Ok((column(&row, 0)?, column(&row, 1)?))).transpose()
}
