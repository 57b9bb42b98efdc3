//! The HTTPS edge (actix-web): service REST, the operator API, health and metrics.
//!
//! - [`error`]: every error mapped once to IoT Hub's REST form (service-api §2).
//! - [`service`]: what every service call does first: api-version, hub from `Host`, SAS rights.
//! - [`device`]: the HTTPS device API: telemetry, single and batch (device-protocol §3).
//! - [`c2d`]: cloud-to-device: the service's send, purge and feedback; the device's receive,
//!   complete, reject and abandon (device-protocol §3, service-api §8).
//! - [`c2d_batch`]: `POST /messages/deviceBound`: cloud-to-device messages to many identities
//!   in one request (beyond IoT Hub: the REST form of the SDKs' AMQP sender link).
//! - [`registry`]: identity registry REST (service-api §3), bulk import included.
//! - [`twins`]: service twin REST (service-api §4), through the device actors.
//! - [`methods`]: direct methods (service-api §6), through the device actors.
//! - [`operator`]: hub management (create/list/update/delete, identity export/import).
//! - [`websocket`]: `/$iothub/websocket`, MQTT over WebSockets bridged to the MQTT endpoint.
//! - [`observe`]: `/health`, `/metrics`, and the request metrics middleware.
//! - [`events`]: the events log read over HTTPS (service-api §9): partitions, reads, a live
//!   stream, consumer-group checkpoints (which it writes itself: see its module doc).
//! - [`listener`]: the HTTPS (and plain HTTP) listener: actix-server, rustls, actix-http, with
//!   each connection's I/O through [`header_case`], which writes response header names in the
//!   exact case an SDK matches (device-protocol §3).
//!
//! Handlers parse the wire and send messages to actors; they never write the store.

pub mod c2d;
pub mod c2d_batch;
pub mod device;
pub mod error;
pub mod events;
pub mod header_case;
pub mod listener;
pub mod methods;
pub mod observe;
pub mod operator;
pub mod registry;
pub mod service;
pub mod twins;
pub mod websocket;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use actix_web::web;
use iothubd_actors::deployment::Deployment;
use metrics_exporter_prometheus::PrometheusHandle;

/// What every handler may reach.
pub struct AppState {
    pub deployment: Deployment,
    /// Bearer key of the operator API.
    pub operator_key: String,
    /// Set once every listener is bound; `/health` answers 503 before.
    pub ready: Arc<AtomicBool>,
    pub metrics: PrometheusHandle,
    /// The internal loopback MQTT listener WebSocket sessions are bridged to.
    pub mqtt_bridge: std::net::SocketAddr,
}

/// The whole HTTPS surface, for `App::configure`.
pub fn configure(cfg: &mut web::ServiceConfig) {
    observe::configure(cfg);
    operator::configure(cfg);
    device::configure(cfg);
    registry::configure(cfg);
    twins::configure(cfg);
    methods::configure(cfg);
    c2d::configure(cfg);
    c2d_batch::configure(cfg);
    websocket::configure(cfg);
    events::configure(cfg);
}

/// 404 for paths nothing serves (e.g. `/configurations`, out of scope), in IoT Hub's form.
pub async fn not_found(req: actix_web::HttpRequest) -> actix_web::HttpResponse {
    let code = error::ErrorCode::InvalidOperation;
    let text = format!("{} {} is not an operation of this hub", req.method(), req.path());
    actix_web::HttpResponse::NotFound()
        .insert_header(("iothub-errorcode", code.name()))
        .json(error::error_body(code, &text))
}
