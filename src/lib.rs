//! iothubd: a self-hosted hub that the unmodified Azure IoT SDKs talk to.
//!
//! - [`config`]: settings from `config/default.toml`, `IOTHUBD_*` and CLI flags.
//! - [`cli`]: `iothubd serve`, `iothubd hub …`, `iothubd monitor-events`, `iothubd simulate`.
//! - [`monitor`]: `monitor-events`: a hub's events printed as `az iot hub monitor-events` does.
//! - [`client`]: an HTTPS client trusting the hub CA (CLI, tests).
//! - [`server`]: boots the actix System (actors, actix-web) and the MQTT workers.
//! - [`tls`]: rustls server configuration; the dev CA when no certificate is configured.
//! - [`store`]: the embedded (SQLite) and PostgreSQL implementations of `Store`.
//! - [`auth`]: SAS tokens (device-protocol §1.3) and rights checks.
//! - [`hubs`]: the default hub and the operator key, from configuration.
//! - [`http`]: the HTTPS edge: registry REST, the events log, operator API, health and metrics.
//! - [`mqtt`]: the MQTT device endpoint: listeners, CONNECT, sessions, topics, property bags.
//! - [`simulate`]: `iothubd simulate`: simulated devices (or raw MQTT clients) under load, with
//!   live progress and JSON/HTML reports.
//!
//! The domain and the actors are in the `iothubd-actors` crate; this crate is the edges.

pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod http;
pub mod hubs;
pub mod monitor;
pub mod mqtt;
pub mod server;
pub mod simulate;
pub mod store;
pub mod tls;
