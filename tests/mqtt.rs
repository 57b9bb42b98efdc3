//! The MQTT device endpoint over real MQTT 3.1.1 + TLS (rumqttc): CONNECT and its CONNACK
//! codes (device-protocol §2.2), telemetry into the events log with its annotations
//! (service-api §9), topic rules (§2.3), one session per identity.

mod common;

use std::time::Duration;

use common::{TestHub, start, unix_now};
use iothubd::auth::sas;
use iothubd_actors::model::event::AnnotationValue;
use reqwest::Method;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn create_device(hub: &TestHub, id: &str) -> String {
    let r = hub.owner(Method::PUT, &format!("/devices/{id}")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let device: Value = r.json().await.unwrap();
    device["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned()
}

fn device_token(hub: &TestHub, id: &str, key: &str, lifetime: i64) -> String {
    let expiry = (unix_now() as i64 + lifetime).max(0) as u64;
    sas::sign(&format!("{}/devices/{id}", hub.host), key, expiry, None).unwrap()
}

/// A TLS client presenting a certificate (X.509 devices send no password).
fn x509_client(hub: &TestHub, id: &str, cert_pem: &str, key_pem: &str) -> (AsyncClient, EventLoop) {
    let port = hub.server.info.mqtts.expect("MQTTS listener").port();
    let mut opts = MqttOptions::new(id, "localhost", port);
    opts.set_credentials(username(hub, id), "");
    let ca = std::fs::read(hub.dir.path().join("tls").join("ca.pem")).unwrap();
    let client_auth = Some((cert_pem.as_bytes().to_vec(), key_pem.as_bytes().to_vec()));
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth }));
    AsyncClient::new(opts, 16)
}

/// A device client as the Python SDK connects: client id = device id, username
/// `{host}/{id}/?api-version=…`, password = SAS token, clean session 0, TLS to the hub.
fn client(hub: &TestHub, client_id: &str, username: &str, password: &str) -> (AsyncClient, EventLoop) {
    let port = hub.server.info.mqtts.expect("MQTTS listener").port();
    let mut opts = MqttOptions::new(client_id, "localhost", port);
    opts.set_credentials(username, password);
    opts.set_keep_alive(Duration::from_secs(60));
    opts.set_clean_session(false);
    opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
    let ca = std::fs::read(hub.dir.path().join("tls").join("ca.pem")).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    AsyncClient::new(opts, 64)
}

fn username(hub: &TestHub, id: &str) -> String {
    format!("{}/{id}/?api-version=2021-04-12&DeviceClientType=iothubd-tests", hub.host)
}

/// Polls until CONNACK; returns its code (or the connection error's text).
async fn connack(eventloop: &mut EventLoop) -> Result<ConnectReturnCode, String> {
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.code),
                Ok(_) => continue,
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Ok(code),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no CONNACK in time".to_owned())?
}

/// Drives the event loop until `n` PUBACKs arrived; returns their packet ids in order.
async fn pubacks(eventloop: &mut EventLoop, n: usize) -> Vec<u16> {
    let mut ids = Vec::new();
    tokio::time::timeout(WAIT, async {
        while ids.len() < n {
            if let Event::Incoming(Packet::PubAck(ack)) = eventloop.poll().await.expect("connection stays up") {
                ids.push(ack.pkid);
            }
        }
    })
    .await
    .expect("PUBACKs in time");
    ids
}

/// Polls until the connection ends; true if it did within the wait.
async fn closed(eventloop: &mut EventLoop) -> bool {
    tokio::time::timeout(WAIT, async {
        loop {
            if eventloop.poll().await.is_err() {
                return;
            }
        }
    })
    .await
    .is_ok()
}

async fn connected(hub: &TestHub, id: &str) -> (AsyncClient, EventLoop) {
    let key = create_device(hub, id).await;
    let (client, mut eventloop) = client(hub, id, &username(hub, id), &device_token(hub, id, &key, 3600));
    assert_eq!(connack(&mut eventloop).await, Ok(ConnectReturnCode::Success));
    (client, eventloop)
}

#[tokio::test]
async fn device_with_valid_sas_connects() {
    let hub = start();
    let (_client, _eventloop) = connected(&hub, "good").await;
    let stats: Value = hub.owner(Method::GET, "/statistics/service").send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["connectedDeviceCount"], 1);
}

#[tokio::test]
async fn bad_expired_and_wrong_scope_tokens_get_connack_5() {
    let hub = start();
    let key = create_device(&hub, "d1").await;
    create_device(&hub, "d2").await;
    let wrong_key = iothubd_actors::model::identity::generate_key();
    for (what, password) in [
        ("wrong key", device_token(&hub, "d1", &wrong_key, 3600)),
        ("expired", device_token(&hub, "d1", &key, -10)),
        ("scoped to d2", sas::sign(&format!("{}/devices/d2", hub.host), &key, unix_now() + 600, None).unwrap()),
    ] {
        let (_c, mut el) = client(&hub, "d1", &username(&hub, "d1"), &password);
        assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::NotAuthorized), "{what}");
    }
    let (_c, mut el) = client(&hub, "d1", &username(&hub, "d1"), "not a token");
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::BadUserNamePassword));
}

#[tokio::test]
async fn unknown_and_disabled_identities_are_refused() {
    let hub = start();
    let key = create_device(&hub, "off").await;
    let (_c, mut el) = client(&hub, "ghost", &username(&hub, "ghost"), &device_token(&hub, "ghost", &key, 600));
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::NotAuthorized));

    hub.disable("/devices/off").await;
    let (_c, mut el) = client(&hub, "off", &username(&hub, "off"), &device_token(&hub, "off", &key, 600));
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::NotAuthorized));
}

#[tokio::test]
async fn client_id_must_match_the_username_identity() {
    let hub = start();
    let key = create_device(&hub, "me").await;
    let (_c, mut el) = client(&hub, "someone-else", &username(&hub, "me"), &device_token(&hub, "me", &key, 600));
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::BadClientId));
}

#[tokio::test]
async fn telemetry_lands_in_the_events_log_with_annotations() {
    let hub = start();
    let (client, mut eventloop) = connected(&hub, "sensor").await;
    let topic = "devices/sensor/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high&with%20space=a%20b%26c";
    client.publish(topic, QoS::AtLeastOnce, false, r#"{"t":21.5}"#).await.unwrap();
    pubacks(&mut eventloop, 1).await;

    let store = hub.server.deployment().store().clone();
    let partitions = 4;
    let mut found = Vec::new();
    for p in 0..partitions {
        found.extend(store.read_events(&hub.name, p, 0, 10).await.unwrap());
    }
    assert_eq!(found.len(), 1, "exactly one event");
    let event = &found[0];
    assert_eq!(event.data.body, br#"{"t":21.5}"#);
    assert_eq!(event.data.properties.message_id.as_deref(), Some("m-1"));
    assert_eq!(event.data.properties.content_type.as_deref(), Some("application/json"));
    assert_eq!(event.data.properties.content_encoding.as_deref(), Some("utf-8"));
    assert!(event.data.application_properties.contains(&("alert".into(), Some("high".into()))));
    assert!(event.data.application_properties.contains(&("with space".into(), Some("a b&c".into()))));
    let annotation = |name: &str| event.data.annotations.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(annotation("iothub-connection-device-id"), Some(AnnotationValue::String("sensor".into())));
    assert_eq!(annotation("iothub-message-source"), Some(AnnotationValue::String("Telemetry".into())));
    let Some(AnnotationValue::String(auth)) = annotation("iothub-connection-auth-method") else {
        panic!("auth method annotation missing")
    };
    let auth: Value = serde_json::from_str(&auth).unwrap();
    assert_eq!(auth, json!({"scope":"device","type":"sas","issuer":"iothub","acceptingIpFilterRule":null}));
    let device: Value = hub.owner(Method::GET, "/devices/sensor").send().await.unwrap().json().await.unwrap();
    assert_eq!(
        annotation("iothub-connection-auth-generation-id"),
        Some(AnnotationValue::String(device["generationId"].as_str().unwrap().into()))
    );
    assert!(matches!(annotation("iothub-enqueuedtime"), Some(AnnotationValue::Timestamp(_))));
}

#[tokio::test]
async fn pubacks_follow_publish_order() {
    let hub = start();
    let (client, mut eventloop) = connected(&hub, "burst").await;
    for i in 0..50 {
        client.publish("devices/burst/messages/events/", QoS::AtLeastOnce, false, format!("{i}")).await.unwrap();
    }
    let ids = pubacks(&mut eventloop, 50).await;
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(ids, sorted, "PUBACKs must come in PUBLISH order");
}

#[tokio::test]
async fn publishing_on_another_identitys_topic_closes_the_connection() {
    let hub = start();
    create_device(&hub, "victim").await;
    let (client, mut eventloop) = connected(&hub, "intruder").await;
    client.publish("devices/victim/messages/events/", QoS::AtLeastOnce, false, "x").await.unwrap();
    assert!(closed(&mut eventloop).await, "the hub must close the connection");
    let store = hub.server.deployment().store().clone();
    for p in 0..4 {
        assert!(store.read_events(&hub.name, p, 0, 10).await.unwrap().is_empty(), "nothing stored");
    }
}

#[tokio::test]
async fn a_second_connection_of_the_same_device_closes_the_first() {
    let hub = start();
    let key = create_device(&hub, "twice").await;
    let token = device_token(&hub, "twice", &key, 600);
    let (_c1, mut first) = client(&hub, "twice", &username(&hub, "twice"), &token);
    assert_eq!(connack(&mut first).await, Ok(ConnectReturnCode::Success));
    let (_c2, mut second) = client(&hub, "twice", &username(&hub, "twice"), &token);
    assert_eq!(connack(&mut second).await, Ok(ConnectReturnCode::Success));
    assert!(closed(&mut first).await, "the older session must be closed");
}

#[tokio::test]
async fn disabling_a_connected_device_drops_its_session() {
    let hub = start();
    let (_client, mut eventloop) = connected(&hub, "revoked").await;
    hub.disable("/devices/revoked").await;
    assert!(closed(&mut eventloop).await, "a disabled device loses its session");
}

#[tokio::test]
async fn subscriptions_to_supported_filters_are_granted_and_others_refused() {
    let hub = start();
    let (client, mut eventloop) = connected(&hub, "sub").await;
    client.subscribe("devices/sub/messages/devicebound/#", QoS::AtLeastOnce).await.unwrap();
    client.subscribe("$iothub/twin/res/#", QoS::ExactlyOnce).await.unwrap();
    client.subscribe("devices/other/messages/devicebound/#", QoS::AtLeastOnce).await.unwrap();
    client.subscribe("some/random/topic", QoS::AtMostOnce).await.unwrap();
    let mut codes = Vec::new();
    tokio::time::timeout(WAIT, async {
        while codes.len() < 4 {
            if let Event::Incoming(Packet::SubAck(ack)) = eventloop.poll().await.unwrap() {
                codes.extend(ack.return_codes);
            }
        }
    })
    .await
    .unwrap();
    use rumqttc::SubscribeReasonCode as C;
    assert_eq!(codes, [C::Success(QoS::AtLeastOnce), C::Success(QoS::AtLeastOnce), C::Failure, C::Failure]);
}

#[tokio::test]
async fn oversize_telemetry_closes_only_that_connection() {
    let hub = start();
    let (big, mut big_loop) = connected(&hub, "big").await;
    let (small, mut small_loop) = connected(&hub, "small").await;
    big.publish("devices/big/messages/events/", QoS::AtLeastOnce, false, vec![b'x'; 300 * 1024]).await.unwrap();
    assert!(closed(&mut big_loop).await, "oversize message closes the connection");
    small.publish("devices/small/messages/events/", QoS::AtLeastOnce, false, "ok").await.unwrap();
    assert_eq!(pubacks(&mut small_loop, 1).await.len(), 1, "other sessions are not disturbed");
}

#[tokio::test]
async fn mqtt_over_websockets_on_the_https_port_carries_telemetry() {
    let hub = start();
    let key = create_device(&hub, "ws-dev").await;
    let port = hub.server.info.https.port();
    let url = format!("wss://localhost:{port}/$iothub/websocket");
    let mut opts = MqttOptions::new("ws-dev", url, port);
    opts.set_credentials(username(&hub, "ws-dev"), device_token(&hub, "ws-dev", &key, 600));
    opts.set_keep_alive(Duration::from_secs(60));
    let ca = std::fs::read(hub.dir.path().join("tls").join("ca.pem")).unwrap();
    opts.set_transport(Transport::wss_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    assert_eq!(connack(&mut eventloop).await, Ok(ConnectReturnCode::Success));
    client.publish("devices/ws-dev/messages/events/%24.mid=over-ws", QoS::AtLeastOnce, false, "hi").await.unwrap();
    pubacks(&mut eventloop, 1).await;
    let store = hub.server.deployment().store().clone();
    let mut ids = Vec::new();
    for p in 0..4 {
        for e in store.read_events(&hub.name, p, 0, 10).await.unwrap() {
            ids.push(e.data.properties.message_id.unwrap_or_default());
        }
    }
    assert_eq!(ids, ["over-ws"]);
}

#[tokio::test]
async fn self_signed_x509_device_connects_with_its_certificate() {
    let hub = start();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["x509dev".into()]).unwrap().self_signed(&key).unwrap();
    let thumbprint = iothubd::tls::peer_thumbprint_sha1(cert.der());
    let r = hub
        .owner(Method::PUT, "/devices/x509dev")
        .json(&json!({ "authentication": { "type": "selfSigned", "x509Thumbprint": { "primaryThumbprint": thumbprint } } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let (client, mut eventloop) = x509_client(&hub, "x509dev", &cert.pem(), &key.serialize_pem());
    assert_eq!(connack(&mut eventloop).await, Ok(ConnectReturnCode::Success));
    client.publish("devices/x509dev/messages/events/", QoS::AtLeastOnce, false, "signed").await.unwrap();
    pubacks(&mut eventloop, 1).await;
    let store = hub.server.deployment().store().clone();
    let mut methods = Vec::new();
    for p in 0..4 {
        for e in store.read_events(&hub.name, p, 0, 10).await.unwrap() {
            for (k, v) in e.data.annotations {
                if let ("iothub-connection-auth-method", AnnotationValue::String(v)) = (&*k, v) {
                    methods.push(serde_json::from_str::<Value>(&v).unwrap()["type"].clone());
                }
            }
        }
    }
    assert_eq!(methods, [json!("x509")]);

    // Another certificate, or no certificate and no password, is refused.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let other = rcgen::CertificateParams::new(vec!["x509dev".into()]).unwrap().self_signed(&other_key).unwrap();
    let (_c, mut el) = x509_client(&hub, "x509dev", &other.pem(), &other_key.serialize_pem());
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::NotAuthorized));
    let (_c, mut el) = client_without_password(&hub, "x509dev");
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::NotAuthorized));
}

fn client_without_password(hub: &TestHub, id: &str) -> (AsyncClient, EventLoop) {
    client(hub, id, &username(hub, id), "")
}

/// Every event of the hub's log, in partition then sequence order.
async fn all_events(hub: &TestHub) -> Vec<iothubd_actors::model::event::StoredEvent> {
    let store = hub.server.deployment().store().clone();
    let mut events = Vec::new();
    for p in 0..4 {
        events.extend(store.read_events(&hub.name, p, 0, 1000).await.unwrap());
    }
    events
}

fn app_property<'a>(e: &'a iothubd_actors::model::event::StoredEvent, name: &str) -> Option<&'a str> {
    e.data.application_properties.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_deref())
}

#[tokio::test]
async fn connection_and_lifecycle_events_flow_only_through_explicit_routes() {
    let hub = start();
    // No routes: only telemetry reaches the built-in endpoint.
    let (client, mut eventloop) = connected(&hub, "quiet").await;
    client.disconnect().await.unwrap();
    let _ = closed(&mut eventloop).await;
    assert!(all_events(&hub).await.is_empty(), "no route, no connection or lifecycle events");

    let mut description: Value =
        hub.operator(Method::GET, &format!("/operator/hubs/{}", hub.name)).send().await.unwrap().json().await.unwrap();
    description["properties"]["routing"] = json!({ "routes": [
        { "name": "conn", "source": "DeviceConnectionStateEvents", "condition": "true", "endpointNames": ["events"], "isEnabled": true },
        { "name": "life", "source": "DeviceLifecycleEvents", "condition": "true", "endpointNames": ["events"], "isEnabled": true },
    ] });
    let r = hub.operator(Method::PUT, &format!("/operator/hubs/{}", hub.name)).json(&description).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let (client, mut eventloop) = connected(&hub, "chatty").await;
    client.disconnect().await.unwrap();
    let _ = closed(&mut eventloop).await;
    let mut events = Vec::new();
    for _ in 0..50 {
        events = all_events(&hub).await;
        if events.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ops: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (app_property(e, "deviceId").unwrap_or(""), app_property(e, "opType").unwrap_or("")))
        .collect();
    assert_eq!(
        ops,
        [("chatty", "createDeviceIdentity"), ("chatty", "deviceConnected"), ("chatty", "deviceDisconnected")]
    );
    let source = |e: &iothubd_actors::model::event::StoredEvent| {
        e.data.annotations.iter().find(|(k, _)| k == "iothub-message-source").map(|(_, v)| v.clone())
    };
    assert_eq!(source(&events[1]), Some(AnnotationValue::String("deviceConnectionStateEvents".into())));
    assert_eq!(source(&events[0]), Some(AnnotationValue::String("deviceLifecycleEvents".into())));
    let sequence = |e: &iothubd_actors::model::event::StoredEvent| {
        serde_json::from_slice::<Value>(&e.data.body).unwrap()["sequenceNumber"].as_str().unwrap().to_owned()
    };
    let (connected_seq, disconnected_seq) = (sequence(&events[1]), sequence(&events[2]));
    assert_eq!(connected_seq.len(), 64);
    assert!(connected_seq < disconnected_seq, "sequence numbers increase as strings");
    assert_eq!(app_property(&events[2], "disconnectReason"), Some("clientDisconnect"));
    assert_eq!(app_property(&events[1], "iothub-message-schema"), Some("deviceConnectionStateNotification"));
    let lifecycle: Value = serde_json::from_slice(&events[0].data.body).unwrap();
    assert_eq!(lifecycle["deviceId"], "chatty");
    assert_eq!(lifecycle["properties"]["desired"]["$version"], 1);
}

async fn connected_count(hub: &TestHub) -> u64 {
    let stats: Value = hub.owner(Method::GET, "/statistics/service").send().await.unwrap().json().await.unwrap();
    stats["connectedDeviceCount"].as_u64().unwrap()
}

#[tokio::test]
async fn qos2_publish_closes_only_that_connection() {
    let hub = start();
    let (bad, mut bad_loop) = connected(&hub, "qos2").await;
    let (good, mut good_loop) = connected(&hub, "qos1").await;
    bad.publish("devices/qos2/messages/events/", QoS::ExactlyOnce, false, "x").await.unwrap();
    assert!(closed(&mut bad_loop).await, "QoS 2 PUBLISH closes the connection (device-protocol §2.3)");
    good.publish("devices/qos1/messages/events/", QoS::AtLeastOnce, false, "ok").await.unwrap();
    assert_eq!(pubacks(&mut good_loop, 1).await.len(), 1);
}

#[tokio::test]
async fn persistent_session_is_present_on_reconnect() {
    let hub = start();
    let key = create_device(&hub, "persist").await;
    let token = device_token(&hub, "persist", &key, 600);
    let session_present = || {
        let (hub, token) = (&hub, token.clone());
        async move {
            let (client, mut el) = client(hub, "persist", &username(hub, "persist"), &token);
            let present = tokio::time::timeout(WAIT, async {
                loop {
                    if let Event::Incoming(Packet::ConnAck(ack)) = el.poll().await.unwrap() {
                        return ack.session_present;
                    }
                }
            })
            .await
            .unwrap();
            client.disconnect().await.unwrap();
            let _ = closed(&mut el).await;
            present
        }
    };
    assert!(!session_present().await, "first connection: nothing stored yet");
    assert!(session_present().await, "clean session 0 again: the session was kept");
}

#[tokio::test]
async fn silent_client_is_closed_after_one_and_a_half_keep_alives() {
    let hub = start();
    let key = create_device(&hub, "silent").await;
    let port = hub.server.info.mqtts.unwrap().port();
    let mut opts = MqttOptions::new("silent", "localhost", port);
    opts.set_credentials(username(&hub, "silent"), device_token(&hub, "silent", &key, 600));
    opts.set_keep_alive(Duration::from_secs(1));
    let ca = std::fs::read(hub.dir.path().join("tls").join("ca.pem")).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    let (_client, mut eventloop) = AsyncClient::new(opts, 4);
    assert_eq!(connack(&mut eventloop).await, Ok(ConnectReturnCode::Success));
    assert_eq!(connected_count(&hub).await, 1);
    // The event loop is no longer polled: no PINGREQ leaves, so the hub must close the session.
    let closed_by_hub = tokio::time::timeout(WAIT, async {
        while connected_count(&hub).await != 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(closed_by_hub.is_ok(), "the hub closes a client silent for 1.5 × keep-alive");
}

#[tokio::test]
async fn malformed_packets_close_only_their_own_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hub = common::start_with_plain_mqtt(port);
    let (good, mut good_loop) = connected(&hub, "bystander").await;
    for garbage in [&[0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F][..], b"GET / HTTP/1.1\r\n\r\n", &[0x10, 0x02, 0x00, 0x04]] {
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        raw.write_all(garbage).await.unwrap();
        let mut buf = [0u8; 64];
        // The hub answers nothing an MQTT client could take for a session and closes.
        let closed = tokio::time::timeout(WAIT, async {
            loop {
                match raw.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert_eq!(closed, Ok(true), "garbage {garbage:?} closes the connection");
    }
    good.publish("devices/bystander/messages/events/", QoS::AtLeastOnce, false, "still here").await.unwrap();
    assert_eq!(pubacks(&mut good_loop, 1).await.len(), 1, "other sessions are not disturbed");
}

#[tokio::test]
async fn the_session_ends_when_its_sas_token_expires() {
    let hub = start();
    let key = create_device(&hub, "shortlived").await;
    let (_client, mut eventloop) =
        client(&hub, "shortlived", &username(&hub, "shortlived"), &device_token(&hub, "shortlived", &key, 2));
    assert_eq!(connack(&mut eventloop).await, Ok(ConnectReturnCode::Success));
    assert!(closed(&mut eventloop).await, "the hub closes the session when the token expires");
}

#[tokio::test]
async fn ca_signed_device_connects_once_its_ca_is_registered_and_verified() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let hub = start();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "fleet CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        (params.signed_by(&key, &ca, &ca_key).unwrap().pem(), key.serialize_pem())
    };
    let r = hub
        .owner(Method::PUT, "/devices/ca-dev")
        .json(&json!({ "authentication": { "type": "certificateAuthority" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (cert, key) = leaf("ca-dev");

    // Not registered yet: refused.
    let (_c, mut el) = x509_client(&hub, "ca-dev", &cert, &key);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::NotAuthorized));

    let path = format!("/operator/hubs/{}/certificates/fleet", hub.name);
    let r = hub
        .operator(Method::PUT, &path)
        .json(&json!({ "properties": { "certificate": ca.pem(), "isVerified": true } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (client, mut el) = x509_client(&hub, "ca-dev", &cert, &key);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    client.publish("devices/ca-dev/messages/events/", QoS::AtLeastOnce, false, "via CA").await.unwrap();
    pubacks(&mut el, 1).await;

    // A leaf of the same CA for another name is refused: the common name must be the device ID.
    let (other_cert, other_key) = leaf("someone-else");
    let (_c, mut el) = x509_client(&hub, "ca-dev", &other_cert, &other_key);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::NotAuthorized));

    let r = hub.operator(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let (_c, mut el) = x509_client(&hub, "ca-dev", &cert, &key);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::NotAuthorized), "the CA is gone");
}

/// A device client with a Will on `will_topic`, connected; returns its CONNACK code too.
async fn connected_with_will(hub: &TestHub, id: &str, will_topic: &str) -> (AsyncClient, EventLoop, ConnectReturnCode) {
    let key = create_device(hub, id).await;
    let port = hub.server.info.mqtts.expect("MQTTS listener").port();
    let mut opts = MqttOptions::new(id, "localhost", port);
    opts.set_credentials(username(hub, id), device_token(hub, id, &key, 3600));
    opts.set_last_will(rumqttc::LastWill::new(will_topic, "gone", QoS::AtLeastOnce, false));
    let ca = std::fs::read(hub.dir.path().join("tls").join("ca.pem")).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let code = connack(&mut eventloop).await.expect("a CONNACK");
    (client, eventloop, code)
}

/// Waits until no device is connected: every session has detached (its Will, if any, was
/// stored before it detached).
async fn all_detached(hub: &TestHub) {
    tokio::time::timeout(WAIT, async {
        while connected_count(hub).await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every session detached");
}

#[tokio::test]
async fn a_will_is_stored_as_telemetry_when_the_connection_drops_without_disconnect() {
    let hub = start();
    let (client, eventloop, code) =
        connected_with_will(&hub, "lost", "devices/lost/messages/events/%24.ct=text%2Fplain").await;
    assert_eq!(code, ConnectReturnCode::Success);
    drop((client, eventloop)); // the socket closes without DISCONNECT
    let (polite, mut polite_loop, code) = connected_with_will(&hub, "polite", "devices/polite/messages/events/").await;
    assert_eq!(code, ConnectReturnCode::Success);
    polite.disconnect().await.unwrap();
    assert!(closed(&mut polite_loop).await);
    all_detached(&hub).await;

    let events = all_events(&hub).await;
    let wills: Vec<_> = events.iter().filter(|e| app_property(e, "iothub-MessageType") == Some("Will")).collect();
    assert_eq!(wills.len(), 1, "only the connection lost without DISCONNECT sends its Will");
    assert_eq!(wills[0].data.body, b"gone");
    assert_eq!(wills[0].data.properties.content_type.as_deref(), Some("text/plain"));
    let device = wills[0].data.annotations.iter().find(|(k, _)| k == "iothub-connection-device-id");
    assert_eq!(device.map(|(_, v)| v), Some(&AnnotationValue::String("lost".into())));

    // A Will on another identity's topic is a topic the device may not publish on.
    let (_c, _el, code) = connected_with_will(&hub, "sly", "devices/lost/messages/events/").await;
    assert_eq!(code, ConnectReturnCode::NotAuthorized);
}
