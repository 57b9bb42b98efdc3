//! Cloud-to-device queues and the hub's feedback queue in the registry file (device-protocol
//! §5.1, service-api §8): the writes the writer thread applies, and the reads.
//!
//! They live in `iothubd.db`, not `events.db`, because a queue belongs to its identity: the
//! foreign key with `ON DELETE CASCADE` removes it in the identity's own delete, and a removal
//! appends its feedback in the same savepoint, so the two are never apart.

use iothubd_actors::model::c2d::{C2dMessage, FeedbackRecord};
use iothubd_actors::model::identity::IdentityKey;
use iothubd_actors::store::StoreError;
use rusqlite::{Connection, params};

use super::schema::store_error;
use super::writer::{Outcome, hub_etag};
use crate::store::{c2d_message, decode, feedback_id, module_column};

/// Which queue: a hub and an identity, in column form (`module_id` is `''` for a device).
pub(super) struct QueueKey {
    pub hub: String,
    pub device_id: String,
    pub module_id: String,
}

impl QueueKey {
    pub(super) fn new(hub: &str, key: &IdentityKey) -> Self {
        Self {
            hub: hub.to_owned(),
            device_id: key.device_id.clone(),
            module_id: module_column(key.module_id.as_deref()).to_owned(),
        }
    }
}

/// One queue write, as the `Store` methods of the same names describe it.
pub(super) enum C2dOp {
    /// Inserts the message or replaces the one with its sequence number; a missing identity
    /// fails the foreign key, which answers `NotFound`.
    Put {
        queue: QueueKey,
        sequence_number: i64,
        doc: String,
        body: Vec<u8>,
    },
    /// Removes messages and appends feedback (`doc`s of `FeedbackRecord`s); `NotFound` for no
    /// such hub.
    Remove {
        queue: QueueKey,
        sequence_numbers: Vec<i64>,
        feedback: Vec<String>,
    },
    RemoveFeedback {
        hub: String,
        ids: Vec<i64>,
    },
}

impl C2dOp {
    /// Runs the write; the outer error is SQLite's, the inner one a refusal decided here.
    pub(super) fn apply(&self, db: &Connection) -> rusqlite::Result<Outcome> {
        match self {
            Self::Put { queue, sequence_number, doc, body } => {
                db.prepare_cached(
                    "INSERT INTO c2d_messages (hub, device_id, module_id, sequence_number, doc, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (hub, device_id, module_id, sequence_number)
                     DO UPDATE SET doc = excluded.doc, body = excluded.body",
                )?
                .execute(params![
                    queue.hub,
                    queue.device_id,
                    queue.module_id,
                    sequence_number,
                    doc,
                    body
                ])?;
                Ok(Ok(None))
            }
            Self::Remove { queue, sequence_numbers, feedback } => {
                if hub_etag(db, &queue.hub)?.is_none() {
                    return Ok(Err(StoreError::NotFound));
                }
                let mut delete = db.prepare_cached(
                    "DELETE FROM c2d_messages
                     WHERE hub = ?1 AND device_id = ?2 AND module_id = ?3 AND sequence_number = ?4",
                )?;
                for sequence_number in sequence_numbers {
                    delete.execute(params![queue.hub, queue.device_id, queue.module_id, sequence_number])?;
                }
                append_feedback(db, &queue.hub, feedback)
            }
            Self::RemoveFeedback { hub, ids } => {
                let mut delete = db.prepare_cached("DELETE FROM feedback WHERE hub = ?1 AND id = ?2")?;
                for id in ids {
                    delete.execute(params![hub, id])?;
                }
                Ok(Ok(None))
            }
        }
    }
}

/// Numbers `docs` from the hub's counter (which never goes back, so ids are never reused) and
/// appends them.
fn append_feedback(db: &Connection, hub: &str, docs: &[String]) -> rusqlite::Result<Outcome> {
    if docs.is_empty() {
        return Ok(Ok(None));
    }
    let Ok(count) = i64::try_from(docs.len()) else {
        return Ok(Err(StoreError::Unavailable(format!("{} feedback records in one write", docs.len()))));
    };
    let first: i64 = db
        .prepare_cached(
            "INSERT INTO feedback_counters (hub, next_id) VALUES (?1, 1 + ?2)
             ON CONFLICT (hub) DO UPDATE SET next_id = next_id + ?2
             RETURNING next_id - ?2",
        )?
        .query_row(params![hub, count], |row| row.get(0))?;
    let mut insert = db.prepare_cached("INSERT INTO feedback (hub, id, doc) VALUES (?1, ?2, ?3)")?;
    for (id, doc) in (first..).zip(docs) {
        insert.execute(params![hub, id, doc])?;
    }
    Ok(Ok(None))
}

/// The identity's queue in sequence order; `NotFound` when the identity does not exist.
///
/// One statement, so the identity check and the messages come from one snapshot: the identity
/// row with no message joins to a single row of NULLs.
pub(super) fn queue(db: &Connection, queue: &QueueKey) -> Result<Vec<C2dMessage>, StoreError> {
    let rows: Vec<(Option<String>, Option<Vec<u8>>)> = db
        .prepare_cached(
            "SELECT m.doc, m.body FROM identities i
             LEFT JOIN c2d_messages m
               ON m.hub = i.hub AND m.device_id = i.device_id AND m.module_id = i.module_id
             WHERE i.hub = ?1 AND i.device_id = ?2 AND i.module_id = ?3
             ORDER BY m.sequence_number",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![queue.hub, queue.device_id, queue.module_id], |row| Ok((row.get(0)?, row.get(1)?)))?
                .collect()
        })
        .map_err(store_error)?;
    if rows.is_empty() {
        return Err(StoreError::NotFound);
    }
    rows.into_iter().filter_map(|(doc, body)| doc.zip(body)).map(|(doc, body)| c2d_message(&doc, body)).collect()
}

/// Up to `max` of the hub's oldest feedback records with their ids.
pub(super) fn feedback_batch(db: &Connection, hub: &str, max: usize) -> Result<Vec<(u64, FeedbackRecord)>, StoreError> {
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let rows: Vec<(i64, String)> = db
        .prepare_cached("SELECT id, doc FROM feedback WHERE hub = ?1 ORDER BY id LIMIT ?2")
        .and_then(|mut stmt| stmt.query_map(params![hub, limit], |row| Ok((row.get(0)?, row.get(1)?)))?.collect())
        .map_err(store_error)?;
    rows.into_iter().map(|(id, doc)| Ok((feedback_id(id)?, decode("feedback record", &doc)?))).collect()
}
