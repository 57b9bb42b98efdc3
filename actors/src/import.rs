//! Bulk identity import: the modes of `POST /devices` (service-api §3) and of the operator
//! API's JSON-lines import, as sequences of registry writes run by the `HubActor`.

use std::str::FromStr;

use serde_json::{Map, Value};

use crate::model::identity::{IdentityKey, IdentitySpec};

/// `importMode`, matched case-insensitively (Node sends `Update`, `UpdateIfMatchETag`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImportMode {
    Create,
    Update,
    UpdateIfMatchETag,
    #[default]
    CreateOrUpdate,
    CreateOrUpdateIfMatchETag,
    Delete,
    DeleteIfMatchETag,
    UpdateTwin,
    UpdateTwinIfMatchETag,
}

impl ImportMode {
    const NAMES: [(&'static str, Self); 9] = [
        ("create", Self::Create),
        ("update", Self::Update),
        ("updateIfMatchETag", Self::UpdateIfMatchETag),
        ("createOrUpdate", Self::CreateOrUpdate),
        ("createOrUpdateIfMatchETag", Self::CreateOrUpdateIfMatchETag),
        ("delete", Self::Delete),
        ("deleteIfMatchETag", Self::DeleteIfMatchETag),
        ("updateTwin", Self::UpdateTwin),
        ("updateTwinIfMatchETag", Self::UpdateTwinIfMatchETag),
    ];

    /// The name as the bulk reply's `operation` field spells it.
    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, m)| *m == self).map(|(n, _)| *n).unwrap_or("createOrUpdate")
    }

    /// Whether this mode checks the item's identity `eTag` (a missing one fails the item).
    pub fn matches_etag(self) -> bool {
        matches!(self, Self::UpdateIfMatchETag | Self::CreateOrUpdateIfMatchETag | Self::DeleteIfMatchETag)
    }
}

impl FromStr for ImportMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s))
            .map(|(_, m)| *m)
            .ok_or_else(|| format!("unknown importMode '{s}'"))
    }
}

/// One item of an import.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportItem {
    pub key: IdentityKey,
    pub mode: ImportMode,
    /// The item's `eTag`, checked by the `…IfMatchETag` modes.
    pub etag: Option<String>,
    pub spec: IdentitySpec,
    /// Twin content of the item (`tags`, `properties.desired`), applied as a twin PATCH.
    pub twin: TwinImport,
}

/// The twin part of an import item.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwinImport {
    pub tags: Option<Map<String, Value>>,
    pub desired: Option<Map<String, Value>>,
    /// `twinETag`, checked by `updateTwinIfMatchETag`.
    pub etag: Option<String>,
}

impl TwinImport {
    pub fn is_empty(&self) -> bool {
        self.tags.is_none() && self.desired.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_modes_parse_case_insensitively() {
        assert_eq!("UpdateIfMatchETag".parse::<ImportMode>(), Ok(ImportMode::UpdateIfMatchETag));
        assert_eq!("DELETE".parse::<ImportMode>(), Ok(ImportMode::Delete));
        assert!("upsert".parse::<ImportMode>().is_err());
        assert_eq!(ImportMode::CreateOrUpdateIfMatchETag.name(), "createOrUpdateIfMatchETag");
    }
}
