//! The merge rules of twin writes (service-api §4, device-protocol §2.6): a patch merges
//! recursively, `null` deletes a key, anything else — arrays included — replaces whole.

use serde_json::{Map, Value};

use super::metadata::{Metadata, Stamp};

/// Fields of a section the hub owns. A service body may carry them back (the C# and Python
/// SDKs send a fetched twin's `$version` and `$metadata`); read-only fields in request bodies
/// are ignored (service-api §0).
const READ_ONLY: [&str; 2] = ["$version", "$metadata"];

/// A section as a service sent it, without the read-only fields.
pub(super) fn without_read_only(mut section: Map<String, Value>) -> Map<String, Value> {
    for key in READ_ONLY {
        section.remove(key);
    }
    section
}

/// Merges `patch` into `data`. With a metadata tree (desired, reported; tags have none) every
/// node the patch names gets the write's stamp, so each touched leaf's ancestors do too, also
/// when the touch is a deletion; deleted keys lose their metadata.
pub(super) fn merge(
    data: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    mut metadata: Option<(&mut Metadata, Stamp)>,
) {
    if let Some((node, stamp)) = &mut metadata {
        node.stamp(*stamp);
    }
    for (key, value) in patch {
        let metadata = metadata.as_mut().map(|(node, stamp)| (&mut **node, *stamp));
        match value {
            Value::Null => {
                data.remove(key);
                if let Some((node, _)) = metadata {
                    node.remove_child(key);
                }
            }
            Value::Object(sub) => {
                if let Some(Value::Object(existing)) = data.get_mut(key) {
                    let child = metadata.map(|(node, stamp)| (node.child_mut(key, stamp), stamp));
                    merge(existing, sub, child);
                } else {
                    let fresh = without_nulls(sub);
                    if let Some((node, stamp)) = metadata {
                        node.set_child(key, Metadata::of_object(&fresh, stamp));
                    }
                    data.insert(key.clone(), Value::Object(fresh));
                }
            }
            leaf => {
                data.insert(key.clone(), leaf.clone());
                if let Some((node, stamp)) = metadata {
                    node.set_child(key, Metadata::new(stamp));
                }
            }
        }
    }
}

/// An object as written where nothing was: its `null` members delete nothing and are dropped.
/// Arrays are values, so `null`s inside them stay.
pub(super) fn without_nulls(object: &Map<String, Value>) -> Map<String, Value> {
    object
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let v = match v {
                Value::Object(sub) => Value::Object(without_nulls(sub)),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect()
}

/// The patch that turns `old` into `new`: `new`'s members, with `null` for every key `new`
/// lacks at any depth. A device that merges it ends up with `new` (device-protocol §2.6 only
/// has patch notifications, so a replaced desired section is pushed this way).
pub(super) fn replacement_patch(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch: Map<String, Value> =
        old.keys().filter(|k| !new.contains_key(*k)).map(|k| (k.clone(), Value::Null)).collect();
    for (key, value) in new {
        let value = match (old.get(key), value) {
            (Some(Value::Object(before)), Value::Object(after)) => Value::Object(replacement_patch(before, after)),
            _ => value.clone(),
        };
        patch.insert(key.clone(), value);
    }
    patch
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn merged(data: Value, patch: Value) -> Value {
        let mut data = object(data);
        merge(&mut data, &object(patch), None);
        Value::Object(data)
    }

    #[test]
    fn objects_merge_recursively_and_null_deletes() {
        let data = json!({"a": {"x": 1, "y": 2}, "b": true, "keep": "k"});
        let patch = json!({"a": {"x": null, "z": 3}, "b": null, "missing": null});
        assert_eq!(merged(data, patch), json!({"a": {"y": 2, "z": 3}, "keep": "k"}));
    }

    #[test]
    fn arrays_and_scalars_replace_whole() {
        let data = json!({"list": [1, 2, 3], "o": {"x": 1}, "s": "v"});
        let patch = json!({"list": [4], "o": 5, "s": {"now": "object", "gone": null}});
        assert_eq!(merged(data, patch), json!({"list": [4], "o": 5, "s": {"now": "object"}}));
    }

    #[test]
    fn nulls_inside_arrays_are_values() {
        assert_eq!(merged(json!({}), json!({"a": {"l": [null, 1]}})), json!({"a": {"l": [null, 1]}}));
    }

    #[test]
    fn read_only_fields_are_dropped_and_others_kept() {
        let section = object(json!({"$version": 3, "$metadata": {}, "$other": 1, "k": 2}));
        assert_eq!(Value::Object(without_read_only(section)), json!({"$other": 1, "k": 2}));
    }

    #[test]
    fn replacement_patch_turns_old_into_new() {
        let old = json!({"a": {"x": 1, "y": {"deep": 1}}, "gone": 1, "leaf": 1});
        let new = json!({"a": {"x": 2}, "leaf": {"now": "object"}, "added": [1]});
        let patch = replacement_patch(&object(old.clone()), &object(new.clone()));
        assert_eq!(
            Value::Object(patch.clone()),
            json!({"a": {"x": 2, "y": null}, "gone": null, "leaf": {"now": "object"}, "added": [1]})
        );
        assert_eq!(merged(old, Value::Object(patch)), new);
    }
}
