//! What the cases store: hubs, identities, twins and telemetry events, and small readers.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use iothubd_actors::model::event::{AnnotationValue, EventData, EventPosition, MessageProperties, PartitionInfo};
use iothubd_actors::model::hub::{HubDescription, HubProperties, Sku};
use iothubd_actors::model::identity::{Identity, IdentityKey, IdentitySpec, IdentityStatus, new_etag};
use iothubd_actors::model::twin::Twin;
use iothubd_actors::store::Store;
use serde_json::json;

pub(crate) fn hub(name: &str) -> HubDescription {
    let mut hub = HubDescription {
        name: name.into(),
        etag: new_etag(),
        sku: Sku::default(),
        properties: HubProperties { host_name: format!("{name}.example.net"), ..Default::default() },
    };
    hub.normalize().expect("a valid hub");
    hub
}

pub(crate) fn device(id: &str) -> Identity {
    Identity::create(IdentityKey::device(id), IdentitySpec::default()).expect("a valid device")
}

pub(crate) fn disabled_device(id: &str) -> Identity {
    let spec = IdentitySpec { status: Some(IdentityStatus::Disabled), ..Default::default() };
    Identity::create(IdentityKey::device(id), spec).expect("a valid device")
}

pub(crate) fn module(device_id: &str, module_id: &str) -> Identity {
    Identity::create(IdentityKey::module(device_id, module_id), IdentitySpec::default()).expect("a valid module")
}

pub(crate) fn disabled(identity: &Identity) -> Identity {
    identity
        .replaced(IdentitySpec { status: Some(IdentityStatus::Disabled), ..Default::default() })
        .expect("a valid replacement")
}

pub(crate) fn ids(identities: &[Identity]) -> Vec<String> {
    identities.iter().map(|i| i.key.to_string()).collect()
}

/// A twin one write after `twin`: its version is one higher.
pub(crate) fn tagged(twin: &Twin, value: &str) -> Twin {
    let mut next = twin.clone();
    let tags = json!({ "value": value }).as_object().cloned();
    next.patch(tags, None, Utc::now()).expect("a valid patch");
    next
}

/// A telemetry message with every kind of metadata, so each append checks their round trip.
pub(crate) fn telemetry(body: &str) -> EventData {
    EventData {
        body: body.as_bytes().to_vec(),
        properties: MessageProperties {
            message_id: Some(format!("id-{body}")),
            content_type: Some("application/json".into()),
            ..Default::default()
        },
        application_properties: vec![("level".into(), Some("info".into())), ("flag".into(), None)],
        annotations: vec![
            ("iothub-connection-device-id".into(), AnnotationValue::String("d1".into())),
            ("iothub-enqueuedtime".into(), AnnotationValue::Timestamp(1_700_000_000_000)),
            ("x-count".into(), AnnotationValue::Long(-3)),
        ],
    }
}

/// `(partition, telemetry(body))` for each body.
pub(crate) fn to_partition(partition: u32, bodies: &[&str]) -> Vec<(u32, EventData)> {
    bodies.iter().map(|b| (partition, telemetry(b))).collect()
}

pub(crate) fn sequences(positions: &[EventPosition]) -> Vec<i64> {
    positions.iter().map(|p| p.sequence_number).collect()
}

pub(crate) async fn bodies(store: &Arc<dyn Store>, hub: &str, partition: u32, from: i64, max: usize) -> Vec<String> {
    let events = store.read_events(hub, partition, from, max).await.unwrap();
    events.into_iter().map(|e| String::from_utf8(e.data.body).expect("UTF-8 body")).collect()
}

pub(crate) const EMPTY_PARTITION: PartitionInfo = PartitionInfo {
    begin_sequence_number: -1,
    last_sequence_number: -1,
    last_enqueued_time: DateTime::UNIX_EPOCH,
    is_empty: true,
};
