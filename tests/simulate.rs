//! `iothubd simulate` run as a library against a real hub started in-process (plain MQTT port,
//! provisioning and the service load over HTTPS), and in raw mode against a tiny routing MQTT
//! broker in the test: what the report counts is what arrived.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use common::{TestHub, start, start_with_plain_mqtt};
use iothubd::simulate::scenario::Seconds;
use iothubd::simulate::{Report, Scenario, ScenarioOptions};
use reqwest::Method;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::SubscribeReasonCode;
use rumqttc::mqttbytes::v4::{self, ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, Publish, SubAck};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A scenario against `hub`'s plain MQTT port, provisioning through its HTTPS endpoint.
fn hub_scenario(hub: &TestHub, mqtt_port: u16, report_dir: &std::path::Path) -> ScenarioOptions {
    ScenarioOptions {
        mqtt: Some(format!("127.0.0.1:{mqtt_port}")),
        plain: Some(true),
        connection_string: Some(format!(
            "HostName={};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
            hub.host, hub.owner_key
        )),
        https: Some(hub.server.info.https.to_string()),
        ca: Some(hub.dir.path().join("tls").join("ca.pem")),
        report_dir: Some(report_dir.to_path_buf()),
        quiet: Some(true),
        connect_rate: Some(1000.0),
        ..Default::default()
    }
}

/// Every event of the hub's log, read over HTTPS (`GET /events/partitions/{p}`), page by page.
async fn all_events(hub: &TestHub) -> Vec<Value> {
    let listing: Value = hub.owner(Method::GET, "/events/partitions").send().await.unwrap().json().await.unwrap();
    let partitions = listing["partitionCount"].as_u64().expect("partitionCount");
    let mut events = Vec::new();
    for p in 0..partitions {
        let mut next = 0;
        loop {
            let r = hub.owner(Method::GET, &format!("/events/partitions/{p}?from=sequence:{next}&max=256")).send();
            let text = r.await.unwrap().text().await.unwrap();
            let page: Vec<Value> =
                text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
            let Some(last) = page.last() else { break };
            next = last["sequenceNumber"].as_i64().expect("sequenceNumber") + 1;
            events.extend(page);
        }
    }
    events
}

fn read_report(dir: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json written");
    serde_json::from_str(&text).expect("report.json is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_telemetry_lands_in_the_events_log_and_the_report_counts_it() {
    let mqtt_port = free_port();
    let hub = start_with_plain_mqtt(mqtt_port);
    let reports = tempfile::tempdir().expect("temp dir");
    let options = ScenarioOptions {
        devices: Some(50),
        device_prefix: Some("simtest-".into()),
        rate: Some(2.0),
        twin_rate: Some(1.0),
        duration: Some(Seconds(2.5)),
        properties: Some("$.ct=application/json,scenario=test".into()),
        ..hub_scenario(&hub, mqtt_port, reports.path())
    };
    let scenario = Scenario::resolve(options).expect("valid scenario");

    // While the devices run, the service invokes a direct method on one and sends a C2D
    // message to another: the simulated devices answer the one and complete the other.
    let service = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let c2d = hub.owner(Method::POST, "/devices/simtest-3/messages/deviceBound").body("{\"on\":true}").send();
        assert_eq!(c2d.await.unwrap().status(), 204, "C2D message queued");
        let body = json!({ "methodName": "reboot", "responseTimeoutInSeconds": 10, "payload": {} });
        let r = hub.owner(Method::POST, "/twins/simtest-7/methods").json(&body).send().await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
    };
    let (report, (method_status, method_reply)) = tokio::join!(iothubd::simulate::run(scenario), service);
    let report: Report = report.expect("the run completes");
    report.write(reports.path()).expect("reports written");

    assert_eq!(method_status, 200, "{method_reply}");
    assert_eq!(method_reply["status"], 200);
    assert_eq!(method_reply["payload"]["device"], "simtest-7");
    assert_eq!(report.counts.totals.c2d_received, 1);
    let purge: Value =
        hub.owner(Method::DELETE, "/devices/simtest-3/commands").send().await.unwrap().json().await.unwrap();
    assert_eq!(purge["totalMessagesPurged"], 0, "the PUBACK completed the C2D message");

    let counts = &report.counts.totals;
    assert_eq!(counts.connects, 50, "every device connected once: {:?}", report.error_samples);
    assert_eq!(counts.errors, 0, "{:?}", report.error_samples);
    assert!(counts.telemetry_sent >= 50, "each device sent at least once: {}", counts.telemetry_sent);
    assert_eq!(counts.telemetry_acked, counts.telemetry_sent, "the drain waited for every PUBACK");
    assert!(counts.twin_sent > 0 && counts.twin_acked == counts.twin_sent);
    assert_eq!(counts.methods_answered, 1);
    assert_eq!(report.latency.ack.as_ref().map(|a| a.count), Some(counts.telemetry_acked));

    let events = all_events(&hub).await;
    let telemetry: Vec<&Value> = events
        .iter()
        .filter(|e| e["annotations"]["iothub-message-source"] == "Telemetry")
        .filter(|e| e["annotations"]["iothub-connection-device-id"].as_str().is_some_and(|d| d.starts_with("simtest-")))
        .collect();
    assert_eq!(telemetry.len() as u64, counts.telemetry_acked, "acknowledged means in the log");
    let devices: BTreeSet<&str> =
        telemetry.iter().filter_map(|e| e["annotations"]["iothub-connection-device-id"].as_str()).collect();
    assert_eq!(devices.len(), 50);
    let first = telemetry[0];
    assert_eq!(first["applicationProperties"]["scenario"], "test");
    assert_eq!(first["properties"]["contentType"], "application/json");
    let body: Value = serde_json::from_str(first["body"].as_str().expect("a UTF-8 body")).expect("a JSON body");
    assert_eq!(body["device"], first["annotations"]["iothub-connection-device-id"]);
    assert_eq!(first["body"].as_str().map(str::len), Some(256));

    let json = read_report(reports.path());
    assert_eq!(json["counts"]["telemetry_acked"], counts.telemetry_acked);
    assert_eq!(json["counts"]["connects"], 50);
    assert_eq!(json["scenario"]["mode"], "azure");
    assert!(json["timeline"].as_array().is_some_and(|t| !t.is_empty()));
    let html = std::fs::read_to_string(reports.path().join("report.html")).expect("report.html written");
    assert!(html.contains("<svg") && !html.contains("<script"), "self-contained plots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_devices_post_telemetry_and_poll_c2d() {
    let hub = start();
    let reports = tempfile::tempdir().expect("temp dir");
    let options = ScenarioOptions {
        transport: Some("https".into()),
        mqtt: None,
        plain: None,
        devices: Some(20),
        device_prefix: Some("httpsim-".into()),
        rate: Some(2.0),
        duration: Some(Seconds(2.5)),
        properties: Some("$.ct=application/json,scenario=https".into()),
        ..hub_scenario(&hub, 0, reports.path())
    };
    let scenario = Scenario::resolve(options).expect("valid scenario");

    // Once the device exists (provisioned by the run), the service sends it a C2D message;
    // the device's poll receives and completes it.
    let service = async {
        for _ in 0..100 {
            let c2d = hub.owner(Method::POST, "/devices/httpsim-3/messages/deviceBound").body("{\"on\":true}").send();
            if c2d.await.unwrap().status() == 204 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    let (report, sent) = tokio::join!(iothubd::simulate::run(scenario), service);
    let report: Report = report.expect("the run completes");
    report.write(reports.path()).expect("reports written");
    assert!(sent, "the C2D message was queued");

    let counts = &report.counts.totals;
    assert_eq!(counts.errors, 0, "{:?}", report.error_samples);
    assert_eq!(counts.connects, 20, "every device was answered");
    assert!(counts.telemetry_sent >= 20, "each device sent at least once: {}", counts.telemetry_sent);
    assert_eq!(counts.telemetry_acked, counts.telemetry_sent, "the drain waited for every 204");
    assert_eq!(report.latency.ack.as_ref().map(|a| a.count), Some(counts.telemetry_acked));
    assert_eq!(counts.c2d_received, 1);
    let purge: Value =
        hub.owner(Method::DELETE, "/devices/httpsim-3/commands").send().await.unwrap().json().await.unwrap();
    assert_eq!(purge["totalMessagesPurged"], 0, "the DELETE completed the C2D message");

    let events = all_events(&hub).await;
    let telemetry: Vec<&Value> = events
        .iter()
        .filter(|e| e["annotations"]["iothub-message-source"] == "Telemetry")
        .filter(|e| e["annotations"]["iothub-connection-device-id"].as_str().is_some_and(|d| d.starts_with("httpsim-")))
        .collect();
    assert_eq!(telemetry.len() as u64, counts.telemetry_acked, "acknowledged means in the log");
    let devices: BTreeSet<&str> =
        telemetry.iter().filter_map(|e| e["annotations"]["iothub-connection-device-id"].as_str()).collect();
    assert_eq!(devices.len(), 20);
    let first = telemetry[0];
    assert_eq!(first["applicationProperties"]["scenario"], "https");
    assert_eq!(first["properties"]["contentType"], "application/json");
    let device = first["annotations"]["iothub-connection-device-id"].as_str().unwrap_or("");
    assert!(first["properties"]["messageId"].as_str().is_some_and(|m| m.starts_with(&format!("{device}-"))));
    assert_eq!(first["body"].as_str().map(str::len), Some(256));

    let json = read_report(reports.path());
    assert_eq!(json["scenario"]["transport"], "https");
    assert_eq!(json["counts"]["telemetry_acked"], counts.telemetry_acked);
    assert_eq!(json["target"], hub.server.info.https.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_unknown_to_the_hub_are_refused_and_the_report_says_so() {
    let mqtt_port = free_port();
    let hub = start_with_plain_mqtt(mqtt_port);
    let reports = tempfile::tempdir().expect("temp dir");
    let options = ScenarioOptions {
        devices: Some(5),
        device_prefix: Some("never-provisioned-".into()),
        skip_provision: Some(true),
        duration: Some(Seconds(1.5)),
        ..hub_scenario(&hub, mqtt_port, reports.path())
    };
    let report = iothubd::simulate::run(Scenario::resolve(options).expect("valid")).await.expect("the run completes");
    assert_eq!(report.counts.totals.connects, 0);
    assert!(report.connack_refused.get("5").is_some_and(|n| *n >= 5), "{:?}", report.connack_refused);
    assert_eq!(report.errors.get("connack_refused"), report.connack_refused.get("5"));
}

/// What the test broker saw: PUBLISHes per topic.
type Received = Arc<Mutex<BTreeMap<String, u64>>>;
/// The broker's subscriptions: filter, granted QoS, the subscriber's outgoing queue.
type Routes = Arc<Mutex<Vec<(String, QoS, mpsc::UnboundedSender<Publish>)>>>;

/// MQTT topic matching with `+` and `#` (MQTT 3.1.1 §4.7).
fn matches(filter: &str, topic: &str) -> bool {
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) | (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// A minimal MQTT 3.1.1 broker for raw mode: CONNACK every CONNECT, PUBACK every QoS 1
/// PUBLISH (counting it by topic) and route it to the matching subscriptions (at the lower
/// QoS), SUBACK every SUBSCRIBE, answer PINGREQ, close on DISCONNECT.
async fn tiny_broker() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let received = Received::default();
    let routes = Routes::default();
    let seen = received.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (seen, routes) = (seen.clone(), routes.clone());
            tokio::spawn(async move {
                let (to_me, mut deliveries) = mpsc::unbounded_channel::<Publish>();
                let mut buf = BytesMut::with_capacity(4096);
                let mut out = BytesMut::new();
                let mut last_pkid = 0u16;
                loop {
                    loop {
                        match v4::read(&mut buf, 1 << 20) {
                            Ok(Packet::Connect(_)) => {
                                ConnAck::new(ConnectReturnCode::Success, false).write(&mut out).expect("CONNACK");
                            }
                            Ok(Packet::Publish(p)) => {
                                *seen.lock().unwrap().entry(p.topic.clone()).or_default() += 1;
                                if p.pkid != 0 {
                                    PubAck::new(p.pkid).write(&mut out).expect("PUBACK");
                                }
                                for (filter, qos, subscriber) in routes.lock().unwrap().iter() {
                                    if matches(filter, &p.topic) {
                                        let qos = if *qos == QoS::AtMostOnce { QoS::AtMostOnce } else { p.qos };
                                        let _ = subscriber.send(Publish::new(p.topic.clone(), qos, p.payload.to_vec()));
                                    }
                                }
                            }
                            Ok(Packet::Subscribe(s)) => {
                                let mut codes = Vec::new();
                                for f in s.filters {
                                    codes.push(SubscribeReasonCode::Success(f.qos));
                                    routes.lock().unwrap().push((f.path, f.qos, to_me.clone()));
                                }
                                SubAck::new(s.pkid, codes).write(&mut out).expect("SUBACK");
                            }
                            Ok(Packet::PingReq) => {
                                PingResp.write(&mut out).expect("PINGRESP");
                            }
                            Ok(Packet::Disconnect) => return,
                            Ok(_) => {}
                            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                            Err(_) => return,
                        }
                    }
                    if !out.is_empty() && socket.write_all(&out.split()).await.is_err() {
                        return;
                    }
                    tokio::select! {
                        n = socket.read_buf(&mut buf) => if n.unwrap_or(0) == 0 { return },
                        Some(mut p) = deliveries.recv() => {
                            if p.qos != QoS::AtMostOnce {
                                last_pkid = last_pkid.checked_add(1).unwrap_or(1);
                                p.pkid = last_pkid;
                            }
                            p.write(&mut out).expect("PUBLISH");
                        }
                    }
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_mode_publishes_plain_mqtt_to_any_broker() {
    let (broker, received) = tiny_broker().await;
    let reports = tempfile::tempdir().expect("temp dir");
    let options = ScenarioOptions {
        raw: Some(true),
        mqtt: Some(broker.to_string()),
        devices: Some(20),
        rate: Some(4.0),
        duration: Some(Seconds(1.5)),
        report_dir: Some(reports.path().to_path_buf()),
        quiet: Some(true),
        ..Default::default()
    };
    let report = iothubd::simulate::run(Scenario::resolve(options).expect("valid")).await.expect("the run completes");
    assert_eq!(report.counts.totals.connects, 20);
    assert_eq!(report.counts.totals.errors, 0, "{:?}", report.error_samples);
    assert_eq!(report.counts.totals.telemetry_acked, report.counts.totals.telemetry_sent);
    let received = received.lock().unwrap().clone();
    assert_eq!(received.values().sum::<u64>(), report.counts.totals.telemetry_sent);
    assert_eq!(received.len(), 20, "one topic per device: {:?}", received.keys());
    assert!(received.keys().all(|t| t.starts_with("sim/") && t.ends_with("/events")));
    assert_eq!(report.scenario["mode"], "raw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_load_calls_methods_and_sends_c2d_through_the_hub_rest_api() {
    let mqtt_port = free_port();
    let hub = start_with_plain_mqtt(mqtt_port);
    let reports = tempfile::tempdir().expect("temp dir");
    let options = ScenarioOptions {
        devices: Some(10),
        device_prefix: Some("svc-".into()),
        rate: Some(0.0),
        method_rate: Some(20.0),
        c2d_in_flight: Some(4),
        duration: Some(Seconds(3.0)),
        ..hub_scenario(&hub, mqtt_port, reports.path())
    };
    let report = iothubd::simulate::run(Scenario::resolve(options).expect("valid")).await.expect("the run completes");
    report.write(reports.path()).expect("reports written");

    let c = &report.counts.totals;
    assert_eq!(c.errors, 0, "{:?}", report.error_samples);
    assert!(c.methods_called >= 10, "about 20 calls a second once all were connected: {}", c.methods_called);
    assert_eq!(c.methods_succeeded, c.methods_called, "every call answered 200 through the hub");
    assert_eq!(c.methods_answered, c.methods_called, "the devices saw every call");
    assert!(c.c2d_sent >= 10, "four sends in flight for seconds: {}", c.c2d_sent);
    assert_eq!(c.c2d_accepted, c.c2d_sent, "every send answered 204");
    assert_eq!(c.c2d_delivered, c.c2d_accepted, "the drain waited for every accepted message");
    assert_eq!(c.c2d_received, c.c2d_delivered, "only this run's messages");
    assert_eq!(report.latency.method.as_ref().map(|l| l.count), Some(c.methods_succeeded));
    assert_eq!(report.latency.c2d.as_ref().map(|l| l.count), Some(c.c2d_delivered));
    let ops = &report.operations;
    assert!(ops.service_started_at_s.is_some());
    assert_eq!(ops.methods.as_ref().map(|m| m.done), Some(c.methods_succeeded));
    assert_eq!(ops.c2d.as_ref().map(|m| m.done), Some(c.c2d_delivered));
    for i in 0..10 {
        let purge = hub.owner(Method::DELETE, &format!("/devices/svc-{i}/commands")).send().await.unwrap();
        let purge: Value = purge.json().await.unwrap();
        assert_eq!(purge["totalMessagesPurged"], 0, "svc-{i}: every message completed by its PUBACK");
    }

    let json = read_report(reports.path());
    assert_eq!(json["connect_storm"]["devices"], 10);
    assert!(json["connect_storm"]["per_s"].as_f64().is_some_and(|r| r > 0.0));
    assert_eq!(json["scenario"]["service"]["c2d"]["in_flight"], 4);
    assert_eq!(json["counts"]["c2d_delivered"], c.c2d_delivered);
    assert!(json["latency"]["method"]["p99_ms"].is_number());
    let html = std::fs::read_to_string(reports.path().join("report.html")).expect("report.html written");
    assert!(html.contains("C2D send → receive") && html.contains("Device and service operations"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_c2d_sends_go_through_the_hub_batch_send_and_every_message_arrives() {
    let mqtt_port = free_port();
    let hub = start_with_plain_mqtt(mqtt_port);
    let reports = tempfile::tempdir().expect("temp dir");
    let options = ScenarioOptions {
        devices: Some(12),
        device_prefix: Some("bat-".into()),
        rate: Some(0.0),
        subscribe: Some("c2d".into()),
        c2d_in_flight: Some(24),
        c2d_batch: Some(6),
        duration: Some(Seconds(2.0)),
        ..hub_scenario(&hub, mqtt_port, reports.path())
    };
    let report = iothubd::simulate::run(Scenario::resolve(options).expect("valid")).await.expect("the run completes");
    let c = &report.counts.totals;
    assert_eq!(c.errors, 0, "{:?}", report.error_samples);
    assert!(c.c2d_sent >= 24, "24 messages in flight, 6 a request: {}", c.c2d_sent);
    assert_eq!(c.c2d_sent % 6, 0, "whole batches of 6 (the window is a multiple of the batch)");
    assert_eq!(c.c2d_accepted, c.c2d_sent, "every batch answered 200 with every message durable");
    assert_eq!(c.c2d_delivered, c.c2d_accepted, "every accepted message delivered");
    assert_eq!(report.scenario["service"]["c2d_batch"], 6);
    let refused = ScenarioOptions { c2d_batch: Some(1001), ..ScenarioOptions::default() };
    assert!(Scenario::resolve(refused).is_err_and(|e| e.to_string().contains("--c2d-batch")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twin_storm_keeps_reported_patches_in_flight_and_the_hub_answers_each() {
    let mqtt_port = free_port();
    let hub = start_with_plain_mqtt(mqtt_port);
    let reports = tempfile::tempdir().expect("temp dir");
    let options = ScenarioOptions {
        devices: Some(10),
        device_prefix: Some("storm-".into()),
        rate: Some(0.0),
        twin_in_flight: Some(1),
        subscribe: Some("none".into()),
        duration: Some(Seconds(2.0)),
        ..hub_scenario(&hub, mqtt_port, reports.path())
    };
    let report = iothubd::simulate::run(Scenario::resolve(options).expect("valid")).await.expect("the run completes");

    let c = &report.counts.totals;
    assert_eq!(c.errors, 0, "{:?}", report.error_samples);
    assert!(c.twin_sent > 10, "each device sends again as its PATCH is answered: {}", c.twin_sent);
    assert_eq!(c.twin_acked, c.twin_sent, "every PATCH answered 204");
    assert_eq!(report.latency.twin.as_ref().map(|l| l.count), Some(c.twin_acked));
    assert_eq!(report.operations.twin.as_ref().map(|t| t.done), Some(c.twin_acked));
    let twin: Value = hub.owner(Method::GET, "/twins/storm-3").send().await.unwrap().json().await.unwrap();
    let rid = twin["properties"]["reported"]["simulator"]["rid"].as_u64();
    assert!(rid.is_some_and(|r| r >= 1), "the hub stored the device's last report: {twin}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_service_load_routes_methods_c2d_and_twin_requests_through_the_broker() {
    let (broker, received) = tiny_broker().await;
    let reports = tempfile::tempdir().expect("temp dir");
    let options = ScenarioOptions {
        raw: Some(true),
        mqtt: Some(broker.to_string()),
        devices: Some(10),
        rate: Some(0.0),
        method_rate: Some(20.0),
        c2d_rate: Some(20.0),
        twin_in_flight: Some(1),
        duration: Some(Seconds(2.5)),
        report_dir: Some(reports.path().to_path_buf()),
        quiet: Some(true),
        ..Default::default()
    };
    let report = iothubd::simulate::run(Scenario::resolve(options).expect("valid")).await.expect("the run completes");

    let c = &report.counts.totals;
    assert_eq!(c.errors, 0, "{:?}", report.error_samples);
    assert!(c.methods_called >= 10 && c.c2d_sent >= 10, "{} calls, {} sends", c.methods_called, c.c2d_sent);
    assert_eq!((c.methods_succeeded, c.methods_answered), (c.methods_called, c.methods_called));
    assert_eq!((c.c2d_accepted, c.c2d_delivered), (c.c2d_sent, c.c2d_sent), "PUBACKed, then received");
    assert!(c.twin_sent > 10);
    assert_eq!(c.twin_acked, c.twin_sent, "the responder answered every twin request");
    assert_eq!(report.latency.method.as_ref().map(|l| l.count), Some(c.methods_called));
    assert_eq!(report.latency.c2d.as_ref().map(|l| l.count), Some(c.c2d_delivered));

    let received = received.lock().unwrap().clone();
    let count = |kind: &str| -> u64 {
        received
            .iter()
            .filter(|(t, _)| t.split('/').skip(2).collect::<Vec<_>>().join("/").starts_with(kind))
            .map(|(_, n)| n)
            .sum()
    };
    assert_eq!(count("methods/req/"), c.methods_called);
    assert_eq!(count("methods/res/"), c.methods_called);
    assert_eq!(count("c2d"), c.c2d_sent);
    assert_eq!(count("twin/req/"), c.twin_sent);
    assert_eq!(count("twin/res/"), c.twin_acked);
    for i in 0..10 {
        for kind in ["methods/req/", "c2d", "twin/req/"] {
            let topic = format!("sim/{i}/{kind}");
            assert!(
                received.keys().any(|t| t.starts_with(&topic)),
                "device {i} had {kind}: round-robin over the fleet"
            );
        }
    }
}
