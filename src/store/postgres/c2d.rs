//! Cloud-to-device queues and the hub's feedback queue on PostgreSQL (device-protocol §5.1,
//! service-api §8).
//!
//! A queue's foreign key cascades from its identity, so an identity delete (and a device's
//! modules with it) removes the queue in the same statement, and a put racing the delete
//! either lands before it (and is swept) or fails the key check (`NotFound`). A removal and
//! its feedback commit in one transaction; feedback ids come from the hub's counter row, whose
//! lock orders concurrent appenders, so ids become visible in increasing order and are never
//! reused.

use iothubd_actors::model::c2d::{C2dMessage, FeedbackRecord};
use iothubd_actors::model::identity::IdentityKey;
use iothubd_actors::store::StoreError;

use super::{PostgresStore, column, doc, execute, query, query_opt, store_error};
use crate::store::{c2d_message, c2d_row, encode, feedback_id, module_column, stored_keys};

pub(super) async fn queue(store: &PostgresStore, hub: &str, key: &IdentityKey) -> Result<Vec<C2dMessage>, StoreError> {
    let module_id = module_column(key.module_id.as_deref());
    let db = store.client().await?;
    // One statement, so the identity check and the messages come from one snapshot: the
    // identity row with no message joins to a single row of NULLs.
    let rows = query(
        &db,
        "SELECT m.doc::text, m.body FROM identities i
         LEFT JOIN c2d_messages m
           ON m.hub = i.hub AND m.device_id = i.device_id AND m.module_id = i.module_id
         WHERE i.hub = $1 AND i.device_id = $2 AND i.module_id = $3
         ORDER BY m.sequence_number",
        &[&hub, &key.device_id, &module_id],
    )
    .await?;
    if rows.is_empty() {
        return Err(StoreError::NotFound);
    }
    let mut messages = Vec::with_capacity(rows.len());
    for row in &rows {
        if let (Some(doc), Some(body)) = (column::<Option<&str>>(row, 0)?, column::<Option<Vec<u8>>>(row, 1)?) {
            messages.push(c2d_message(doc, body)?);
        }
    }
    Ok(messages)
}

pub(super) async fn put(
    store: &PostgresStore,
    hub: &str,
    key: &IdentityKey,
    message: &C2dMessage,
) -> Result<(), StoreError> {
    let (sequence_number, doc, body) = c2d_row(message)?;
    let module_id = module_column(key.module_id.as_deref());
    let db = store.client().await?;
    // A missing identity fails the foreign key, which `store_error` answers as `NotFound`.
    execute(
        &db,
        "INSERT INTO c2d_messages (hub, device_id, module_id, sequence_number, doc, body)
         VALUES ($1, $2, $3, $4, $5::text::jsonb, $6)
         ON CONFLICT (hub, device_id, module_id, sequence_number)
         DO UPDATE SET doc = excluded.doc, body = excluded.body",
        &[&hub, &key.device_id, &module_id, &sequence_number, &doc, &body],
    )
    .await
    .map(drop)
}

pub(super) async fn remove(
    store: &PostgresStore,
    hub: &str,
    key: &IdentityKey,
    sequence_numbers: &[u64],
    feedback: &[FeedbackRecord],
) -> Result<(), StoreError> {
    let module_id = module_column(key.module_id.as_deref());
    let sequence_numbers = stored_keys(sequence_numbers);
    let docs = feedback.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
    let count = i64::try_from(docs.len())
        .map_err(|_| StoreError::Unavailable(format!("{} feedback records in one write", docs.len())))?;
    let mut db = store.client().await?;
    let tx = db.transaction().await.map_err(store_error)?;
    // The hub's key-share lock comes first: `delete_hub` locks the hub row before the queue
    // rows, so taking the queue rows first could deadlock with it.
    if query_opt(&tx, "SELECT 1 FROM hubs WHERE name = $1 FOR KEY SHARE", &[&hub]).await?.is_none() {
        return Err(StoreError::NotFound);
    }
    execute(
        &tx,
        "DELETE FROM c2d_messages
         WHERE hub = $1 AND device_id = $2 AND module_id = $3 AND sequence_number = ANY($4)",
        &[&hub, &key.device_id, &module_id, &sequence_numbers],
    )
    .await?;
    if count > 0 {
        let counter = query_opt(
            &tx,
            "INSERT INTO feedback_counters AS c (hub, next_id) VALUES ($1, 1 + $2::bigint)
             ON CONFLICT (hub) DO UPDATE SET next_id = c.next_id + $2::bigint
             RETURNING c.next_id - $2::bigint",
            &[&hub, &count],
        )
        .await?
        .ok_or_else(|| StoreError::Corrupt("the feedback counter returned no row".into()))?;
        let first: i64 = column(&counter, 0)?;
        execute(
            &tx,
            "INSERT INTO feedback (hub, id, doc)
             SELECT $1, $2::bigint + f.ordinality - 1, f.doc::jsonb
             FROM unnest($3::text[]) WITH ORDINALITY AS f (doc, ordinality)",
            &[&hub, &first, &docs],
        )
        .await?;
    }
    tx.commit().await.map_err(store_error)
}

pub(super) async fn feedback_batch(
    store: &PostgresStore,
    hub: &str,
    max: usize,
) -> Result<Vec<(u64, FeedbackRecord)>, StoreError> {
    let limit = i64::try_from(max).unwrap_or(i64::MAX);
    let db = store.client().await?;
    let rows =
        query(&db, "SELECT doc::text, id FROM feedback WHERE hub = $1 ORDER BY id LIMIT $2", &[&hub, &limit]).await?;
    rows.iter().map(|row| Ok((feedback_id(column(row, 1)?)?, doc("feedback record", row)?))).collect()
}

pub(super) async fn feedback_remove(store: &PostgresStore, hub: &str, ids: &[u64]) -> Result<(), StoreError> {
    let ids = stored_keys(ids);
    let db = store.client().await?;
    execute(&db, "DELETE FROM feedback WHERE hub = $1 AND id = ANY($2)", &[&hub, &ids]).await.map(drop)
}
