//! The events log: sequence numbers, reads, time lookups, partition info, retention,
//! checkpoints, hub isolation and durability.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::future::join_all;
use iothubd_actors::model::event::{EventData, EventPosition, PartitionInfo};
use iothubd_actors::model::identity::IdentityKey;
use iothubd_actors::model::twin::Twin;
use iothubd_actors::store::{Store, StoreError};

use crate::backend::Backend;
use crate::fixtures::*;

pub(crate) async fn appends_number_each_partition_from_zero(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let first = store.append_events("alpha", to_partition(0, &["a0", "a1"])).await.unwrap();
    assert_eq!(sequences(&first), [0, 1]);
    assert!(first.iter().all(|p| p.partition == 0 && p.offset() == p.sequence_number.to_string()));

    // One call spanning partitions, interleaved: positions come back in the call's order.
    let mixed = vec![(1, telemetry("b0")), (0, telemetry("a2")), (1, telemetry("b1")), (3, telemetry("d0"))];
    let positions = store.append_events("alpha", mixed).await.unwrap();
    let placed: Vec<(u32, i64)> = positions.iter().map(|p| (p.partition, p.sequence_number)).collect();
    assert_eq!(placed, [(1, 0), (0, 2), (1, 1), (3, 0)]);
    assert!(positions.iter().all(|p| p.enqueued_time >= first[0].enqueued_time), "time moves forward");
    assert_eq!(store.append_events("alpha", Vec::new()).await, Ok(Vec::new()));

    assert_eq!(bodies(&store, "alpha", 0, 0, 10).await, ["a0", "a1", "a2"]);
    assert_eq!(bodies(&store, "alpha", 1, 0, 10).await, ["b0", "b1"]);
    assert_eq!(bodies(&store, "alpha", 3, 0, 10).await, ["d0"]);
    assert!(bodies(&store, "alpha", 2, 0, 10).await.is_empty());

    let stored = store.read_events("alpha", 1, 1, 1).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].position, positions[2], "read back where the append said");
    assert_eq!(stored[0].data, telemetry("b1"), "body, properties and annotations round-trip");

    assert_eq!(store.append_events("missing", to_partition(0, &["x"])).await, Err(StoreError::NotFound), "no such hub");
}

pub(crate) async fn reads_start_at_a_sequence_number_and_stop_at_max(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let all: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    store.append_events("alpha", to_partition(2, &refs)).await.unwrap();

    assert_eq!(bodies(&store, "alpha", 2, 3, 4).await, ["e3", "e4", "e5", "e6"]);
    assert_eq!(bodies(&store, "alpha", 2, 8, 100).await, ["e8", "e9"]);
    assert_eq!(bodies(&store, "alpha", 2, -5, 2).await, ["e0", "e1"], "before the start reads from the start");
    assert!(bodies(&store, "alpha", 2, 10, 100).await.is_empty(), "the end is empty, not an error");
    assert!(bodies(&store, "alpha", 2, 1000, 100).await.is_empty());
    assert!(bodies(&store, "alpha", 2, 0, 0).await.is_empty());
    let read = store.read_events("alpha", 2, 0, 100).await.unwrap();
    assert_eq!(read.iter().map(|e| e.position.sequence_number).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
}

pub(crate) async fn sequence_at_finds_the_first_event_at_or_after_a_time(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    assert_eq!(store.sequence_at("alpha", 0, Utc::now()).await, Ok(0), "an empty partition: the next number");
    let early = store.append_events("alpha", to_partition(0, &["e0", "e1"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let late = store.append_events("alpha", to_partition(0, &["e2", "e3", "e4"])).await.unwrap();
    assert!(late[0].enqueued_time > early[1].enqueued_time);

    let at = |time| store.sequence_at("alpha", 0, time);
    assert_eq!(at(DateTime::UNIX_EPOCH).await, Ok(0));
    assert_eq!(at(early[0].enqueued_time).await, Ok(0));
    assert_eq!(at(early[0].enqueued_time + TimeDelta::milliseconds(1)).await, Ok(2));
    assert_eq!(at(late[0].enqueued_time).await, Ok(2));
    assert_eq!(at(late[2].enqueued_time + TimeDelta::milliseconds(1)).await, Ok(5), "after the last: the next");
    assert_eq!(store.sequence_at("alpha", 1, DateTime::UNIX_EPOCH).await, Ok(0));
}

pub(crate) async fn partition_info_reports_empty_and_filled_partitions(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    assert_eq!(store.partition_info("alpha", 0).await, Ok(EMPTY_PARTITION));
    let positions = store.append_events("alpha", to_partition(0, &["e0", "e1", "e2"])).await.unwrap();
    let info = store.partition_info("alpha", 0).await.unwrap();
    let expected = PartitionInfo {
        begin_sequence_number: 0,
        last_sequence_number: 2,
        last_enqueued_time: positions[2].enqueued_time,
        is_empty: false,
    };
    assert_eq!(info, expected);
    assert_eq!(store.partition_info("alpha", 1).await, Ok(EMPTY_PARTITION), "other partitions stay empty");
    assert_eq!(store.partition_info("missing", 0).await, Ok(EMPTY_PARTITION));
}

pub(crate) async fn expiry_keeps_sequence_numbers_moving_forward(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let old = store.append_events("alpha", to_partition(0, &["e0", "e1", "e2"])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let new =
        store.append_events("alpha", vec![(0, telemetry("e3")), (0, telemetry("e4")), (1, telemetry("f0"))]).await;
    let new = new.unwrap();
    assert!(new[0].enqueued_time > old[2].enqueued_time);

    assert_eq!(store.expire_events("alpha", old[0].enqueued_time).await, Ok(0), "nothing is older than the first");
    assert_eq!(store.expire_events("alpha", new[0].enqueued_time).await, Ok(3));
    assert_eq!(bodies(&store, "alpha", 0, 0, 10).await, ["e3", "e4"]);
    assert_eq!(bodies(&store, "alpha", 1, 0, 10).await, ["f0"]);
    let info = store.partition_info("alpha", 0).await.unwrap();
    assert_eq!((info.begin_sequence_number, info.last_sequence_number, info.is_empty), (3, 4, false));
    assert_eq!(store.sequence_at("alpha", 0, DateTime::UNIX_EPOCH).await, Ok(3), "the first retained");

    let after_all = new[2].enqueued_time + TimeDelta::milliseconds(1);
    assert_eq!(store.expire_events("alpha", after_all).await, Ok(3));
    let expired = PartitionInfo {
        begin_sequence_number: -1,
        last_sequence_number: 4,
        last_enqueued_time: new[1].enqueued_time,
        is_empty: true,
    };
    assert_eq!(store.partition_info("alpha", 0).await, Ok(expired), "the last number outlives its event");
    assert_eq!(store.sequence_at("alpha", 0, DateTime::UNIX_EPOCH).await, Ok(5));
    assert_eq!(store.expire_events("alpha", after_all).await, Ok(0));

    let later = store.append_events("alpha", to_partition(0, &["e5"])).await.unwrap();
    assert_eq!(sequences(&later), [5], "numbers are never reused");
    assert_eq!(sequences(&store.append_events("alpha", to_partition(1, &["f1"])).await.unwrap()), [1]);
    assert_eq!(bodies(&store, "alpha", 0, 0, 10).await, ["e5"]);
    assert_eq!(store.expire_events("missing", Utc::now()).await, Ok(0));
}

pub(crate) async fn expiry_deletes_a_large_backlog(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    // More than one expiry chunk in each partition.
    let events: Vec<(u32, EventData)> = (0..12_000).map(|i| (i % 2, telemetry(&i.to_string()))).collect();
    let positions = store.append_events("alpha", events).await.unwrap();
    let last = positions.iter().map(|p| p.enqueued_time).max().expect("appended");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let kept = store.append_events("alpha", to_partition(1, &["kept"])).await.unwrap();
    assert!(kept[0].enqueued_time > last);

    assert_eq!(store.expire_events("alpha", last + TimeDelta::milliseconds(1)).await, Ok(12_000));
    assert_eq!(store.partition_info("alpha", 0).await.unwrap().last_sequence_number, 5_999);
    assert!(store.partition_info("alpha", 0).await.unwrap().is_empty);
    assert_eq!(bodies(&store, "alpha", 1, 0, 10).await, ["kept"]);
    assert_eq!(kept[0].sequence_number, 6_000);
}

pub(crate) async fn concurrent_single_event_appends_are_gap_free(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let results = join_all((0..100).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let position = store.append_events("alpha", to_partition(0, &[&format!("m{i}")])).await;
            (format!("m{i}"), position)
        })
    }))
    .await;
    let mut assigned = Vec::new();
    for result in results {
        let (body, positions) = result.expect("task");
        let positions = positions.expect("append");
        assert_eq!(positions.len(), 1);
        assigned.push((positions[0].sequence_number, body));
    }
    assigned.sort();
    assert_eq!(assigned.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (0..100).collect::<Vec<_>>(), "0..99 once each");
    let read = bodies(&store, "alpha", 0, 0, 1000).await;
    assert_eq!(read, assigned.into_iter().map(|(_, body)| body).collect::<Vec<_>>(), "each at its position");
    let read = store.read_events("alpha", 0, 0, 1000).await.unwrap();
    assert!(read.windows(2).all(|w| w[0].position.enqueued_time <= w[1].position.enqueued_time), "time follows order");
}

/// Many callers at once, each appending several events over two partitions of one of two hubs,
/// while others append to a hub that does not exist: every caller gets the positions of its
/// own events (each event is read back at its position), each partition is numbered without
/// gaps, a caller's events in one partition keep their order, and the failing appends fail
/// alone.
pub(crate) async fn concurrent_appends_get_their_own_positions_and_fail_alone(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    store.create_hub(&hub("beta")).await.unwrap();
    let results = join_all((0..60).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let hub = ["alpha", "beta", "missing"][i % 3];
            let bodies: Vec<String> = (0..=i % 4).map(|k| format!("c{i}-e{k}")).collect();
            let events = bodies.iter().enumerate().map(|(k, b)| (u32::from(k % 2 == 1), telemetry(b))).collect();
            (hub, bodies, store.append_events(hub, events).await)
        })
    }))
    .await;
    let mut numbered: Vec<(&str, u32, i64)> = Vec::new();
    for result in results {
        let (hub, bodies, positions) = result.expect("task");
        if hub == "missing" {
            assert_eq!(positions, Err(StoreError::NotFound), "an append to a missing hub fails");
            continue;
        }
        let positions = positions.expect("append");
        assert_eq!(positions.len(), bodies.len());
        for (k, (body, position)) in bodies.iter().zip(&positions).enumerate() {
            assert_eq!(position.partition, u32::from(k % 2 == 1), "{body}: its own partition");
            let read = bodies_at(&store, hub, position.partition, position.sequence_number).await;
            assert_eq!(&read, body, "{body}: read back at its position");
            numbered.push((hub, position.partition, position.sequence_number));
        }
        for w in positions.windows(3) {
            assert!(w[0].sequence_number < w[2].sequence_number, "a caller's events keep their order");
        }
    }
    for hub in ["alpha", "beta"] {
        for partition in [0, 1] {
            let mut sequences: Vec<i64> =
                numbered.iter().filter(|n| n.0 == hub && n.1 == partition).map(|n| n.2).collect();
            sequences.sort_unstable();
            let expected: Vec<i64> = (0..i64::try_from(sequences.len()).unwrap()).collect();
            assert_eq!(sequences, expected, "{hub}/{partition}: numbered from 0 without gaps");
        }
    }
}

/// The body of the event at `sequence_number`.
async fn bodies_at(store: &Arc<dyn Store>, hub: &str, partition: u32, sequence_number: i64) -> String {
    bodies(store, hub, partition, sequence_number, 1).await.pop().expect("an event at the position")
}

pub(crate) async fn events_and_checkpoints_are_per_hub(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    store.create_hub(&hub("beta")).await.unwrap();
    store.append_events("alpha", to_partition(0, &["a0", "a1"])).await.unwrap();
    store.set_checkpoint("alpha", "$Default", 0, 1).await.unwrap();

    assert!(bodies(&store, "beta", 0, 0, 10).await.is_empty());
    assert_eq!(store.partition_info("beta", 0).await, Ok(EMPTY_PARTITION));
    assert_eq!(store.get_checkpoint("beta", "$Default", 0).await, Ok(None));
    assert_eq!(sequences(&store.append_events("beta", to_partition(0, &["b0"])).await.unwrap()), [0]);
    assert_eq!(store.expire_events("beta", Utc::now() + TimeDelta::days(1)).await, Ok(1));
    assert_eq!(bodies(&store, "alpha", 0, 0, 10).await, ["a0", "a1"], "expiring beta leaves alpha alone");
}

pub(crate) async fn hub_delete_removes_its_events_and_checkpoints(store: Arc<dyn Store>) {
    store.create_hub(&hub("doomed")).await.unwrap();
    store.create_hub(&hub("kept")).await.unwrap();
    for name in ["doomed", "kept"] {
        store.append_events(name, to_partition(0, &["e0", "e1"])).await.unwrap();
        store.set_checkpoint(name, "$Default", 0, 1).await.unwrap();
    }
    store.delete_hub("doomed").await.unwrap();
    assert_eq!(store.append_events("doomed", to_partition(0, &["late"])).await, Err(StoreError::NotFound));
    assert_eq!(store.set_checkpoint("doomed", "$Default", 0, 5).await, Err(StoreError::NotFound));

    store.create_hub(&hub("doomed")).await.unwrap();
    assert!(bodies(&store, "doomed", 0, 0, 10).await.is_empty());
    assert_eq!(store.partition_info("doomed", 0).await, Ok(EMPTY_PARTITION), "the counters went too");
    assert_eq!(store.get_checkpoint("doomed", "$Default", 0).await, Ok(None));
    assert_eq!(sequences(&store.append_events("doomed", to_partition(0, &["new"])).await.unwrap()), [0]);
    assert_eq!(bodies(&store, "kept", 0, 0, 10).await, ["e0", "e1"], "other hubs untouched");
    assert_eq!(store.get_checkpoint("kept", "$Default", 0).await, Ok(Some(1)));
}

pub(crate) async fn checkpoints_are_set_and_overwritten(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    assert_eq!(store.get_checkpoint("alpha", "$Default", 0).await, Ok(None));
    store.set_checkpoint("alpha", "$Default", 0, 41).await.unwrap();
    store.set_checkpoint("alpha", "$Default", 1, 7).await.unwrap();
    store.set_checkpoint("alpha", "router", 0, 3).await.unwrap();
    assert_eq!(store.get_checkpoint("alpha", "$Default", 0).await, Ok(Some(41)));
    store.set_checkpoint("alpha", "$Default", 0, 42).await.unwrap();
    assert_eq!(store.get_checkpoint("alpha", "$Default", 0).await, Ok(Some(42)), "overwritten");
    assert_eq!(store.get_checkpoint("alpha", "$Default", 1).await, Ok(Some(7)), "per partition");
    assert_eq!(store.get_checkpoint("alpha", "router", 0).await, Ok(Some(3)), "per consumer group");
    assert_eq!(store.get_checkpoint("alpha", "$default", 0).await, Ok(None), "consumer groups are case-sensitive");
    assert_eq!(store.set_checkpoint("missing", "$Default", 0, 1).await, Err(StoreError::NotFound));
}

pub(crate) async fn events_twins_and_checkpoints_survive_close_and_reopen(backend: &Backend) {
    let first = backend.open().await;
    first.create_hub(&hub("alpha")).await.unwrap();
    first.create_identity("alpha", &device("d1")).await.unwrap();
    let twin = tagged(&Twin::new(Utc::now()), "durable");
    first.replace_twin("alpha", &IdentityKey::device("d1"), &twin, None).await.unwrap();
    let appends = join_all((0..50).map(|i| first.append_events("alpha", vec![(i % 2, telemetry(&format!("m{i}")))])));
    let mut positions: Vec<EventPosition> = appends.await.into_iter().flat_map(|r| r.unwrap()).collect();
    positions.sort_by_key(|p| (p.partition, p.sequence_number));
    first.set_checkpoint("alpha", "$Default", 1, 12).await.unwrap();
    let before = first.partition_info("alpha", 0).await.unwrap();
    first.close().await.unwrap();

    let second = backend.open().await;
    assert_eq!(second.get_twin("alpha", &IdentityKey::device("d1")).await, Ok(Some(twin)));
    assert_eq!(second.get_checkpoint("alpha", "$Default", 1).await, Ok(Some(12)));
    assert_eq!(second.partition_info("alpha", 0).await, Ok(before));
    let mut read = second.read_events("alpha", 0, 0, 100).await.unwrap();
    read.extend(second.read_events("alpha", 1, 0, 100).await.unwrap());
    assert_eq!(read.iter().map(|e| e.position).collect::<Vec<_>>(), positions, "every acknowledged event is back");
    assert!(read.iter().all(|e| e.data.annotations == telemetry("").annotations));
    let next = second.append_events("alpha", to_partition(0, &["after"])).await.unwrap();
    assert_eq!(sequences(&next), [25], "numbering continues after a restart");
    second.close().await.unwrap();
}

/// Bodies `{prefix}0`, `{prefix}1`, … for one append.
fn numbered(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}{i}")).collect()
}

fn appending(partition: u32, bodies: &[String]) -> Vec<(u32, EventData)> {
    bodies.iter().map(|body| (partition, telemetry(body))).collect()
}

pub(crate) async fn reads_start_and_stop_anywhere_within_and_across_batches(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    // Three appends, each committed before the next: in the embedded store, three chunks.
    let mut all = Vec::new();
    for (prefix, count) in [("a", 4), ("b", 3), ("c", 5)] {
        let bodies = numbered(prefix, count);
        store.append_events("alpha", appending(0, &bodies)).await.unwrap();
        all.extend(bodies);
    }
    let total = i64::try_from(all.len()).unwrap();
    for from in -1..=total + 1 {
        for max in 0..=all.len() + 1 {
            let start = usize::try_from(from.clamp(0, total)).unwrap();
            let expected = &all[start..(start + max).min(all.len())];
            let read = store.read_events("alpha", 0, from, max).await.unwrap();
            let read_bodies: Vec<String> =
                read.iter().map(|e| String::from_utf8(e.data.body.clone()).unwrap()).collect();
            assert_eq!(read_bodies, expected, "from {from}, max {max}");
            let numbers: Vec<i64> = read.iter().map(|e| e.position.sequence_number).collect();
            let first = i64::try_from(start).unwrap();
            assert_eq!(numbers, (first..).take(expected.len()).collect::<Vec<_>>(), "from {from}, max {max}");
        }
    }
}

pub(crate) async fn sequence_at_a_time_between_two_batches_is_the_later_batch(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let mut batches = Vec::new();
    for prefix in ["a", "b", "c"] {
        batches.push(store.append_events("alpha", appending(0, &numbered(prefix, 3))).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let time = |batch: usize| batches[batch][0].enqueued_time;
    assert!(batches.iter().all(|b| b.iter().all(|p| p.enqueued_time == b[0].enqueued_time)), "one time per batch");
    assert!(time(0) < time(1) && time(1) < time(2));

    let at = |time| store.sequence_at("alpha", 0, time);
    assert_eq!(at(time(0) + (time(1) - time(0)) / 2).await, Ok(3), "midway between the first two");
    assert_eq!(at(time(1) - TimeDelta::milliseconds(1)).await, Ok(3));
    assert_eq!(at(time(1)).await, Ok(3));
    assert_eq!(at(time(1) + TimeDelta::milliseconds(1)).await, Ok(6));
    assert_eq!(at(time(2) + TimeDelta::milliseconds(1)).await, Ok(9), "after the last: the next");
    let from_time = store.read_events("alpha", 0, at(time(0) + TimeDelta::milliseconds(1)).await.unwrap(), 2).await;
    assert_eq!(from_time.unwrap().iter().map(|e| e.position).collect::<Vec<_>>(), batches[1][..2]);
}

pub(crate) async fn expiry_keeps_a_batch_whole_until_it_is_past_retention(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let old = store.append_events("alpha", appending(0, &numbered("a", 3))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Larger than one chunk of the embedded store, and interleaved with another partition.
    let large: Vec<(u32, EventData)> = (0..2_000)
        .map(|i| {
            let mut event = telemetry(&format!("b{i}"));
            event.body.resize(200, b'.');
            (u32::from(i % 10 == 0), event)
        })
        .collect();
    let batch = store.append_events("alpha", large).await.unwrap();
    for partition in [0, 1] {
        let mut times = batch.iter().filter(|p| p.partition == partition).map(|p| p.enqueued_time);
        let first = times.next().unwrap();
        assert!(times.all(|time| time == first), "one time per batch and partition");
    }
    let (earliest, latest) = (batch.iter().map(|p| p.enqueued_time).min(), batch.iter().map(|p| p.enqueued_time).max());
    let (earliest, latest) = (earliest.unwrap(), latest.unwrap());
    assert!(old[2].enqueued_time < earliest);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let new = store.append_events("alpha", appending(0, &numbered("c", 1))).await.unwrap();

    assert_eq!(store.expire_events("alpha", earliest).await, Ok(3), "only what is older than the batch");
    assert_eq!(store.expire_events("alpha", earliest).await, Ok(0));
    let info = store.partition_info("alpha", 0).await.unwrap();
    assert_eq!((info.begin_sequence_number, info.last_sequence_number), (3, 1_803));
    assert_eq!(store.read_events("alpha", 0, 0, 3_000).await.unwrap().len(), 1_801, "the batch is whole");
    assert_eq!(store.read_events("alpha", 1, 0, 3_000).await.unwrap().len(), 200);

    assert_eq!(store.expire_events("alpha", latest + TimeDelta::milliseconds(1)).await, Ok(2_000));
    let kept = store.read_events("alpha", 0, 0, 10).await.unwrap();
    assert_eq!(kept.iter().map(|e| e.position).collect::<Vec<_>>(), new, "the newer batch stays");
    assert!(store.partition_info("alpha", 1).await.unwrap().is_empty);
}

pub(crate) async fn sequence_numbers_continue_across_restarts(backend: &Backend) {
    let first = backend.open().await;
    first.create_hub(&hub("alpha")).await.unwrap();
    first.append_events("alpha", appending(0, &numbered("a", 3))).await.unwrap();
    first.append_events("alpha", appending(0, &numbered("b", 2))).await.unwrap();
    first.append_events("alpha", appending(1, &numbered("x", 1))).await.unwrap();
    first.close().await.unwrap();

    let second = backend.open().await;
    let next = second.append_events("alpha", appending(0, &numbered("c", 2))).await.unwrap();
    assert_eq!(sequences(&next), [5, 6]);
    assert_eq!(bodies(&second, "alpha", 0, 3, 4).await, ["b0", "b1", "c0", "c1"], "across the restart");
    let expired = second.expire_events("alpha", next[1].enqueued_time + TimeDelta::milliseconds(1)).await;
    assert_eq!(expired, Ok(8));
    second.close().await.unwrap();

    let third = backend.open().await;
    let info = third.partition_info("alpha", 0).await.unwrap();
    assert_eq!((info.begin_sequence_number, info.last_sequence_number, info.is_empty), (-1, 6, true));
    assert_eq!(third.sequence_at("alpha", 0, DateTime::UNIX_EPOCH).await, Ok(7), "the counters outlive the events");
    assert_eq!(sequences(&third.append_events("alpha", appending(0, &numbered("d", 1))).await.unwrap()), [7]);
    assert_eq!(sequences(&third.append_events("alpha", appending(1, &numbered("y", 1))).await.unwrap()), [1]);
    assert_eq!(third.partition_info("alpha", 0).await.unwrap().begin_sequence_number, 7);
    third.close().await.unwrap();
}
