//! The telemetry ingest path: a device's message, stamped with what the hub knows of the
//! sender (service-api §9, device-protocol §6), appended to its hub's events log.
//!
//! Telemetry does not hop through the `DeviceActor`: the stamps are fixed when the session
//! authenticates ([`Sender`]), so a session hands messages straight to the store's group commit
//! and acknowledges them when it returns — one durable write per message, batched, no
//! cross-thread actor hop on the hottest path (DESIGN.md §3). The actor still owns everything
//! stateful about the device.

use std::sync::Arc;

use chrono::Utc;

use crate::directory::HubShared;
use crate::model::event::{AnnotationValue, EventData, EventPosition, partition_of};
use crate::model::identity::{AuthenticationType, Identity, IdentityKey};
use crate::store::{Store, StoreError};

/// Who sent a message, as stamped on it: fixed for the life of a session.
#[derive(Debug, Clone)]
pub struct Sender {
    pub key: IdentityKey,
    pub generation_id: String,
    /// `iothub-connection-auth-method`, JSON text.
    pub auth_method: String,
    /// PnP model id from CONNECT (`dt-dataschema`).
    pub model_id: Option<String>,
    partition: u32,
}

/// How a session authenticated, for `iothub-connection-auth-method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// A token signed with the identity's own key.
    IdentitySas,
    /// A token of a hub policy with DeviceConnect.
    PolicySas,
    /// A client certificate.
    X509(AuthenticationType),
}

impl Sender {
    pub fn new(hub: &HubShared, identity: &Identity, method: AuthMethod, model_id: Option<String>) -> Self {
        let scope = match method {
            AuthMethod::PolicySas => "hub",
            _ if identity.key.is_module() => "module",
            _ => "device",
        };
        let kind = match method {
            AuthMethod::IdentitySas | AuthMethod::PolicySas => "sas",
            AuthMethod::X509(_) => "x509",
        };
        let auth_method = serde_json::json!({
            "scope": scope, "type": kind, "issuer": "iothub", "acceptingIpFilterRule": null,
        })
        .to_string();
        let partitions = hub.description().properties.event_hub_endpoints.events.partition_count;
        Self {
            key: identity.key.clone(),
            generation_id: identity.generation_id.clone(),
            auth_method,
            model_id,
            // Modules use their device's ID (service-api §9).
            partition: partition_of(&identity.key.device_id, partitions),
        }
    }

    /// The hub's annotations on a telemetry message from this sender.
    fn stamp(&self, data: &mut EventData) {
        let now = Utc::now().timestamp_millis();
        let a = &mut data.annotations;
        a.push(("iothub-connection-device-id".into(), AnnotationValue::String(self.key.device_id.clone())));
        if let Some(m) = &self.key.module_id {
            a.push(("iothub-connection-module-id".into(), AnnotationValue::String(m.clone())));
        }
        a.push(("iothub-connection-auth-method".into(), AnnotationValue::String(self.auth_method.clone())));
        a.push(("iothub-connection-auth-generation-id".into(), AnnotationValue::String(self.generation_id.clone())));
        a.push(("iothub-enqueuedtime".into(), AnnotationValue::Timestamp(now)));
        a.push(("iothub-message-source".into(), AnnotationValue::String("Telemetry".into())));
        if let Some(model) = &self.model_id {
            a.push(("dt-dataschema".into(), AnnotationValue::String(model.clone())));
        }
    }
}

/// Appends telemetry to hub logs. Cheap to clone; shared by every session.
#[derive(Clone)]
pub struct Ingest {
    store: Arc<dyn Store>,
}

impl Ingest {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Stamps `data` and appends it; returns once it is durable.
    pub async fn telemetry(
        &self,
        hub: &HubShared,
        sender: &Sender,
        mut data: EventData,
    ) -> Result<EventPosition, StoreError> {
        sender.stamp(&mut data);
        let mut positions = self.store.append_events(hub.name(), vec![(sender.partition, data)]).await?;
        hub.signal_events_appended();
        positions.pop().ok_or_else(|| StoreError::Corrupt("the store returned no position for an append".into()))
    }
}
