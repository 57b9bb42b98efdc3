//! MQTT codec cost per message: classifying a typical SDK telemetry topic and reading its
//! property bag (the path every telemetry PUBLISH takes), and writing a C2D topic with its bag.
//!
//! `cargo bench --bench mqtt_codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use iothubd::mqtt::bag::{PropertyBag, SystemProperties};
use iothubd::mqtt::topic::{DeviceTopic, c2d};
use iothubd_actors::model::identity::IdentityKey;

/// What the Python SDK publishes for a message with an ID, JSON content and two properties.
const PYTHON_TELEMETRY: &str = "devices/thermostat-0042/messages/events/\
    %24.mid=5d2a9f3e-7c41-4b8e-9a61-0f3c2b1d8e77&%24.ct=application%2Fjson&%24.ce=utf-8\
    &alert=high&with%20space=a%20b%26c%3Dd%2Fe";

/// The same message from an SDK that leaves unreserved text unencoded (nothing to decode).
const PLAIN_TELEMETRY: &str = "devices/thermostat-0042/messages/events/\
    %24.mid=5d2a9f3e-7c41-4b8e-9a61-0f3c2b1d8e77&%24.ce=utf-8&alert=high&zone=north";

fn telemetry(c: &mut Criterion) {
    let identity = IdentityKey::device("thermostat-0042");
    for (name, topic) in [("telemetry_parse/python", PYTHON_TELEMETRY), ("telemetry_parse/plain", PLAIN_TELEMETRY)] {
        assert!(matches!(DeviceTopic::parse(topic, &identity), Ok(DeviceTopic::Telemetry { .. })));
        c.bench_function(name, |b| b.iter(|| DeviceTopic::parse(black_box(topic), black_box(&identity))));
    }
}

fn c2d_encode(c: &mut Criterion) {
    let bag = PropertyBag {
        system: SystemProperties {
            message_id: Some("5d2a9f3e-7c41-4b8e-9a61-0f3c2b1d8e77".into()),
            to: Some("/devices/thermostat-0042/messages/deviceBound".into()),
            content_type: Some("application/json".into()),
            ack: Some("full".into()),
            ..Default::default()
        },
        application: vec![("color".into(), Some("red".into())), ("note".into(), Some("a b/c".into()))],
    };
    c.bench_function("c2d_topic_encode", |b| b.iter(|| c2d(black_box("thermostat-0042"), black_box(&bag))));
}

criterion_group!(benches, telemetry, c2d_encode);
criterion_main!(benches);
