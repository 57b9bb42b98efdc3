//! A hub (tenant) in the ARM shape of the resource provider (DESIGN.md §5).
//!
//! The operator API reads and writes [`HubDescription`] as JSON; the store keeps it as a
//! document. Everything a request needs from its hub — host name, policies and their rights,
//! partitions — is read from here.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::identity::generate_key;

/// The rights of a shared access policy (device-protocol §1.3, service-api §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AccessRights(u8);

impl AccessRights {
    pub const REGISTRY_READ: Self = Self(1);
    pub const REGISTRY_WRITE: Self = Self(2);
    pub const SERVICE_CONNECT: Self = Self(4);
    pub const DEVICE_CONNECT: Self = Self(8);
    const NAMES: [(&'static str, Self); 4] = [
        ("RegistryRead", Self::REGISTRY_READ),
        ("RegistryWrite", Self::REGISTRY_WRITE),
        ("ServiceConnect", Self::SERVICE_CONNECT),
        ("DeviceConnect", Self::DEVICE_CONNECT),
    ];

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Parses ARM's comma-separated form, `"RegistryRead, RegistryWrite"` (case-insensitive).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rights = Self::default();
        for word in text.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let (_, r) = Self::NAMES
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(word))
                .ok_or_else(|| format!("unknown right '{word}'"))?;
            rights = rights.union(*r);
        }
        Ok(rights)
    }
}

impl std::fmt::Display for AccessRights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = Self::NAMES.iter().filter(|(_, r)| self.contains(*r)).map(|(n, _)| *n).collect();
        f.write_str(&names.join(", "))
    }
}

impl Serialize for AccessRights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AccessRights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A shared access policy of a hub (`properties.authorizationPolicies[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    pub key_name: String,
    #[serde(default)]
    pub primary_key: String,
    #[serde(default)]
    pub secondary_key: String,
    pub rights: AccessRights,
}

/// The five policies every hub starts with (service-api §1).
pub fn builtin_policies() -> Vec<AuthorizationPolicy> {
    use AccessRights as R;
    let all = R::REGISTRY_READ.union(R::REGISTRY_WRITE).union(R::SERVICE_CONNECT).union(R::DEVICE_CONNECT);
    [
        ("iothubowner", all),
        ("service", R::SERVICE_CONNECT),
        ("device", R::DEVICE_CONNECT),
        ("registryRead", R::REGISTRY_READ),
        ("registryReadWrite", R::REGISTRY_READ.union(R::REGISTRY_WRITE)),
    ]
    .into_iter()
    .map(|(name, rights)| AuthorizationPolicy {
        key_name: name.to_owned(),
        primary_key: generate_key(),
        secondary_key: generate_key(),
        rights,
    })
    .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sku {
    pub name: String,
    pub capacity: u32,
}

impl Default for Sku {
    fn default() -> Self {
        Self { name: "S1".into(), capacity: 1 }
    }
}

/// `properties.eventHubEndpoints.events`: the built-in endpoint (service-api §9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsEndpoint {
    pub partition_count: u32,
    pub retention_time_in_days: u32,
    /// Event Hub-compatible name; defaults to the hub name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Event Hub-compatible endpoint (`sb://{host}/`); filled in by the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

impl Default for EventsEndpoint {
    fn default() -> Self {
        Self { partition_count: 4, retention_time_in_days: 1, path: None, endpoint: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct EventHubEndpoints {
    #[serde(default)]
    pub events: EventsEndpoint,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackProperties {
    pub lock_duration_as_iso8601: String,
    pub ttl_as_iso8601: String,
    pub max_delivery_count: u32,
}

impl Default for FeedbackProperties {
    fn default() -> Self {
        Self { lock_duration_as_iso8601: "PT1M".into(), ttl_as_iso8601: "PT1H".into(), max_delivery_count: 10 }
    }
}

/// A CA certificate registered with the hub: `certificateAuthority` devices present chains
/// that end at a verified one (device-protocol §1.4). iothubd keeps these in the hub's
/// `properties.caCertificates` (on Azure they are a child resource of the hub).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaCertificate {
    pub name: String,
    /// The certificate, PEM.
    pub certificate: String,
    /// Only verified CAs authenticate devices.
    pub is_verified: bool,
    /// SHA-1 thumbprint, upper-case hex (filled by the hub).
    #[serde(default)]
    pub thumbprint: String,
}

/// `properties.cloudToDevice` (device-protocol §5.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CloudToDeviceProperties {
    pub max_delivery_count: u32,
    pub default_ttl_as_iso8601: String,
    #[serde(default)]
    pub feedback: FeedbackProperties,
}

impl Default for CloudToDeviceProperties {
    fn default() -> Self {
        Self { max_delivery_count: 10, default_ttl_as_iso8601: "PT1H".into(), feedback: FeedbackProperties::default() }
    }
}

/// The longest a cloud-to-device or feedback message may live (device-protocol §5.1).
pub const MAX_C2D_TTL: std::time::Duration = std::time::Duration::from_secs(2 * 24 * 3600);

impl CloudToDeviceProperties {
    /// `defaultTtlAsIso8601` (checked by [`HubDescription::normalize`]; 1 h if unreadable).
    pub fn default_ttl(&self) -> std::time::Duration {
        iso8601_duration(&self.default_ttl_as_iso8601).unwrap_or(std::time::Duration::from_secs(3600))
    }
}

impl FeedbackProperties {
    /// `ttlAsIso8601` (1 h if unreadable).
    pub fn ttl(&self) -> std::time::Duration {
        iso8601_duration(&self.ttl_as_iso8601).unwrap_or(std::time::Duration::from_secs(3600))
    }

    /// `lockDurationAsIso8601` (1 min if unreadable).
    pub fn lock_duration(&self) -> std::time::Duration {
        iso8601_duration(&self.lock_duration_as_iso8601).unwrap_or(std::time::Duration::from_secs(60))
    }
}

/// An ISO 8601 duration as ARM writes them (`PT1H`, `P2D`, `PT1M30S`); `None` when unreadable.
pub fn iso8601_duration(text: &str) -> Option<std::time::Duration> {
    iso8601::duration(text).ok().map(Into::into)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HubProperties {
    pub host_name: String,
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicy>,
    #[serde(default)]
    pub event_hub_endpoints: EventHubEndpoints,
    #[serde(default)]
    pub cloud_to_device: CloudToDeviceProperties,
    /// CA certificates for X.509 `certificateAuthority` devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_certificates: Vec<CaCertificate>,
    /// ARM `routing` (service-api §10); stored now, evaluated by the routing actors.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub routing: Value,
}

/// A hub as the operator API and the store see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubDescription {
    pub name: String,
    #[serde(default)]
    pub etag: String,
    #[serde(default)]
    pub sku: Sku,
    pub properties: HubProperties,
}

/// Why a hub description is refused; mapped to 400 by the operator API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HubError(pub String);

impl HubDescription {
    /// Fills defaults (built-in policies, missing keys, EH name) and checks limits.
    pub fn normalize(&mut self) -> Result<(), HubError> {
        let name_ok = (3..=50).contains(&self.name.len())
            && self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !self.name.starts_with('-')
            && !self.name.ends_with('-');
        if !name_ok {
            return Err(HubError(format!(
                "hub name '{}' must be 3-50 characters of letters, digits and inner hyphens",
                self.name
            )));
        }
        self.properties.host_name = self.properties.host_name.trim().to_ascii_lowercase();
        if self.properties.host_name.is_empty() {
            return Err(HubError("properties.hostName is required".into()));
        }
        if self.properties.authorization_policies.is_empty() {
            self.properties.authorization_policies = builtin_policies();
        }
        for p in &mut self.properties.authorization_policies {
            for key in [&mut p.primary_key, &mut p.secondary_key] {
                if key.is_empty() {
                    *key = generate_key();
                }
            }
        }
        let events = &mut self.properties.event_hub_endpoints.events;
        if !(2..=128).contains(&events.partition_count) {
            return Err(HubError("eventHubEndpoints.events.partitionCount must be 2-128".into()));
        }
        if !(1..=7).contains(&events.retention_time_in_days) {
            return Err(HubError("eventHubEndpoints.events.retentionTimeInDays must be 1-7".into()));
        }
        events.path.get_or_insert_with(|| self.name.clone());
        events.endpoint = Some(format!("sb://{}/", self.properties.host_name));
        let c2d = &self.properties.cloud_to_device;
        if !(1..=100).contains(&c2d.max_delivery_count) {
            return Err(HubError("cloudToDevice.maxDeliveryCount must be 1-100".into()));
        }
        let minute = std::time::Duration::from_secs(60);
        let in_range = |text: &str, min, max| iso8601_duration(text).is_some_and(|d| (min..=max).contains(&d));
        if !in_range(&c2d.default_ttl_as_iso8601, minute, MAX_C2D_TTL) {
            return Err(HubError("cloudToDevice.defaultTtlAsIso8601 must be an ISO 8601 duration of PT1M-P2D".into()));
        }
        if !in_range(&c2d.feedback.ttl_as_iso8601, minute, MAX_C2D_TTL) {
            return Err(HubError(
                "cloudToDevice.feedback.ttlAsIso8601 must be an ISO 8601 duration of PT1M-P2D".into(),
            ));
        }
        let (five_s, five_min) = (std::time::Duration::from_secs(5), std::time::Duration::from_secs(300));
        if !in_range(&c2d.feedback.lock_duration_as_iso8601, five_s, five_min) {
            return Err(HubError("cloudToDevice.feedback.lockDurationAsIso8601 must be PT5S-PT5M".into()));
        }
        if !(1..=100).contains(&c2d.feedback.max_delivery_count) {
            return Err(HubError("cloudToDevice.feedback.maxDeliveryCount must be 1-100".into()));
        }
        if !(1..=200).contains(&self.sku.capacity) {
            return Err(HubError("sku.capacity must be 1-200".into()));
        }
        Ok(())
    }

    pub fn policy(&self, name: &str) -> Option<&AuthorizationPolicy> {
        self.properties.authorization_policies.iter().find(|p| p.key_name == name)
    }

    /// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…` for a policy.
    pub fn connection_string(&self, policy: &str) -> Option<String> {
        self.policy(policy).map(|p| {
            format!(
                "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
                self.properties.host_name, p.key_name, p.primary_key
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_durations_of_hub_settings() {
        assert_eq!(iso8601_duration("PT1H"), Some(std::time::Duration::from_secs(3600)));
        assert_eq!(iso8601_duration("P2D"), Some(MAX_C2D_TTL));
        assert_eq!(iso8601_duration("PT1M30S"), Some(std::time::Duration::from_secs(90)));
        assert_eq!(iso8601_duration("an hour"), None);
    }

    #[test]
    fn rights_round_trip_arm_text() {
        let r = AccessRights::parse("registryread, ServiceConnect").unwrap();
        assert!(r.contains(AccessRights::REGISTRY_READ));
        assert!(!r.contains(AccessRights::REGISTRY_WRITE));
        assert_eq!(r.to_string(), "RegistryRead, ServiceConnect");
        assert!(AccessRights::parse("Everything").is_err());
    }

    #[test]
    fn normalize_fills_policies_and_event_hub_name() {
        let mut hub = HubDescription {
            name: "myhub".into(),
            etag: String::new(),
            sku: Sku::default(),
            properties: HubProperties { host_name: "MyHub.Example".into(), ..Default::default() },
        };
        hub.normalize().unwrap();
        assert_eq!(hub.properties.host_name, "myhub.example");
        assert_eq!(hub.properties.authorization_policies.len(), 5);
        assert_eq!(hub.properties.event_hub_endpoints.events.path.as_deref(), Some("myhub"));
        assert!(hub.connection_string("iothubowner").unwrap().starts_with("HostName=myhub.example;"));
    }

    #[test]
    fn normalize_refuses_bad_partition_count() {
        let mut hub = HubDescription {
            name: "myhub".into(),
            etag: String::new(),
            sku: Sku::default(),
            properties: HubProperties { host_name: "h".into(), ..Default::default() },
        };
        hub.properties.event_hub_endpoints.events.partition_count = 1;
        assert!(hub.normalize().is_err());
    }
}
