//! Twins: stored with their identity, written only at the version the writer read.

use std::sync::Arc;

use chrono::Utc;
use futures::future::join_all;
use iothubd_actors::model::identity::IdentityKey;
use iothubd_actors::model::twin::Twin;
use iothubd_actors::store::{Store, StoreError};

use crate::fixtures::*;

pub(crate) async fn twin_is_written_only_at_the_expected_version(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let d1 = IdentityKey::device("d1");
    store.create_identity("alpha", &device("d1")).await.unwrap();
    assert_eq!(store.get_twin("alpha", &d1).await, Ok(None), "a new identity has no stored twin");

    let first = Twin::new(Utc::now());
    store.replace_twin("alpha", &d1, &first, None).await.unwrap();
    assert_eq!(store.get_twin("alpha", &d1).await, Ok(Some(first.clone())));
    let other_first = tagged(&Twin::new(Utc::now()), "lost");
    assert_eq!(
        store.replace_twin("alpha", &d1, &other_first, None).await,
        Err(StoreError::PreconditionFailed),
        "`None` means never written"
    );

    let second = tagged(&first, "two");
    assert_eq!(second.version(), first.version() + 1);
    store.replace_twin("alpha", &d1, &second, Some(first.version())).await.unwrap();
    let stale = tagged(&first, "stale");
    assert_eq!(
        store.replace_twin("alpha", &d1, &stale, Some(first.version())).await,
        Err(StoreError::PreconditionFailed)
    );
    assert_eq!(store.replace_twin("alpha", &d1, &stale, Some(99)).await, Err(StoreError::PreconditionFailed));
    assert_eq!(store.get_twin("alpha", &d1).await, Ok(Some(second.clone())), "a refused write changes nothing");

    let ghost = IdentityKey::device("ghost");
    assert_eq!(store.get_twin("alpha", &ghost).await, Err(StoreError::NotFound));
    assert_eq!(store.replace_twin("alpha", &ghost, &first, None).await, Err(StoreError::NotFound));
    assert_eq!(store.replace_twin("alpha", &ghost, &second, Some(1)).await, Err(StoreError::NotFound));
    assert_eq!(store.get_twin("beta", &d1).await, Err(StoreError::NotFound), "no such hub");

    let m1 = IdentityKey::module("d1", "m1");
    store.create_identity("alpha", &module("d1", "m1")).await.unwrap();
    assert_eq!(store.get_twin("alpha", &m1).await, Ok(None), "a module's twin is its own");
    let module_twin = tagged(&Twin::new(Utc::now()), "module");
    store.replace_twin("alpha", &m1, &module_twin, None).await.unwrap();
    assert_eq!(store.get_twin("alpha", &m1).await, Ok(Some(module_twin)));
    assert_eq!(store.get_twin("alpha", &d1).await, Ok(Some(second)));

    let identity = store.get_identity("alpha", &d1).await.unwrap().expect("present");
    store.replace_identity("alpha", &disabled(&identity), None).await.unwrap();
    assert!(store.get_twin("alpha", &d1).await.unwrap().is_some(), "an identity replace keeps the twin");
}

pub(crate) async fn concurrent_twin_writes_at_one_version_have_one_winner(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    store.create_identity("alpha", &device("d1")).await.unwrap();
    let key = IdentityKey::device("d1");
    let base = Twin::new(Utc::now());
    store.replace_twin("alpha", &key, &base, None).await.unwrap();
    let contenders: Vec<Twin> = (0..20).map(|i| tagged(&base, &format!("writer-{i}"))).collect();
    let results = join_all(contenders.iter().cloned().map(|twin| {
        let (store, key, version) = (store.clone(), key.clone(), base.version());
        tokio::spawn(async move { store.replace_twin("alpha", &key, &twin, Some(version)).await })
    }))
    .await;
    let results: Vec<_> = results.into_iter().map(|r| r.expect("task")).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Ok(()) | Err(StoreError::PreconditionFailed))), "{results:?}");
    let winner = results.iter().position(Result::is_ok).map(|i| contenders[i].clone());
    assert_eq!(store.get_twin("alpha", &key).await, Ok(winner));
}

pub(crate) async fn twin_is_deleted_with_its_identity_and_hub(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let (d1, m1) = (IdentityKey::device("d1"), IdentityKey::module("d1", "m1"));
    store.create_identity("alpha", &device("d1")).await.unwrap();
    store.create_identity("alpha", &module("d1", "m1")).await.unwrap();
    let twin = tagged(&Twin::new(Utc::now()), "kept?");
    store.replace_twin("alpha", &d1, &twin, None).await.unwrap();
    store.replace_twin("alpha", &m1, &twin, None).await.unwrap();

    store.delete_identity("alpha", &d1, None).await.unwrap();
    assert_eq!(store.get_twin("alpha", &d1).await, Err(StoreError::NotFound));
    store.create_identity("alpha", &device("d1")).await.unwrap();
    store.create_identity("alpha", &module("d1", "m1")).await.unwrap();
    assert_eq!(store.get_twin("alpha", &d1).await, Ok(None), "a re-created device starts without a twin");
    assert_eq!(store.get_twin("alpha", &m1).await, Ok(None), "its modules' twins went with it");

    store.replace_twin("alpha", &d1, &twin, None).await.unwrap();
    store.delete_hub("alpha").await.unwrap();
    store.create_hub(&hub("alpha")).await.unwrap();
    store.create_identity("alpha", &device("d1")).await.unwrap();
    assert_eq!(store.get_twin("alpha", &d1).await, Ok(None), "twins go with their hub");
}
