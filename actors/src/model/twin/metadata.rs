//! `$metadata` of the desired and reported sections (service-api §4).
//!
//! The tree mirrors the section's data: the section root, every object and every leaf carries
//! the time of the write that last touched it (`$lastUpdated`) and, in desired, that write's
//! desired `$version` (`$lastUpdatedVersion`). Arrays are leaves. It is kept typed rather than
//! as JSON so a write restamps nodes without parsing times, and rendered on the way out.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::model::iso_time;

/// What one write leaves on every node it touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub at: DateTime<Utc>,
    /// The desired `$version` of the write; `None` for reported, which has no such field.
    pub version: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Metadata {
    last_updated: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_updated_version: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    children: BTreeMap<String, Metadata>,
}

impl Metadata {
    /// A node with no children: a leaf, an empty object or a fresh section root.
    pub fn new(stamp: Stamp) -> Self {
        Self { last_updated: stamp.at, last_updated_version: stamp.version, children: BTreeMap::new() }
    }

    /// The tree for an object written whole: it and every object and leaf in it get `stamp`.
    pub fn of_object(object: &Map<String, Value>, stamp: Stamp) -> Self {
        let children = object
            .iter()
            .map(|(k, v)| {
                let child = match v {
                    Value::Object(sub) => Self::of_object(sub, stamp),
                    _ => Self::new(stamp),
                };
                (k.clone(), child)
            })
            .collect();
        Self { children, ..Self::new(stamp) }
    }

    pub fn stamp(&mut self, stamp: Stamp) {
        self.last_updated = stamp.at;
        self.last_updated_version = stamp.version;
    }

    /// The child for `key`, created with `stamp` if the tree lacks it.
    pub fn child_mut(&mut self, key: &str, stamp: Stamp) -> &mut Metadata {
        self.children.entry(key.to_owned()).or_insert_with(|| Self::new(stamp))
    }

    pub fn set_child(&mut self, key: &str, child: Metadata) {
        self.children.insert(key.to_owned(), child);
    }

    pub fn remove_child(&mut self, key: &str) {
        self.children.remove(key);
    }

    /// The `$metadata` JSON of the whole tree.
    pub fn json(&self) -> Value {
        let mut out = self.own_json();
        for (key, child) in &self.children {
            out.insert(key.clone(), child.json());
        }
        Value::Object(out)
    }

    /// The `$metadata` JSON limited to the paths of `patch`, for the update event of
    /// service-api §11. Deleted keys (`null` in the patch) have no metadata left to show.
    pub fn patch_json(&self, patch: &Map<String, Value>) -> Value {
        let mut out = self.own_json();
        for (key, value) in patch {
            let Some(child) = self.children.get(key) else {
                continue;
            };
            let shown = match value {
                Value::Null => continue,
                Value::Object(sub) => child.patch_json(sub),
                _ => child.json(),
            };
            out.insert(key.clone(), shown);
        }
        Value::Object(out)
    }

    fn own_json(&self) -> Map<String, Value> {
        let mut out = Map::new();
        out.insert("$lastUpdated".into(), json!(iso_time(self.last_updated)));
        if let Some(version) = self.last_updated_version {
            out.insert("$lastUpdatedVersion".into(), json!(version));
        }
        out
    }
}
