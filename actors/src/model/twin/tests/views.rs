//! The REST twin and the device GET (service-api §4, device-protocol §2.6), and storage.

use serde_json::json;

use super::{at, desired_metadata, object, stamp};
use crate::model::identity::{ConnectionView, Identity, IdentityKey, IdentitySpec};
use crate::model::twin::{Twin, TwinIdentity};

fn identity() -> Identity {
    Identity::create(IdentityKey::device("d1"), IdentitySpec::default()).unwrap()
}

#[test]
fn service_json_matches_spec_shape() {
    let mut twin = Twin::new(at(0));
    twin.patch(Some(object(json!({"site": "A"}))), Some(object(json!({"cfg": {"freq": 5}}))), at(1)).unwrap();
    twin.report(object(json!({"battery": 55})), at(2)).unwrap();
    let mut registered = identity();
    registered.etag = "MTk0NTQyNzY3".into();
    let live = ConnectionView::default();
    let view = TwinIdentity { status_update_time: None, ..TwinIdentity::new(&registered, &live, "") };

    let d = json!({"$lastUpdated": stamp(1), "$lastUpdatedVersion": 2});
    assert_eq!(
        twin.service_json(&view),
        json!({
            "deviceId": "d1", "etag": "AAAAAAAAAAM=", "deviceEtag": "MTk0NTQyNzY3", "status": "enabled",
            "statusUpdateTime": "0001-01-01T00:00:00Z", "connectionState": "Disconnected",
            "lastActivityTime": "0001-01-01T00:00:00Z", "cloudToDeviceMessageCount": 0,
            "authenticationType": "sas",
            "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
            "modelId": "", "version": 3,
            "tags": {"site": "A"},
            "properties": {
                "desired": {"cfg": {"freq": 5}, "$metadata": {
                    "$lastUpdated": stamp(1), "$lastUpdatedVersion": 2,
                    "cfg": {"$lastUpdated": stamp(1), "$lastUpdatedVersion": 2, "freq": d},
                }, "$version": 2},
                "reported": {"battery": 55, "$metadata": {
                    "$lastUpdated": stamp(2), "battery": {"$lastUpdated": stamp(2)},
                }, "$version": 2},
            },
            "capabilities": {"iotEdge": false},
        })
    );
}

#[test]
fn service_json_shows_live_connection_and_module_id() {
    let twin = Twin::new(at(0));
    let mut registered = identity();
    registered.key = IdentityKey::module("d1", "m1");
    let live = ConnectionView {
        connected: true,
        last_activity_time: Some(at(5)),
        cloud_to_device_message_count: 3,
        ..Default::default()
    };
    let json = twin.service_json(&TwinIdentity::new(&registered, &live, "dtmi:com:example;1"));
    assert_eq!(json["moduleId"], json!("m1"));
    assert_eq!(json["deviceId"], json!("d1"));
    assert_eq!(json["connectionState"], json!("Connected"));
    assert_eq!(json["lastActivityTime"], json!(stamp(5)));
    assert_eq!(json["cloudToDeviceMessageCount"], json!(3));
    assert_eq!(json["modelId"], json!("dtmi:com:example;1"));
    assert_eq!(json["statusUpdateTime"], json!(crate::model::iso_time(registered.status_updated_time)));
    assert_eq!(json["properties"]["desired"], json!({"$metadata": {"$lastUpdated": stamp(0)}, "$version": 1}));
}

#[test]
fn device_json_has_no_tags_or_metadata() {
    let mut twin = Twin::new(at(0));
    twin.patch(Some(object(json!({"site": "A"}))), Some(object(json!({"cfg": {"freq": 5}}))), at(1)).unwrap();
    twin.report(object(json!({"battery": 55})), at(2)).unwrap();
    assert_eq!(
        twin.device_json(),
        json!({"desired": {"cfg": {"freq": 5}, "$version": 2}, "reported": {"battery": 55, "$version": 2}})
    );
}

#[test]
fn last_updated_has_seven_fraction_digits() {
    let twin = Twin::new(at(0));
    let shown = desired_metadata(&twin)["$lastUpdated"].as_str().unwrap().to_owned();
    assert_eq!(shown, "2022-06-01T22:27:50.2612586Z");
}

#[test]
fn twin_survives_a_storage_round_trip() {
    let mut twin = Twin::new(at(0));
    twin.patch(Some(object(json!({"t": [1, {"x": null}]}))), Some(object(json!({"a": {"b": 1.5}}))), at(1)).unwrap();
    twin.report(object(json!({"r": "v"})), at(2)).unwrap();
    let stored = serde_json::to_string(&twin).unwrap();
    let loaded: Twin = serde_json::from_str(&stored).unwrap();
    assert_eq!(loaded, twin);
    let registered = identity();
    let live = ConnectionView::default();
    let view = TwinIdentity::new(&registered, &live, "");
    assert_eq!(loaded.service_json(&view), twin.service_json(&view));
}
