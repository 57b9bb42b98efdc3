//! Hot-path micro-benchmarks besides the MQTT codec (`mqtt_codec`) and the log append
//! (`store`): verifying a device's SAS token (every CONNECT and HTTPS device call) and merging
//! twin patches (every reported update and desired change).
//!
//! `cargo bench --bench hot_paths -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use chrono::Utc;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use iothubd::auth::sas::{SasToken, sign};
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

criterion_group!(benches, sas, twin);
criterion_main!(benches);
