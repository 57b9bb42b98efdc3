//! The HTTPS device API for telemetry (device-protocol §3) over real HTTPS.

mod common;

use common::{TestHub, start, unix_now};
use iothubd::auth::sas;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn device_key(hub: &TestHub, id: &str) -> String {
    let r = hub.owner(Method::PUT, &format!("/devices/{id}")).json(&json!({})).send().await.unwrap();
    r.json::<Value>().await.unwrap()["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned()
}

fn device_post(hub: &TestHub, id: &str, key: &str) -> reqwest::RequestBuilder {
    let token = sas::sign(&format!("{}/devices/{id}", hub.host), key, unix_now() + 600, None).unwrap();
    hub.client
        .post(hub.url(&format!("/devices/{id}/messages/events?api-version=2016-11-14")))
        .header("Authorization", token)
}

async fn events(hub: &TestHub) -> Vec<iothubd_actors::model::event::StoredEvent> {
    let store = hub.server.deployment().store().clone();
    let mut all = Vec::new();
    for p in 0..4 {
        all.extend(store.read_events(&hub.name, p, 0, 100).await.unwrap());
    }
    all
}

#[tokio::test]
async fn a_posted_message_keeps_its_headers_as_properties() {
    let hub = start();
    let key = device_key(&hub, "h1").await;
    let r = device_post(&hub, "h1", &key)
        .header("IoTHub-MessageId", "m-9")
        .header("iothub-contenttype", "application/json")
        .header("iothub-app-Color", "red")
        .header("User-Agent", "ignored")
        .body(r#"{"t":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let all = events(&hub).await;
    assert_eq!(all.len(), 1);
    let e = &all[0].data;
    assert_eq!(e.body, br#"{"t":1}"#);
    assert_eq!(e.properties.message_id.as_deref(), Some("m-9"));
    assert_eq!(e.properties.content_type.as_deref(), Some("application/json"));
    // HTTP header names are case-insensitive and arrive lower-case: `iothub-app-Color` → `color`.
    assert_eq!(e.application_properties, vec![("color".to_owned(), Some("red".to_owned()))]);
    assert!(e.annotations.iter().any(|(k, _)| k == "iothub-connection-device-id"));
}

#[tokio::test]
async fn a_batch_lands_as_separate_messages() {
    let hub = start();
    let key = device_key(&hub, "h2").await;
    let batch = json!([
        { "body": "aGVsbG8=", "properties": { "iothub-app-n": "1", "iothub-messageid": "a" } },
        { "body": "plain text", "base64Encoded": false, "properties": { "iothub-app-n": "2" } },
    ]);
    let r = device_post(&hub, "h2", &key)
        .header("Content-Type", "application/vnd.microsoft.iothub.json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let mut bodies: Vec<Vec<u8>> = events(&hub).await.into_iter().map(|e| e.data.body).collect();
    bodies.sort();
    assert_eq!(bodies, [b"hello".to_vec(), b"plain text".to_vec()]);
}

#[tokio::test]
async fn bad_credentials_and_oversize_messages_are_refused() {
    let hub = start();
    let key = device_key(&hub, "h3").await;
    let other = device_key(&hub, "h4").await;
    let r = device_post(&hub, "h3", &other).body("x").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "h4's key does not sign for h3");
    assert_eq!(r.headers().get("iothub-errorcode").unwrap(), "IotHubUnauthorizedAccess");
    let r = hub.client.post(hub.url("/devices/h3/messages/events")).body("x").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = device_post(&hub, "h3", &key).body(vec![b'x'; 256 * 1024 + 1]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(events(&hub).await.is_empty());
}
