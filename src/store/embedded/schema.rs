//! The embedded store's schema, its migrations, connection settings, and how SQLite errors map
//! to [`StoreError`].
//!
//! Two files, each with its own migrations: the registry (`iothubd.db`, [`MIGRATIONS`]) and the
//! events log (`events.db`, [`EVENT_LOG_MIGRATIONS`]). A file's schema version is its
//! `PRAGMA user_version`: migration `i` of its list brings it to version `i + 1`. Migrations run
//! in one transaction at open, so a crash leaves the old version intact. Together the two lists
//! stay parallel to `postgres::schema::MIGRATIONS`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use iothubd_actors::store::StoreError;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, ffi};

/// Ordered schema migrations of the registry file; append, never edit a released one.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: hubs and identities. `module_id` is '' for a device so the primary key has no NULL.
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
    // 2: twins live on their identity's row, so deleting the identity deletes the twin. NULL
    // until first written; `twin_version` is the twin's `version` for conditional writes.
    "ALTER TABLE identities ADD COLUMN twin TEXT;
    ALTER TABLE identities ADD COLUMN twin_version INTEGER;",
    // 3: cloud-to-device queues and feedback (device-protocol §5.1, service-api §8). A queue's
    // foreign key cascades, so deleting an identity (and a device's modules with it) deletes
    // its queue in the same statement. `doc` is the message without its body, which is kept
    // as bytes. Feedback ids come from a counter per hub, so they are never reused even after
    // the newest record was taken — a late removal cannot hit a newer record.
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
];

/// Ordered schema migrations of the events log file; append, never edit a released one.
///
/// No foreign keys: `hubs` is in the other file. The log's writer checks that a hub exists
/// before writing for it, and deleting a hub purges its rows here (see `event_log`).
pub(super) const EVENT_LOG_MIGRATIONS: &[&str] = &[
    // 1: events, per-partition counters (which outlive expired events, so sequence numbers are
    // never reused), consumer-group checkpoints. WITHOUT ROWID: each event is stored once, in
    // its key's b-tree, instead of in a rowid table plus a key index.
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
];

/// How long a connection waits for a lock another process holds before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the writer connection of a file and brings it to the schema of `migrations`: WAL so
/// readers never block the writer (nor it them), and `synchronous = FULL` so a committed
/// transaction survives power loss, not just a crash.
pub(super) fn open_writer(path: &Path, migrations: &[&str]) -> anyhow::Result<Connection> {
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

fn migrate(conn: &mut Connection, migrations: &[&str]) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = migrations.len();
    let Ok(applied) = usize::try_from(version) else {
        bail!("schema version {version} is invalid");
    };
    if applied > known {
        bail!("schema version {applied} is newer than this build knows ({known}); use a newer iothubd");
    }
    for (index, sql) in migrations.iter().enumerate().skip(applied) {
        tx.execute_batch(sql).with_context(|| format!("schema migration {}", index + 1))?;
        tx.pragma_update(None, "user_version", index + 1)?;
    }
    tx.commit()?;
    if applied < known {
        tracing::info!(from = applied, to = known, "embedded store schema migrated");
    }
    Ok(())
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
