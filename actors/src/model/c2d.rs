//! Cloud-to-device messages and their feedback (device-protocol §5.1, service-api §8).
//!
//! Each identity has a durable queue, owned by its `DeviceActor`: messages are Enqueued, or
//! Invisible while a delivery holds their lock; complete/reject/expiry/delivery-count
//! exhaustion/purge remove them and — per the message's `iothub-ack` — produce feedback records
//! in the hub's feedback queue.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `iothub-ack`: which outcomes produce feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedbackMode {
    #[default]
    None,
    /// Completed (`Success`) only.
    Positive,
    /// Dead-lettered (`Expired`, `DeliveryCountExceeded`, `Rejected`, `Purged`) only.
    Negative,
    Full,
}

impl FeedbackMode {
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "none" => Some(Self::None),
            "positive" => Some(Self::Positive),
            "negative" => Some(Self::Negative),
            "full" => Some(Self::Full),
            _ => None,
        }
    }

    /// The `iothub-ack` text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Positive => "positive",
            Self::Negative => "negative",
            Self::Full => "full",
        }
    }

    /// Whether an outcome with `status` produces a feedback record under this mode.
    pub fn wants(self, status: FeedbackStatus) -> bool {
        match self {
            Self::None => false,
            Self::Full => true,
            Self::Positive => status == FeedbackStatus::Success,
            Self::Negative => status != FeedbackStatus::Success,
        }
    }
}

/// The lock a delivery holds on a message (Invisible until `locked_until`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct C2dLock {
    pub token: String,
    pub locked_until: DateTime<Utc>,
}

/// A message in an identity's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct C2dMessage {
    /// Increasing per identity, assigned when enqueued.
    pub sequence_number: u64,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub expiry_time: DateTime<Utc>,
    pub ack: FeedbackMode,
    /// Application properties, in the order sent.
    pub properties: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub enqueued_time: DateTime<Utc>,
    /// Counted on explicit abandon only (device-protocol §5.1).
    pub delivery_count: u32,
    pub lock: Option<C2dLock>,
}

/// `statusCode` of a feedback record (service-api §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeedbackStatus {
    Success,
    Expired,
    DeliveryCountExceeded,
    Rejected,
    Purged,
}

impl FeedbackStatus {
    /// The `statusCode` text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "Success",
            Self::Expired => "Expired",
            Self::DeliveryCountExceeded => "DeliveryCountExceeded",
            Self::Rejected => "Rejected",
            Self::Purged => "Purged",
        }
    }
}

/// One feedback record, as the service reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedbackRecord {
    pub original_message_id: Option<String>,
    pub device_generation_id: String,
    pub device_id: String,
    pub module_id: Option<String>,
    pub enqueued_time_utc: DateTime<Utc>,
    pub status: FeedbackStatus,
    pub description: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_modes_select_outcomes() {
        use FeedbackStatus::*;
        assert_eq!(FeedbackMode::parse("Full"), Some(FeedbackMode::Full));
        assert!(FeedbackMode::Positive.wants(Success) && !FeedbackMode::Positive.wants(Rejected));
        assert!(FeedbackMode::Negative.wants(Expired) && !FeedbackMode::Negative.wants(Success));
        assert!(!FeedbackMode::None.wants(Purged));
        assert!(FeedbackMode::Full.wants(DeliveryCountExceeded));
    }
}
