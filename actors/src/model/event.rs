//! Messages in a hub's events log: the built-in, Event Hubs-compatible `events` endpoint
//! (service-api §9, DESIGN.md §3).
//!
//! Telemetry (and, through routes, twin-change, lifecycle and connection events) is appended to
//! one of the hub's partitions — `partition_of(deviceId)` — and read back by partition from a
//! sequence number, an offset or a time. The shapes here are what the AMQP Event Hubs endpoint
//! will serve: sequence numbers are `i64` from 0 per partition, offsets are decimal strings that
//! increase, every event has an enqueued time.

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The AMQP-typed value of a message annotation (service-api §9 table). Strings are shared:
/// the hub stamps the same sender values on every message of a session, and a clone per
/// message was an allocation each on the ingest path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AnnotationValue {
    String(Arc<str>),
    Long(i64),
    /// Milliseconds since the Unix epoch (an AMQP timestamp).
    Timestamp(i64),
}

/// The AMQP `properties` section a device may set (device-protocol §6).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageProperties {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub to: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Absolute expiry, milliseconds since the Unix epoch.
    pub absolute_expiry_time: Option<i64>,
}

/// A message as it enters the log: the device's body and properties plus the hub's stamps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventData {
    pub body: Vec<u8>,
    pub properties: MessageProperties,
    /// Application properties in arrival order; `None` = a property sent without a value.
    pub application_properties: Vec<(String, Option<String>)>,
    /// `iothub-connection-device-id`, `iothub-enqueuedtime`, `iothub-message-source`, …
    /// (names the hub stamps are static: no allocation per message).
    pub annotations: Vec<(Cow<'static, str>, AnnotationValue)>,
}

/// Where an appended event landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventPosition {
    pub partition: u32,
    pub sequence_number: i64,
    pub enqueued_time: DateTime<Utc>,
}

impl EventPosition {
    /// The Event Hubs offset: a decimal string that increases with the sequence number.
    pub fn offset(&self) -> String {
        self.sequence_number.to_string()
    }
}

/// An event read back from the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub position: EventPosition,
    pub data: EventData,
}

/// What the Event Hubs management `READ` of a partition reports (service-api §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    /// First retained sequence number; -1 when the partition is empty.
    pub begin_sequence_number: i64,
    /// Last sequence number; -1 when the partition has never held an event.
    pub last_sequence_number: i64,
    /// Enqueued time of the last event; the Unix epoch when there is none.
    pub last_enqueued_time: DateTime<Utc>,
    pub is_empty: bool,
}

/// The partition of a device's messages: a stable hash of the device ID (modules use their
/// device's ID) modulo the partition count (service-api §9). FNV-1a: stable across versions and
/// processes, unlike `std`'s hasher.
pub fn partition_of(device_id: &str, partition_count: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in device_id.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partition_count.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        assert_eq!(partition_of("device-1", 4), partition_of("device-1", 4));
        assert!((0..1000).all(|i| partition_of(&format!("d{i}"), 4) < 4));
        let used: std::collections::HashSet<u32> = (0..100).map(|i| partition_of(&format!("d{i}"), 4)).collect();
        assert_eq!(used.len(), 4, "100 devices spread over every partition");
    }
}
