//! Identity registry REST over real HTTPS (service-api §2–3), with SAS auth (§1).

mod common;

use common::{TestHub, start, unix_now};
use iothubd::auth::sas;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn body(r: reqwest::Response) -> Value {
    r.json().await.expect("JSON body")
}

async fn create(hub: &TestHub, id: &str) -> Value {
    let r = hub.owner(Method::PUT, &format!("/devices/{id}")).json(&json!({ "deviceId": id })).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "create {id}");
    body(r).await
}

fn assert_iothub_error(r: &reqwest::Response, status: StatusCode, code: &str) {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers().get("iothub-errorcode").and_then(|h| h.to_str().ok()), Some(code));
}

#[tokio::test]
async fn device_create_get_list_delete_round_trip() {
    let hub = start();
    let created = create(&hub, "dev-1").await;
    assert_eq!(created["deviceId"], "dev-1");
    assert_eq!(created["status"], "enabled");
    assert_eq!(created["connectionState"], "Disconnected");
    assert_eq!(created["authentication"]["type"], "sas");
    assert!(created["authentication"]["symmetricKey"]["primaryKey"].as_str().is_some_and(|k| k.len() == 44));
    assert_eq!(created["lastActivityTime"], "0001-01-01T00:00:00Z");
    assert_eq!(created["capabilities"]["iotEdge"], false);

    let r = hub.owner(Method::GET, "/devices/dev-1").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let etag = r.headers().get("etag").unwrap().to_str().unwrap().to_owned();
    let got = body(r).await;
    assert_eq!(etag, format!("\"{}\"", got["etag"].as_str().unwrap()));
    assert_eq!(got["generationId"], created["generationId"]);

    create(&hub, "dev-2").await;
    let list = body(hub.owner(Method::GET, "/devices/?top=10").send().await.unwrap()).await;
    let ids: Vec<&str> = list.as_array().unwrap().iter().map(|d| d["deviceId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["dev-1", "dev-2"]);

    let r = hub.owner(Method::DELETE, "/devices/dev-1").header("If-Match", "*").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = hub.owner(Method::GET, "/devices/dev-1").send().await.unwrap();
    assert_iothub_error(&r, StatusCode::NOT_FOUND, "DeviceNotFound");
    let err = body(r).await;
    assert!(err["Message"].as_str().unwrap().starts_with("ErrorCode:DeviceNotFound;"));
    assert!(err["ExceptionMessage"].as_str().unwrap().starts_with("Tracking ID:"));
}

#[tokio::test]
async fn duplicate_create_is_409_and_stale_etag_is_412() {
    let hub = start();
    let created = create(&hub, "dup").await;
    let r = hub.owner(Method::PUT, "/devices/dup").json(&json!({ "deviceId": "dup" })).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::CONFLICT, "DeviceAlreadyExists");

    // Replace with the current ETag (quoted, as C# sends it) disables the device.
    let etag = created["etag"].as_str().unwrap();
    let r = hub
        .owner(Method::PUT, "/devices/dup")
        .header("If-Match", format!("\"{etag}\""))
        .json(&json!({ "deviceId": "dup", "status": "disabled", "statusReason": "maintenance" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let replaced = body(r).await;
    assert_eq!(replaced["status"], "disabled");
    assert_eq!(replaced["generationId"], created["generationId"]);
    assert_ne!(replaced["etag"], created["etag"]);

    // The old ETag (bare, as Python sends it) is now stale.
    let r = hub
        .owner(Method::PUT, "/devices/dup")
        .header("If-Match", etag)
        .json(&json!({ "deviceId": "dup" }))
        .send()
        .await
        .unwrap();
    assert_iothub_error(&r, StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
    let r = hub.owner(Method::DELETE, "/devices/dup").header("If-Match", etag).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::PRECONDITION_FAILED, "PreconditionFailed");

    // Replacing a device that does not exist is a 404.
    let r = hub
        .owner(Method::PUT, "/devices/ghost")
        .header("If-Match", "*")
        .json(&json!({ "deviceId": "ghost" }))
        .send()
        .await
        .unwrap();
    assert_iothub_error(&r, StatusCode::NOT_FOUND, "DeviceNotFound");
}

#[tokio::test]
async fn supplied_keys_are_kept_and_bad_ones_refused() {
    let hub = start();
    let key = iothubd_actors::model::identity::generate_key();
    let r = hub
        .owner(Method::PUT, "/devices/keyed")
        .json(&json!({ "deviceId": "keyed", "authentication": { "type": "sas",
            "symmetricKey": { "primaryKey": key, "secondaryKey": key } } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await["authentication"]["symmetricKey"]["primaryKey"], key.as_str());

    let r = hub
        .owner(Method::PUT, "/devices/badkey")
        .json(&json!({ "deviceId": "badkey", "authentication": { "symmetricKey": { "primaryKey": "c2hvcnQ=" } } }))
        .send()
        .await
        .unwrap();
    assert_iothub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");

    let r = hub.owner(Method::PUT, "/devices/has%20space").json(&json!({})).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
}

#[tokio::test]
async fn ids_with_special_characters_survive_percent_encoding() {
    let hub = start();
    // `+`, `%`, `#`, `$` and `'` are legal in IDs (service-api §3) and arrive percent-encoded.
    let id = "a+b%c#d$e'f";
    let encoded = "a%2Bb%25c%23d%24e%27f";
    let r =
        hub.owner(Method::PUT, &format!("/devices/{encoded}")).json(&json!({ "deviceId": id })).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let got = body(hub.owner(Method::GET, &format!("/devices/{encoded}")).send().await.unwrap()).await;
    assert_eq!(got["deviceId"], id);
}

#[tokio::test]
async fn modules_are_created_listed_and_deleted_with_their_device() {
    let hub = start();
    let r =
        hub.owner(Method::PUT, "/devices/nodev/modules/m1").json(&json!({ "moduleId": "m1" })).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::NOT_FOUND, "DeviceNotFound");

    create(&hub, "edge").await;
    for m in ["m1", "m2"] {
        let r = hub
            .owner(Method::PUT, &format!("/devices/edge/modules/{m}"))
            .json(&json!({ "moduleId": m, "deviceId": "edge", "managedBy": "me" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let module = body(r).await;
        assert_eq!(module["moduleId"], m);
        assert_eq!(module["managedBy"], "me");
    }
    let r = hub.owner(Method::PUT, "/devices/edge/modules/m1").json(&json!({})).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::CONFLICT, "ModuleAlreadyExistsOnDevice");
    let r = hub.owner(Method::GET, "/devices/edge/modules/nope").send().await.unwrap();
    assert_iothub_error(&r, StatusCode::NOT_FOUND, "ModuleNotFound");

    let list = body(hub.owner(Method::GET, "/devices/edge/modules").send().await.unwrap()).await;
    assert_eq!(list.as_array().unwrap().len(), 2);

    let r = hub.owner(Method::DELETE, "/devices/edge").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = hub.owner(Method::GET, "/devices/edge/modules/m1").send().await.unwrap();
    assert_iothub_error(&r, StatusCode::NOT_FOUND, "ModuleNotFound");
}

#[tokio::test]
async fn statistics_count_enabled_and_disabled_devices() {
    let hub = start();
    create(&hub, "s1").await;
    create(&hub, "s2").await;
    let r = hub
        .owner(Method::PUT, "/devices/s3")
        .json(&json!({ "deviceId": "s3", "status": "disabled" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let stats = body(hub.owner(Method::GET, "/statistics/devices").send().await.unwrap()).await;
    assert_eq!(stats, json!({ "totalDeviceCount": 3, "enabledDeviceCount": 2, "disabledDeviceCount": 1 }));
    let svc = body(hub.owner(Method::GET, "/statistics/service").send().await.unwrap()).await;
    assert_eq!(svc, json!({ "connectedDeviceCount": 0 }));
}

#[tokio::test]
async fn bulk_import_applies_every_identity_mode() {
    let hub = start();
    let items = json!([
        { "id": "b1", "importMode": "create" },
        { "id": "b2", "importMode": "createOrUpdate", "status": "disabled" },
        { "id": "b3" },
    ]);
    let r = hub.owner(Method::POST, "/devices").json(&items).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await, json!({ "isSuccessful": true, "errors": [], "warnings": [] }));

    let b1 = body(hub.owner(Method::GET, "/devices/b1").send().await.unwrap()).await;
    let items = json!([
        { "id": "b1", "importMode": "UpdateIfMatchETag", "eTag": b1["etag"], "status": "disabled" },
        { "id": "b2", "importMode": "Update", "status": "enabled" },
        { "id": "b3", "importMode": "Delete" },
        { "id": "b4", "importMode": "createOrUpdateIfMatchETag", "eTag": "whatever" },
        { "id": "b1", "moduleId": "m", "importMode": "create" },
    ]);
    let r = hub.owner(Method::POST, "/devices").json(&items).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(hub.owner(Method::GET, "/devices/b1").send().await.unwrap()).await["status"], "disabled");
    assert_eq!(body(hub.owner(Method::GET, "/devices/b2").send().await.unwrap()).await["status"], "enabled");
    assert_eq!(hub.owner(Method::GET, "/devices/b3").send().await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(hub.owner(Method::GET, "/devices/b4").send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(hub.owner(Method::GET, "/devices/b1/modules/m").send().await.unwrap().status(), StatusCode::OK);

    // One bad item fails alone: 400 with per-item errors, the good item still applied.
    let items = json!([
        { "id": "b1", "importMode": "create" },
        { "id": "b5", "importMode": "create" },
        { "id": "b2", "importMode": "deleteIfMatchETag", "eTag": "stale" },
        { "id": "b2", "moduleId": "x", "importMode": "updateIfMatchETag" },
    ]);
    let r = hub.owner(Method::POST, "/devices").json(&items).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let report = body(r).await;
    assert_eq!(report["isSuccessful"], false);
    let codes: Vec<(&str, &str)> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["deviceId"].as_str().unwrap(), e["errorCode"].as_str().unwrap()))
        .collect();
    assert_eq!(codes, [("b1", "DeviceAlreadyExists"), ("b2", "PreconditionFailed"), ("b2", "ArgumentInvalid")]);
    assert_eq!(hub.owner(Method::GET, "/devices/b5").send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn bulk_import_refuses_duplicates_and_oversize_requests() {
    let hub = start();
    let r = hub.owner(Method::POST, "/devices").json(&json!([{ "id": "x" }, { "id": "x" }])).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::BAD_REQUEST, "DeviceDefinedMultipleTimes");
    let many: Vec<Value> = (0..101).map(|i| json!({ "id": format!("d{i}") })).collect();
    let r = hub.owner(Method::POST, "/devices").json(&many).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::PAYLOAD_TOO_LARGE, "TooManyDevices");
}

#[tokio::test]
async fn wrong_or_expired_sas_gets_401_with_errorcode() {
    let hub = start();
    let wrong = hub.policy_token("iothubowner", &iothubd_actors::model::identity::generate_key());
    let r = hub.with_token(Method::GET, "/devices/x", &wrong).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");

    let expired = sas::sign(&hub.host, &hub.owner_key, unix_now() - 10, Some("iothubowner")).unwrap();
    let r = hub.with_token(Method::GET, "/devices/x", &expired).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");

    let unknown_policy = hub.policy_token("nosuchpolicy", &hub.owner_key);
    let r = hub.with_token(Method::GET, "/devices/x", &unknown_policy).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");

    let r = hub.client.get(hub.url(&format!("/devices/x?{}", common::API))).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
}

#[tokio::test]
async fn registry_read_token_can_read_but_not_write() {
    let hub = start();
    create(&hub, "ro").await;
    let token = hub.policy_token("registryRead", &hub.registry_read_key);
    let r = hub.with_token(Method::GET, "/devices/ro", &token).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = hub.with_token(Method::PUT, "/devices/rw", &token).json(&json!({})).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
    let r = hub.with_token(Method::DELETE, "/devices/ro", &token).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
}

#[tokio::test]
async fn device_scoped_token_is_not_a_service_credential() {
    let hub = start();
    let device = create(&hub, "scoped").await;
    let key = device["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    let token = sas::sign(&format!("{}/devices/scoped", hub.host), key, unix_now() + 600, None).unwrap();
    let r = hub.with_token(Method::GET, "/devices/scoped", &token).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
}

#[tokio::test]
async fn missing_api_version_is_400() {
    let hub = start();
    let r = hub.client.get(hub.url("/devices/x")).header("Authorization", hub.owner_token()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers().contains_key("iothub-errorcode"));
}

#[tokio::test]
async fn health_and_metrics_answer() {
    let hub = start();
    let r = hub.client.get(hub.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    create(&hub, "m").await;
    let text = hub.client.get(hub.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("iothubd_http_requests_total"), "{text}");
    assert!(text.contains("route=\"/devices/{id}\""), "{text}");
}

#[tokio::test]
async fn bulk_import_writes_tags_and_desired_into_twins() {
    let hub = start();
    let items = json!([
        { "id": "t1", "importMode": "create", "tags": { "site": "A" }, "properties": { "desired": { "freq": 5 } } },
        { "id": "t2" },
    ]);
    let r = hub.owner(Method::POST, "/devices").json(&items).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let store = hub.server.deployment().store().clone();
    let key = |id: &str| iothubd_actors::model::identity::IdentityKey::device(id);
    let t1 = store.get_twin(&hub.name, &key("t1")).await.unwrap().expect("twin written on create");
    assert_eq!(t1.tags()["site"], "A");
    assert_eq!(t1.desired()["freq"], 5);

    // updateTwin merges; updateTwinIfMatchETag checks twinETag.
    let items = json!([
        { "id": "t1", "importMode": "updateTwin", "tags": { "floor": 2 } },
        { "id": "t2", "importMode": "UpdateTwinIfMatchETag", "twinETag": "stale", "tags": { "x": 1 } },
        { "id": "t2", "moduleId": "nope", "importMode": "updateTwin", "tags": { "x": 1 } },
    ]);
    let r = hub.owner(Method::POST, "/devices").json(&items).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let report = body(r).await;
    let codes: Vec<&str> =
        report["errors"].as_array().unwrap().iter().map(|e| e["errorCode"].as_str().unwrap()).collect();
    assert_eq!(codes, ["PreconditionFailed", "ModuleNotFound"]);
    let t1 = store.get_twin(&hub.name, &key("t1")).await.unwrap().unwrap();
    assert_eq!((t1.tags()["site"].as_str(), t1.tags()["floor"].as_i64()), (Some("A"), Some(2)));
    assert!(store.get_twin(&hub.name, &key("t2")).await.unwrap().is_none(), "a refused twin update writes nothing");

    let etag = t1.etag();
    let items = json!([{ "id": "t1", "importMode": "updateTwinIfMatchETag", "twinETag": etag, "properties": { "desired": { "freq": null } } }]);
    let r = hub.owner(Method::POST, "/devices").json(&items).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let t1 = store.get_twin(&hub.name, &key("t1")).await.unwrap().unwrap();
    assert!(t1.desired().get("freq").is_none());

    let items = json!([{ "id": "t2", "importMode": "updateTwin", "tags": { "bad.key": 1 } }]);
    let r = hub.owner(Method::POST, "/devices").json(&items).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(body(r).await["errors"][0]["errorCode"], "ArgumentInvalid");
}
