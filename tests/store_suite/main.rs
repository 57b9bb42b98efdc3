//! The one suite both `Store` backends pass (DESIGN.md §4, §9).
//!
//! Each case is written once against `Arc<dyn Store>` (or, when it must reopen or reach under
//! the store, against the [`Backend`] harness); `store_suite!` turns every case into one
//! `#[tokio::test]` per backend, so they run in parallel. The cases live by subject:
//! `registry` (hubs, identities, durability), `twins`, `events` (the events log and
//! checkpoints), `c2d` (cloud-to-device queues and feedback); `fixtures` builds what they store
//! and `backend` is the harness.
//!
//! The embedded store always runs, in a temporary directory. PostgreSQL runs when
//! `IOTHUBD_TEST_POSTGRES_URL` is set — and then fails rather than skips if it cannot connect.
//! Each PostgreSQL test works in a fresh schema of its own (via `search_path`), so parallel test
//! processes never see each other's rows.

mod backend;
mod c2d;
mod events;
mod fixtures;
mod registry;
mod twins;

use futures::future::join_all;
use iothubd::store::embedded::{DATABASE_FILE, EVENT_LOG_FILE};

use backend::Backend;
use c2d::*;
use events::*;
use fixtures::*;
use registry::*;
use twins::*;

/// One `#[tokio::test]` per case for one backend; `$connect` yields `None` when the backend is
/// not configured.
macro_rules! backend_tests {
    ($backend:ident, $connect:expr, store: [$($case:ident),*], harness: [$($harness_case:ident),*]) => {
        mod $backend {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let Some(backend) = $connect.await else { return };
                    super::$case(backend.open().await).await;
                    backend.finish().await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $harness_case() {
                    let Some(backend) = $connect.await else { return };
                    super::$harness_case(&backend).await;
                    backend.finish().await;
                }
            )*
        }
    };
}

macro_rules! store_suite {
    (store: [$($case:ident),* $(,)?], harness: [$($harness_case:ident),* $(,)?] $(,)?) => {
        backend_tests!(embedded, Backend::embedded(), store: [$($case),*], harness: [$($harness_case),*]);
        backend_tests!(postgres, Backend::postgres(), store: [$($case),*], harness: [$($harness_case),*]);
    };
}

store_suite!(
    store: [
        hub_create_get_list_and_conflicts,
        hub_replace_checks_etag_and_host_name,
        hub_delete_removes_its_identities,
        identity_create_get_and_conflicts,
        identity_replace_checks_etag,
        identity_delete_returns_it_and_removes_modules,
        list_devices_pages_in_device_id_order,
        list_modules_and_statistics_count_the_right_identities,
        concurrent_creates_all_land,
        concurrent_creates_of_one_id_have_one_winner,
        concurrent_replaces_with_one_etag_have_one_winner,
        twin_is_written_only_at_the_expected_version,
        concurrent_twin_writes_at_one_version_have_one_winner,
        twin_is_deleted_with_its_identity_and_hub,
        appends_number_each_partition_from_zero,
        reads_start_at_a_sequence_number_and_stop_at_max,
        sequence_at_finds_the_first_event_at_or_after_a_time,
        partition_info_reports_empty_and_filled_partitions,
        expiry_keeps_sequence_numbers_moving_forward,
        expiry_deletes_a_large_backlog,
        concurrent_single_event_appends_are_gap_free,
        concurrent_appends_get_their_own_positions_and_fail_alone,
        reads_start_and_stop_anywhere_within_and_across_batches,
        sequence_at_a_time_between_two_batches_is_the_later_batch,
        expiry_keeps_a_batch_whole_until_it_is_past_retention,
        events_and_checkpoints_are_per_hub,
        hub_delete_removes_its_events_and_checkpoints,
        checkpoints_are_set_and_overwritten,
        writes_after_close_are_unavailable,
        c2d_queue_starts_empty_and_reads_in_sequence_order,
        c2d_put_with_a_known_sequence_number_replaces_the_message,
        c2d_queue_of_an_unknown_identity_is_not_found,
        c2d_remove_takes_messages_and_appends_feedback_together,
        feedback_is_read_oldest_first_and_removed_by_id,
        c2d_queue_is_deleted_with_its_identity,
        c2d_queues_and_feedback_are_deleted_with_their_hub,
    ],
    harness: [
        writes_survive_close_and_reopen,
        events_twins_and_checkpoints_survive_close_and_reopen,
        sequence_numbers_continue_across_restarts,
        corrupt_document_reads_as_corrupt,
        concurrent_opens_migrate_once,
        c2d_queues_and_feedback_survive_close_and_reopen,
    ],
);

/// The embedded writer's queue bound is backpressure, not a limit: with room for one waiting
/// write and batches of two, hundreds of concurrent writers all get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_tiny_queue_holds_writers_back_without_losing_writes() {
    let backend = Backend::embedded_with(|store| {
        store.queue_capacity = 1;
        store.max_batch = 2;
    });
    let store = backend.open().await;
    store.create_hub(&hub("alpha")).await.unwrap();
    let results = join_all((0..300).map(|i| {
        let store = store.clone();
        tokio::spawn(async move { store.create_identity("alpha", &device(&format!("d{i:03}"))).await })
    }))
    .await;
    assert!(results.into_iter().all(|r| r.expect("task").is_ok()));
    assert_eq!(store.device_statistics("alpha").await.unwrap().total_device_count, 300);
    backend.finish().await;
}

/// A crash between deleting a hub from the registry and purging its events leaves log rows
/// behind; the next open purges them, so a hub created later with that name starts empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_open_purges_the_events_of_hubs_the_registry_lost() {
    let backend = Backend::embedded_with(|_| {});
    let store = backend.open().await;
    for name in ["lost", "kept"] {
        store.create_hub(&hub(name)).await.unwrap();
        store.append_events(name, to_partition(0, &["e0", "e1"])).await.unwrap();
        store.set_checkpoint(name, "$Default", 0, 1).await.unwrap();
    }
    store.close().await.unwrap();
    // What the registry half of `delete_hub` leaves when the process dies before the purge.
    let registry = rusqlite::Connection::open(backend.data_dir().join(DATABASE_FILE)).expect("open the file");
    assert_eq!(registry.execute("DELETE FROM hubs WHERE name = 'lost'", []).expect("delete the hub row"), 1);
    drop(registry);

    let store = backend.open().await;
    store.create_hub(&hub("lost")).await.unwrap();
    assert_eq!(store.partition_info("lost", 0).await, Ok(EMPTY_PARTITION));
    assert_eq!(store.get_checkpoint("lost", "$Default", 0).await, Ok(None));
    assert_eq!(bodies(&store, "kept", 0, 0, 10).await, ["e0", "e1"]);
    store.close().await.unwrap();
    let log = rusqlite::Connection::open(backend.data_dir().join(EVENT_LOG_FILE)).expect("open the log");
    let rows: i64 =
        log.query_row("SELECT count(*) FROM event_chunks WHERE hub = 'lost'", [], |r| r.get(0)).expect("count");
    assert_eq!(rows, 0);
    backend.finish().await;
}
