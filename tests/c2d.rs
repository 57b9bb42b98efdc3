//! Cloud-to-device messages end to end (device-protocol §2.8, §3, §5.1; service-api §8): the
//! service REST send, purge and feedback; delivery over MQTT (rumqttc) and HTTPS (reqwest).

mod common;

use std::time::Duration;

use common::{TestHub, start, unix_now};
use iothubd::auth::sas;
use reqwest::{Method, StatusCode};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn device_key(hub: &TestHub, id: &str) -> String {
    let r = hub.owner(Method::PUT, &format!("/devices/{id}")).json(&json!({})).send().await.unwrap();
    r.json::<Value>().await.unwrap()["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned()
}

fn send(hub: &TestHub, id: &str, body: &str) -> reqwest::RequestBuilder {
    hub.owner(Method::POST, &format!("/devices/{id}/messages/deviceBound")).body(body.to_owned())
}

/// A device-authenticated request on the HTTPS device API.
fn device_request(hub: &TestHub, method: Method, id: &str, key: &str, path: &str) -> reqwest::RequestBuilder {
    let token = sas::sign(&format!("{}/devices/{id}", hub.host), key, unix_now() + 600, None).unwrap();
    let sep = if path.contains('?') { '&' } else { '?' };
    hub.client.request(method, hub.url(&format!("{path}{sep}api-version=2020-09-30"))).header("Authorization", token)
}

fn lock_of(r: &reqwest::Response) -> String {
    let etag = r.headers()["etag"].to_str().unwrap();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "ETag {etag} is quoted");
    etag.trim_matches('"').to_owned()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers().get(name).unwrap_or_else(|| panic!("{name} present")).to_str().unwrap()
}

/// Every feedback record the service can take now (completing each batch).
async fn take_feedback(hub: &TestHub) -> Vec<Value> {
    let mut all = Vec::new();
    loop {
        let r = hub.owner(Method::GET, "/messages/serviceBound/feedback").send().await.unwrap();
        if r.status() == StatusCode::NO_CONTENT {
            return all;
        }
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), "application/vnd.microsoft.iothub.feedback.json");
        let lock = lock_of(&r);
        all.extend(r.json::<Vec<Value>>().await.unwrap());
        let done = hub.owner(Method::DELETE, &format!("/messages/serviceBound/feedback/{lock}")).send().await.unwrap();
        assert_eq!(done.status(), StatusCode::NO_CONTENT);
    }
}

fn statuses(records: &[Value]) -> Vec<(&str, &str)> {
    records.iter().map(|r| (r["originalMessageId"].as_str().unwrap(), r["statusCode"].as_str().unwrap())).collect()
}

#[tokio::test]
async fn https_device_receives_completes_and_the_service_reads_feedback() {
    let hub = start();
    let key = device_key(&hub, "c1").await;
    let r = send(&hub, "c1", r#"{"on":true}"#)
        .header("iothub-messageid", "m-1")
        .header("iothub-correlationid", "corr-1")
        .header("iothub-ack", "full")
        .header("iothub-contenttype", "application/json")
        .header("iothub-app-color", "red")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let sequence: u64 = header(&r, "iothub-sequencenumber").parse().unwrap();

    let got = device_request(&hub, Method::GET, "c1", &key, "/devices/c1/messages/deviceBound").send().await.unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    let lock = lock_of(&got);
    assert_eq!(header(&got, "iothub-messageid"), "m-1");
    assert_eq!(header(&got, "iothub-correlationid"), "corr-1");
    assert_eq!(header(&got, "iothub-to"), "/devices/c1/messages/deviceBound");
    assert_eq!(header(&got, "iothub-ack"), "full");
    assert_eq!(header(&got, "iothub-deliverycount"), "0");
    assert_eq!(header(&got, "iothub-sequencenumber"), sequence.to_string());
    assert_eq!(header(&got, "iothub-app-color"), "red");
    assert_eq!(header(&got, "contenttype"), "application/json");
    assert!(chrono::DateTime::parse_from_rfc3339(header(&got, "iothub-enqueuedtime")).is_ok());
    assert_eq!(got.bytes().await.unwrap(), r#"{"on":true}"#);

    // Locked: nothing else to receive meanwhile.
    let none = device_request(&hub, Method::GET, "c1", &key, "/devices/c1/messages/deviceBound").send().await.unwrap();
    assert_eq!(none.status(), StatusCode::NO_CONTENT);

    let path = format!("/devices/c1/messages/deviceBound/{lock}");
    let done = device_request(&hub, Method::DELETE, "c1", &key, &path)
        .header("If-Match", format!("\"{lock}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), StatusCode::NO_CONTENT);
    // Completing twice: the lock is gone.
    let again = device_request(&hub, Method::DELETE, "c1", &key, &path).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(header(&again, "iothub-errorcode"), "DeviceMessageLockLost");

    let feedback = take_feedback(&hub).await;
    assert_eq!(statuses(&feedback), vec![("m-1", "Success")]);
    assert_eq!(feedback[0]["deviceId"], "c1");
    assert!(feedback[0]["deviceGenerationId"].as_str().is_some_and(|g| !g.is_empty()));
    assert!(take_feedback(&hub).await.is_empty(), "a completed batch is gone");
}

#[tokio::test]
async fn a_batch_send_enqueues_each_identity_in_order_and_refuses_messages_alone() {
    let hub = start();
    let key = device_key(&hub, "b1").await;
    device_key(&hub, "b2").await;
    let batch = json!([
        {"deviceId": "b1", "body": "first", "messageId": "m1", "ack": "full", "properties": {"Color": "red"}},
        {"deviceId": "nobody", "body": "lost"},
        {"deviceId": "b2", "bodyBase64": "AAEC", "contentType": "application/octet-stream"},
        {"deviceId": "b1", "body": "second", "messageId": "bad id with spaces"},
        {"deviceId": "b1", "body": "third", "messageId": "m3", "expiryTimeUtc": "2999-01-01T00:00:00Z"},
    ]);
    let r = hub.owner(Method::POST, "/messages/deviceBound").json(&batch).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["isSuccessful"], false);
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 5, "one result per message, in request order");
    assert!(results[0]["sequenceNumber"].is_u64());
    assert_eq!(results[1]["errorCode"], "DeviceNotFound");
    assert_eq!(results[1]["deviceId"], "nobody");
    assert!(results[2]["sequenceNumber"].is_u64());
    assert_eq!(results[3]["errorCode"], "ArgumentInvalid");
    assert!(results[4]["sequenceNumber"].as_u64() > results[0]["sequenceNumber"].as_u64());

    // b1 gets its two accepted messages in request order (tests/https_listener.rs reads the
    // property names' case on the wire; reqwest shows header names lower-cased).
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let got =
            device_request(&hub, Method::GET, "b1", &key, "/devices/b1/messages/deviceBound").send().await.unwrap();
        assert_eq!(got.status(), StatusCode::OK);
        let lock = lock_of(&got);
        if header(&got, "iothub-messageid") == "m1" {
            let names: Vec<&str> = got.headers().keys().map(|k| k.as_str()).collect();
            assert!(names.contains(&"iothub-app-color"), "{names:?}");
            assert_eq!(header(&got, "iothub-ack"), "full");
        }
        bodies.push(got.bytes().await.unwrap());
        let path = format!("/devices/b1/messages/deviceBound/{lock}");
        assert_eq!(device_request(&hub, Method::DELETE, "b1", &key, &path).send().await.unwrap().status(), 204);
    }
    assert_eq!(bodies, ["first", "third"]);

    // Not an array, an empty one, one too many: the request is refused as a whole.
    for bad in [json!({"deviceId": "b1"}), json!([]), Value::Array(vec![json!({"deviceId": "b1"}); 1001])] {
        let r = hub.owner(Method::POST, "/messages/deviceBound").json(&bad).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(header(&r, "iothub-errorcode"), "ArgumentInvalid");
    }
    // A device token cannot send.
    let token = sas::sign(&format!("{}/devices/b1", hub.host), &key, unix_now() + 600, None).unwrap();
    let r = hub
        .client
        .post(hub.url("/messages/deviceBound?api-version=2021-04-12"))
        .header("Authorization", token)
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn reject_and_abandon_follow_the_queue_rules() {
    let hub = start();
    let key = device_key(&hub, "c2").await;
    for (id, ack) in [("rejected", "negative"), ("abandoned", "positive")] {
        let r = send(&hub, "c2", id).header("iothub-messageid", id).header("iothub-ack", ack).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    let receive = || device_request(&hub, Method::GET, "c2", &key, "/devices/c2/messages/deviceBound").send();

    let first = receive().await.unwrap();
    assert_eq!(header(&first, "iothub-messageid"), "rejected");
    let lock = lock_of(&first);
    let reject =
        device_request(&hub, Method::DELETE, "c2", &key, &format!("/devices/c2/messages/deviceBound/{lock}?reject"))
            .send()
            .await
            .unwrap();
    assert_eq!(reject.status(), StatusCode::NO_CONTENT);

    let second = receive().await.unwrap();
    assert_eq!(header(&second, "iothub-messageid"), "abandoned");
    let lock = lock_of(&second);
    let path = format!("/devices/c2/messages/deviceBound/{lock}/abandon");
    let abandon = device_request(&hub, Method::POST, "c2", &key, &path).send().await.unwrap();
    assert_eq!(abandon.status(), StatusCode::NO_CONTENT);
    // Abandoned: Enqueued again, one delivery counted.
    let third = receive().await.unwrap();
    assert_eq!(header(&third, "iothub-messageid"), "abandoned");
    assert_eq!(header(&third, "iothub-deliverycount"), "1");
    let stale = device_request(&hub, Method::POST, "c2", &key, &path).send().await.unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);

    // `negative` reports the rejection; `positive` reports nothing until completed.
    assert_eq!(statuses(&take_feedback(&hub).await), vec![("rejected", "Rejected")]);
}

#[tokio::test]
async fn abandoning_max_delivery_count_times_dead_letters() {
    let hub = start();
    let key = device_key(&hub, "c3").await;
    let path = format!("/operator/hubs/{}", hub.name);
    let mut description: Value = hub.operator(Method::GET, &path).send().await.unwrap().json().await.unwrap();
    description["properties"]["cloudToDevice"]["maxDeliveryCount"] = json!(2);
    let r = hub.operator(Method::PUT, &path).json(&description).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    send(&hub, "c3", "x").header("iothub-messageid", "tired").header("iothub-ack", "full").send().await.unwrap();
    for _ in 0..2 {
        let got =
            device_request(&hub, Method::GET, "c3", &key, "/devices/c3/messages/deviceBound").send().await.unwrap();
        let path = format!("/devices/c3/messages/deviceBound/{}/abandon", lock_of(&got));
        device_request(&hub, Method::POST, "c3", &key, &path).send().await.unwrap();
    }
    let none = device_request(&hub, Method::GET, "c3", &key, "/devices/c3/messages/deviceBound").send().await.unwrap();
    assert_eq!(none.status(), StatusCode::NO_CONTENT);
    assert_eq!(statuses(&take_feedback(&hub).await), vec![("tired", "DeliveryCountExceeded")]);
}

#[tokio::test]
async fn sends_are_checked_and_the_queue_depth_is_enforced() {
    let hub = start();
    let key = device_key(&hub, "c4").await;
    let unknown = send(&hub, "nobody", "x").send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(header(&unknown, "iothub-errorcode"), "DeviceNotFound");
    let big = send(&hub, "c4", &"x".repeat(64 * 1024 + 1)).send().await.unwrap();
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let bad_ack = send(&hub, "c4", "x").header("iothub-ack", "sometimes").send().await.unwrap();
    assert_eq!(bad_ack.status(), StatusCode::BAD_REQUEST);
    let past = send(&hub, "c4", "x").header("iothub-expiry", "2001-01-01T00:00:00Z").send().await.unwrap();
    assert_eq!(past.status(), StatusCode::BAD_REQUEST);
    // A device token cannot send to devices.
    let as_device = device_request(&hub, Method::POST, "c4", &key, "/devices/c4/messages/deviceBound")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(as_device.status(), StatusCode::UNAUTHORIZED);

    for i in 0..50 {
        let r = send(&hub, "c4", &format!("m{i}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "message {i}");
    }
    let full = send(&hub, "c4", "one too many").send().await.unwrap();
    assert_eq!(full.status(), StatusCode::FORBIDDEN);
    assert_eq!(header(&full, "iothub-errorcode"), "DeviceMaximumQueueDepthExceeded");

    let purge = hub.owner(Method::DELETE, "/devices/c4/commands").send().await.unwrap();
    assert_eq!(purge.status(), StatusCode::OK);
    assert_eq!(
        purge.json::<Value>().await.unwrap(),
        json!({ "totalMessagesPurged": 50, "deviceId": "c4", "moduleId": null })
    );
    let room = send(&hub, "c4", "fits again").send().await.unwrap();
    assert_eq!(room.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn purge_and_expiry_produce_feedback() {
    let hub = start();
    let key = device_key(&hub, "c5").await;
    send(&hub, "c5", "p").header("iothub-messageid", "purged").header("iothub-ack", "negative").send().await.unwrap();
    let purge = hub.owner(Method::DELETE, "/devices/c5/commands").send().await.unwrap();
    assert_eq!(purge.json::<Value>().await.unwrap()["totalMessagesPurged"], 1);
    assert_eq!(statuses(&take_feedback(&hub).await), vec![("purged", "Purged")]);

    let soon = (chrono::Utc::now() + chrono::Duration::milliseconds(300)).to_rfc3339();
    let r = send(&hub, "c5", "e")
        .header("iothub-messageid", "expired")
        .header("iothub-ack", "full")
        .header("iothub-expiry", soon)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // The actor's expiry timer dead-letters it without anyone asking.
    let feedback = tokio::time::timeout(WAIT, async {
        loop {
            let records = take_feedback(&hub).await;
            if !records.is_empty() {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("expiry feedback in time");
    assert_eq!(statuses(&feedback), vec![("expired", "Expired")]);
    let none = device_request(&hub, Method::GET, "c5", &key, "/devices/c5/messages/deviceBound").send().await.unwrap();
    assert_eq!(none.status(), StatusCode::NO_CONTENT);
}

async fn connect(hub: &TestHub, id: &str, key: &str, clean: bool, manual_acks: bool) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "localhost", hub.server.info.mqtts.unwrap().port());
    let token = sas::sign(&format!("{}/devices/{id}", hub.host), key, unix_now() + 600, None).unwrap();
    opts.set_credentials(format!("{}/{id}/?api-version=2021-04-12", hub.host), token);
    opts.set_clean_session(clean);
    opts.set_manual_acks(manual_acks);
    let ca = std::fs::read(hub.dir.path().join("tls").join("ca.pem")).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    tokio::time::timeout(WAIT, async {
        while !matches!(eventloop.poll().await.unwrap(), Event::Incoming(Packet::ConnAck(_))) {}
    })
    .await
    .unwrap();
    (client, eventloop)
}

/// The next `n` C2D deliveries (other packets are skipped).
async fn deliveries(eventloop: &mut EventLoop, n: usize) -> Vec<Publish> {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        while got.len() < n {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await.unwrap()
                && p.topic.starts_with("devices/")
            {
                got.push(p);
            }
        }
    })
    .await
    .expect("deliveries in time");
    got
}

#[tokio::test]
async fn mqtt_delivers_in_order_with_the_bag_and_puback_completes() {
    let hub = start();
    let key = device_key(&hub, "m1").await;
    // Sent while the device is offline: it waits in the queue.
    for i in 0..3 {
        let r = send(&hub, "m1", &format!("body-{i}"))
            .header("iothub-messageid", format!("id-{i}"))
            .header("iothub-ack", "full")
            .header("iothub-contenttype", "application/json")
            .header("iothub-app-color", "r&b")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    let (client, mut el) = connect(&hub, "m1", &key, true, false).await;
    client.subscribe("devices/m1/messages/devicebound/#", QoS::AtLeastOnce).await.unwrap();
    let got = deliveries(&mut el, 3).await;
    for (i, p) in got.iter().enumerate() {
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(p.payload, format!("body-{i}"));
        assert_eq!(
            p.topic,
            format!(
                "devices/m1/messages/devicebound/%24.mid=id-{i}&%24.to=%2Fdevices%2Fm1%2Fmessages%2FdeviceBound\
                 &%24.ct=application%2Fjson&iothub-ack=full&color=r%26b"
            )
        );
    }
    // rumqttc acknowledged each: the hub completes them and reports `Success`.
    let feedback = tokio::time::timeout(WAIT, async {
        let mut records = Vec::new();
        while records.len() < 3 {
            records.extend(take_feedback(&hub).await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        records
    })
    .await
    .expect("completion feedback");
    let mut ids: Vec<_> = statuses(&feedback);
    ids.sort();
    assert_eq!(ids, vec![("id-0", "Success"), ("id-1", "Success"), ("id-2", "Success")]);
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn an_unacknowledged_delivery_comes_again_with_dup_after_reconnect() {
    let hub = start();
    let key = device_key(&hub, "m2").await;
    let (client, mut el) = connect(&hub, "m2", &key, false, true).await;
    client.subscribe("devices/m2/messages/devicebound/#", QoS::AtLeastOnce).await.unwrap();
    send(&hub, "m2", "again")
        .header("iothub-messageid", "again")
        .header("iothub-ack", "positive")
        .send()
        .await
        .unwrap();
    let first = deliveries(&mut el, 1).await.remove(0);
    assert!(!first.dup);
    // Gone without a PUBACK.
    drop(client);
    drop(el);

    // A persistent session keeps its subscription: the message flows right after CONNACK.
    let (client, mut el) = connect(&hub, "m2", &key, false, true).await;
    let second = deliveries(&mut el, 1).await.remove(0);
    assert!(second.dup, "a redelivery carries DUP=1");
    assert_eq!(second.payload, "again");
    client.ack(&second).await.unwrap();
    // The PUBACK completes it: `Success` feedback (the event loop keeps running meanwhile).
    let feedback = async {
        loop {
            let records = take_feedback(&hub).await;
            if !records.is_empty() {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let records = tokio::time::timeout(WAIT, async {
        tokio::select! {
            records = feedback => records,
            _ = async { loop { let _ = el.poll().await; } } => unreachable!(),
        }
    })
    .await
    .expect("feedback in time");
    assert_eq!(statuses(&records), vec![("again", "Success")]);
}

#[tokio::test]
async fn a_qos0_subscription_gets_at_most_once_delivery_settled_on_send() {
    let hub = start();
    let key = device_key(&hub, "m3").await;
    let (client, mut el) = connect(&hub, "m3", &key, true, true).await;
    client.subscribe("devices/m3/messages/devicebound/#", QoS::AtMostOnce).await.unwrap();
    send(&hub, "m3", "once").header("iothub-messageid", "once").header("iothub-ack", "positive").send().await.unwrap();
    let got = deliveries(&mut el, 1).await.remove(0);
    assert_eq!(got.qos, QoS::AtMostOnce);
    assert_eq!(got.payload, "once");
    // No PUBACK exists at QoS 0: the hub completed it when it sent it.
    let feedback = tokio::time::timeout(WAIT, async {
        loop {
            let records = take_feedback(&hub).await;
            if !records.is_empty() {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("feedback in time");
    assert_eq!(statuses(&feedback), vec![("once", "Success")]);
}
