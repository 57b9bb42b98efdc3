//! The MQTT device endpoint's codec (device-protocol §2): text in, values out, no I/O.
//!
//! - [`topic`]: device PUBLISH topics and SUBSCRIBE filters classified for the connected
//!   identity, the topics the hub publishes on, and the CONNECT username.
//! - [`bag`]: the property bag of telemetry and C2D topics (§2.4), split into system and
//!   application properties.

pub mod bag;
pub mod topic;
