//! The embedded store's schema, its migrations, connection settings, and how SQLite errors map
//! to [`StoreError`].
//!
//! Two files, each with its own migrations: the registry (`iothubd.db`, [`MIGRATIONS`]) and the
//! events log (`events.db`, [`EVENT_LOG_MIGRATIONS`]). A file's schema version is its
//! `PRAGMA user_version`: migration `i` of its list brings it to version `i + 1`. Migrations run
//! in one transaction at open, so a crash leaves the old version intact. Together the two lists
//! stay parallel to `postgres::schema::MIGRATIONS`, except for the layout of the events log:
//! here events are stored in chunks (events log migration 2), there one row per event.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use iothubd_actors::store::StoreError;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, ffi, params};

use super::event_writer::CHUNK_BYTES;
use crate::store::event_codec::EventChunk;

/// One step of a file's schema history.
pub(super) enum Migration {
    /// Statements run as one batch.
    Sql(&'static str),
    /// A step SQL cannot express, such as re-encoding rows; it runs in the migration's
    /// transaction like the statements.
    Code(fn(&Connection) -> anyhow::Result<()>),
}

/// Ordered schema migrations of the registry file; append, never edit a released one.
pub(super) const MIGRATIONS: &[Migration] = &[
    // 1: hubs and identities. `module_id` is '' for a device so the primary key has no NULL.
    Migration::Sql(
        "CREATE TABLE hubs (
        name      TEXT NOT NULL PRIMARY KEY,
        host_name TEXT NOT NULL UNIQUE,
        etag      TEXT NOT NULL,
        doc       TEXT NOT NULL
    ) STRICT;
    CREATE TABLE identities (
        hub       TEXT NOT NULL REFERENCES hubs (name),
        device_id TEXT NOT NULL,
        module_id TEXT NOT NULL,
        status    TEXT NOT NULL,
        etag      TEXT NOT NULL,
        doc       TEXT NOT NULL,
        PRIMARY KEY (hub, device_id, module_id)
    ) STRICT;",
    ),
    // 2: twins live on their identity's row, so deleting the identity deletes the twin. NULL
    // until first written; `twin_version` is the twin's `version` for conditional writes.
    Migration::Sql(
        "ALTER TABLE identities ADD COLUMN twin TEXT;
    ALTER TABLE identities ADD COLUMN twin_version INTEGER;",
    ),
    // 3: cloud-to-device queues and feedback (device-protocol §5.1, service-api §8). A queue's
    // foreign key cascades, so deleting an identity (and a device's modules with it) deletes
    // its queue in the same statement. `doc` is the message without its body, which is kept
    // as bytes. Feedback ids come from a counter per hub, so they are never reused even after
    // the newest record was taken — a late removal cannot hit a newer record.
    Migration::Sql(
        "CREATE TABLE c2d_messages (
        hub             TEXT NOT NULL,
        device_id       TEXT NOT NULL,
        module_id       TEXT NOT NULL,
        sequence_number INTEGER NOT NULL,
        doc             TEXT NOT NULL,
        body            BLOB NOT NULL,
        PRIMARY KEY (hub, device_id, module_id, sequence_number),
        FOREIGN KEY (hub, device_id, module_id) REFERENCES identities (hub, device_id, module_id)
            ON DELETE CASCADE
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE feedback_counters (
        hub     TEXT NOT NULL PRIMARY KEY REFERENCES hubs (name),
        next_id INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE feedback (
        hub TEXT NOT NULL REFERENCES hubs (name),
        id  INTEGER NOT NULL,
        doc TEXT NOT NULL,
        PRIMARY KEY (hub, id)
    ) STRICT, WITHOUT ROWID;",
    ),
];

/// Ordered schema migrations of the events log file; append, never edit a released one.
///
/// No foreign keys: `hubs` is in the other file. The log's writer checks that a hub exists
/// before writing for it, and deleting a hub purges its rows here (see `event_log`).
pub(super) const EVENT_LOG_MIGRATIONS: &[Migration] = &[
    // 1: events, per-partition counters (which outlive expired events, so sequence numbers are
    // never reused), consumer-group checkpoints. WITHOUT ROWID: each event is stored once, in
    // its key's b-tree, instead of in a rowid table plus a key index.
    Migration::Sql(
        "CREATE TABLE events (
        hub             TEXT NOT NULL,
        partition_id    INTEGER NOT NULL,
        sequence_number INTEGER NOT NULL,
        enqueued_ms     INTEGER NOT NULL,
        body            BLOB NOT NULL,
        meta            BLOB NOT NULL,
        PRIMARY KEY (hub, partition_id, sequence_number)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE event_partitions (
        hub              TEXT NOT NULL,
        partition_id     INTEGER NOT NULL,
        next_sequence    INTEGER NOT NULL,
        last_enqueued_ms INTEGER NOT NULL,
        PRIMARY KEY (hub, partition_id)
    ) STRICT, WITHOUT ROWID;
    CREATE TABLE event_checkpoints (
        hub             TEXT NOT NULL,
        consumer_group  TEXT NOT NULL,
        partition_id    INTEGER NOT NULL,
        sequence_number INTEGER NOT NULL,
        PRIMARY KEY (hub, consumer_group, partition_id)
    ) STRICT, WITHOUT ROWID;",
    ),
    // 2: events in chunks (see `event_writer`): one row per partition per commit, rather than
    // one per event, moved over from `events` by [`events_into_chunks`]. A rowid table, as a
    // chunk is large: WITHOUT ROWID suits rows of a small fraction of a page. One index, by
    // sequence number, serves lookups by time too: enqueued times follow sequence order, so a
    // binary search over it finds a time (`event_log::first_chunk_at_or_after`). An index on
    // time would add a page or more to every commit (one per partition written), measured as
    // ~8% on a lone durable append, for the sake of a lookup made once per reader.
    Migration::Code(events_into_chunks),
];

/// How long a connection waits for a lock another process holds before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the writer connection of a file and brings it to the schema of `migrations`: WAL so
/// readers never block the writer (nor it them), and `synchronous = FULL` so a committed
/// transaction survives power loss, not just a crash.
pub(super) fn open_writer(path: &Path, migrations: &[Migration]) -> anyhow::Result<Connection> {
    let mut conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("{} cannot use write-ahead logging (journal_mode is {mode})", path.display());
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    migrate(&mut conn, migrations).with_context(|| format!("migrating {}", path.display()))?;
    Ok(conn)
}

/// Opens a read-only connection; call after [`open_writer`] has created and migrated the file.
pub(super) fn open_reader(path: &Path) -> anyhow::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, migrations: &[Migration]) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = migrations.len();
    let Ok(applied) = usize::try_from(version) else {
        bail!("schema version {version} is invalid");
    };
    if applied > known {
        bail!("schema version {applied} is newer than this build knows ({known}); use a newer iothubd");
    }
    for (index, migration) in migrations.iter().enumerate().skip(applied) {
        match migration {
            Migration::Sql(sql) => tx.execute_batch(sql).map_err(Into::into),
            Migration::Code(step) => step(&tx),
        }
        .with_context(|| format!("schema migration {}", index + 1))?;
        tx.pragma_update(None, "user_version", index + 1)?;
    }
    tx.commit()?;
    if applied < known {
        tracing::info!(from = applied, to = known, "embedded store schema migrated");
    }
    Ok(())
}

/// Events log migration 2: creates `event_chunks` and moves every event of `events` into it,
/// then drops `events`. Runs of consecutive events of a partition with one enqueued time become
/// one chunk each (as the writer would have made them, one per commit), up to the writer's
/// chunk size, so every event of a chunk keeps its own enqueued time. Bodies and metadata are
/// moved as stored, without decoding: an event that was unreadable stays so, alone.
fn events_into_chunks(db: &Connection) -> anyhow::Result<()> {
    db.execute_batch(
        "CREATE TABLE event_chunks (
            hub            TEXT NOT NULL,
            partition_id   INTEGER NOT NULL,
            first_sequence INTEGER NOT NULL,
            event_count    INTEGER NOT NULL,
            enqueued_ms    INTEGER NOT NULL,
            events         BLOB NOT NULL
        ) STRICT;
        CREATE UNIQUE INDEX event_chunks_by_sequence ON event_chunks (hub, partition_id, first_sequence);",
    )?;
    let moved = move_events_into_chunks(db)?;
    db.execute_batch("DROP TABLE events")?;
    if moved > 0 {
        tracing::info!(events = moved, "events log moved into chunks");
    }
    Ok(())
}

/// The copying part of [`events_into_chunks`]; answers how many events it moved.
fn move_events_into_chunks(db: &Connection) -> anyhow::Result<u64> {
    let mut insert = db.prepare(
        "INSERT INTO event_chunks (hub, partition_id, first_sequence, event_count, enqueued_ms, events)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut write = |chunk: &MigratedChunk| {
        let MigratedChunk { hub, partition, first_sequence, enqueued_ms, events } = chunk;
        insert.execute(params![hub, partition, first_sequence, events.count(), enqueued_ms, events.blob()])
    };
    let mut select = db.prepare(
        "SELECT hub, partition_id, sequence_number, enqueued_ms, body, meta FROM events
         ORDER BY hub, partition_id, sequence_number",
    )?;
    let mut rows = select.query([])?;
    let mut open: Option<MigratedChunk> = None;
    let mut moved = 0;
    while let Some(row) = rows.next()? {
        let hub = row.get_ref(0)?.as_str()?;
        let (partition, sequence_number, enqueued_ms): (i64, i64, i64) = (row.get(1)?, row.get(2)?, row.get(3)?);
        let (body, meta) = (row.get_ref(4)?.as_blob()?, row.get_ref(5)?.as_blob()?);
        let joins = open.as_ref().is_some_and(|chunk| {
            chunk.hub == hub
                && chunk.partition == partition
                && chunk.first_sequence + chunk.events.count() == sequence_number
                && chunk.enqueued_ms == enqueued_ms
                && chunk.events.size() < CHUNK_BYTES
        });
        if !joins && let Some(full) = open.take() {
            write(&full)?;
        }
        let chunk = open.get_or_insert_with(|| MigratedChunk {
            hub: hub.to_owned(),
            partition,
            first_sequence: sequence_number,
            enqueued_ms,
            events: EventChunk::new(),
        });
        chunk.events.push_stored(body, meta)?;
        moved += 1;
    }
    if let Some(last) = open {
        write(&last)?;
    }
    Ok(moved)
}

/// A chunk being filled by [`events_into_chunks`].
struct MigratedChunk {
    hub: String,
    partition: i64,
    first_sequence: i64,
    enqueued_ms: i64,
    events: EventChunk,
}

/// Maps a SQLite error: a key taken is `Conflict`, a missing referenced hub is `NotFound`,
/// anything else means the write did not happen (`Unavailable`).
pub(super) fn store_error(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error().map(|s| s.extended_code) {
        Some(ffi::SQLITE_CONSTRAINT_PRIMARYKEY | ffi::SQLITE_CONSTRAINT_UNIQUE) => StoreError::Conflict,
        Some(ffi::SQLITE_CONSTRAINT_FOREIGNKEY) => StoreError::NotFound,
        _ => StoreError::Unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_registry_migrates_keeping_its_rows() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("registry.db");
        let v1 = open_writer(&path, &MIGRATIONS[..1]).expect("a version 1 file");
        v1.execute_batch(
            "INSERT INTO hubs VALUES ('alpha', 'alpha.example.net', 'e1', '{}');
             INSERT INTO identities VALUES ('alpha', 'd1', '', 'enabled', 'e2', '{\"doc\":1}');",
        )
        .expect("version 1 rows");
        drop(v1);

        let current = open_writer(&path, MIGRATIONS).expect("migrated");
        let version: usize = current.pragma_query_value(None, "user_version", |row| row.get(0)).expect("version");
        assert_eq!(version, MIGRATIONS.len());
        let row: (String, Option<String>, Option<i64>) = current
            .query_row("SELECT doc, twin, twin_version FROM identities WHERE device_id = 'd1'", [], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .expect("the identity is still there");
        assert_eq!(row, ("{\"doc\":1}".to_owned(), None, None), "existing identities have no twin yet");
    }

    #[test]
    fn a_file_from_a_newer_build_is_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("events.db");
        drop(open_writer(&path, EVENT_LOG_MIGRATIONS).expect("current file"));
        let err = open_writer(&path, &EVENT_LOG_MIGRATIONS[..0]).expect_err("an older build must refuse it");
        assert!(format!("{err:#}").contains("newer than this build"), "{err:#}");
    }
}
