//! `RouterActor`: one per hub; the router input for events that are not telemetry
//! (connection state, identity lifecycle, twin changes) — service-api §10, §11.
//!
//! Azure routes these sources only through explicit routes: with no route for a source, its
//! events go nowhere. A route here delivers to the built-in `events` endpoint when its source
//! matches, it is enabled, and its condition is `true` (or empty). Conditions in the routing
//! query language and custom endpoints arrive with the routing issue; until then a route with
//! another condition or endpoint does not match, and the hub logs once per route why.
//!
//! The input is bounded: producers `try_send`, and an event that finds the router's mailbox full
//! is counted (`iothubd_router_dropped_total`) and logged, never queued without bound.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix::prelude::*;
use chrono::Utc;
use serde_json::Value;

use crate::directory::HubShared;
use crate::model::event::{AnnotationValue, EventData, MessageProperties, partition_of};
use crate::model::identity::IdentityKey;
use crate::model::iso_time;
use crate::store::Store;

/// Events the router may hold before producers start dropping.
pub const ROUTER_MAILBOX: usize = 4096;

/// The routing `source` of a system event (service-api §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    DeviceConnectionState,
    DeviceLifecycle,
    TwinChange,
}

impl EventSource {
    /// The name routes use in `source`.
    fn route_name(self) -> &'static str {
        match self {
            Self::DeviceConnectionState => "DeviceConnectionStateEvents",
            Self::DeviceLifecycle => "DeviceLifecycleEvents",
            Self::TwinChange => "TwinChangeEvents",
        }
    }

    /// `iothub-message-source` (service-api §9).
    fn message_source(self) -> &'static str {
        match self {
            Self::DeviceConnectionState => "deviceConnectionStateEvents",
            Self::DeviceLifecycle => "deviceLifecycleEvents",
            Self::TwinChange => "twinChangeEvents",
        }
    }

    /// `iothub-message-schema` (service-api §11).
    fn schema(self) -> &'static str {
        match self {
            Self::DeviceConnectionState => "deviceConnectionStateNotification",
            Self::DeviceLifecycle => "deviceLifecycleNotification",
            Self::TwinChange => "twinChangeNotification",
        }
    }
}

/// Device actor / hub actor → router: a non-telemetry event about `key`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct SystemEvent {
    pub source: EventSource,
    pub key: IdentityKey,
    /// `opType`: `deviceConnected`, `deviceDisconnected`, `createDeviceIdentity`, …
    pub op_type: &'static str,
    pub body: Value,
    /// Extra application properties (e.g. the disconnect reason).
    pub properties: Vec<(String, String)>,
}

/// Strictly increasing connection-event sequence numbers, 64 hex digits, ordered by string
/// comparison (service-api §11); derived from the clock so they keep increasing across
/// restarts.
#[derive(Debug, Default)]
pub struct ConnectionSequence(AtomicU64);

impl ConnectionSequence {
    pub fn next(&self) -> String {
        let now = Utc::now().timestamp_nanos_opt().unwrap_or(0).max(0) as u64;
        let mut current = self.0.load(Ordering::Relaxed);
        loop {
            let next = now.max(current + 1);
            match self.0.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return format!("{next:064x}"),
                Err(seen) => current = seen,
            }
        }
    }
}

pub struct RouterActor {
    hub: Arc<HubShared>,
    store: Arc<dyn Store>,
    /// Routes already reported as not evaluable, so the log says it once.
    reported: HashSet<String>,
}

impl RouterActor {
    pub fn new(hub: Arc<HubShared>, store: Arc<dyn Store>) -> Self {
        Self { hub, store, reported: HashSet::new() }
    }

    /// Whether an enabled route sends `source` to the built-in endpoint.
    fn routes_to_events(&mut self, source: EventSource) -> bool {
        let description = self.hub.description();
        let routes = description.properties.routing.get("routes").and_then(Value::as_array);
        let mut matched = false;
        for route in routes.into_iter().flatten() {
            let name = route.get("name").and_then(Value::as_str).unwrap_or("");
            let enabled = route.get("isEnabled").and_then(Value::as_bool).unwrap_or(true);
            let same_source = route.get("source").and_then(Value::as_str) == Some(source.route_name());
            if !enabled || !same_source {
                continue;
            }
            let condition = route.get("condition").and_then(Value::as_str).unwrap_or("true").trim();
            let endpoints: Vec<&str> = route
                .get("endpointNames")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if (condition.is_empty() || condition.eq_ignore_ascii_case("true")) && endpoints == ["events"] {
                matched = true;
            } else if self.reported.insert(name.to_owned()) {
                tracing::warn!(
                    hub = self.hub.name(),
                    route = name,
                    "route not evaluated: only condition `true` to endpoint `events` is routed until the routing issue lands"
                );
            }
        }
        matched
    }
}

impl Actor for RouterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(ROUTER_MAILBOX);
    }
}

impl Supervised for RouterActor {}

impl Handler<SystemEvent> for RouterActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, event: SystemEvent, _: &mut Context<Self>) -> Self::Result {
        if !self.routes_to_events(event.source) {
            return Box::pin(async {});
        }
        let description = self.hub.description();
        let partitions = description.properties.event_hub_endpoints.events.partition_count;
        let partition = partition_of(&event.key.device_id, partitions);
        let now = Utc::now();
        let mut application_properties = vec![
            ("hubName".to_owned(), Some(description.name.clone())),
            ("deviceId".to_owned(), Some(event.key.device_id.clone())),
            ("operationTimestamp".to_owned(), Some(iso_time(now))),
            ("opType".to_owned(), Some(event.op_type.to_owned())),
            ("iothub-message-schema".to_owned(), Some(event.source.schema().to_owned())),
        ];
        if let Some(m) = &event.key.module_id {
            application_properties.push(("moduleId".to_owned(), Some(m.clone())));
        }
        application_properties.extend(event.properties.into_iter().map(|(k, v)| (k, Some(v))));
        let mut annotations = vec![
            ("iothub-connection-device-id".into(), AnnotationValue::String(event.key.device_id.as_str().into())),
            ("iothub-enqueuedtime".into(), AnnotationValue::Timestamp(now.timestamp_millis())),
            ("iothub-message-source".into(), AnnotationValue::String(event.source.message_source().into())),
        ];
        if let Some(m) = &event.key.module_id {
            annotations.push(("iothub-connection-module-id".into(), AnnotationValue::String(m.as_str().into())));
        }
        let data = EventData {
            body: event.body.to_string().into_bytes(),
            properties: MessageProperties {
                correlation_id: Some(uuid::Uuid::new_v4().to_string()),
                user_id: Some(description.name.clone()),
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                ..Default::default()
            },
            application_properties,
            annotations,
        };
        let (store, hub) = (self.store.clone(), self.hub.clone());
        Box::pin(async move {
            match store.append_events(hub.name(), vec![(partition, data)]).await {
                Ok(_) => hub.signal_events_appended(),
                Err(e) => tracing::warn!(hub = hub.name(), error = %e, "a routed system event could not be stored"),
            }
        })
    }
}
