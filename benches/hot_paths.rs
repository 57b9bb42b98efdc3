//! Hot-path micro-benchmarks besides the MQTT codec (`mqtt_codec`) and the log append
//! (`store`): verifying a device's SAS token (every CONNECT and HTTPS device call), merging
//! twin patches (every reported update and desired change), and the HTTPS listener's look for
//! marked header names in every byte it writes (`http::header_case`).
//!
//! `cargo bench --bench hot_paths -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use actix_web::web::BytesMut;
use chrono::Utc;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use iothubd::auth::sas::{SasToken, sign};
use iothubd::http::header_case::{Restorer, mark};
use iothubd_actors::model::twin::Twin;
use serde_json::{Map, Value, json};

const KEY: &str = "YmVuY2htYXJrLWRldmljZS1rZXktMzItYnl0ZXMtISE=";

fn sas(c: &mut Criterion) {
    let token = sign("myhub.azure-devices.net/devices/thermostat-0042", KEY, 4_000_000_000, None).expect("token");
    assert!(SasToken::parse(&token).is_ok_and(|t| t.verify(KEY)));
    c.bench_function("sas_parse_verify", |b| {
        b.iter(|| SasToken::parse(black_box(&token)).map(|t| t.verify(black_box(KEY))))
    });
}

fn object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn twin(c: &mut Criterion) {
    // A twin with some history: 20 reported and 10 desired properties, nested one level.
    let mut base = Twin::new(Utc::now());
    let reported: Map<String, Value> =
        (0..20).map(|i| (format!("sensor{i}"), json!({ "value": i, "unit": "C", "ok": true }))).collect();
    base.report(reported, Utc::now()).expect("report");
    let desired = object(json!({ "setpoint": 21.5, "mode": "eco", "schedule": { "on": "07:00", "off": "22:00" } }));
    base.patch(None, Some(desired), Utc::now()).expect("desired");

    let report = object(json!({ "sensor3": { "value": 42 }, "firmware": "1.2.3", "sensor19": null }));
    c.bench_function("twin_report_merge", |b| {
        b.iter_batched(|| base.clone(), |mut t| t.report(black_box(report.clone()), Utc::now()), BatchSize::SmallInput)
    });
    let patch = object(json!({ "setpoint": 22.0, "schedule": { "off": "23:00" } }));
    c.bench_function("twin_desired_patch", |b| {
        b.iter_batched(
            || base.clone(),
            |mut t| t.patch(None, Some(black_box(patch.clone())), Utc::now()),
            BatchSize::SmallInput,
        )
    });
}

fn header_case(c: &mut Criterion) {
    let mut group = c.benchmark_group("header_case");
    // Most writes hold no marked name: a response body or an events-stream chunk.
    let body: Vec<u8> = br#"{"deviceId":"thermostat-0042","temperature":21.5,"humidity":40}"#.repeat(256);
    let restorer = Restorer::default();
    assert!(restorer.passes_through(&body));
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("pass_through_16k", |b| b.iter(|| restorer.passes_through(black_box(&body))));
    // A C2D receive's head: three marked names among a dozen headers.
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: 11\r\netag: \"0b4e9a52-6f1d-4c1e-9d0a-3e2f5b7c8d90\"\r\n\
         iothub-messageid: m-1\r\n{}: application/json\r\n{}: utf-8\r\niothub-to: /devices/d/messages/deviceBound\r\n\
         iothub-ack: full\r\niothub-sequencenumber: 1712345678901234\r\n\
         iothub-enqueuedtime: 2026-01-01T00:00:00.000Z\r\niothub-deliverycount: 0\r\n\
         iothub-expiry: 2026-01-03T00:00:00.000Z\r\n{}: red\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n",
        mark("ContentType").expect("name"),
        mark("ContentEncoding").expect("name"),
        mark("iothub-app-Color").expect("name"),
    );
    let mut out = BytesMut::with_capacity(head.len());
    group.throughput(Throughput::Bytes(head.len() as u64));
    group.bench_function("restore_c2d_head", |b| {
        b.iter(|| {
            out.clear();
            let mut restorer = Restorer::default();
            restorer.restore(black_box(head.as_bytes()), &mut out);
        })
    });
    group.finish();
}

criterion_group!(benches, sas, twin, header_case);
criterion_main!(benches);
