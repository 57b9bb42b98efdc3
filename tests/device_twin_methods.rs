//! Device twin over MQTT (device-protocol §2.6) and direct methods (§2.7, service-api §6),
//! end to end: a rumqttc device and the service REST API.

mod common;

use std::time::Duration;

use common::{TestHub, start, unix_now};
use iothubd::auth::sas;
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn device(hub: &TestHub, id: &str) -> (AsyncClient, EventLoop) {
    let r = hub.owner(Method::PUT, &format!("/devices/{id}")).json(&json!({})).send().await.unwrap();
    let key =
        r.json::<Value>().await.unwrap()["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    connect(hub, id, &key).await
}

async fn connect(hub: &TestHub, id: &str, key: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "localhost", hub.server.info.mqtts.unwrap().port());
    let token = sas::sign(&format!("{}/devices/{id}", hub.host), key, unix_now() + 600, None).unwrap();
    opts.set_credentials(format!("{}/{id}/?api-version=2021-04-12", hub.host), token);
    let ca = std::fs::read(hub.dir.path().join("tls").join("ca.pem")).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    tokio::time::timeout(WAIT, async {
        while !matches!(eventloop.poll().await.unwrap(), Event::Incoming(Packet::ConnAck(_))) {}
    })
    .await
    .unwrap();
    (client, eventloop)
}

/// Polls until `n` SUBACKs arrived.
async fn subacks(eventloop: &mut EventLoop, n: usize) {
    let mut seen = 0;
    tokio::time::timeout(WAIT, async {
        while seen < n {
            if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
                seen += 1;
            }
        }
    })
    .await
    .unwrap();
}

/// Polls until a PUBLISH whose topic starts with `prefix` arrives.
async fn next_publish(eventloop: &mut EventLoop, prefix: &str) -> Publish {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap() {
                if p.topic.starts_with(prefix) {
                    return p;
                }
            }
        }
    })
    .await
    .expect("publish in time")
}

#[tokio::test]
async fn device_gets_its_twin_and_reports_properties() {
    let hub = start();
    let (client, mut el) = device(&hub, "twin-dev").await;
    client.subscribe("$iothub/twin/res/#", QoS::AtLeastOnce).await.unwrap();
    subacks(&mut el, 1).await;

    client.publish("$iothub/twin/GET/?$rid=abc-1", QoS::AtLeastOnce, false, "").await.unwrap();
    let res = next_publish(&mut el, "$iothub/twin/res/").await;
    assert_eq!(res.topic, "$iothub/twin/res/200/?$rid=abc-1");
    let view: Value = serde_json::from_slice(&res.payload).unwrap();
    assert_eq!(view, json!({ "desired": { "$version": 1 }, "reported": { "$version": 1 } }));

    client
        .publish("$iothub/twin/PATCH/properties/reported/?$rid=7", QoS::AtLeastOnce, false, r#"{"battery":55}"#)
        .await
        .unwrap();
    let res = next_publish(&mut el, "$iothub/twin/res/").await;
    assert_eq!(res.topic, "$iothub/twin/res/204/?$rid=7&$version=2");
    let twin: Value = hub.owner(Method::GET, "/twins/twin-dev").send().await.unwrap().json().await.unwrap();
    assert_eq!(twin["properties"]["reported"]["battery"], 55);

    // `$` keys are not the device's to write: 400, nothing changes.
    client
        .publish("$iothub/twin/PATCH/properties/reported/?$rid=8", QoS::AtLeastOnce, false, r#"{"$bad":1}"#)
        .await
        .unwrap();
    let res = next_publish(&mut el, "$iothub/twin/res/").await;
    assert_eq!(res.topic, "$iothub/twin/res/400/?$rid=8");
}

#[tokio::test]
async fn device_receives_desired_patch_after_service_update() {
    let hub = start();
    let (client, mut el) = device(&hub, "desired-dev").await;
    client.subscribe("$iothub/twin/PATCH/properties/desired/#", QoS::AtLeastOnce).await.unwrap();
    subacks(&mut el, 1).await;
    let r = hub
        .owner(Method::PATCH, "/twins/desired-dev")
        .json(&json!({ "properties": { "desired": { "freq": 5 } } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let p = next_publish(&mut el, "$iothub/twin/PATCH/properties/desired/").await;
    assert_eq!(p.topic, "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(serde_json::from_slice::<Value>(&p.payload).unwrap(), json!({ "freq": 5, "$version": 2 }));
}

/// Invokes a method from a background task; returns its HTTP status and body.
fn invoke(hub: &TestHub, id: &str, body: Value) -> tokio::task::JoinHandle<(StatusCode, Value, Option<String>)> {
    let req = hub.owner(Method::POST, &format!("/twins/{id}/methods")).json(&body);
    tokio::spawn(async move {
        let r = req.send().await.unwrap();
        let code = r.headers().get("iothub-errorcode").map(|h| h.to_str().unwrap().to_owned());
        (r.status(), r.json().await.unwrap_or(Value::Null), code)
    })
}

/// Drives the device's event loop until the service call returns; its status, body, code.
async fn finish(
    call: tokio::task::JoinHandle<(StatusCode, Value, Option<String>)>,
    el: &mut EventLoop,
    within: Duration,
) -> (StatusCode, Value, Option<String>) {
    tokio::time::timeout(within, async {
        let mut call = call;
        loop {
            tokio::select! {
                r = &mut call => return r.unwrap(),
                _ = el.poll() => {}
            }
        }
    })
    .await
    .expect("the call returns in time")
}

#[tokio::test]
async fn direct_method_round_trip_carries_the_device_status_and_payload() {
    let hub = start();
    let (client, mut el) = device(&hub, "method-dev").await;
    client.subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce).await.unwrap();
    subacks(&mut el, 1).await;
    let call = invoke(
        &hub,
        "method-dev",
        json!({ "methodName": "echo", "payload": { "x": 1 }, "responseTimeoutInSeconds": 10 }),
    );
    let request = next_publish(&mut el, "$iothub/methods/POST/").await;
    let rid = request.topic.strip_prefix("$iothub/methods/POST/echo/?$rid=").expect("method topic").to_owned();
    assert_eq!(serde_json::from_slice::<Value>(&request.payload).unwrap(), json!({ "x": 1 }));
    client
        .publish(format!("$iothub/methods/res/201/?$rid={rid}"), QoS::AtLeastOnce, false, r#"{"ok":true}"#)
        .await
        .unwrap();
    // Keep the event loop running so the response leaves.
    let (status, body, _) = finish(call, &mut el, WAIT).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "status": 201, "payload": { "ok": true } }));
}

#[tokio::test]
async fn offline_unknown_and_silent_devices_get_their_errors() {
    let hub = start();
    let r = hub.owner(Method::PUT, "/devices/offline").json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (status, _, code) = invoke(&hub, "offline", json!({ "methodName": "m" })).await.unwrap();
    assert_eq!((status, code.as_deref()), (StatusCode::NOT_FOUND, Some("DeviceNotOnline")));
    let (status, _, code) = invoke(&hub, "ghost", json!({ "methodName": "m" })).await.unwrap();
    assert_eq!((status, code.as_deref()), (StatusCode::NOT_FOUND, Some("DeviceNotFound")));
    let (status, _, _) =
        invoke(&hub, "offline", json!({ "methodName": "m", "responseTimeoutInSeconds": 1 })).await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "response timeout below 5 s");

    // Subscribed but never answering: 504 after the response timeout.
    let (client, mut el) = device(&hub, "silent").await;
    client.subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce).await.unwrap();
    subacks(&mut el, 1).await;
    let call = invoke(&hub, "silent", json!({ "methodName": "m", "responseTimeoutInSeconds": 5 }));
    let (status, _, code) = finish(call, &mut el, Duration::from_secs(20)).await;
    assert_eq!((status, code.as_deref()), (StatusCode::GATEWAY_TIMEOUT, Some("GatewayTimeout")));
}

#[tokio::test]
async fn a_call_waits_for_the_device_within_the_connect_timeout() {
    let hub = start();
    let r = hub.owner(Method::PUT, "/devices/late").json(&json!({})).send().await.unwrap();
    let key =
        r.json::<Value>().await.unwrap()["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let call = invoke(
        &hub,
        "late",
        json!({ "methodName": "wake", "connectTimeoutInSeconds": 20, "responseTimeoutInSeconds": 20 }),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (client, mut el) = connect(&hub, "late", &key).await;
    client.subscribe("$iothub/methods/POST/#", QoS::AtLeastOnce).await.unwrap();
    let request = next_publish(&mut el, "$iothub/methods/POST/wake/").await;
    let rid = request.topic.rsplit_once("$rid=").unwrap().1.to_owned();
    client.publish(format!("$iothub/methods/res/200/?$rid={rid}"), QoS::AtLeastOnce, false, "").await.unwrap();
    let (status, body, _) = finish(call, &mut el, WAIT).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({ "status": 200, "payload": null }));
}
