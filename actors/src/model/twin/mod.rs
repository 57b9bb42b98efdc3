//! Device and module twins (service-api §4, device-protocol §2.6 and §5.2): the document, its
//! writes and its JSON views, without I/O.
//!
//! - [`Twin`]: tags, desired and reported properties with their versions and `$metadata`,
//!   serialized as-is into the store.
//! - Writes: [`Twin::patch`] (service PATCH), [`Twin::replace`] (service PUT) and
//!   [`Twin::report`] (device reported PATCH). Each checks the key, value, depth and size
//!   limits first, so a refused write ([`TwinError`]) leaves the twin untouched, and returns
//!   what the hub must announce: the twin change event body (service-api §11) and the desired
//!   notification for the device.
//! - Views: [`Twin::service_json`] (the REST twin) and [`Twin::device_json`] (a device's GET).
//!
//! The twin ETag is derived from `version`, as Azure's is: base64 of the big-endian 8-byte
//! version (`AAAAAAAAAAc=` at version 7). It changes with every write and needs no storage.

mod limits;
mod metadata;
mod patch;
mod view;

#[cfg(test)]
mod tests;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

pub use limits::{Section, TwinError};
pub use view::TwinIdentity;

use limits::{check_content, check_size, merged_size, object_size};
use metadata::{Metadata, Stamp};
use patch::{merge, replacement_patch, without_nulls, without_read_only};

/// A twin as the store keeps it. Identity and connection fields shown in the REST view are not
/// part of it: they come from the registry and the live directory (see [`TwinIdentity`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Twin {
    /// +1 on every write to any section.
    version: u64,
    tags: Map<String, Value>,
    desired: Map<String, Value>,
    /// Desired `$version`: +1 on every write that touches desired.
    desired_version: u64,
    desired_metadata: Metadata,
    reported: Map<String, Value>,
    /// Reported `$version`: +1 on every device report.
    reported_version: u64,
    reported_metadata: Metadata,
}

/// What a service PATCH changed.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinUpdate {
    /// Body of the `updateTwin` change event (service-api §11): the new `version` and the
    /// sections as patched, deleted keys as `null`, desired with its `$metadata` and `$version`.
    /// `None` when the patch named nothing, so nothing changed.
    pub change_event: Option<Value>,
    /// For connected devices subscribed to desired changes; `None` when desired was untouched.
    pub desired: Option<DesiredUpdate>,
}

/// A desired-property notification (device-protocol §2.6, §4.5).
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredUpdate {
    /// The new desired `$version`, also carried in the MQTT topic and the AMQP annotation.
    pub version: u64,
    /// The patch plus `"$version"`.
    pub body: Value,
}

/// What a device report changed.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedUpdate {
    /// The reported `$version` after the report, returned to the device (`$version=` of the
    /// MQTT response topic, AMQP `version` annotation).
    pub version: u64,
    /// Body of the `updateTwin` change event; `None` for an empty report, which changes nothing.
    pub change_event: Option<Value>,
}

impl Twin {
    /// The twin of a new identity: version 1, empty sections at `$version` 1 whose `$metadata`
    /// holds only the root's `$lastUpdated` (service-api §4).
    pub fn new(now: DateTime<Utc>) -> Self {
        let root = Metadata::new(Stamp { at: now, version: None });
        Self {
            version: 1,
            tags: Map::new(),
            desired: Map::new(),
            desired_version: 1,
            desired_metadata: root.clone(),
            reported: Map::new(),
            reported_version: 1,
            reported_metadata: root,
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Base64 of the big-endian version, Azure's twin ETag scheme.
    pub fn etag(&self) -> String {
        B64.encode(self.version.to_be_bytes())
    }

    pub fn tags(&self) -> &Map<String, Value> {
        &self.tags
    }

    pub fn desired(&self) -> &Map<String, Value> {
        &self.desired
    }

    pub fn desired_version(&self) -> u64 {
        self.desired_version
    }

    pub fn reported(&self) -> &Map<String, Value> {
        &self.reported
    }

    pub fn reported_version(&self) -> u64 {
        self.reported_version
    }

    /// A service PATCH: `tags` and `properties.desired` merged recursively, `null` deleting,
    /// arrays replaced whole; an omitted (or empty) section is untouched. Top-level `$version`
    /// and `$metadata` in either section are ignored as read-only.
    pub fn patch(
        &mut self,
        tags: Option<Map<String, Value>>,
        desired: Option<Map<String, Value>>,
        now: DateTime<Utc>,
    ) -> Result<TwinUpdate, TwinError> {
        let tags = tags.map(without_read_only).filter(|t| !t.is_empty());
        let desired = desired.map(without_read_only).filter(|d| !d.is_empty());
        if let Some(tags) = &tags {
            check_content(Section::Tags, tags)?;
            check_size(Section::Tags, merged_size(&self.tags, tags))?;
        }
        if let Some(desired) = &desired {
            check_content(Section::Desired, desired)?;
            check_size(Section::Desired, merged_size(&self.desired, desired))?;
        }
        if tags.is_none() && desired.is_none() {
            return Ok(TwinUpdate { change_event: None, desired: None });
        }

        self.version += 1;
        let mut event = Map::new();
        event.insert("version".into(), json!(self.version));
        if let Some(tags) = tags {
            merge(&mut self.tags, &tags, None);
            event.insert("tags".into(), Value::Object(tags));
        }
        let mut notification = None;
        if let Some(patch) = desired {
            self.desired_version += 1;
            let stamp = Stamp { at: now, version: Some(self.desired_version) };
            merge(&mut self.desired, &patch, Some((&mut self.desired_metadata, stamp)));
            let shown = section_event(&patch, &self.desired_metadata, self.desired_version);
            event.insert("properties".into(), json!({ "desired": shown }));
            notification =
                Some(DesiredUpdate { version: self.desired_version, body: with_version(patch, self.desired_version) });
        }
        Ok(TwinUpdate { change_event: Some(Value::Object(event)), desired: notification })
    }

    /// A service PUT: tags and desired replaced wholesale (read-only fields ignored, `null`
    /// members dropped), reported untouched. Always a write to desired, so its `$version` moves
    /// and every desired node is restamped. The `replaceTwin` event body (service-api §11) is
    /// the full twin, [`Twin::service_json`], taken after this returns.
    pub fn replace(
        &mut self,
        tags: Map<String, Value>,
        desired: Map<String, Value>,
        now: DateTime<Utc>,
    ) -> Result<DesiredUpdate, TwinError> {
        let tags = without_read_only(tags);
        let desired = without_read_only(desired);
        check_content(Section::Tags, &tags)?;
        check_content(Section::Desired, &desired)?;
        check_size(Section::Tags, object_size(&tags))?;
        check_size(Section::Desired, object_size(&desired))?;
        let desired = without_nulls(&desired);

        self.version += 1;
        self.desired_version += 1;
        let stamp = Stamp { at: now, version: Some(self.desired_version) };
        let patch = replacement_patch(&self.desired, &desired);
        self.desired_metadata = Metadata::of_object(&desired, stamp);
        self.desired = desired;
        self.tags = without_nulls(&tags);
        Ok(DesiredUpdate { version: self.desired_version, body: with_version(patch, self.desired_version) })
    }

    /// A device's reported-properties PATCH (device-protocol §2.6): merged like a service
    /// patch, except that no key may start with `$`, not even `$version`.
    pub fn report(&mut self, patch: Map<String, Value>, now: DateTime<Utc>) -> Result<ReportedUpdate, TwinError> {
        check_content(Section::Reported, &patch)?;
        check_size(Section::Reported, merged_size(&self.reported, &patch))?;
        if patch.is_empty() {
            return Ok(ReportedUpdate { version: self.reported_version, change_event: None });
        }

        self.version += 1;
        self.reported_version += 1;
        let stamp = Stamp { at: now, version: None };
        merge(&mut self.reported, &patch, Some((&mut self.reported_metadata, stamp)));
        let shown = section_event(&patch, &self.reported_metadata, self.reported_version);
        let event = json!({ "version": self.version, "properties": { "reported": shown } });
        Ok(ReportedUpdate { version: self.reported_version, change_event: Some(event) })
    }
}

/// A section as the update event shows it: the patch, the metadata of its paths, `$version`.
fn section_event(patch: &Map<String, Value>, metadata: &Metadata, version: u64) -> Value {
    let mut shown = patch.clone();
    shown.insert("$metadata".into(), metadata.patch_json(patch));
    shown.insert("$version".into(), json!(version));
    Value::Object(shown)
}

fn with_version(mut section: Map<String, Value>, version: u64) -> Value {
    section.insert("$version".into(), json!(version));
    Value::Object(section)
}
