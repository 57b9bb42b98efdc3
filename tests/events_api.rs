//! The events log read over real HTTPS (service-api §9 through `/events/…`), and the
//! `monitor-events` command run as the built binary. Events are appended through the store of
//! the hub under test, as the telemetry path does, then read back over the wire.

mod common;

use std::time::{Duration, Instant};

use common::{TestHub, start};
use iothubd_actors::model::event::{AnnotationValue, EventData, EventPosition, MessageProperties};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A telemetry message from `device`, stamped the way the ingest path stamps one.
fn telemetry(device: &str, body: impl Into<Vec<u8>>) -> EventData {
    EventData {
        body: body.into(),
        properties: MessageProperties {
            message_id: Some(format!("msg-{device}")),
            content_type: Some("application/json".into()),
            content_encoding: Some("utf-8".into()),
            ..MessageProperties::default()
        },
        application_properties: vec![("alert".into(), Some("high".into())), ("flag".into(), None)],
        annotations: vec![
            ("iothub-connection-device-id".into(), AnnotationValue::String(device.into())),
            ("iothub-enqueuedtime".into(), AnnotationValue::Timestamp(1_654_109_018_176)),
            ("iothub-message-source".into(), AnnotationValue::String("Telemetry".into())),
        ],
    }
}

/// Appends to the hub's log and wakes its readers, as `Ingest::telemetry` does.
async fn append(hub: &TestHub, events: Vec<(u32, EventData)>) -> Vec<EventPosition> {
    let deployment = hub.server.deployment();
    let positions = deployment.store().append_events(&hub.name, events).await.expect("append");
    deployment.directory().get(&hub.name).expect("the hub is live").shared.signal_events_appended();
    positions
}

/// `GET /events/partitions/{p}?{query}` as the owner → the JSON lines.
async fn read(hub: &TestHub, partition: u32, query: &str) -> Vec<Value> {
    let r = hub.owner(Method::GET, &format!("/events/partitions/{partition}?{query}")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "read {partition}?{query}");
    assert_eq!(r.headers().get("content-type").and_then(|h| h.to_str().ok()), Some("application/x-ndjson"));
    lines(&r.text().await.unwrap())
}

fn lines(text: &str) -> Vec<Value> {
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

fn sequences(events: &[Value]) -> Vec<i64> {
    events.iter().map(|e| e["sequenceNumber"].as_i64().expect("sequenceNumber")).collect()
}

fn assert_iothub_error(r: &reqwest::Response, status: StatusCode, code: &str) {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers().get("iothub-errorcode").and_then(|h| h.to_str().ok()), Some(code));
}

#[tokio::test]
async fn partitions_listing_reports_empty_and_filled_partitions() {
    let hub = start();
    let r = hub.owner(Method::GET, "/events/partitions").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let listing: Value = r.json().await.unwrap();
    assert_eq!(listing["partitionCount"], 4);
    assert_eq!(listing["partitionIds"], json!(["0", "1", "2", "3"]));
    for p in listing["partitions"].as_array().unwrap() {
        assert_eq!(p["beginSequenceNumber"], -1);
        assert_eq!(p["lastEnqueuedSequenceNumber"], -1);
        assert_eq!(p["lastEnqueuedOffset"], "-1");
        assert!(p["lastEnqueuedTimeUtc"].as_str().unwrap().starts_with("1970-01-01T00:00:00"));
        assert_eq!(p["isEmpty"], true);
    }

    let positions = append(&hub, vec![(1, telemetry("d1", "a")), (1, telemetry("d1", "b"))]).await;
    let listing: Value = hub.owner(Method::GET, "/events/partitions/").send().await.unwrap().json().await.unwrap();
    let p1 = &listing["partitions"][1];
    assert_eq!(p1["partitionId"], "1");
    assert_eq!(p1["beginSequenceNumber"], 0);
    assert_eq!(p1["lastEnqueuedSequenceNumber"], 1);
    assert_eq!(p1["lastEnqueuedOffset"], positions[1].offset());
    assert_eq!(p1["isEmpty"], false);
    assert!(!p1["lastEnqueuedTimeUtc"].as_str().unwrap().starts_with("1970"));
    assert_eq!(listing["partitions"][0]["isEmpty"], true);
}

#[tokio::test]
async fn reads_from_start_sequence_offset_time_and_end() {
    let hub = start();
    append(&hub, (0..3).map(|i| (0, telemetry("d1", format!("{{\"n\":{i}}}")))).collect()).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let between = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    append(&hub, vec![(0, telemetry("d1", "{\"n\":3}")), (0, telemetry("d1", vec![0xff, 0x00, 0xfe]))]).await;

    let all = read(&hub, 0, "from=start").await;
    assert_eq!(sequences(&all), [0, 1, 2, 3, 4]);
    let first = &all[0];
    assert_eq!(first["partition"], "0");
    assert_eq!(first["body"], "{\"n\":0}");
    assert_eq!(first["bodyBase64"], "eyJuIjowfQ==");
    assert_eq!(
        first["properties"],
        json!({ "messageId": "msg-d1", "contentType": "application/json", "contentEncoding": "utf-8" })
    );
    assert_eq!(first["applicationProperties"], json!({ "alert": "high", "flag": null }));
    assert_eq!(first["annotations"]["iothub-connection-device-id"], "d1");
    assert_eq!(first["annotations"]["iothub-enqueuedtime"], "2022-06-01T18:43:38.1760000Z");
    assert!(first["enqueuedTimeUtc"].as_str().unwrap().ends_with('Z'));
    // A body that is not UTF-8 comes as base64 only.
    assert!(all[4].get("body").is_none());
    assert_eq!(all[4]["bodyBase64"], "/wD+");

    assert_eq!(sequences(&read(&hub, 0, "from=sequence:3").await), [3, 4]);
    let offset = all[2]["offset"].as_str().unwrap();
    assert_eq!(sequences(&read(&hub, 0, &format!("from=offset:{offset}")).await), [2, 3, 4]);
    assert_eq!(sequences(&read(&hub, 0, "from=offset:-1").await), [0, 1, 2, 3, 4]);
    let rfc3339 = between.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    assert_eq!(sequences(&read(&hub, 0, &format!("from=time:{rfc3339}")).await), [3, 4]);
    let ms = between.timestamp_millis();
    assert_eq!(sequences(&read(&hub, 0, &format!("from=time:{ms}")).await), [3, 4]);
    assert!(read(&hub, 0, "from=end").await.is_empty());
    assert_eq!(sequences(&read(&hub, 0, "from=start&max=2").await), [0, 1]);
    assert!(read(&hub, 1, "from=start").await.is_empty());

    let r = hub.owner(Method::GET, "/events/partitions/0?from=yesterday").send().await.unwrap();
    assert_iothub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let r = hub.owner(Method::GET, "/events/partitions/0?max=0").send().await.unwrap();
    assert_iothub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let r = hub.owner(Method::GET, "/events/partitions/0?wait=61").send().await.unwrap();
    assert_iothub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
}

#[tokio::test]
async fn wait_returns_an_event_appended_after_the_call_started() {
    let hub = start();
    let started = Instant::now();
    assert!(read(&hub, 2, "from=end&wait=1").await.is_empty(), "nothing to wait for");
    assert!(started.elapsed() >= Duration::from_millis(900), "the read waited before answering empty");

    let request = hub.owner(Method::GET, "/events/partitions/2?from=sequence:0&wait=30").send();
    let appender = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        append(&hub, vec![(2, telemetry("late", "hello"))]).await
    };
    let started = Instant::now();
    let (response, _) = tokio::join!(request, appender);
    let events = lines(&response.unwrap().text().await.unwrap());
    assert_eq!(sequences(&events), [0]);
    assert_eq!(events[0]["body"], "hello");
    assert!(started.elapsed() < Duration::from_secs(20), "answered on the append, not at the end of the wait");
}

#[tokio::test]
async fn checkpoint_round_trip_and_reads_start_after_it() {
    let hub = start();
    append(&hub, (0..4).map(|i| (3, telemetry("d", format!("{i}")))).collect()).await;

    let r = hub.owner(Method::GET, "/events/checkpoints/ops/3").send().await.unwrap();
    assert_iothub_error(&r, StatusCode::NOT_FOUND, "ArgumentInvalid");
    let r = hub.owner(Method::PUT, "/events/checkpoints/ops/3").json(&json!({ "sequenceNumber": 1 })).send().await;
    assert_eq!(r.unwrap().status(), StatusCode::NO_CONTENT);
    let r = hub.owner(Method::GET, "/events/checkpoints/ops/3").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "sequenceNumber": 1 }));

    assert_eq!(sequences(&read(&hub, 3, "consumerGroup=ops").await), [2, 3]);
    assert_eq!(sequences(&read(&hub, 3, "").await), [0, 1, 2, 3], "$Default has no checkpoint");
    assert_eq!(sequences(&read(&hub, 3, "consumerGroup=ops&from=start").await), [0, 1, 2, 3]);

    let r = hub.owner(Method::PUT, "/events/checkpoints/%24Default/3").json(&json!({ "sequenceNumber": 2 })).send();
    assert_eq!(r.await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(sequences(&read(&hub, 3, "consumerGroup=%24Default").await), [3]);

    let r = hub.owner(Method::PUT, "/events/checkpoints/bad%20group/3").json(&json!({ "sequenceNumber": 2 })).send();
    assert_iothub_error(&r.await.unwrap(), StatusCode::BAD_REQUEST, "ArgumentInvalid");
    let r = hub.owner(Method::PUT, "/events/checkpoints/ops/3").json(&json!({ "seq": 2 })).send().await.unwrap();
    assert_iothub_error(&r, StatusCode::BAD_REQUEST, "IotHubFormatError");
    let r = hub.owner(Method::GET, "/events/partitions/3?consumerGroup=no/slash").send().await.unwrap();
    assert_iothub_error(&r, StatusCode::BAD_REQUEST, "ArgumentInvalid");
}

#[tokio::test]
async fn unknown_partition_is_404() {
    let hub = start();
    for path in ["/events/partitions/4", "/events/partitions/x", "/events/stream?partitions=0,9"] {
        let r = hub.owner(Method::GET, path).send().await.unwrap();
        assert_iothub_error(&r, StatusCode::NOT_FOUND, "ArgumentInvalid");
        let body: Value = r.json().await.unwrap();
        assert!(body["Message"].as_str().unwrap().starts_with("ErrorCode:ArgumentInvalid;"), "{path}");
    }
    let r = hub.owner(Method::PUT, "/events/checkpoints/ops/7").json(&json!({ "sequenceNumber": 1 })).send().await;
    assert_iothub_error(&r.unwrap(), StatusCode::NOT_FOUND, "ArgumentInvalid");
}

#[tokio::test]
async fn every_events_call_needs_service_connect() {
    let hub = start();
    let token = hub.policy_token("registryRead", &hub.registry_read_key);
    for (method, path) in [
        (Method::GET, "/events/partitions"),
        (Method::GET, "/events/partitions/0"),
        (Method::GET, "/events/stream"),
        (Method::GET, "/events/checkpoints/ops/0"),
        (Method::PUT, "/events/checkpoints/ops/0"),
    ] {
        let r = hub.with_token(method, path, &token).json(&json!({ "sequenceNumber": 1 })).send().await.unwrap();
        assert_iothub_error(&r, StatusCode::UNAUTHORIZED, "IotHubUnauthorizedAccess");
    }
    let r = hub.client.get(hub.url("/events/partitions")).header("Authorization", hub.owner_token()).send();
    assert_iothub_error(&r.await.unwrap(), StatusCode::BAD_REQUEST, "ArgumentNull");
}

#[tokio::test]
async fn stream_delivers_events_appended_after_connecting() {
    let hub = start();
    append(&hub, vec![(0, telemetry("old", "before"))]).await;
    let mut response = hub.owner(Method::GET, "/events/stream?from=end&partitions=0,3").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    append(&hub, vec![(0, telemetry("a", "first")), (1, telemetry("b", "unwatched")), (3, telemetry("c", "third"))])
        .await;

    let mut seen = Vec::new();
    let mut pending = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 2 {
        let chunk = tokio::time::timeout_at(deadline, response.chunk()).await.expect("events within 20 s");
        pending.push_str(std::str::from_utf8(&chunk.unwrap().expect("the stream stays open")).unwrap());
        while let Some(end) = pending.find('\n') {
            let line: String = pending.drain(..=end).collect();
            if !line.trim().is_empty() {
                seen.push(serde_json::from_str::<Value>(&line).unwrap());
            }
        }
    }
    let mut bodies: Vec<&str> = seen.iter().map(|e| e["body"].as_str().unwrap()).collect();
    bodies.sort_unstable();
    assert_eq!(bodies, ["first", "third"]);
}

#[tokio::test]
async fn monitor_events_cli_prints_events_in_az_shape() {
    let hub = start();
    let partitions = 4;
    let own = iothubd_actors::model::event::partition_of("cli-dev", partitions);
    let other = iothubd_actors::model::event::partition_of("other-dev", partitions);
    append(&hub, vec![(own, telemetry("cli-dev", "{\"temp\":21}")), (other, telemetry("other-dev", "{\"temp\":5}"))])
        .await;

    let login = hub.server.info.owner_connection_string.clone().expect("a default hub");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_iothubd"))
        .args(["monitor-events", "--timeout", "2", "--from", "start", "--device", "cli-dev", "--properties"])
        .arg("--login")
        .arg(&login)
        .arg("--url")
        .arg(format!("https://127.0.0.1:{}", hub.server.info.https.port()))
        .arg("--ca")
        .arg(hub.dir.path().join("tls").join("ca.pem"))
        .env_remove("IOTHUB_CONNECTION_STRING")
        .output()
        .await
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stderr: {}", String::from_utf8_lossy(&output.stderr));
    let printed: Vec<Value> =
        serde_json::Deserializer::from_str(&stdout).into_iter::<Value>().collect::<Result<_, _>>().expect("JSON out");
    assert_eq!(printed.len(), 1, "only cli-dev's event: {stdout}");
    let event = &printed[0]["event"];
    assert_eq!(event["origin"], "cli-dev");
    assert_eq!(event["module"], "");
    assert_eq!(event["payload"], json!({ "temp": 21 }));
    assert_eq!(event["properties"]["application"]["alert"], "high");
    assert_eq!(event["properties"]["system"]["message-id"], "msg-cli-dev");
    assert_eq!(event["properties"]["system"]["iothub-message-source"], "Telemetry");
}
