//! Cloud-to-device queues and the feedback queue: stored per identity, removed with their
//! feedback in one write, deleted with their identity and hub.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use iothubd_actors::model::c2d::{C2dLock, C2dMessage, FeedbackMode, FeedbackRecord, FeedbackStatus};
use iothubd_actors::model::identity::IdentityKey;
use iothubd_actors::store::{Store, StoreError};

use crate::backend::Backend;
use crate::fixtures::*;

/// A whole second, so the time survives every backend's JSON round trip unchanged.
fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000 + seconds, 0).expect("a valid time")
}

/// A message with every field set, so each round trip checks them all; the body is binary.
fn message(sequence_number: u64) -> C2dMessage {
    C2dMessage {
        sequence_number,
        message_id: Some(format!("msg-{sequence_number}")),
        correlation_id: Some("corr".into()),
        user_id: None,
        content_type: Some("application/octet-stream".into()),
        content_encoding: Some("utf-8".into()),
        expiry_time: at(3600),
        ack: FeedbackMode::Full,
        properties: vec![("z".into(), "last".into()), ("a".into(), "first".into())],
        body: [&[0, 255, 10, 13][..], &sequence_number.to_be_bytes()].concat(),
        enqueued_time: at(0),
        delivery_count: 0,
        lock: None,
    }
}

fn record(original_message_id: &str, status: FeedbackStatus) -> FeedbackRecord {
    FeedbackRecord {
        original_message_id: Some(original_message_id.into()),
        device_generation_id: "638000000000000000".into(),
        device_id: "d1".into(),
        module_id: None,
        enqueued_time_utc: at(10),
        status,
        description: format!("{status:?}"),
    }
}

fn sequence_numbers(queue: &[C2dMessage]) -> Vec<u64> {
    queue.iter().map(|m| m.sequence_number).collect()
}

fn message_ids(batch: &[(u64, FeedbackRecord)]) -> Vec<&str> {
    batch.iter().map(|(_, r)| r.original_message_id.as_deref().unwrap_or("")).collect()
}

/// A hub `alpha` with device `d1` and its module `d1/m1`.
async fn hub_with_device_and_module(store: &Arc<dyn Store>) -> (IdentityKey, IdentityKey) {
    store.create_hub(&hub("alpha")).await.unwrap();
    store.create_identity("alpha", &device("d1")).await.unwrap();
    store.create_identity("alpha", &module("d1", "m1")).await.unwrap();
    (IdentityKey::device("d1"), IdentityKey::module("d1", "m1"))
}

pub(crate) async fn c2d_queue_starts_empty_and_reads_in_sequence_order(store: Arc<dyn Store>) {
    let (d1, m1) = hub_with_device_and_module(&store).await;
    assert_eq!(store.c2d_queue("alpha", &d1).await, Ok(vec![]));
    for sequence_number in [3, 1, 2] {
        store.c2d_put("alpha", &d1, &message(sequence_number)).await.unwrap();
    }
    store.c2d_put("alpha", &m1, &message(7)).await.unwrap();
    assert_eq!(store.c2d_queue("alpha", &d1).await, Ok(vec![message(1), message(2), message(3)]));
    assert_eq!(store.c2d_queue("alpha", &m1).await, Ok(vec![message(7)]), "a module's queue is its own");
}

pub(crate) async fn c2d_put_with_a_known_sequence_number_replaces_the_message(store: Arc<dyn Store>) {
    let (d1, _) = hub_with_device_and_module(&store).await;
    store.c2d_put("alpha", &d1, &message(1)).await.unwrap();
    store.c2d_put("alpha", &d1, &message(2)).await.unwrap();
    let locked = C2dMessage {
        delivery_count: 1,
        lock: Some(C2dLock { token: "lock-token".into(), locked_until: at(60) }),
        ..message(1)
    };
    store.c2d_put("alpha", &d1, &locked).await.unwrap();
    assert_eq!(store.c2d_queue("alpha", &d1).await, Ok(vec![locked.clone(), message(2)]));
    let released = C2dMessage { lock: None, ..locked };
    store.c2d_put("alpha", &d1, &released).await.unwrap();
    assert_eq!(store.c2d_queue("alpha", &d1).await, Ok(vec![released, message(2)]));
}

pub(crate) async fn c2d_queue_of_an_unknown_identity_is_not_found(store: Arc<dyn Store>) {
    hub_with_device_and_module(&store).await;
    for (hub, key) in [
        ("alpha", IdentityKey::device("ghost")),
        ("alpha", IdentityKey::module("d1", "ghost")),
        ("alpha", IdentityKey::module("ghost", "m1")),
        ("beta", IdentityKey::device("d1")),
    ] {
        assert_eq!(store.c2d_queue(hub, &key).await, Err(StoreError::NotFound), "{hub} {key}");
        assert_eq!(store.c2d_put(hub, &key, &message(1)).await, Err(StoreError::NotFound), "{hub} {key}");
    }
}

pub(crate) async fn c2d_remove_takes_messages_and_appends_feedback_together(store: Arc<dyn Store>) {
    let (d1, _) = hub_with_device_and_module(&store).await;
    for sequence_number in 1..=4 {
        store.c2d_put("alpha", &d1, &message(sequence_number)).await.unwrap();
    }
    let feedback = [record("msg-1", FeedbackStatus::Success), record("msg-3", FeedbackStatus::Rejected)];
    store.c2d_remove("alpha", &d1, &[1, 3, 99, u64::MAX], &feedback).await.unwrap();
    assert_eq!(store.c2d_queue("alpha", &d1).await.map(|q| sequence_numbers(&q)), Ok(vec![2, 4]));
    let batch = store.feedback_batch("alpha", 10).await.unwrap();
    assert_eq!(batch.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(), feedback);

    store.c2d_remove("alpha", &d1, &[2], &[]).await.unwrap();
    assert_eq!(store.c2d_queue("alpha", &d1).await.map(|q| sequence_numbers(&q)), Ok(vec![4]));
    assert_eq!(store.feedback_batch("alpha", 10).await.unwrap().len(), 2, "no feedback, none appended");
    assert_eq!(store.c2d_remove("beta", &d1, &[4], &feedback).await, Err(StoreError::NotFound), "no such hub");
}

pub(crate) async fn feedback_is_read_oldest_first_and_removed_by_id(store: Arc<dyn Store>) {
    let (d1, m1) = hub_with_device_and_module(&store).await;
    store.create_hub(&hub("beta")).await.unwrap();
    assert_eq!(store.feedback_batch("alpha", 10).await, Ok(vec![]));
    store.c2d_remove("alpha", &d1, &[], &[record("a", FeedbackStatus::Success)]).await.unwrap();
    let second = [record("b", FeedbackStatus::Expired), record("c", FeedbackStatus::Purged)];
    store.c2d_remove("alpha", &m1, &[], &second).await.unwrap();
    store.c2d_remove("alpha", &d1, &[], &[record("d", FeedbackStatus::DeliveryCountExceeded)]).await.unwrap();

    let all = store.feedback_batch("alpha", 10).await.unwrap();
    assert_eq!(message_ids(&all), ["a", "b", "c", "d"]);
    assert!(all.windows(2).all(|pair| pair[0].0 < pair[1].0), "ids increase: {all:?}");
    let first_two = store.feedback_batch("alpha", 2).await.unwrap();
    assert_eq!(first_two, all[..2]);
    assert_eq!(store.feedback_batch("beta", 10).await, Ok(vec![]), "feedback is per hub");

    store.feedback_remove("alpha", &[all[0].0, all[2].0, all[3].0 + 1000, u64::MAX]).await.unwrap();
    assert_eq!(message_ids(&store.feedback_batch("alpha", 10).await.unwrap()), ["b", "d"]);
    store.feedback_remove("beta", &[all[1].0]).await.unwrap();
    assert_eq!(store.feedback_batch("alpha", 10).await.unwrap().len(), 2, "another hub's remove takes nothing");

    store.feedback_remove("alpha", &[all[1].0, all[3].0]).await.unwrap();
    store.c2d_remove("alpha", &d1, &[], &[record("e", FeedbackStatus::Success)]).await.unwrap();
    let after = store.feedback_batch("alpha", 10).await.unwrap();
    assert_eq!(message_ids(&after), ["e"]);
    assert!(after[0].0 > all[3].0, "ids are never reused, even after the newest was taken");
}

pub(crate) async fn c2d_queue_is_deleted_with_its_identity(store: Arc<dyn Store>) {
    let (d1, m1) = hub_with_device_and_module(&store).await;
    store.create_identity("alpha", &device("d2")).await.unwrap();
    let d2 = IdentityKey::device("d2");
    for key in [&d1, &m1, &d2] {
        store.c2d_put("alpha", key, &message(1)).await.unwrap();
    }
    store.delete_identity("alpha", &m1, None).await.unwrap();
    store.create_identity("alpha", &module("d1", "m1")).await.unwrap();
    assert_eq!(store.c2d_queue("alpha", &m1).await, Ok(vec![]), "a recreated module starts empty");
    store.c2d_put("alpha", &m1, &message(2)).await.unwrap();

    store.delete_identity("alpha", &d1, None).await.unwrap();
    store.create_identity("alpha", &device("d1")).await.unwrap();
    store.create_identity("alpha", &module("d1", "m1")).await.unwrap();
    assert_eq!(store.c2d_queue("alpha", &d1).await, Ok(vec![]), "a recreated device starts empty");
    assert_eq!(store.c2d_queue("alpha", &m1).await, Ok(vec![]), "a device delete drops its modules' queues");
    assert_eq!(store.c2d_queue("alpha", &d2).await, Ok(vec![message(1)]));
}

pub(crate) async fn c2d_queues_and_feedback_are_deleted_with_their_hub(store: Arc<dyn Store>) {
    let (d1, m1) = hub_with_device_and_module(&store).await;
    store.c2d_put("alpha", &d1, &message(1)).await.unwrap();
    store.c2d_put("alpha", &m1, &message(1)).await.unwrap();
    store.c2d_remove("alpha", &d1, &[1], &[record("msg-1", FeedbackStatus::Success)]).await.unwrap();
    store.c2d_put("alpha", &d1, &message(2)).await.unwrap();
    store.delete_hub("alpha").await.unwrap();

    let (d1, m1) = hub_with_device_and_module(&store).await;
    assert_eq!(store.c2d_queue("alpha", &d1).await, Ok(vec![]));
    assert_eq!(store.c2d_queue("alpha", &m1).await, Ok(vec![]));
    assert_eq!(store.feedback_batch("alpha", 10).await, Ok(vec![]));
    store.c2d_remove("alpha", &d1, &[], &[record("again", FeedbackStatus::Success)]).await.unwrap();
    assert_eq!(message_ids(&store.feedback_batch("alpha", 10).await.unwrap()), ["again"]);
}

pub(crate) async fn c2d_queues_and_feedback_survive_close_and_reopen(backend: &Backend) {
    let first = backend.open().await;
    let (d1, m1) = hub_with_device_and_module(&first).await;
    let locked = C2dMessage {
        lock: Some(C2dLock { token: "t".into(), locked_until: at(0) + Duration::minutes(1) }),
        ..message(2)
    };
    for queued in [message(1), locked.clone(), message(3)] {
        first.c2d_put("alpha", &d1, &queued).await.unwrap();
    }
    first.c2d_put("alpha", &m1, &message(9)).await.unwrap();
    first.c2d_remove("alpha", &d1, &[3], &[record("msg-3", FeedbackStatus::Rejected)]).await.unwrap();
    let feedback = first.feedback_batch("alpha", 10).await.unwrap();
    first.close().await.unwrap();

    let second = backend.open().await;
    assert_eq!(second.c2d_queue("alpha", &d1).await, Ok(vec![message(1), locked]));
    assert_eq!(second.c2d_queue("alpha", &m1).await, Ok(vec![message(9)]));
    assert_eq!(second.feedback_batch("alpha", 10).await, Ok(feedback));
    second.close().await.unwrap();
}
