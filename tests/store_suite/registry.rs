//! Hubs and identities: create, replace, delete, list, counts, concurrency and durability.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::Utc;
use futures::future::join_all;
use iothubd_actors::model::hub::HubDescription;
use iothubd_actors::model::identity::{Identity, IdentityKey, new_etag};
use iothubd_actors::model::twin::Twin;
use iothubd_actors::store::{DeviceStatistics, Store, StoreError};

use crate::backend::Backend;
use crate::fixtures::*;

pub(crate) async fn hub_create_get_list_and_conflicts(store: Arc<dyn Store>) {
    let alpha = hub("alpha");
    let beta = hub("beta");
    store.create_hub(&beta).await.unwrap();
    store.create_hub(&alpha).await.unwrap();

    assert_eq!(store.get_hub("alpha").await.unwrap(), Some(alpha.clone()));
    assert_eq!(store.get_hub("gamma").await.unwrap(), None);
    assert_eq!(store.list_hubs().await.unwrap(), vec![alpha.clone(), beta.clone()], "ordered by name");

    let same_name = HubDescription { etag: new_etag(), ..hub("alpha") };
    assert_eq!(store.create_hub(&same_name).await, Err(StoreError::Conflict));
    let mut same_host = hub("gamma");
    same_host.properties.host_name = alpha.properties.host_name.clone();
    assert_eq!(store.create_hub(&same_host).await, Err(StoreError::Conflict));
    assert_eq!(store.get_hub("alpha").await.unwrap(), Some(alpha), "a refused create changes nothing");
    assert_eq!(store.get_hub("gamma").await.unwrap(), None);
}

pub(crate) async fn hub_replace_checks_etag_and_host_name(store: Arc<dyn Store>) {
    let original = hub("alpha");
    store.create_hub(&original).await.unwrap();
    store.create_hub(&hub("beta")).await.unwrap();

    let mut next = original.clone();
    next.etag = new_etag();
    next.sku.capacity = 3;
    store.replace_hub(&next, Some(&original.etag)).await.unwrap();
    assert_eq!(store.get_hub("alpha").await.unwrap(), Some(next.clone()));

    let mut stale = next.clone();
    stale.etag = new_etag();
    stale.sku.capacity = 9;
    assert_eq!(store.replace_hub(&stale, Some(&original.etag)).await, Err(StoreError::PreconditionFailed));
    assert_eq!(store.get_hub("alpha").await.unwrap(), Some(next.clone()), "a refused replace changes nothing");

    store.replace_hub(&stale, None).await.unwrap();
    assert_eq!(store.get_hub("alpha").await.unwrap(), Some(stale.clone()), "no ETag means unconditional");

    let mut moved = stale.clone();
    moved.properties.host_name = "beta.example.net".into();
    assert_eq!(store.replace_hub(&moved, None).await, Err(StoreError::Conflict), "host name taken by beta");
    moved.properties.host_name = "alpha.example.org".into();
    store.replace_hub(&moved, Some(&stale.etag)).await.unwrap();
    let mut reuses_old_host = hub("gamma");
    reuses_old_host.properties.host_name = "alpha.example.net".into();
    store.create_hub(&reuses_old_host).await.expect("the old host name is free again");

    assert_eq!(store.replace_hub(&hub("missing"), None).await, Err(StoreError::NotFound));
    assert_eq!(store.replace_hub(&hub("missing"), Some("etag")).await, Err(StoreError::NotFound));
}

pub(crate) async fn hub_delete_removes_its_identities(store: Arc<dyn Store>) {
    store.create_hub(&hub("doomed")).await.unwrap();
    store.create_hub(&hub("kept")).await.unwrap();
    for hub_name in ["doomed", "kept"] {
        store.create_identity(hub_name, &device("d1")).await.unwrap();
        store.create_identity(hub_name, &module("d1", "m1")).await.unwrap();
        store.create_identity(hub_name, &device("d2")).await.unwrap();
    }

    store.delete_hub("doomed").await.unwrap();
    assert_eq!(store.get_hub("doomed").await.unwrap(), None);
    assert_eq!(store.delete_hub("doomed").await, Err(StoreError::NotFound));
    assert_eq!(store.list_hubs().await.unwrap().len(), 1);

    store.create_hub(&hub("doomed")).await.expect("the name is free again");
    assert_eq!(store.get_identity("doomed", &IdentityKey::device("d1")).await.unwrap(), None);
    assert_eq!(store.get_identity("doomed", &IdentityKey::module("d1", "m1")).await.unwrap(), None);
    assert!(store.list_devices("doomed", None, 100).await.unwrap().is_empty());
    assert_eq!(store.device_statistics("doomed").await.unwrap(), DeviceStatistics::default());
    assert_eq!(ids(&store.list_devices("kept", None, 100).await.unwrap()), ["d1", "d2"], "other hubs untouched");
    assert_eq!(store.list_modules("kept", "d1").await.unwrap().len(), 1);
}

pub(crate) async fn identity_create_get_and_conflicts(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    store.create_hub(&hub("beta")).await.unwrap();
    let d1 = device("d1");
    store.create_identity("alpha", &d1).await.unwrap();
    assert_eq!(store.create_identity("alpha", &device("d1")).await, Err(StoreError::Conflict));
    assert_eq!(store.get_identity("alpha", &d1.key).await.unwrap(), Some(d1.clone()), "the first one stays");

    assert_eq!(store.create_identity("alpha", &module("nobody", "m1")).await, Err(StoreError::NotFound));
    assert_eq!(store.create_identity("missing-hub", &device("d1")).await, Err(StoreError::NotFound));

    let m1 = module("d1", "m1");
    store.create_identity("alpha", &m1).await.unwrap();
    assert_eq!(store.create_identity("alpha", &module("d1", "m1")).await, Err(StoreError::Conflict));
    assert_eq!(store.get_identity("alpha", &m1.key).await.unwrap(), Some(m1));
    assert_eq!(store.get_identity("alpha", &d1.key).await.unwrap(), Some(d1), "a module does not shadow its device");

    assert_eq!(store.get_identity("alpha", &IdentityKey::device("D1")).await.unwrap(), None, "IDs are case-sensitive");
    assert_eq!(store.get_identity("alpha", &IdentityKey::module("d1", "m2")).await.unwrap(), None);
    assert_eq!(store.get_identity("beta", &IdentityKey::device("d1")).await.unwrap(), None, "hubs are separate");
    let beta_d1 = device("d1");
    store.create_identity("beta", &beta_d1).await.expect("the same ID in another hub");
    assert_eq!(store.get_identity("beta", &beta_d1.key).await.unwrap(), Some(beta_d1));
}

pub(crate) async fn identity_replace_checks_etag(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let original = device("d1");
    store.create_identity("alpha", &original).await.unwrap();

    let second = disabled(&original);
    store.replace_identity("alpha", &second, Some(&original.etag)).await.unwrap();
    assert_eq!(store.get_identity("alpha", &original.key).await.unwrap(), Some(second.clone()));

    let stale = disabled(&second);
    assert_eq!(
        store.replace_identity("alpha", &stale, Some(&original.etag)).await,
        Err(StoreError::PreconditionFailed)
    );
    assert_eq!(store.get_identity("alpha", &original.key).await.unwrap(), Some(second));
    store.replace_identity("alpha", &stale, None).await.unwrap();
    assert_eq!(store.get_identity("alpha", &original.key).await.unwrap(), Some(stale));

    let m1 = module("d1", "m1");
    store.create_identity("alpha", &m1).await.unwrap();
    let m1_next = disabled(&m1);
    store.replace_identity("alpha", &m1_next, Some(&m1.etag)).await.unwrap();
    assert_eq!(store.get_identity("alpha", &m1.key).await.unwrap(), Some(m1_next));

    assert_eq!(store.replace_identity("alpha", &device("ghost"), None).await, Err(StoreError::NotFound));
    assert_eq!(store.replace_identity("alpha", &device("ghost"), Some("etag")).await, Err(StoreError::NotFound));
    assert_eq!(store.replace_identity("alpha", &module("d1", "ghost"), None).await, Err(StoreError::NotFound));
    assert_eq!(store.replace_identity("beta", &device("d1"), None).await, Err(StoreError::NotFound));
}

pub(crate) async fn identity_delete_returns_it_and_removes_modules(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let d1 = device("d1");
    let d2 = device("d2");
    let (m1, m2, other) = (module("d1", "m1"), module("d1", "m2"), module("d2", "m1"));
    for identity in [&d1, &d2, &m1, &m2, &other] {
        store.create_identity("alpha", identity).await.unwrap();
    }

    assert_eq!(store.delete_identity("alpha", &m2.key, Some("stale")).await, Err(StoreError::PreconditionFailed));
    assert_eq!(store.delete_identity("alpha", &m2.key, Some(&m2.etag)).await, Ok(m2.clone()));
    assert_eq!(store.get_identity("alpha", &m2.key).await.unwrap(), None);
    assert_eq!(
        store.get_identity("alpha", &d1.key).await.unwrap(),
        Some(d1.clone()),
        "deleting a module keeps its device"
    );

    assert_eq!(store.delete_identity("alpha", &d1.key, Some("stale")).await, Err(StoreError::PreconditionFailed));
    assert_eq!(store.get_identity("alpha", &m1.key).await.unwrap(), Some(m1.clone()), "a refused delete keeps modules");
    assert_eq!(store.delete_identity("alpha", &d1.key, None).await, Ok(d1.clone()));
    assert_eq!(store.get_identity("alpha", &d1.key).await.unwrap(), None);
    assert_eq!(store.get_identity("alpha", &m1.key).await.unwrap(), None, "deleting a device deletes its modules");
    assert!(store.list_modules("alpha", "d1").await.unwrap().is_empty());
    assert_eq!(store.get_identity("alpha", &other.key).await.unwrap(), Some(other), "other devices' modules stay");

    assert_eq!(store.delete_identity("alpha", &d1.key, None).await, Err(StoreError::NotFound));
    assert_eq!(store.delete_identity("alpha", &m1.key, Some(&m1.etag)).await, Err(StoreError::NotFound));
    assert_eq!(store.delete_identity("beta", &d2.key, None).await, Err(StoreError::NotFound));
    store.create_identity("alpha", &device("d1")).await.expect("the ID is free again");
}

pub(crate) async fn list_devices_pages_in_device_id_order(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    store.create_hub(&hub("beta")).await.unwrap();
    let mut expected: BTreeSet<String> = (0..25).map(|i| format!("dev-{i:02}")).collect();
    // Bytewise order: uppercase before lowercase, whatever the database's locale.
    expected.extend(["Zeta", "alpha", "B-2", "b-1"].map(String::from));
    for id in &expected {
        store.create_identity("alpha", &device(id)).await.unwrap();
    }
    store.create_identity("alpha", &module("dev-03", "m1")).await.unwrap();
    store.create_identity("beta", &device("dev-99")).await.unwrap();

    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list_devices("alpha", after.as_deref(), 10).await.unwrap();
        assert!(page.len() <= 10);
        assert!(page.iter().all(|i| !i.key.is_module()), "modules are not devices");
        listed.extend(ids(&page));
        if page.len() < 10 {
            break;
        }
        after = page.last().map(|i| i.key.device_id.clone());
    }
    assert_eq!(listed, expected.iter().cloned().collect::<Vec<_>>());

    let from_gap = store.list_devices("alpha", Some("dev-10x"), 2).await.unwrap();
    assert_eq!(ids(&from_gap), ["dev-11", "dev-12"], "`after` need not exist");
    assert!(store.list_devices("alpha", None, 0).await.unwrap().is_empty());
    assert!(store.list_devices("alpha", Some("zzz"), 10).await.unwrap().is_empty());
    assert!(store.list_devices("missing", None, 10).await.unwrap().is_empty());
}

pub(crate) async fn list_modules_and_statistics_count_the_right_identities(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    store.create_hub(&hub("beta")).await.unwrap();
    assert_eq!(store.device_statistics("alpha").await.unwrap(), DeviceStatistics::default());

    for identity in [device("d1"), disabled_device("d2"), device("d3"), module("d1", "mb"), module("d1", "ma")] {
        store.create_identity("alpha", &identity).await.unwrap();
    }
    store.create_identity("alpha", &module("d3", "mc")).await.unwrap();
    store.create_identity("beta", &device("d1")).await.unwrap();

    assert_eq!(ids(&store.list_modules("alpha", "d1").await.unwrap()), ["d1/ma", "d1/mb"]);
    assert_eq!(ids(&store.list_modules("alpha", "d3").await.unwrap()), ["d3/mc"]);
    assert!(store.list_modules("alpha", "d2").await.unwrap().is_empty());
    assert!(store.list_modules("alpha", "nobody").await.unwrap().is_empty());
    assert!(store.list_modules("beta", "d1").await.unwrap().is_empty());

    let stats = store.device_statistics("alpha").await.unwrap();
    let expected = DeviceStatistics { total_device_count: 3, enabled_device_count: 2, disabled_device_count: 1 };
    assert_eq!(stats, expected, "modules are not counted");

    let d1 = store.get_identity("alpha", &IdentityKey::device("d1")).await.unwrap().unwrap();
    store.replace_identity("alpha", &disabled(&d1), None).await.unwrap();
    let stats = store.device_statistics("alpha").await.unwrap();
    assert_eq!((stats.enabled_device_count, stats.disabled_device_count), (1, 2), "replace moves the count");
    assert_eq!(store.device_statistics("beta").await.unwrap().total_device_count, 1);
}

pub(crate) async fn concurrent_creates_all_land(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    for i in 0..20 {
        store.create_identity("alpha", &device(&format!("taken-{i}"))).await.unwrap();
    }
    // The refused creates are interleaved with the others, so with group commit they share
    // batches: one refusal must not undo its neighbours.
    let tasks = (0..200).flat_map(|i| {
        let fresh = (device(&format!("new-{i:03}")), true);
        let taken = (i % 10 == 0).then(|| (device(&format!("taken-{}", i / 10)), false));
        std::iter::once(fresh).chain(taken)
    });
    let results = join_all(tasks.map(|(identity, fresh)| {
        let store = store.clone();
        tokio::spawn(async move { (fresh, store.create_identity("alpha", &identity).await) })
    }))
    .await;
    for result in results {
        match result.expect("task") {
            (true, outcome) => assert_eq!(outcome, Ok(())),
            (false, outcome) => assert_eq!(outcome, Err(StoreError::Conflict)),
        }
    }
    assert_eq!(store.list_devices("alpha", None, 1000).await.unwrap().len(), 220);
    assert_eq!(store.device_statistics("alpha").await.unwrap().total_device_count, 220);
}

pub(crate) async fn concurrent_creates_of_one_id_have_one_winner(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let contenders: Vec<Identity> = (0..50).map(|_| device("same")).collect();
    let results = join_all(contenders.iter().cloned().map(|identity| {
        let store = store.clone();
        tokio::spawn(async move { store.create_identity("alpha", &identity).await })
    }))
    .await;
    let results: Vec<_> = results.into_iter().map(|r| r.expect("task")).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Ok(()) | Err(StoreError::Conflict))), "{results:?}");
    let winner = results.iter().position(Result::is_ok).map(|i| &contenders[i]);
    assert_eq!(store.get_identity("alpha", &IdentityKey::device("same")).await.unwrap().as_ref(), winner);
}

pub(crate) async fn concurrent_replaces_with_one_etag_have_one_winner(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    let original = device("d1");
    store.create_identity("alpha", &original).await.unwrap();
    let contenders: Vec<Identity> = (0..20).map(|_| disabled(&original)).collect();
    let results = join_all(contenders.iter().cloned().map(|identity| {
        let (store, etag) = (store.clone(), original.etag.clone());
        tokio::spawn(async move { store.replace_identity("alpha", &identity, Some(&etag)).await })
    }))
    .await;
    let results: Vec<_> = results.into_iter().map(|r| r.expect("task")).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
    assert!(results.iter().all(|r| matches!(r, Ok(()) | Err(StoreError::PreconditionFailed))), "{results:?}");
    let winner = results.iter().position(Result::is_ok).map(|i| &contenders[i]);
    assert_eq!(store.get_identity("alpha", &original.key).await.unwrap().as_ref(), winner);
}

pub(crate) async fn writes_after_close_are_unavailable(store: Arc<dyn Store>) {
    store.create_hub(&hub("alpha")).await.unwrap();
    store.close().await.unwrap();
    let unavailable = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Unavailable(_)));
    assert!(unavailable(store.create_hub(&hub("beta")).await));
    assert!(unavailable(store.create_identity("alpha", &device("d1")).await));
    assert!(unavailable(store.replace_hub(&hub("alpha"), None).await));
    assert!(unavailable(store.delete_hub("alpha").await));
    assert!(unavailable(store.set_checkpoint("alpha", "$Default", 0, 1).await));
    let key = IdentityKey::device("d1");
    assert!(unavailable(store.replace_twin("alpha", &key, &Twin::new(Utc::now()), None).await));
    let append = store.append_events("alpha", to_partition(0, &["late"])).await;
    assert!(matches!(append, Err(StoreError::Unavailable(_))), "{append:?}");
    assert!(matches!(store.get_hub("alpha").await, Err(StoreError::Unavailable(_))));
    assert!(matches!(store.read_events("alpha", 0, 0, 10).await, Err(StoreError::Unavailable(_))));
    store.close().await.expect("closing twice is harmless");
}

pub(crate) async fn writes_survive_close_and_reopen(backend: &Backend) {
    let first = backend.open().await;
    let alpha = hub("alpha");
    first.create_hub(&alpha).await.unwrap();
    let devices: Vec<Identity> = (0..50).map(|i| device(&format!("d{i:02}"))).collect();
    join_all(devices.iter().map(|d| first.create_identity("alpha", d))).await.into_iter().for_each(|r| r.unwrap());
    let m1 = module("d00", "m1");
    first.create_identity("alpha", &m1).await.unwrap();
    let d01 = disabled(&devices[1]);
    first.replace_identity("alpha", &d01, Some(&devices[1].etag)).await.unwrap();
    first.delete_identity("alpha", &devices[2].key, None).await.unwrap();
    first.close().await.unwrap();

    let second = backend.open().await;
    assert_eq!(second.get_hub("alpha").await.unwrap(), Some(alpha));
    assert_eq!(second.get_identity("alpha", &devices[0].key).await.unwrap().as_ref(), Some(&devices[0]));
    assert_eq!(second.get_identity("alpha", &m1.key).await.unwrap(), Some(m1));
    assert_eq!(second.get_identity("alpha", &d01.key).await.unwrap(), Some(d01));
    assert_eq!(second.get_identity("alpha", &devices[2].key).await.unwrap(), None);
    assert_eq!(second.list_devices("alpha", None, 100).await.unwrap().len(), 49);
    let stats = second.device_statistics("alpha").await.unwrap();
    assert_eq!((stats.total_device_count, stats.disabled_device_count), (49, 1));
    second.close().await.unwrap();
}

pub(crate) async fn corrupt_document_reads_as_corrupt(backend: &Backend) {
    let store = backend.open().await;
    store.create_hub(&hub("alpha")).await.unwrap();
    store.create_identity("alpha", &device("d1")).await.unwrap();
    store.create_identity("alpha", &device("d2")).await.unwrap();
    backend.corrupt_identity("alpha", "d1").await;
    let key = IdentityKey::device("d1");
    assert!(matches!(store.get_identity("alpha", &key).await, Err(StoreError::Corrupt(_))));
    assert!(matches!(store.list_devices("alpha", None, 10).await, Err(StoreError::Corrupt(_))));
    assert!(store.get_identity("alpha", &IdentityKey::device("d2")).await.unwrap().is_some(), "other rows still read");
    store.close().await.unwrap();
}

pub(crate) async fn concurrent_opens_migrate_once(backend: &Backend) {
    let stores = join_all((0..4).map(|_| backend.open())).await;
    stores[0].create_hub(&hub("alpha")).await.unwrap();
    for store in &stores {
        assert!(store.get_hub("alpha").await.unwrap().is_some());
    }
    for store in &stores {
        store.close().await.unwrap();
    }
}
