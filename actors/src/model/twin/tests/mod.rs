//! Behaviour of twin writes and views (service-api §4, §11; device-protocol §2.6, §5.2).

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Map, Value, json};

use super::limits::{MAX_INTEGER, MAX_KEY_BYTES, MAX_STRING_BYTES, MIN_INTEGER};
use super::*;

mod views;

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Distinct, readable instants: `at(n)` is 2022-06-01T22:27:5n.2612586Z.
fn at(n: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_654_122_470 + n, 261_258_600).single().expect("valid instant")
}

fn stamp(n: i64) -> String {
    format!("2022-06-01T22:27:{:02}.2612586Z", 50 + n)
}

fn desired_patch(twin: &mut Twin, desired: Value, n: i64) -> TwinUpdate {
    twin.patch(None, Some(object(desired)), at(n)).expect("valid desired patch")
}

fn desired_metadata(twin: &Twin) -> Value {
    twin.desired_metadata.json()
}

fn reported_metadata(twin: &Twin) -> Value {
    twin.reported_metadata.json()
}

#[test]
fn new_twin_has_version_one_and_bare_root_metadata() {
    let twin = Twin::new(at(0));
    assert_eq!((twin.version(), twin.desired_version(), twin.reported_version()), (1, 1, 1));
    assert_eq!(desired_metadata(&twin), json!({"$lastUpdated": stamp(0)}));
    assert_eq!(reported_metadata(&twin), json!({"$lastUpdated": stamp(0)}));
    assert_eq!(twin.etag(), "AAAAAAAAAAE=");
}

#[test]
fn etag_is_base64_of_the_big_endian_version_and_moves_with_every_write() {
    let mut twin = Twin::new(at(0));
    twin.version = 7;
    assert_eq!(twin.etag(), "AAAAAAAAAAc=");
    twin.report(object(json!({"a": 1})), at(1)).unwrap();
    assert_eq!(twin.etag(), "AAAAAAAAAAg=");
}

#[test]
fn patch_merges_recursively_and_keeps_siblings() {
    let mut twin = Twin::new(at(0));
    desired_patch(&mut twin, json!({"cfg": {"freq": 5, "mode": "a"}, "other": 1}), 1);
    desired_patch(&mut twin, json!({"cfg": {"freq": 6}}), 2);
    assert_eq!(Value::Object(twin.desired().clone()), json!({"cfg": {"freq": 6, "mode": "a"}, "other": 1}));
}

#[test]
fn null_in_desired_patch_removes_key_and_its_metadata() {
    let mut twin = Twin::new(at(0));
    desired_patch(&mut twin, json!({"cfg": {"freq": 5, "mode": "a"}}), 1);
    desired_patch(&mut twin, json!({"cfg": {"mode": null}}), 2);
    assert_eq!(Value::Object(twin.desired().clone()), json!({"cfg": {"freq": 5}}));
    let metadata = desired_metadata(&twin);
    assert!(metadata["cfg"].get("mode").is_none());
    assert!(metadata["cfg"].get("freq").is_some());

    desired_patch(&mut twin, json!({"cfg": null}), 3);
    assert!(twin.desired().is_empty());
    assert_eq!(desired_metadata(&twin), json!({"$lastUpdated": stamp(3), "$lastUpdatedVersion": 4}));
}

#[test]
fn arrays_are_replaced_whole() {
    let mut twin = Twin::new(at(0));
    desired_patch(&mut twin, json!({"list": [1, 2, 3], "objs": [{"a": 1}]}), 1);
    desired_patch(&mut twin, json!({"list": [9], "objs": [{"b": 2}]}), 2);
    assert_eq!(Value::Object(twin.desired().clone()), json!({"list": [9], "objs": [{"b": 2}]}));
    // Arrays are leaves of the metadata tree: nothing below them.
    assert_eq!(desired_metadata(&twin)["objs"], json!({"$lastUpdated": stamp(2), "$lastUpdatedVersion": 3}));
}

#[test]
fn desired_version_bumps_only_when_desired_changes() {
    let mut twin = Twin::new(at(0));
    let update = twin.patch(Some(object(json!({"site": "A"}))), None, at(1)).unwrap();
    assert_eq!((twin.version(), twin.desired_version()), (2, 1));
    assert_eq!(update.desired, None);

    let update = twin.patch(Some(object(json!({"site": "B"}))), Some(object(json!({"x": 1}))), at(2)).unwrap();
    assert_eq!((twin.version(), twin.desired_version(), twin.reported_version()), (3, 2, 1));
    assert_eq!(update.desired.map(|d| d.version), Some(2));
}

#[test]
fn empty_or_omitted_sections_change_nothing() {
    let mut twin = Twin::new(at(0));
    let before = twin.clone();
    let update = twin.patch(Some(Map::new()), Some(object(json!({"$version": 4}))), at(1)).unwrap();
    assert_eq!(update, TwinUpdate { change_event: None, desired: None });
    assert_eq!(twin.patch(None, None, at(1)).unwrap().change_event, None);
    assert_eq!(twin, before);
}

#[test]
fn metadata_stamps_ancestors_of_changed_leaf() {
    let mut twin = Twin::new(at(0));
    desired_patch(&mut twin, json!({"a": {"b": {"c": 1}, "sibling": 1}, "untouched": 1}), 1);
    desired_patch(&mut twin, json!({"a": {"b": {"c": 2}}}), 2);
    let metadata = desired_metadata(&twin);
    let fresh = json!(stamp(2));
    for node in [&metadata, &metadata["a"], &metadata["a"]["b"], &metadata["a"]["b"]["c"]] {
        assert_eq!(node["$lastUpdated"], fresh);
        assert_eq!(node["$lastUpdatedVersion"], json!(3));
    }
    assert_eq!(metadata["a"]["sibling"], json!({"$lastUpdated": stamp(1), "$lastUpdatedVersion": 2}));
    assert_eq!(metadata["untouched"], json!({"$lastUpdated": stamp(1), "$lastUpdatedVersion": 2}));
}

#[test]
fn deleting_a_child_restamps_its_ancestors() {
    let mut twin = Twin::new(at(0));
    desired_patch(&mut twin, json!({"a": {"b": {"gone": 1, "kept": 1}}}), 1);
    desired_patch(&mut twin, json!({"a": {"b": {"gone": null}}}), 2);
    let metadata = desired_metadata(&twin);
    assert_eq!(metadata["a"]["$lastUpdated"], json!(stamp(2)));
    assert_eq!(metadata["a"]["b"]["$lastUpdated"], json!(stamp(2)));
    assert_eq!(metadata["a"]["b"]["kept"]["$lastUpdated"], json!(stamp(1)));
}

#[test]
fn object_and_leaf_replace_each_other_with_matching_metadata() {
    let mut twin = Twin::new(at(0));
    desired_patch(&mut twin, json!({"x": {"deep": {"er": 1}}, "y": 1}), 1);
    desired_patch(&mut twin, json!({"x": 5, "y": {"now": {"an": "object", "skip": null}}}), 2);
    assert_eq!(Value::Object(twin.desired().clone()), json!({"x": 5, "y": {"now": {"an": "object"}}}));
    let s = json!({"$lastUpdated": stamp(2), "$lastUpdatedVersion": 3});
    let metadata = desired_metadata(&twin);
    assert_eq!(metadata["x"], s);
    assert_eq!(
        metadata["y"],
        json!({"$lastUpdated": stamp(2), "$lastUpdatedVersion": 3, "now": {
            "$lastUpdated": stamp(2), "$lastUpdatedVersion": 3, "an": s,
        }})
    );
}

#[test]
fn read_only_fields_in_a_service_body_are_ignored() {
    let mut twin = Twin::new(at(0));
    let body = json!({"$version": 99, "$metadata": {"$lastUpdated": "x"}, "k": 1});
    let update = twin.patch(Some(object(json!({"$version": 1}))), Some(object(body)), at(1)).unwrap();
    assert_eq!(Value::Object(twin.desired().clone()), json!({"k": 1}));
    assert!(twin.tags().is_empty());
    assert_eq!(twin.desired_version(), 2);
    assert_eq!(update.desired.unwrap().body, json!({"k": 1, "$version": 2}));
}

#[test]
fn dollar_keys_below_the_section_root_are_rejected() {
    let mut twin = Twin::new(at(0));
    let err = twin.patch(None, Some(object(json!({"a": {"$version": 1}}))), at(1)).unwrap_err();
    assert_eq!(err, TwinError::InvalidKey { path: "properties.desired.a.$version".into() });
}

#[test]
fn desired_notification_is_the_patch_plus_version() {
    let mut twin = Twin::new(at(0));
    let update = desired_patch(&mut twin, json!({"cfg": {"freq": 5}, "old": null, "l": [1]}), 1);
    let desired = update.desired.unwrap();
    assert_eq!(desired.version, 2);
    assert_eq!(desired.body, json!({"cfg": {"freq": 5}, "old": null, "l": [1], "$version": 2}));
}

#[test]
fn update_event_shows_changed_sections_with_metadata_and_version() {
    let mut twin = Twin::new(at(0));
    desired_patch(&mut twin, json!({"cfg": {"freq": 5}, "gone": 1, "other": 1}), 1);
    let update = twin
        .patch(Some(object(json!({"site": "A"}))), Some(object(json!({"cfg": {"freq": 6}, "gone": null}))), at(2))
        .unwrap();
    let s = json!({"$lastUpdated": stamp(2), "$lastUpdatedVersion": 3});
    assert_eq!(
        update.change_event,
        Some(json!({
            "version": 3,
            "tags": {"site": "A"},
            "properties": {"desired": {
                "cfg": {"freq": 6},
                "gone": null,
                "$metadata": {"$lastUpdated": stamp(2), "$lastUpdatedVersion": 3, "cfg": {
                    "$lastUpdated": stamp(2), "$lastUpdatedVersion": 3, "freq": s,
                }},
                "$version": 3,
            }},
        }))
    );
}

#[test]
fn tags_only_update_event_has_no_properties() {
    let mut twin = Twin::new(at(0));
    let update = twin.patch(Some(object(json!({"site": "A", "gone": null}))), None, at(1)).unwrap();
    assert_eq!(update.change_event, Some(json!({"version": 2, "tags": {"site": "A", "gone": null}})));
}

#[test]
fn replace_swaps_tags_and_desired_and_keeps_reported() {
    let mut twin = Twin::new(at(0));
    twin.patch(Some(object(json!({"old": 1}))), Some(object(json!({"a": 1, "b": {"c": 1}}))), at(1)).unwrap();
    twin.report(object(json!({"battery": 55})), at(2)).unwrap();
    let reported_metadata_before = reported_metadata(&twin);

    let tags = object(json!({"site": "B", "$version": 5, "dropped": null}));
    let desired = object(json!({"b": {"d": 2}, "$metadata": {}, "$version": 9}));
    let update = twin.replace(tags, desired, at(3)).unwrap();
    assert_eq!(Value::Object(twin.tags().clone()), json!({"site": "B"}));
    assert_eq!(Value::Object(twin.desired().clone()), json!({"b": {"d": 2}}));
    assert_eq!(Value::Object(twin.reported().clone()), json!({"battery": 55}));
    assert_eq!(reported_metadata(&twin), reported_metadata_before);
    assert_eq!((twin.version(), twin.desired_version(), twin.reported_version()), (4, 3, 2));
    let s = json!({"$lastUpdated": stamp(3), "$lastUpdatedVersion": 3});
    assert_eq!(
        desired_metadata(&twin),
        json!({"$lastUpdated": stamp(3), "$lastUpdatedVersion": 3, "b": {
            "$lastUpdated": stamp(3), "$lastUpdatedVersion": 3, "d": s,
        }})
    );
    assert_eq!(update.version, 3);
}

#[test]
fn replace_notification_deletes_what_the_device_no_longer_should_have() {
    let mut twin = Twin::new(at(0));
    desired_patch(&mut twin, json!({"a": 1, "b": {"c": 1, "d": 1}}), 1);
    let update = twin.replace(Map::new(), object(json!({"b": {"d": 2}})), at(2)).unwrap();
    assert_eq!(update.body, json!({"a": null, "b": {"c": null, "d": 2}, "$version": 3}));
}

#[test]
fn invalid_replace_leaves_twin_unchanged() {
    let mut twin = Twin::new(at(0));
    desired_patch(&mut twin, json!({"a": 1}), 1);
    let before = twin.clone();
    let big = object(json!({"t": "x".repeat(4000), "u": "x".repeat(4000), "v": "x".repeat(400)}));
    let err = twin.replace(big, Map::new(), at(2)).unwrap_err();
    assert!(matches!(err, TwinError::TooLarge { section: Section::Tags, .. }));
    assert!(twin.replace(Map::new(), object(json!({"a.b": 1})), at(2)).is_err());
    assert_eq!(twin, before);
}

#[test]
fn report_merges_and_bumps_reported_version() {
    let mut twin = Twin::new(at(0));
    let first = twin.report(object(json!({"battery": 55, "fw": {"v": "1.0", "ok": true}})), at(1)).unwrap();
    let second = twin.report(object(json!({"fw": {"ok": null}})), at(2)).unwrap();
    assert_eq!((first.version, second.version), (2, 3));
    assert_eq!((twin.version(), twin.desired_version()), (3, 1));
    assert_eq!(Value::Object(twin.reported().clone()), json!({"battery": 55, "fw": {"v": "1.0"}}));
    assert_eq!(
        second.change_event,
        Some(json!({
            "version": 3,
            "properties": {"reported": {
                "fw": {"ok": null},
                "$metadata": {"$lastUpdated": stamp(2), "fw": {"$lastUpdated": stamp(2)}},
                "$version": 3,
            }},
        }))
    );
}

#[test]
fn reported_metadata_has_no_last_updated_version() {
    let mut twin = Twin::new(at(0));
    twin.report(object(json!({"a": {"b": 1}})), at(1)).unwrap();
    assert_eq!(
        reported_metadata(&twin),
        json!({"$lastUpdated": stamp(1), "a": {"$lastUpdated": stamp(1), "b": {"$lastUpdated": stamp(1)}}})
    );
}

#[test]
fn empty_report_keeps_the_reported_version() {
    let mut twin = Twin::new(at(0));
    let update = twin.report(Map::new(), at(1)).unwrap();
    assert_eq!(update, ReportedUpdate { version: 1, change_event: None });
    assert_eq!(twin.version(), 1);
}

#[test]
fn reported_rejects_dollar_keys() {
    let mut twin = Twin::new(at(0));
    let before = twin.clone();
    for body in [json!({"$version": 3}), json!({"$metadata": {}}), json!({"ok": {"$x": 1}})] {
        let err = twin.report(object(body.clone()), at(1)).unwrap_err();
        assert!(matches!(err, TwinError::InvalidKey { .. }), "{body}");
    }
    assert_eq!(twin, before);
}

#[test]
fn oversize_desired_is_rejected_and_twin_unchanged() {
    let mut twin = Twin::new(at(0));
    // 8192 bytes each, 8194 with their key: three fit in 32 KB, a fourth does not.
    let quarter = json!({"a": "x".repeat(4095), "b": "x".repeat(4095)});
    desired_patch(&mut twin, json!({"h1": quarter.clone(), "h2": quarter.clone(), "h3": quarter.clone()}), 1);
    let before = twin.clone();
    let err = twin.patch(Some(object(json!({"tag": 1}))), Some(object(json!({"h4": quarter}))), at(2)).unwrap_err();
    assert!(matches!(err, TwinError::TooLarge { section: Section::Desired, limit: 32768, .. }), "{err}");
    assert_eq!(twin, before);
}

#[test]
fn size_limit_applies_to_the_result_so_deleting_makes_room() {
    let mut twin = Twin::new(at(0));
    let big = |s: &str| json!({ s: "x".repeat(4000), format!("{s}2"): "x".repeat(4000) });
    twin.patch(Some(object(big("a"))), None, at(1)).unwrap();
    assert!(twin.patch(Some(object(json!({"b": "x".repeat(400)}))), None, at(2)).is_err());
    twin.patch(Some(object(json!({"a": null, "b": "x".repeat(3000)}))), None, at(3)).unwrap();
    assert_eq!(twin.tags().len(), 2);
}

#[test]
fn oversize_reported_is_rejected() {
    let mut twin = Twin::new(at(0));
    let fields: Map<String, Value> = (0..9).map(|i| (format!("k{i}"), json!("x".repeat(4000)))).collect();
    let err = twin.report(fields, at(1)).unwrap_err();
    assert!(matches!(err, TwinError::TooLarge { section: Section::Reported, .. }));
    assert!(twin.reported().is_empty());
}

#[test]
fn a_refused_section_keeps_the_valid_one_from_applying() {
    let mut twin = Twin::new(at(0));
    let before = twin.clone();
    let err =
        twin.patch(Some(object(json!({"site": "A"}))), Some(object(json!({"n": MAX_INTEGER + 1}))), at(1)).unwrap_err();
    assert!(matches!(err, TwinError::IntegerOutOfRange { .. }));
    assert_eq!(twin, before);
}

#[test]
fn key_string_integer_and_depth_limits_apply_to_service_patches() {
    let deep = json!({ "root": (0..11).fold(json!(1), |inner, i| json!({ format!("l{i}"): inner })) });
    let cases = [
        json!({ "k".repeat(MAX_KEY_BYTES + 1): 1 }),
        json!({"a b": 1}),
        json!({"s": "x".repeat(MAX_STRING_BYTES + 1)}),
        json!({"n": MIN_INTEGER - 1}),
        deep,
    ];
    let mut twin = Twin::new(at(0));
    for desired in cases {
        assert!(twin.patch(None, Some(object(desired.clone())), at(1)).is_err(), "{desired}");
        assert!(twin.patch(Some(object(desired.clone())), None, at(1)).is_err(), "{desired}");
    }
    assert_eq!(twin.version(), 1);
}
