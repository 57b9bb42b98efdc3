//! The embedded store's schema, its migrations, connection settings, and how SQLite errors map
//! to [`StoreError`].
//!
//! The schema version is `PRAGMA user_version`: migration `i` of [`MIGRATIONS`] brings the file
//! to version `i + 1`. Migrations run in one transaction at open, so a crash leaves the old
//! version intact. Keep this list parallel to `postgres::schema::MIGRATIONS`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use iothubd_actors::store::StoreError;
use rusqlite::{Connection, OpenFlags, TransactionBehavior, ffi};

/// Ordered schema migrations; append, never edit a released one.
const MIGRATIONS: &[&str] = &[
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
];

/// How long a connection waits for a lock another process holds before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens the writer connection: WAL so readers never block the writer (nor it them), and
/// `synchronous = FULL` so a committed transaction survives power loss, not just a crash.
pub(super) fn open_writer(path: &Path) -> anyhow::Result<Connection> {
    let mut conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("{} cannot use write-ahead logging (journal_mode is {mode})", path.display());
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Opens a read-only connection; call after [`open_writer`] has created and migrated the file.
pub(super) fn open_reader(path: &Path) -> anyhow::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
    let known = MIGRATIONS.len();
    let Ok(applied) = usize::try_from(version) else {
        bail!("schema version {version} is invalid");
    };
    if applied > known {
        bail!("schema version {applied} is newer than this build knows ({known}); use a newer iothubd");
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
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
