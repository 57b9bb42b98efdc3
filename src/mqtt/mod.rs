//! The MQTT 3.1.1 device endpoint (device-protocol §2).
//!
//! - [`listener`]: the listeners (TLS 8883, opt-in plain, the WebSocket bridge's loopback one)
//!   and the per-core worker threads connections run on.
//! - [`transport`]: the byte stream under a session (TLS or plain TCP).
//! - [`connect`]: CONNECT — username, SAS or X.509, CONNACK codes, attaching to the
//!   `DeviceActor`.
//! - [`session`]: one connection after CONNACK: reading, PUBACK ordering, keep-alive, token
//!   expiry, the Will, detach when it ends; [`inbound`] handles the device's packets,
//!   [`outbound`] the actor's commands (method requests, desired patches, C2D deliveries).
//! - [`frame`]: frame boundaries, ntex-mqtt's codec, the outgoing packet buffer.
//! - [`twin`]: device twin GET and reported PATCH (§2.6).
//! - [`telemetry`]: a telemetry PUBLISH as an events-log message.
//! - [`topic`]: device PUBLISH topics and SUBSCRIBE filters classified for the connected
//!   identity, the topics the hub publishes on, and the CONNECT username.
//! - [`bag`]: the property bag of telemetry and C2D topics (§2.4), split into system and
//!   application properties.

pub mod bag;
pub mod connect;
pub mod frame;
mod inbound;
pub mod listener;
mod outbound;
pub mod session;
pub mod telemetry;
pub mod topic;
pub mod transport;
pub mod twin;
