//! Device and module identities as the identity registry holds them (service-api §3).
//!
//! One `Identity` type serves devices and modules: a module is an identity whose key has a
//! `module_id`. The JSON shapes differ (a module has `moduleId` and `managedBy`, no `status`),
//! so the REST views are produced by [`Identity::device_json`] and [`Identity::module_json`].

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{NEVER, iso_time};

/// Which identity: a device, or a module of a device. IDs are case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentityKey {
    pub device_id: String,
    pub module_id: Option<String>,
}

impl IdentityKey {
    pub fn device(device_id: impl Into<String>) -> Self {
        Self { device_id: device_id.into(), module_id: None }
    }

    pub fn module(device_id: impl Into<String>, module_id: impl Into<String>) -> Self {
        Self { device_id: device_id.into(), module_id: Some(module_id.into()) }
    }

    pub fn is_module(&self) -> bool {
        self.module_id.is_some()
    }
}

impl std::fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.module_id {
            Some(m) => write!(f, "{}/{}", self.device_id, m),
            None => f.write_str(&self.device_id),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum IdentityStatus {
    #[default]
    Enabled,
    Disabled,
}

impl IdentityStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }
}

/// `authentication.type` of service-api §3.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AuthenticationType {
    #[default]
    #[serde(rename = "sas")]
    Sas,
    #[serde(rename = "selfSigned")]
    SelfSigned,
    #[serde(rename = "certificateAuthority")]
    CertificateAuthority,
    #[serde(rename = "none")]
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKey {
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct X509Thumbprint {
    pub primary_thumbprint: Option<String>,
    pub secondary_thumbprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    #[serde(default)]
    pub symmetric_key: SymmetricKey,
    #[serde(default)]
    pub x509_thumbprint: X509Thumbprint,
    #[serde(rename = "type", default)]
    pub kind: AuthenticationType,
}

/// An entry of the identity registry. Serialized as-is into the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub key: IdentityKey,
    pub generation_id: String,
    pub etag: String,
    pub status: IdentityStatus,
    pub status_reason: Option<String>,
    pub status_updated_time: DateTime<Utc>,
    pub authentication: Authentication,
    pub iot_edge: bool,
    pub managed_by: Option<String>,
    pub device_scope: Option<String>,
    pub created_time: DateTime<Utc>,
}

/// The mutable fields a client may set on create or replace (read-only fields are ignored).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdentitySpec {
    pub status: Option<IdentityStatus>,
    pub status_reason: Option<String>,
    pub authentication: Option<Authentication>,
    pub iot_edge: Option<bool>,
    pub managed_by: Option<String>,
    pub device_scope: Option<String>,
}

/// Why an identity request is invalid; mapped to `ArgumentInvalid` by the REST layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the id '{0}' is invalid: 1-128 characters of A-Z a-z 0-9 - : . + % _ # * ? ! ( ) , = @ ; $ '")]
    InvalidId(String),
    #[error("{0}")]
    InvalidAuthentication(String),
    #[error("statusReason must be at most 128 characters")]
    StatusReasonTooLong,
}

/// Checks an ID against service-api §3: 1–128 chars of `A-Za-z0-9-:.+%_#*?!(),=@;$'`.
pub fn validate_id(id: &str) -> Result<(), IdentityError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-:.+%_#*?!(),=@;$'".contains(&b));
    if ok { Ok(()) } else { Err(IdentityError::InvalidId(id.to_owned())) }
}

/// A fresh random 32-byte key, base64 (what Azure generates when none is supplied).
pub fn generate_key() -> String {
    let mut k = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut k);
    B64.encode(k)
}

/// A new opaque ETag in Azure's style: base64 of a decimal number.
pub fn new_etag() -> String {
    B64.encode(rand::thread_rng().next_u64().to_string())
}

/// A new `generationId`: a decimal string like Azure's, unique per (re)creation.
pub fn new_generation_id() -> String {
    let now = Utc::now();
    // .NET ticks-like prefix keeps IDs sortable by creation; the random tail keeps them unique.
    format!("63{:011}{:05}", now.timestamp() % 100_000_000_000, rand::thread_rng().next_u32() % 100_000)
}

fn validate_authentication(auth: &mut Authentication) -> Result<(), IdentityError> {
    match auth.kind {
        AuthenticationType::Sas => {
            let sk = &mut auth.symmetric_key;
            let blank = |k: &Option<String>| k.as_deref().is_none_or(str::is_empty);
            if blank(&sk.primary_key) && blank(&sk.secondary_key) {
                sk.primary_key = Some(generate_key());
                sk.secondary_key = Some(generate_key());
            }
            for key in [&mut sk.primary_key, &mut sk.secondary_key] {
                match key.as_deref() {
                    None | Some("") => *key = Some(generate_key()),
                    Some(k) => {
                        let len = B64.decode(k).map(|b| b.len()).unwrap_or(0);
                        if !(16..=64).contains(&len) {
                            return Err(IdentityError::InvalidAuthentication(
                                "symmetric keys must be base64 of 16 to 64 bytes".into(),
                            ));
                        }
                    }
                }
            }
            auth.x509_thumbprint = X509Thumbprint::default();
        }
        AuthenticationType::SelfSigned => {
            let t = &mut auth.x509_thumbprint;
            let valid = |s: &str| (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit());
            if t.primary_thumbprint.as_deref().is_none_or(str::is_empty) {
                return Err(IdentityError::InvalidAuthentication(
                    "selfSigned authentication needs a primaryThumbprint".into(),
                ));
            }
            for th in [&mut t.primary_thumbprint, &mut t.secondary_thumbprint] {
                if th.as_deref() == Some("") {
                    *th = None;
                }
                if let Some(s) = th.as_deref() {
                    if !valid(s) {
                        return Err(IdentityError::InvalidAuthentication(
                            "thumbprints must be 40 (SHA-1) or 64 (SHA-256) hex characters".into(),
                        ));
                    }
                    *th = Some(s.to_ascii_uppercase());
                }
            }
            auth.symmetric_key = SymmetricKey::default();
        }
        AuthenticationType::CertificateAuthority | AuthenticationType::None => {
            auth.symmetric_key = SymmetricKey::default();
            auth.x509_thumbprint = X509Thumbprint::default();
        }
    }
    Ok(())
}

impl Identity {
    /// A new identity from a client's spec: keys generated when none are given.
    pub fn create(key: IdentityKey, spec: IdentitySpec) -> Result<Self, IdentityError> {
        validate_id(&key.device_id)?;
        if let Some(m) = &key.module_id {
            validate_id(m)?;
        }
        let now = Utc::now();
        let mut identity = Identity {
            key,
            generation_id: new_generation_id(),
            etag: new_etag(),
            status: IdentityStatus::Enabled,
            status_reason: None,
            status_updated_time: now,
            authentication: Authentication::default(),
            iot_edge: false,
            managed_by: None,
            device_scope: None,
            created_time: now,
        };
        identity.apply(spec)?;
        Ok(identity)
    }

    /// Replaces the mutable fields (a PUT with `If-Match`); keeps identity, generation and times.
    pub fn replaced(&self, spec: IdentitySpec) -> Result<Self, IdentityError> {
        let mut next = self.clone();
        next.apply(spec)?;
        next.etag = new_etag();
        Ok(next)
    }

    fn apply(&mut self, spec: IdentitySpec) -> Result<(), IdentityError> {
        if spec.status_reason.as_ref().is_some_and(|r| r.chars().count() > 128) {
            return Err(IdentityError::StatusReasonTooLong);
        }
        let status = spec.status.unwrap_or(IdentityStatus::Enabled);
        if status != self.status {
            self.status_updated_time = Utc::now();
        }
        self.status = status;
        self.status_reason = spec.status_reason;
        let mut auth = spec.authentication.unwrap_or_default();
        validate_authentication(&mut auth)?;
        self.authentication = auth;
        self.iot_edge = spec.iot_edge.unwrap_or(false);
        self.managed_by = spec.managed_by;
        self.device_scope = spec.device_scope;
        Ok(())
    }

    pub fn is_enabled(&self) -> bool {
        self.status == IdentityStatus::Enabled
    }

    fn authentication_json(&self) -> Value {
        serde_json::to_value(&self.authentication).unwrap_or(Value::Null)
    }

    /// The device view of service-api §3. Connection fields come from the live directory.
    pub fn device_json(&self, live: &ConnectionView) -> Value {
        json!({
            "deviceId": self.key.device_id,
            "generationId": self.generation_id,
            "etag": self.etag,
            "connectionState": live.state(),
            "status": self.status.as_str(),
            "statusReason": self.status_reason,
            "connectionStateUpdatedTime": live.state_updated_time(),
            "statusUpdatedTime": iso_time(self.status_updated_time),
            "lastActivityTime": live.last_activity_time(),
            "cloudToDeviceMessageCount": live.cloud_to_device_message_count,
            "authentication": self.authentication_json(),
            "capabilities": { "iotEdge": self.iot_edge },
            "deviceScope": self.device_scope,
            "parentScopes": [],
        })
    }

    /// The module view of service-api §3.
    pub fn module_json(&self, live: &ConnectionView) -> Value {
        json!({
            "moduleId": self.key.module_id,
            "deviceId": self.key.device_id,
            "managedBy": self.managed_by,
            "generationId": self.generation_id,
            "etag": self.etag,
            "connectionState": live.state(),
            "connectionStateUpdatedTime": live.state_updated_time(),
            "lastActivityTime": live.last_activity_time(),
            "cloudToDeviceMessageCount": live.cloud_to_device_message_count,
            "authentication": self.authentication_json(),
        })
    }

    pub fn json(&self, live: &ConnectionView) -> Value {
        if self.key.is_module() { self.module_json(live) } else { self.device_json(live) }
    }
}

/// What the live side knows about an identity's connection (nothing, until it connects).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectionView {
    pub connected: bool,
    pub state_updated_time: Option<DateTime<Utc>>,
    pub last_activity_time: Option<DateTime<Utc>>,
    pub cloud_to_device_message_count: u64,
}

impl ConnectionView {
    fn state(&self) -> &'static str {
        if self.connected { "Connected" } else { "Disconnected" }
    }

    fn state_updated_time(&self) -> String {
        self.state_updated_time.map(iso_time).unwrap_or_else(|| NEVER.to_owned())
    }

    fn last_activity_time(&self) -> String {
        self.last_activity_time.map(iso_time).unwrap_or_else(|| NEVER.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_registry_charset() {
        assert!(validate_id("dev-1:a.b+c%_#*?!(),=@;$'").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("has space").is_err());
        assert!(validate_id("slash/no").is_err());
        assert!(validate_id(&"a".repeat(129)).is_err());
    }

    #[test]
    fn missing_keys_are_generated() {
        let id = Identity::create(IdentityKey::device("d1"), IdentitySpec::default()).unwrap();
        let sk = &id.authentication.symmetric_key;
        assert_eq!(B64.decode(sk.primary_key.as_ref().unwrap()).unwrap().len(), 32);
        assert_ne!(sk.primary_key, sk.secondary_key);
    }

    #[test]
    fn short_keys_are_refused() {
        let spec = IdentitySpec {
            authentication: Some(Authentication {
                symmetric_key: SymmetricKey { primary_key: Some(B64.encode([1u8; 8])), secondary_key: None },
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(Identity::create(IdentityKey::device("d1"), spec).is_err());
    }

    #[test]
    fn replace_keeps_generation_and_changes_etag() {
        let id = Identity::create(IdentityKey::device("d1"), IdentitySpec::default()).unwrap();
        let next = id.replaced(IdentitySpec { status: Some(IdentityStatus::Disabled), ..Default::default() }).unwrap();
        assert_eq!(next.generation_id, id.generation_id);
        assert_ne!(next.etag, id.etag);
        assert!(!next.is_enabled());
    }
}
