//! The single writer of the embedded store, and the writes it knows.
//!
//! A durable SQLite commit costs one fsync (~0.3 ms here) while the write itself costs a few
//! microseconds (DESIGN.md §10), so one OS thread owns the only writing connection and commits
//! whatever has queued up meanwhile in one transaction: group commit. Each write runs in its own
//! savepoint, so a refused write (a taken key, a stale ETag) is rolled back alone and the rest of
//! the batch still commits. Callers get their answer only after the commit returned.
//!
//! The queue is bounded: when it is full, [`WriterHandle::write`] waits — backpressure on the
//! callers rather than unbounded memory.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{mpsc, oneshot};

use super::c2d::C2dOp;
use super::schema::{MIGRATIONS, open_writer, store_error};
use crate::store::{HUB_SCOPED_TABLES, missing_or_stale};
use iothubd_actors::store::StoreError;

/// What a write answers: for a delete that returns what it removed, the removed document.
pub(super) type Outcome = Result<Option<String>, StoreError>;

/// A hub row; `doc` is the JSON of the `HubDescription`.
pub(super) struct HubRow {
    pub name: String,
    pub host_name: String,
    pub etag: String,
    pub doc: String,
}

/// An identity row; `doc` is the JSON of the `Identity`.
pub(super) struct IdentityRow {
    pub hub: String,
    pub device_id: String,
    /// `''` for a device.
    pub module_id: String,
    pub status: &'static str,
    pub etag: String,
    pub doc: String,
}

/// One write, as the `Store` methods of the same names describe it.
pub(super) enum WriteOp {
    CreateHub(HubRow),
    ReplaceHub {
        row: HubRow,
        expected_etag: Option<String>,
    },
    DeleteHub {
        name: String,
    },
    CreateIdentity(IdentityRow),
    ReplaceIdentity {
        row: IdentityRow,
        expected_etag: Option<String>,
    },
    /// Answers the deleted document.
    DeleteIdentity {
        hub: String,
        device_id: String,
        module_id: String,
        expected_etag: Option<String>,
    },
    /// Writes `doc` (a `Twin`) if the stored twin's version is `expected_version` (NULL: never
    /// written).
    ReplaceTwin {
        hub: String,
        device_id: String,
        module_id: String,
        doc: String,
        version: i64,
        expected_version: Option<i64>,
    },
    /// A cloud-to-device queue or feedback write (`c2d`).
    C2d(C2dOp),
}

enum Request {
    Write {
        op: WriteOp,
        reply: oneshot::Sender<Outcome>,
    },
    /// Stop accepting writes, commit what is queued, close the file, then answer.
    Close(oneshot::Sender<Result<(), StoreError>>),
}

/// The callers' side of the writer thread.
pub(super) struct WriterHandle {
    queue: mpsc::Sender<Request>,
}

impl WriterHandle {
    /// Opens (creating and migrating) the database and starts the writer thread.
    pub(super) fn start(path: &std::path::Path, queue_capacity: usize, max_batch: usize) -> anyhow::Result<Self> {
        let conn = open_writer(path, MIGRATIONS)?;
        let (queue, requests) = mpsc::channel(queue_capacity);
        std::thread::Builder::new()
            .name("iothubd-store-writer".into())
            .spawn(move || run(conn, requests, max_batch))?;
        Ok(Self { queue })
    }

    /// Queues a write (waiting while the queue is full) and answers once it is committed.
    pub(super) async fn write(&self, op: WriteOp) -> Outcome {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Request::Write { op, reply }).await.map_err(|_| closed())?;
        answer.await.map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?
    }

    /// Commits everything queued so far and stops the writer; later writes get `Unavailable`.
    pub(super) async fn close(&self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        if self.queue.send(Request::Close(reply)).await.is_err() {
            // Already closed or closing; every write acknowledged so far is durable already.
            return Ok(());
        }
        answer.await.unwrap_or_else(|_| Err(StoreError::Unavailable("the store writer stopped".into())))
    }
}

pub(super) fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

fn run(mut conn: Connection, mut requests: mpsc::Receiver<Request>, max_batch: usize) {
    // Every statement the writer runs stays prepared (rusqlite keeps 16 by default, fewer than
    // the writer has, and an evicted statement is parsed again on its next use).
    conn.set_prepared_statement_cache_capacity(128);
    let mut batch = Vec::with_capacity(max_batch);
    let mut close_waiters = Vec::new();
    // Returns 0 only once the queue is closed and empty: writes queued before a `Close` still
    // commit.
    while requests.blocking_recv_many(&mut batch, max_batch) > 0 {
        let mut writes = Vec::with_capacity(batch.len());
        for request in batch.drain(..) {
            match request {
                Request::Write { op, reply } => writes.push((op, reply)),
                Request::Close(reply) => {
                    requests.close();
                    close_waiters.push(reply);
                }
            }
        }
        commit_batch(&mut conn, writes);
    }
    let closed = conn.close().map_err(|(_, e)| StoreError::Unavailable(e.to_string()));
    for waiter in close_waiters {
        let _ = waiter.send(closed.clone());
    }
}

fn commit_batch(conn: &mut Connection, writes: Vec<(WriteOp, oneshot::Sender<Outcome>)>) {
    if writes.is_empty() {
        return;
    }
    let outcomes = match apply_all(conn, writes.iter().map(|(op, _)| op)) {
        Ok(outcomes) => outcomes,
        // Nothing of the batch was committed.
        Err(e) => {
            tracing::error!(error = %e, writes = writes.len(), "embedded store commit failed");
            vec![Err(StoreError::Unavailable(e.to_string())); writes.len()]
        }
    };
    for ((_, reply), outcome) in writes.into_iter().zip(outcomes) {
        // A caller that gave up waiting no longer needs the answer; the write stands.
        let _ = reply.send(outcome);
    }
}

fn apply_all<'a>(conn: &mut Connection, ops: impl Iterator<Item = &'a WriteOp>) -> rusqlite::Result<Vec<Outcome>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::new();
    for op in ops {
        // Savepoint statements from the statement cache: rusqlite's `Savepoint` runs them as
        // text, and parsing two statements per write showed in the store writer's profile.
        tx.prepare_cached("SAVEPOINT write_op")?.execute([])?;
        let outcome = op.apply(&tx).map_err(store_error).and_then(|outcome| outcome);
        if outcome.is_err() {
            tx.prepare_cached("ROLLBACK TO write_op")?.execute([])?;
        }
        tx.prepare_cached("RELEASE write_op")?.execute([])?;
        outcomes.push(outcome);
    }
    tx.commit()?;
    Ok(outcomes)
}

impl WriteOp {
    /// Runs the write; the outer error is SQLite's, the inner one a refusal decided here.
    fn apply(&self, db: &Connection) -> rusqlite::Result<Outcome> {
        match self {
            Self::CreateHub(row) => {
                db.prepare_cached("INSERT INTO hubs (name, host_name, etag, doc) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![row.name, row.host_name, row.etag, row.doc])?;
                Ok(Ok(None))
            }
            Self::ReplaceHub { row, expected_etag } => {
                let changed = db
                    .prepare_cached(
                        "UPDATE hubs SET host_name = ?2, etag = ?3, doc = ?4
                         WHERE name = ?1 AND (?5 IS NULL OR etag = ?5)",
                    )?
                    .execute(params![row.name, row.host_name, row.etag, row.doc, expected_etag])?;
                if changed == 0 {
                    return Ok(Err(missing_or_stale(hub_etag(db, &row.name)?)));
                }
                Ok(Ok(None))
            }
            Self::DeleteHub { name } => {
                if hub_etag(db, name)?.is_none() {
                    return Ok(Err(StoreError::NotFound));
                }
                for table in HUB_SCOPED_TABLES {
                    db.prepare_cached(&format!("DELETE FROM {table} WHERE hub = ?1"))?.execute([name])?;
                }
                db.prepare_cached("DELETE FROM hubs WHERE name = ?1")?.execute([name])?;
                Ok(Ok(None))
            }
            Self::CreateIdentity(row) => {
                if !row.module_id.is_empty() && identity_etag(db, &row.hub, &row.device_id, "")?.is_none() {
                    return Ok(Err(StoreError::NotFound));
                }
                db.prepare_cached(
                    "INSERT INTO identities (hub, device_id, module_id, status, etag, doc)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    row.hub,
                    row.device_id,
                    row.module_id,
                    row.status,
                    row.etag,
                    row.doc
                ])?;
                Ok(Ok(None))
            }
            Self::ReplaceIdentity { row, expected_etag } => {
                let changed = db
                    .prepare_cached(
                        "UPDATE identities SET status = ?4, etag = ?5, doc = ?6
                         WHERE hub = ?1 AND device_id = ?2 AND module_id = ?3 AND (?7 IS NULL OR etag = ?7)",
                    )?
                    .execute(params![
                        row.hub,
                        row.device_id,
                        row.module_id,
                        row.status,
                        row.etag,
                        row.doc,
                        expected_etag
                    ])?;
                if changed == 0 {
                    return Ok(Err(missing_or_stale(identity_etag(db, &row.hub, &row.device_id, &row.module_id)?)));
                }
                Ok(Ok(None))
            }
            Self::DeleteIdentity { hub, device_id, module_id, expected_etag } => {
                let current: Option<(String, String)> = db
                    .prepare_cached(
                        "SELECT etag, doc FROM identities WHERE hub = ?1 AND device_id = ?2 AND module_id = ?3",
                    )?
                    .query_row(params![hub, device_id, module_id], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()?;
                let Some((etag, doc)) = current else {
                    return Ok(Err(StoreError::NotFound));
                };
                if expected_etag.as_ref().is_some_and(|expected| *expected != etag) {
                    return Ok(Err(StoreError::PreconditionFailed));
                }
                // For a device (module_id = '') this removes its modules as well.
                db.prepare_cached(
                    "DELETE FROM identities WHERE hub = ?1 AND device_id = ?2 AND (module_id = ?3 OR ?3 = '')",
                )?
                .execute(params![hub, device_id, module_id])?;
                Ok(Ok(Some(doc)))
            }
            Self::ReplaceTwin { hub, device_id, module_id, doc, version, expected_version } => {
                // `IS` is SQLite's `IS NOT DISTINCT FROM`: NULL matches a never-written twin.
                let changed = db
                    .prepare_cached(
                        "UPDATE identities SET twin = ?4, twin_version = ?5
                         WHERE hub = ?1 AND device_id = ?2 AND module_id = ?3 AND twin_version IS ?6",
                    )?
                    .execute(params![hub, device_id, module_id, doc, version, expected_version])?;
                if changed == 0 {
                    return Ok(Err(missing_or_stale(identity_etag(db, hub, device_id, module_id)?)));
                }
                Ok(Ok(None))
            }
            Self::C2d(op) => op.apply(db),
        }
    }
}

pub(super) fn hub_etag(db: &Connection, name: &str) -> rusqlite::Result<Option<String>> {
    db.prepare_cached("SELECT etag FROM hubs WHERE name = ?1")?.query_row([name], |row| row.get(0)).optional()
}

fn identity_etag(db: &Connection, hub: &str, device_id: &str, module_id: &str) -> rusqlite::Result<Option<String>> {
    db.prepare_cached("SELECT etag FROM identities WHERE hub = ?1 AND device_id = ?2 AND module_id = ?3")?
        .query_row([hub, device_id, module_id], |row| row.get(0))
        .optional()
}
