//! The MQTT 3.1.1 device endpoint (device-protocol §2).
//!
//! - [`server`]: the listeners (TLS 8883, opt-in plain) on the ntex System; PUBLISH and
//!   SUBSCRIBE handling.
//! - [`connect`]: CONNECT — username, SAS, CONNACK codes, attaching to the `DeviceActor`.
//! - [`session`]: one connection's state; PUBACK ordering; detach when it ends.
//! - [`twin`]: device twin GET and reported PATCH (§2.6).
//! - [`telemetry`]: a telemetry PUBLISH as an events-log message.
//! - [`topic`]: device PUBLISH topics and SUBSCRIBE filters classified for the connected
//!   identity, the topics the hub publishes on, and the CONNECT username.
//! - [`bag`]: the property bag of telemetry and C2D topics (§2.4), split into system and
//!   application properties.

pub mod bag;
pub mod connect;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod topic;
pub mod twin;
