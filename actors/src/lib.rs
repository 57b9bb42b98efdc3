//! iothubd-actors: the hub's domain and its actors.
//!
//! - [`model`]: hubs (ARM shape, policies, rights) and identities (devices, modules).
//! - [`store`]: the `Store` trait, the only door to persistent state; implemented in `iothubd`.
//! - [`messages`]: every message the front-ends send to actors, with what the reply means.
//! - [`import`]: bulk import modes (service-api §3).
//! - [`device`]: `DeviceActor`, one per identity: its session slot, twin, direct methods and
//!   cloud-to-device queue.
//! - [`feedback`]: the hub's C2D feedback queue as the service receives it (batches under locks).
//! - [`ingest`]: telemetry stamped and appended to the hub's events log.
//! - [`router`]: `RouterActor`, one per hub: non-telemetry events through explicit routes.
//! - [`hub`]: `HubActor`, one per hub: identity-registry writes and hub settings.
//! - [`directory`]: where live hub actors are found, by hub name or host name.
//! - [`deployment`]: every hub of the process: start from the store, create, update, delete.
//!
//! Front-ends (HTTP, MQTT, AMQP in the `iothubd` crate) parse wire formats and send messages;
//! actors never see a wire format, and only actors write through the store.

pub mod deployment;
pub mod device;
pub mod directory;
pub mod feedback;
pub mod hub;
pub mod import;
pub mod ingest;
pub mod messages;
pub mod model;
pub mod router;
pub mod store;
