//! The JSON shapes a twin is read in: the service's REST twin (service-api §4) and a device's
//! GET (device-protocol §2.6).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::Twin;
use super::metadata::Metadata;
use crate::model::identity::{
    AuthenticationType, ConnectionView, Identity, IdentityKey, IdentityStatus, X509Thumbprint,
};
use crate::model::{NEVER, iso_time};

/// The registry and connection fields the REST twin shows beside the properties.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinIdentity<'a> {
    pub key: &'a IdentityKey,
    /// The identity's ETag, shown as `deviceEtag`.
    pub device_etag: &'a str,
    pub status: IdentityStatus,
    pub status_update_time: Option<DateTime<Utc>>,
    pub connected: bool,
    pub last_activity_time: Option<DateTime<Utc>>,
    pub cloud_to_device_message_count: u64,
    pub authentication_type: AuthenticationType,
    pub x509_thumbprint: &'a X509Thumbprint,
    /// The PnP model ID the device announced on connect; empty when none.
    pub model_id: &'a str,
    pub iot_edge: bool,
}

impl<'a> TwinIdentity<'a> {
    /// The fields of a registry entry and what the live side knows of its connection.
    pub fn new(identity: &'a Identity, live: &ConnectionView, model_id: &'a str) -> Self {
        Self {
            key: &identity.key,
            device_etag: &identity.etag,
            status: identity.status,
            status_update_time: Some(identity.status_updated_time),
            connected: live.connected,
            last_activity_time: live.last_activity_time,
            cloud_to_device_message_count: live.cloud_to_device_message_count,
            authentication_type: identity.authentication.kind,
            x509_thumbprint: &identity.authentication.x509_thumbprint,
            model_id,
            iot_edge: identity.iot_edge,
        }
    }
}

fn time_or_never(t: Option<DateTime<Utc>>) -> String {
    t.map(iso_time).unwrap_or_else(|| NEVER.to_owned())
}

fn authentication_type(kind: AuthenticationType) -> &'static str {
    match kind {
        AuthenticationType::Sas => "sas",
        AuthenticationType::SelfSigned => "selfSigned",
        AuthenticationType::CertificateAuthority => "certificateAuthority",
        AuthenticationType::None => "none",
    }
}

/// A section's data followed by its `$metadata` (when shown) and `$version`.
fn section_json(data: &Map<String, Value>, metadata: Option<&Metadata>, version: u64) -> Value {
    let mut out = data.clone();
    if let Some(metadata) = metadata {
        out.insert("$metadata".into(), metadata.json());
    }
    out.insert("$version".into(), json!(version));
    Value::Object(out)
}

impl Twin {
    /// The twin of `GET /twins/{id}` and of PATCH/PUT responses (service-api §4). Note the twin
    /// says `statusUpdateTime` where the identity says `statusUpdatedTime`; module twins add
    /// `moduleId`.
    pub fn service_json(&self, identity: &TwinIdentity<'_>) -> Value {
        let mut out = json!({
            "deviceId": identity.key.device_id,
            "etag": self.etag(),
            "deviceEtag": identity.device_etag,
            "status": identity.status.as_str(),
            "statusUpdateTime": time_or_never(identity.status_update_time),
            "connectionState": if identity.connected { "Connected" } else { "Disconnected" },
            "lastActivityTime": time_or_never(identity.last_activity_time),
            "cloudToDeviceMessageCount": identity.cloud_to_device_message_count,
            "authenticationType": authentication_type(identity.authentication_type),
            "x509Thumbprint": {
                "primaryThumbprint": identity.x509_thumbprint.primary_thumbprint,
                "secondaryThumbprint": identity.x509_thumbprint.secondary_thumbprint,
            },
            "modelId": identity.model_id,
            "version": self.version,
            "tags": self.tags,
            "properties": {
                "desired": section_json(&self.desired, Some(&self.desired_metadata), self.desired_version),
                "reported": section_json(&self.reported, Some(&self.reported_metadata), self.reported_version),
            },
            "capabilities": { "iotEdge": identity.iot_edge },
        });
        if let (Some(module_id), Value::Object(fields)) = (&identity.key.module_id, &mut out) {
            fields.insert("moduleId".into(), json!(module_id));
        }
        out
    }

    /// The twin a device GETs (device-protocol §2.6): properties with their `$version`, no tags
    /// (never shown to devices) and no `$metadata` (service-side only).
    pub fn device_json(&self) -> Value {
        json!({
            "desired": section_json(&self.desired, None, self.desired_version),
            "reported": section_json(&self.reported, None, self.reported_version),
        })
    }
}
