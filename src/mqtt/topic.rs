//! MQTT topic names and the CONNECT username (device-protocol §2.1, §2.5–§2.8).
//!
//! - [`DeviceTopic::parse`]: what a device's PUBLISH asks for.
//! - [`Subscription::parse`]: which hub→device flow a SUBSCRIBE filter opens.
//! - [`twin_response`], [`desired_patch`], [`method_request`], [`c2d`], [`module_input`]: the
//!   topics the hub publishes on.
//! - [`parse_username`]: the identity and client details in the CONNECT username.
//!
//! Matching follows the spec's global tolerance: fixed path words (`devices`, `messages`,
//! `events`, `devicebound`, `$iothub`, `GET`, …) match case-insensitively, IDs case-sensitively.
//! IDs are raw in topics (§1.1), yet the Python SDK percent-encodes them (`_get_topic_base`
//! quotes with `safe=""`), so an ID segment also names an identity when it decodes to its ID.
//! Topics the hub builds carry IDs raw: the C# SDK matches them raw.

use std::borrow::Cow;

use iothubd_actors::model::identity::{IdentityError, IdentityKey, validate_id};

use super::bag::{BagError, PropertyBag, decode};

/// Why a PUBLISH topic or SUBSCRIBE filter is refused. The caller maps these once: a PUBLISH
/// closes the connection (§2.3), a SUBSCRIBE filter gets 0x80.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("the topic names an identity other than the connected one")]
    ForeignIdentity,
    #[error("not a topic of the IoT Hub device protocol")]
    Unknown,
    #[error("the request has no $rid")]
    MissingRid,
    #[error("the method status '{0}' is not an integer")]
    BadStatus(String),
    #[error(transparent)]
    Bag(#[from] BagError),
}

/// A device PUBLISH, by topic (§2.5).
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "telemetry is the common case: boxing its bag would cost an allocation per message to save a copy"
)]
pub enum DeviceTopic<'a> {
    /// `devices/{d}/messages/events/[bag]`, or `devices/{d}/modules/{m}/messages/events/[bag]`.
    Telemetry { bag: PropertyBag<'a> },
    /// `$iothub/twin/GET/?$rid={rid}`. The rid is raw text, echoed verbatim in the response (§2.6).
    TwinGet { rid: &'a str },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}[&$version={v}]`; the rid as for GET.
    TwinReportedPatch { rid: &'a str },
    /// `$iothub/methods/res/{status}/?$rid={rid}`. The rid is decoded: it is compared with the
    /// one the hub sent, and Python percent-encodes it (§2.7).
    MethodResponse { status: i32, rid: Cow<'a, str> },
}

impl<'a> DeviceTopic<'a> {
    /// Classifies `topic`, published by `identity`. Twin and method topics name no identity;
    /// the connection's identity selects the twin (§2.5).
    pub fn parse(topic: &'a str, identity: &IdentityKey) -> Result<Self, TopicError> {
        if let Some(rest) = strip_word(topic, "devices") {
            return telemetry(rest, identity);
        }
        let rest = strip_word(topic, "$iothub").ok_or(TopicError::Unknown)?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        // The trailing `/` before `?` is what SDKs send, but tolerate it missing (spec preamble).
        let path = path.strip_suffix('/').unwrap_or(path);
        if is_path(path, &["twin", "GET"]) {
            return Ok(DeviceTopic::TwinGet { rid: rid(query)? });
        }
        if is_path(path, &["twin", "PATCH", "properties", "reported"]) {
            return Ok(DeviceTopic::TwinReportedPatch { rid: rid(query)? });
        }
        if let Some(status) = strip_word(path, "methods").and_then(|rest| strip_word(rest, "res"))
            && !status.contains('/')
        {
            let status = decode(status)?;
            let status = status.parse().map_err(|_| TopicError::BadStatus(status.into_owned()))?;
            return Ok(DeviceTopic::MethodResponse { status, rid: decode(rid(query)?)? });
        }
        Err(TopicError::Unknown)
    }
}

/// `{d}/messages/events[/bag]` or `{d}/modules/{m}/messages/events[/bag]`, after `devices/`.
/// The bag is all the rest: the C SDK's raw values may hold `/` (`%24.ct=application/json`).
fn telemetry<'a>(rest: &'a str, identity: &IdentityKey) -> Result<DeviceTopic<'a>, TopicError> {
    let (device, rest) = rest.split_once('/').ok_or(TopicError::Unknown)?;
    let (module, rest) = match strip_word(rest, "modules") {
        Some(rest) => {
            let (module, rest) = rest.split_once('/').ok_or(TopicError::Unknown)?;
            (Some(module), rest)
        }
        None => (None, rest),
    };
    let rest = strip_word(rest, "messages").ok_or(TopicError::Unknown)?;
    let bag = match rest.split_once('/') {
        Some((events, bag)) if is(events, "events") => bag,
        None if is(rest, "events") => "",
        _ => return Err(TopicError::Unknown),
    };
    if !names_identity(device, module, identity, names) {
        return Err(TopicError::ForeignIdentity);
    }
    Ok(DeviceTopic::Telemetry { bag: PropertyBag::parse(bag)? })
}

/// The `$rid` of a request's query (`$rid=1&$version=2`, or Node's `$rid=1&props`). Node and C
/// write the key raw; `%24rid` is accepted too. An empty rid could not be answered.
fn rid(query: &str) -> Result<&str, TopicError> {
    query
        .split('&')
        .find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == "$rid" || key == "%24rid").then_some(value)
        })
        .filter(|rid| !rid.is_empty())
        .ok_or(TopicError::MissingRid)
}

/// A hub→device flow a device subscribes to (§2.3, §2.5); any other filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscription {
    /// `devices/{d}/messages/devicebound/#`.
    C2d,
    /// `devices/{d}/modules/{m}/#` (C, C#) or `devices/{d}/modules/{m}/inputs/#` (Python).
    ModuleInputs,
    /// `$iothub/twin/res/#`.
    TwinResponses,
    /// `$iothub/twin/PATCH/properties/desired/#`.
    DesiredPatches,
    /// `$iothub/methods/POST/#`.
    MethodRequests,
}

impl Subscription {
    /// Classifies a SUBSCRIBE filter from `identity`. A `+` in an ID position stands for the
    /// connection's own ID: the embedded C SDK (azure-sdk-for-c) subscribes to
    /// `devices/+/messages/devicebound/#`, and no ID may contain `+` (§1.1).
    pub fn parse(filter: &str, identity: &IdentityKey) -> Result<Self, TopicError> {
        if let Some(rest) = strip_word(filter, "$iothub") {
            return if is_path(rest, &["twin", "res", "#"]) {
                Ok(Subscription::TwinResponses)
            } else if is_path(rest, &["twin", "PATCH", "properties", "desired", "#"]) {
                Ok(Subscription::DesiredPatches)
            } else if is_path(rest, &["methods", "POST", "#"]) {
                Ok(Subscription::MethodRequests)
            } else {
                Err(TopicError::Unknown)
            };
        }
        let rest = strip_word(filter, "devices").ok_or(TopicError::Unknown)?;
        let (device, rest) = rest.split_once('/').ok_or(TopicError::Unknown)?;
        let (subscription, module) = if is_path(rest, &["messages", "devicebound", "#"]) {
            (Subscription::C2d, None)
        } else if let Some((module, rest)) = strip_word(rest, "modules").and_then(|rest| rest.split_once('/'))
            && (rest == "#" || is_path(rest, &["inputs", "#"]))
        {
            (Subscription::ModuleInputs, Some(module))
        } else {
            return Err(TopicError::Unknown);
        };
        let names_or_wildcard = |segment: &str, id: &str| segment == "+" || names(segment, id);
        if !names_identity(device, module, identity, names_or_wildcard) {
            return Err(TopicError::ForeignIdentity);
        }
        Ok(subscription)
    }
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`: the rid exactly as the device sent
/// it, `$version` only after it (§2.6).
pub fn twin_response(status: u16, rid: &str, version: Option<i64>) -> String {
    match version {
        Some(version) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={version}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}` (§2.6).
pub fn desired_patch(version: i64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// `$iothub/methods/POST/{name}/?$rid={rid}`, nothing after the rid: the C SDK takes the rest of
/// the topic as the rid (§2.7).
pub fn method_request(name: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{name}/?$rid={rid}")
}

/// `devices/{d}/messages/devicebound/{bag}`; with an empty bag the topic ends with `/` (§2.8).
pub fn c2d(device_id: &str, bag: &PropertyBag<'_>) -> String {
    let mut topic = format!("devices/{device_id}/messages/devicebound/");
    bag.encode(&mut topic);
    topic
}

/// `devices/{d}/modules/{m}/inputs/{input}/{bag}`: a message routed to an Edge module's input.
pub fn module_input(device_id: &str, module_id: &str, input: &str, bag: &PropertyBag<'_>) -> String {
    let mut topic = format!("devices/{device_id}/modules/{module_id}/inputs/{input}/");
    bag.encode(&mut topic);
    topic
}

/// The CONNECT username (§2.1): `{host}/{d}/?{query}` or `{host}/{d}/{m}/?{query}`; also
/// `{host}/{d}/api-version=…` (old C and Java SDKs, no `?`), the same for a module, and bare
/// `{host}/{d}`. Query values are percent-decoded; `auth-chain` and unknown parameters are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    pub host: String,
    pub device_id: String,
    pub module_id: Option<String>,
    pub api_version: Option<String>,
    /// `DeviceClientType`: the SDK's product info, e.g. `iothubclient/1.15.0 (native; Linux; x86_64)`.
    pub client_type: Option<String>,
    /// `model-id`: the Plug and Play DTMI, e.g. `dtmi:com:example:Thermostat;1`.
    pub model_id: Option<String>,
}

/// Why a CONNECT username cannot be read; the caller answers with a CONNACK code (§2.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("the username is not {{host}}/{{deviceId}}[/{{moduleId}}]/?{{query}}")]
    Malformed,
    #[error(transparent)]
    InvalidId(#[from] IdentityError),
    #[error(transparent)]
    Encoding(#[from] BagError),
}

/// Reads a CONNECT username. IDs are taken raw (§1.1) and must be valid registry IDs.
pub fn parse_username(text: &str) -> Result<Username, UsernameError> {
    let (host, rest) = text.split_once('/').ok_or(UsernameError::Malformed)?;
    if host.is_empty() {
        return Err(UsernameError::Malformed);
    }
    let (device_id, rest) = match rest.split_once('/') {
        Some((device_id, rest)) => (device_id, rest),
        None => (rest, ""),
    };
    validate_id(device_id)?;
    let (module_id, query) = module_and_query(rest);
    if let Some(module_id) = module_id {
        validate_id(module_id)?;
    }
    let mut username = Username {
        host: host.to_owned(),
        device_id: device_id.to_owned(),
        module_id: module_id.map(str::to_owned),
        api_version: None,
        client_type: None,
        model_id: None,
    };
    for (key, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
        let field = if key.eq_ignore_ascii_case("api-version") {
            &mut username.api_version
        } else if key.eq_ignore_ascii_case("DeviceClientType") {
            &mut username.client_type
        } else if key.eq_ignore_ascii_case("model-id") {
            &mut username.model_id
        } else {
            continue;
        };
        *field = Some(decode(value)?.into_owned());
    }
    Ok(username)
}

/// Splits what follows `{host}/{d}/` into an optional module ID and the query.
fn module_and_query(rest: &str) -> (Option<&str>, &str) {
    if let Some(query) = rest.strip_prefix('?') {
        return (None, query);
    }
    if starts_legacy_query(rest) {
        return (None, rest);
    }
    match rest.split_once('/') {
        Some((module_id, query)) => (Some(module_id), query.strip_prefix('?').unwrap_or(query)),
        None if rest.is_empty() => (None, ""),
        None => (Some(rest), ""),
    }
}

/// Whether a segment without `?` is already the query, as in `{host}/{d}/api-version=…&…`
/// (old C) or `{host}/{d}/DeviceClientType=…` (old Java); otherwise it is a module ID.
fn starts_legacy_query(rest: &str) -> bool {
    let key = rest.split(['=', '&', '/']).next().unwrap_or_default();
    rest[key.len()..].starts_with('=')
        && (key.eq_ignore_ascii_case("api-version") || key.eq_ignore_ascii_case("DeviceClientType"))
}

/// Whether the topic's ID segments name `identity`: same device, and the same module or none.
fn names_identity(
    device: &str,
    module: Option<&str>,
    identity: &IdentityKey,
    matches: impl Fn(&str, &str) -> bool,
) -> bool {
    matches(device, &identity.device_id)
        && match (module, identity.module_id.as_deref()) {
            (None, None) => true,
            (Some(segment), Some(id)) => matches(segment, id),
            _ => false,
        }
}

/// Whether an ID segment names `id`: raw, or percent-encoded as Python sends it.
fn names(segment: &str, id: &str) -> bool {
    segment == id || (segment.contains('%') && decode(segment).is_ok_and(|decoded| decoded == id))
}

/// `text` after a leading fixed `word` and its `/`, matched case-insensitively.
fn strip_word<'a>(text: &'a str, word: &str) -> Option<&'a str> {
    let (head, rest) = text.split_once('/')?;
    is(head, word).then_some(rest)
}

fn is(segment: &str, word: &str) -> bool {
    segment.eq_ignore_ascii_case(word)
}

/// Whether `path` is exactly `words`, each matched case-insensitively.
fn is_path(path: &str, words: &[&str]) -> bool {
    let mut parts = path.split('/');
    words.iter().all(|word| parts.next().is_some_and(|part| is(part, word))) && parts.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::bag::SystemProperties;

    fn dev1() -> IdentityKey {
        IdentityKey::device("dev1")
    }

    fn module() -> IdentityKey {
        IdentityKey::module("edge1", "filter")
    }

    fn telemetry_bag<'a>(topic: &'a str, identity: &IdentityKey) -> PropertyBag<'a> {
        match DeviceTopic::parse(topic, identity) {
            Ok(DeviceTopic::Telemetry { bag }) => bag,
            other => panic!("{topic}: {other:?}"),
        }
    }

    #[test]
    fn device_telemetry_carries_its_bag() {
        let bag = telemetry_bag(
            "devices/dev1/messages/events/%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high\
             &with%20space=a%20b%26c%3Dd%2Fe",
            &dev1(),
        );
        assert_eq!(bag.system.message_id.as_deref(), Some("m1"));
        assert_eq!(bag.system.content_type.as_deref(), Some("application/json"));
        assert_eq!(bag.application[1], ("with space".into(), Some("a b&c=d/e".into())));
    }

    #[test]
    fn telemetry_with_empty_or_missing_bag() {
        assert_eq!(telemetry_bag("devices/dev1/messages/events/", &dev1()), PropertyBag::default());
        assert_eq!(telemetry_bag("devices/dev1/messages/events", &dev1()), PropertyBag::default());
    }

    #[test]
    fn telemetry_path_words_match_case_insensitively() {
        let bag = telemetry_bag("Devices/dev1/Messages/EVENTS/?k=v", &dev1());
        assert_eq!(bag.application, [("k".into(), Some("v".into()))]);
    }

    #[test]
    fn c_sdk_raw_bag_may_contain_slashes() {
        let bag = telemetry_bag("devices/dev1/messages/events/%24.ct=application/json&path=/a/b", &dev1());
        assert_eq!(bag.system.content_type.as_deref(), Some("application/json"));
        assert_eq!(bag.application, [("path".into(), Some("/a/b".into()))]);
    }

    #[test]
    fn module_telemetry_is_accepted_from_that_module() {
        let bag = telemetry_bag("devices/edge1/modules/filter/messages/events/%24.on=out1", &module());
        assert_eq!(bag.system.output_name.as_deref(), Some("out1"));
    }

    #[test]
    fn telemetry_for_another_identity_is_refused() {
        let foreign = Err(TopicError::ForeignIdentity);
        assert_eq!(DeviceTopic::parse("devices/dev2/messages/events/", &dev1()), foreign);
        assert_eq!(DeviceTopic::parse("devices/DEV1/messages/events/", &dev1()), foreign);
        assert_eq!(DeviceTopic::parse("devices/edge1/modules/filter/messages/events/", &dev1()), foreign);
        assert_eq!(DeviceTopic::parse("devices/edge1/modules/other/messages/events/", &module()), foreign);
        assert_eq!(DeviceTopic::parse("devices/edge1/messages/events/", &module()), foreign);
    }

    #[test]
    fn percent_encoded_ids_from_python_name_the_identity() {
        let identity = IdentityKey::module("dev:1", "m$1");
        let bag = telemetry_bag("devices/dev%3A1/modules/m%241/messages/events/k=v", &identity);
        assert_eq!(bag.application.len(), 1);
        let raw = IdentityKey::device("a%41");
        assert!(DeviceTopic::parse("devices/a%41/messages/events/", &raw).is_ok());
        assert!(DeviceTopic::parse("devices/a%2541/messages/events/", &raw).is_ok());
    }

    #[test]
    fn unknown_topics_are_refused() {
        for topic in [
            "devices/dev1/messages/devicebound/",
            "devices/dev1/messages/eventsx/",
            "devices/dev1",
            "devices/dev1/modules/m",
            "$iothub/twin/GET/extra/?$rid=1",
            "$iothub/twin/PATCH/properties/desired/?$rid=1",
            "$iothub/methods/POST/reboot/?$rid=1",
            "$iothub/methods/res/?$rid=1",
            "telemetry",
            "",
        ] {
            assert_eq!(DeviceTopic::parse(topic, &dev1()), Err(TopicError::Unknown), "{topic}");
        }
    }

    #[test]
    fn twin_get_keeps_the_rid_verbatim() {
        for (topic, rid) in [
            ("$iothub/twin/GET/?$rid=42", "42"),
            ("$iothub/twin/GET/?$rid=0b5f7c2e-8a3d-4c1e-9f2a-1d2e3f4a5b6c", "0b5f7c2e-8a3d-4c1e-9f2a-1d2e3f4a5b6c"),
            ("$iothub/twin/GET/?$rid=get_twin", "get_twin"),
            ("$iothub/twin/GET?$rid=7", "7"),
            ("$IOTHUB/Twin/get/?%24rid=a%2Fb", "a%2Fb"),
        ] {
            assert_eq!(DeviceTopic::parse(topic, &dev1()), Ok(DeviceTopic::TwinGet { rid }), "{topic}");
        }
    }

    #[test]
    fn reported_patch_rid_ends_before_version() {
        let topic = "$iothub/twin/PATCH/properties/reported/?$rid=9&$version=3";
        assert_eq!(DeviceTopic::parse(topic, &module()), Ok(DeviceTopic::TwinReportedPatch { rid: "9" }));
        let topic = "$iothub/twin/PATCH/properties/reported/?$rid=c1a2";
        assert_eq!(DeviceTopic::parse(topic, &dev1()), Ok(DeviceTopic::TwinReportedPatch { rid: "c1a2" }));
    }

    #[test]
    fn twin_requests_without_rid_are_refused() {
        for topic in ["$iothub/twin/GET/", "$iothub/twin/GET/?$rid=", "$iothub/twin/PATCH/properties/reported/?x=1"] {
            assert_eq!(DeviceTopic::parse(topic, &dev1()), Err(TopicError::MissingRid), "{topic}");
        }
    }

    #[test]
    fn method_response_status_and_rid() {
        let parse = |topic| DeviceTopic::parse(topic, &dev1());
        let response = |status, rid: &str| Ok(DeviceTopic::MethodResponse { status, rid: rid.to_owned().into() });
        assert_eq!(parse("$iothub/methods/res/200/?$rid=1"), response(200, "1"));
        assert_eq!(parse("$iothub/methods/res/-1/?$rid=1"), response(-1, "1"));
        assert_eq!(parse("$iothub/methods/res/404/?$rid=2&k=v"), response(404, "2"));
        assert_eq!(parse("$iothub/methods/res/200/?$rid=a%20b%26c"), response(200, "a b&c"));
        assert_eq!(parse("$iothub/methods/res/ok/?$rid=1"), Err(TopicError::BadStatus("ok".into())));
        assert_eq!(parse("$iothub/methods/res/200/"), Err(TopicError::MissingRid));
    }

    #[test]
    fn subscriptions_for_the_connected_device() {
        let sub = |filter| Subscription::parse(filter, &dev1());
        assert_eq!(sub("devices/dev1/messages/devicebound/#"), Ok(Subscription::C2d));
        assert_eq!(sub("devices/dev1/messages/deviceBound/#"), Ok(Subscription::C2d));
        assert_eq!(sub("devices/+/messages/devicebound/#"), Ok(Subscription::C2d));
        assert_eq!(sub("$iothub/twin/res/#"), Ok(Subscription::TwinResponses));
        assert_eq!(sub("$iothub/twin/PATCH/properties/desired/#"), Ok(Subscription::DesiredPatches));
        assert_eq!(sub("$iothub/methods/POST/#"), Ok(Subscription::MethodRequests));
    }

    #[test]
    fn module_input_subscriptions() {
        let sub = |filter| Subscription::parse(filter, &module());
        assert_eq!(sub("devices/edge1/modules/filter/#"), Ok(Subscription::ModuleInputs));
        assert_eq!(sub("devices/edge1/modules/filter/inputs/#"), Ok(Subscription::ModuleInputs));
        assert_eq!(sub("$iothub/methods/POST/#"), Ok(Subscription::MethodRequests));
    }

    #[test]
    fn subscriptions_naming_another_identity_are_refused() {
        let foreign = Err(TopicError::ForeignIdentity);
        assert_eq!(Subscription::parse("devices/dev2/messages/devicebound/#", &dev1()), foreign);
        assert_eq!(Subscription::parse("devices/edge1/messages/devicebound/#", &module()), foreign);
        assert_eq!(Subscription::parse("devices/edge1/modules/other/#", &module()), foreign);
        assert_eq!(Subscription::parse("devices/dev1/modules/filter/#", &dev1()), foreign);
    }

    #[test]
    fn other_filters_are_unsupported() {
        for filter in [
            "#",
            "devices/dev1/#",
            "devices/dev1/messages/devicebound/+",
            "devices/dev1/messages/events/#",
            "$iothub/twin/#",
            "$iothub/twin/res/200/#",
            "$iothub/methods/POST/reboot/#",
            "$iothub/twin/PATCH/properties/reported/#",
        ] {
            assert_eq!(Subscription::parse(filter, &dev1()), Err(TopicError::Unknown), "{filter}");
        }
    }

    #[test]
    fn outbound_twin_and_method_topics() {
        assert_eq!(twin_response(200, "abc-1", None), "$iothub/twin/res/200/?$rid=abc-1");
        assert_eq!(twin_response(204, "7", Some(12)), "$iothub/twin/res/204/?$rid=7&$version=12");
        assert_eq!(desired_patch(5), "$iothub/twin/PATCH/properties/desired/?$version=5");
        assert_eq!(method_request("reboot", "1f"), "$iothub/methods/POST/reboot/?$rid=1f");
    }

    #[test]
    fn c2d_topic_matches_the_spec_example() {
        let bag = PropertyBag {
            system: SystemProperties {
                message_id: Some("42".into()),
                to: Some("/devices/dev1/messages/deviceBound".into()),
                content_type: Some("application/json".into()),
                ack: Some("full".into()),
                ..Default::default()
            },
            application: vec![("color".into(), Some("red".into()))],
        };
        assert_eq!(
            c2d("dev1", &bag),
            "devices/dev1/messages/devicebound/%24.mid=42&%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound\
             &%24.ct=application%2Fjson&iothub-ack=full&color=red"
        );
        assert_eq!(c2d("dev1", &PropertyBag::default()), "devices/dev1/messages/devicebound/");
    }

    #[test]
    fn module_input_topic() {
        let bag = PropertyBag { application: vec![("k".into(), Some("v/w".into()))], ..Default::default() };
        assert_eq!(
            module_input("edge1", "filter", "input1", &bag),
            "devices/edge1/modules/filter/inputs/input1/k=v%2Fw"
        );
    }

    fn user(text: &str) -> Username {
        parse_username(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn username_of_a_device_with_query() {
        let u = user(
            "hub.azure-devices.net/dev1/?api-version=2020-09-30\
             &DeviceClientType=iothubclient%2F1.15.0%20(native%3B%20Linux%3B%20x86_64)\
             &model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1",
        );
        assert_eq!(
            u,
            Username {
                host: "hub.azure-devices.net".into(),
                device_id: "dev1".into(),
                module_id: None,
                api_version: Some("2020-09-30".into()),
                client_type: Some("iothubclient/1.15.0 (native; Linux; x86_64)".into()),
                model_id: Some("dtmi:com:example:Thermostat;1".into()),
            }
        );
    }

    #[test]
    fn username_of_a_module_with_params_in_any_order() {
        let u = user("hub/edge1/filter/?auth-chain=a;b&DeviceClientType=py&unknown=1&api-version=2019-10-01");
        assert_eq!((u.device_id.as_str(), u.module_id.as_deref()), ("edge1", Some("filter")));
        assert_eq!((u.api_version.as_deref(), u.client_type.as_deref()), (Some("2019-10-01"), Some("py")));
        assert_eq!(u.model_id, None);
    }

    #[test]
    fn legacy_and_bare_usernames() {
        let u = user("hub/dev1/api-version=2016-11-14&DeviceClientType=iothubclient%2f1.2.1");
        assert_eq!((u.module_id, u.api_version.as_deref()), (None, Some("2016-11-14")));
        assert_eq!(u.client_type.as_deref(), Some("iothubclient/1.2.1"));
        let u = user("hub/edge1/filter/api-version=2017-06-30");
        assert_eq!((u.module_id.as_deref(), u.api_version.as_deref()), (Some("filter"), Some("2017-06-30")));
        for bare in ["hub/dev1", "hub/dev1/", "hub/dev1/?"] {
            let u = user(bare);
            assert_eq!(
                (u.host.as_str(), u.device_id.as_str(), u.module_id, u.api_version),
                ("hub", "dev1", None, None)
            );
        }
        assert_eq!(user("hub/edge1/filter").module_id.as_deref(), Some("filter"));
    }

    #[test]
    fn malformed_usernames_are_refused() {
        assert_eq!(parse_username("hub"), Err(UsernameError::Malformed));
        assert_eq!(parse_username("/dev1/?api-version=1"), Err(UsernameError::Malformed));
        assert!(matches!(parse_username("hub//?api-version=1"), Err(UsernameError::InvalidId(_))));
        assert!(matches!(parse_username("hub/dev 1/?"), Err(UsernameError::InvalidId(_))));
        assert!(matches!(parse_username("hub/dev1/?model-id=%FF"), Err(UsernameError::Encoding(_))));
    }
}
