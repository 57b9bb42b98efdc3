//! The PostgreSQL schema and its versioned migrations.
//!
//! `schema_migrations` records each applied version. Migrations run at open in one transaction
//! that first takes a transaction-scoped advisory lock, so two processes starting together apply
//! each migration once: the second waits, then finds nothing left to do. Keep this list parallel
//! to the embedded store's (`embedded::schema`).

use anyhow::{Context, bail};
use deadpool_postgres::Pool;

/// Ordered schema migrations; append, never edit a released one.
///
/// Key columns use the "C" collation so that ordering (and so `list_devices` pagination) is
/// bytewise, as in SQLite, whatever the database's locale.
const MIGRATIONS: &[&str] = &[
    // 1: hubs and identities. `module_id` is '' for a device so the primary key has no NULL.
    r#"CREATE TABLE hubs (
        name      text COLLATE "C" PRIMARY KEY,
        host_name text NOT NULL UNIQUE,
        etag      text NOT NULL,
        doc       jsonb NOT NULL
    );
    CREATE TABLE identities (
        hub       text COLLATE "C" NOT NULL REFERENCES hubs (name),
        device_id text COLLATE "C" NOT NULL,
        module_id text COLLATE "C" NOT NULL,
        status    text NOT NULL,
        etag      text NOT NULL,
        doc       jsonb NOT NULL,
        PRIMARY KEY (hub, device_id, module_id)
    );"#,
    // 2: twins on their identity's row (NULL until first written; `twin_version` is the twin's
    // `version` for conditional writes), and the events log: events, per-partition counters
    // (which outlive expired events, so sequence numbers are never reused, and whose row lock
    // orders concurrent appenders), consumer-group checkpoints. `events` has no foreign key:
    // every append upserts its partition's counter row, whose key check on `hubs` already
    // holds the hub against a concurrent delete.
    r#"ALTER TABLE identities ADD COLUMN twin jsonb, ADD COLUMN twin_version bigint;
    CREATE TABLE event_partitions (
        hub              text COLLATE "C" NOT NULL REFERENCES hubs (name),
        partition_id     bigint NOT NULL,
        next_sequence    bigint NOT NULL,
        last_enqueued_ms bigint NOT NULL,
        PRIMARY KEY (hub, partition_id)
    );
    CREATE TABLE events (
        hub             text COLLATE "C" NOT NULL,
        partition_id    bigint NOT NULL,
        sequence_number bigint NOT NULL,
        enqueued_ms     bigint NOT NULL,
        body            bytea NOT NULL,
        meta            bytea NOT NULL,
        PRIMARY KEY (hub, partition_id, sequence_number)
    );
    CREATE TABLE event_checkpoints (
        hub             text COLLATE "C" NOT NULL REFERENCES hubs (name),
        consumer_group  text COLLATE "C" NOT NULL,
        partition_id    bigint NOT NULL,
        sequence_number bigint NOT NULL,
        PRIMARY KEY (hub, consumer_group, partition_id)
    );"#,
    // 3: cloud-to-device queues and feedback, as in the embedded store's migration 3: a
    // queue's foreign key cascades from its identity; feedback ids come from a counter per hub
    // whose row lock also orders concurrent appenders, so ids become visible in increasing order.
    r#"CREATE TABLE c2d_messages (
        hub             text COLLATE "C" NOT NULL,
        device_id       text COLLATE "C" NOT NULL,
        module_id       text COLLATE "C" NOT NULL,
        sequence_number bigint NOT NULL,
        doc             jsonb NOT NULL,
        body            bytea NOT NULL,
        PRIMARY KEY (hub, device_id, module_id, sequence_number),
        FOREIGN KEY (hub, device_id, module_id) REFERENCES identities (hub, device_id, module_id)
            ON DELETE CASCADE
    );
    CREATE TABLE feedback_counters (
        hub     text COLLATE "C" PRIMARY KEY REFERENCES hubs (name),
        next_id bigint NOT NULL
    );
    CREATE TABLE feedback (
        hub text COLLATE "C" NOT NULL REFERENCES hubs (name),
        id  bigint NOT NULL,
        doc jsonb NOT NULL,
        PRIMARY KEY (hub, id)
    );"#,
];

/// The advisory lock serializing migrations: "iothubd" in ASCII.
const MIGRATION_LOCK: i64 = 0x0069_6f74_6875_6264;

pub(super) async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool.get().await.context("connecting to PostgreSQL")?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    integer PRIMARY KEY,
            applied_at timestamptz NOT NULL
        )",
    )
    .await?;
    let applied: i32 =
        tx.query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[]).await?.try_get(0)?;
    let applied = usize::try_from(applied).context("schema_migrations holds a negative version")?;
    let known = MIGRATIONS.len();
    if applied > known {
        bail!("schema version {applied} is newer than this build knows ({known}); use a newer iothubd");
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let version = i32::try_from(index + 1)?;
        tx.batch_execute(sql).await.with_context(|| format!("schema migration {version}"))?;
        tx.execute("INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())", &[&version]).await?;
    }
    tx.commit().await?;
    if applied < known {
        tracing::info!(from = applied, to = known, "PostgreSQL schema migrated");
    }
    Ok(())
}
