//! Service twin REST over real HTTPS (service-api §4): shapes, PATCH/PUT semantics, ETags,
//! validation, module twins.

mod common;

use common::{TestHub, start};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn create(hub: &TestHub, path: &str) {
    let r = hub.owner(Method::PUT, path).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "create {path}");
}

async fn twin(hub: &TestHub, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut req = hub.owner(method, path);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn new_twin_has_the_spec_shape() {
    let hub = start();
    create(&hub, "/devices/t1").await;
    let r = twin(&hub, Method::GET, "/twins/t1", None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers().get("etag").unwrap().to_str().unwrap().to_owned();
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["deviceId"], "t1");
    assert_eq!(format!("\"{}\"", t["etag"].as_str().unwrap()), etag);
    assert_eq!(t["version"], 1);
    assert_eq!(t["status"], "enabled");
    assert!(t.get("statusUpdateTime").is_some(), "twins spell it statusUpdateTime");
    assert_eq!(t["properties"]["desired"]["$version"], 1);
    assert_eq!(t["properties"]["reported"]["$version"], 1);
    assert!(t["properties"]["desired"]["$metadata"]["$lastUpdated"].is_string());
    assert_eq!(t["tags"], json!({}));
}

#[tokio::test]
async fn patch_merges_null_deletes_and_versions_move() {
    let hub = start();
    create(&hub, "/devices/t2").await;
    let patch = json!({ "tags": { "site": "A", "floor": 1 }, "properties": { "desired": { "cfg": { "freq": 5, "mode": "x" } } } });
    let t: Value = twin(&hub, Method::PATCH, "/twins/t2", Some(patch)).await.json().await.unwrap();
    assert_eq!(t["tags"], json!({ "site": "A", "floor": 1 }));
    assert_eq!(t["properties"]["desired"]["cfg"], json!({ "freq": 5, "mode": "x" }));
    assert_eq!(t["properties"]["desired"]["$version"], 2);
    assert_eq!(t["properties"]["desired"]["$metadata"]["cfg"]["freq"]["$lastUpdatedVersion"], 2);

    let patch = json!({ "tags": { "floor": null }, "properties": { "desired": { "cfg": { "mode": null } } } });
    let t: Value = twin(&hub, Method::PATCH, "/twins/t2", Some(patch)).await.json().await.unwrap();
    assert_eq!(t["tags"], json!({ "site": "A" }));
    assert_eq!(t["properties"]["desired"]["cfg"], json!({ "freq": 5 }));
    assert!(t["properties"]["desired"]["$metadata"]["cfg"].get("mode").is_none());

    // Tags only: desired $version stays.
    let t: Value =
        twin(&hub, Method::PATCH, "/twins/t2", Some(json!({ "tags": { "x": true } }))).await.json().await.unwrap();
    assert_eq!(t["properties"]["desired"]["$version"], 3);
    // Persisted: a fresh read after the actor is gone sees the same (read through the store).
    let again: Value = twin(&hub, Method::GET, "/twins/t2", None).await.json().await.unwrap();
    assert_eq!(again["tags"], t["tags"]);
    assert_eq!(again["etag"], t["etag"]);
}

#[tokio::test]
async fn stale_etag_is_412_and_put_replaces_tags_and_desired() {
    let hub = start();
    create(&hub, "/devices/t3").await;
    let t: Value =
        twin(&hub, Method::PATCH, "/twins/t3", Some(json!({ "tags": { "a": 1, "b": 2 } }))).await.json().await.unwrap();
    let etag = t["etag"].as_str().unwrap().to_owned();
    let t2: Value =
        twin(&hub, Method::PATCH, "/twins/t3", Some(json!({ "tags": { "c": 3 } }))).await.json().await.unwrap();
    let r = hub
        .owner(Method::PATCH, "/twins/t3")
        .header("If-Match", format!("\"{etag}\""))
        .json(&json!({ "tags": { "d": 4 } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.headers().get("iothub-errorcode").unwrap(), "PreconditionFailed");

    let current = t2["etag"].as_str().unwrap();
    let r = hub
        .owner(Method::PUT, "/twins/t3")
        .header("If-Match", current)
        .json(&json!({ "deviceId": "ignored", "tags": { "only": "this" }, "properties": { "desired": { "k": 1 } } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let t: Value = r.json().await.unwrap();
    assert_eq!(t["tags"], json!({ "only": "this" }));
    assert_eq!(t["properties"]["desired"]["k"], 1);
    assert_eq!(t["deviceId"], "t3");
}

#[tokio::test]
async fn invalid_twins_are_400_and_unknown_identities_404() {
    let hub = start();
    create(&hub, "/devices/t4").await;
    for (body, why) in [
        (json!({ "properties": { "reported": { "x": 1 } } }), "reported from the service"),
        (json!({ "tags": { "bad.key": 1 } }), "dot in a key"),
        (json!({ "tags": { "n": 4503599627370496u64 } }), "integer out of range"),
        (json!({ "tags": "not an object" }), "tags not an object"),
    ] {
        let r = twin(&hub, Method::PATCH, "/twins/t4", Some(body)).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{why}");
        assert_eq!(r.headers().get("iothub-errorcode").unwrap(), "ArgumentInvalid", "{why}");
    }
    let r = twin(&hub, Method::GET, "/twins/nobody", None).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers().get("iothub-errorcode").unwrap(), "DeviceNotFound");
    let r = twin(&hub, Method::GET, "/twins/t4/modules/none", None).await;
    assert_eq!(r.headers().get("iothub-errorcode").unwrap(), "ModuleNotFound");
}

#[tokio::test]
async fn module_twins_carry_the_module_id() {
    let hub = start();
    create(&hub, "/devices/edge").await;
    create(&hub, "/devices/edge/modules/m1").await;
    let t: Value = twin(
        &hub,
        Method::PATCH,
        "/twins/edge/modules/m1",
        Some(json!({ "properties": { "desired": { "on": true } } })),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!((t["deviceId"].as_str(), t["moduleId"].as_str()), (Some("edge"), Some("m1")));
    assert_eq!(t["properties"]["desired"]["on"], true);
    let device: Value = twin(&hub, Method::GET, "/twins/edge", None).await.json().await.unwrap();
    assert!(device["properties"]["desired"].get("on").is_none(), "the device twin is separate");
}

#[tokio::test]
async fn twin_rest_needs_service_connect() {
    let hub = start();
    create(&hub, "/devices/t5").await;
    let token = hub.policy_token("registryRead", &hub.registry_read_key);
    let r = hub.with_token(Method::GET, "/twins/t5", &token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn requests_for_unknown_identities_leave_no_actor_behind() {
    let hub = start();
    for i in 0..20 {
        let r = twin(&hub, Method::GET, &format!("/twins/ghost-{i}"), None).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }
    let r = hub.owner(Method::POST, "/twins/ghost-m/methods").json(&json!({ "methodName": "x" })).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let shared = hub.server.deployment().directory().get(&hub.name).unwrap().shared;
    for _ in 0..50 {
        if shared.live_device_count() == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(shared.live_device_count(), 0, "actors of unknown identities stop at once");
}
