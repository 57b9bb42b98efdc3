//! Every topic a simulated device and the simulated service use, in both modes, and the reading
//! of what arrives on them.
//!
//! **Azure mode** speaks the hub's device protocol (device-protocol §2): telemetry on
//! `devices/{id}/messages/events/{bag}`; reported PATCHes on
//! `$iothub/twin/PATCH/properties/reported/?$rid={rid}`, answered on
//! `$iothub/twin/res/{status}/?$rid={rid}`; method requests on
//! `$iothub/methods/POST/{name}/?$rid={rid}`, answered on `$iothub/methods/res/{status}/?$rid={rid}`;
//! C2D on `devices/{id}/messages/devicebound/{bag}`. The service side is the hub's REST API.
//!
//! **Raw mode** has no hub to do the service's part, so a service client and a twin responder
//! (MQTT clients of the broker, see [`super::service::broker`]) play it, on these topics
//! (`{i}` is the device index):
//!
//! | workload | request | answer |
//! |---|---|---|
//! | telemetry | device → `sim/{i}/events` (QoS as `--qos`) | the broker's PUBACK |
//! | direct method | service → `sim/{i}/methods/req/{rid}` (QoS 0) | device → `sim/{i}/methods/res/{rid}` (QoS 0), the service subscribed to `sim/+/methods/res/#` |
//! | C2D | service → `sim/{i}/c2d` (QoS 1; devices subscribe at QoS 1) | the device's PUBACK |
//! | twin PATCH | device → `sim/{i}/twin/req/{rid}` (QoS 1) | responder (subscribed to `sim/+/twin/req/#`) → `sim/{i}/twin/res/{rid}` (QoS 0) |

use ntex_mqtt::v3::codec::QoS;

use super::fleet::Fleet;
use super::scenario::Mode;

/// What the raw service client subscribes to: every device's method answers.
pub const RAW_METHOD_RESPONSES: &str = "sim/+/methods/res/#";
/// What the raw twin responder subscribes to: every device's twin requests.
pub const RAW_TWIN_REQUESTS: &str = "sim/+/twin/req/#";

/// Device `index`'s telemetry topic.
pub fn telemetry(fleet: &Fleet, index: u32) -> String {
    match fleet.mode {
        Mode::Raw => format!("sim/{index}/events"),
        Mode::Azure => format!("devices/{}{index}/messages/events/{}", fleet.prefix, fleet.property_bag),
    }
}

/// Whether devices subscribe to anything (then they are ready for the service at the SUBACK).
pub fn subscribes(fleet: &Fleet) -> bool {
    fleet.methods || fleet.c2d || fleet.twin_every.is_some() || fleet.twin_in_flight.is_some()
}

/// The filters device `index` subscribes to (device-protocol §2.5 in Azure mode).
pub fn subscriptions(fleet: &Fleet, index: u32) -> Vec<(String, QoS)> {
    let mut filters = Vec::new();
    let raw = fleet.mode == Mode::Raw;
    if fleet.methods {
        let filter = if raw { format!("sim/{index}/methods/req/+") } else { "$iothub/methods/POST/#".to_owned() };
        filters.push((filter, QoS::AtMostOnce));
    }
    if fleet.twin_every.is_some() || fleet.twin_in_flight.is_some() {
        let filter = if raw { format!("sim/{index}/twin/res/+") } else { "$iothub/twin/res/#".to_owned() };
        filters.push((filter, QoS::AtMostOnce));
    }
    if fleet.c2d {
        // QoS 1: the PUBACK is what completes a C2D message (§2.8).
        let filter = if raw {
            format!("sim/{index}/c2d")
        } else {
            format!("devices/{}/messages/devicebound/#", fleet.device_id(index))
        };
        filters.push((filter, QoS::AtLeastOnce));
    }
    filters
}

/// The topic of device `index`'s reported PATCH (Azure) or twin request (raw) number `rid`.
pub fn twin_request(mode: Mode, index: u32, rid: u32) -> String {
    match mode {
        Mode::Azure => format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}"),
        Mode::Raw => format!("sim/{index}/twin/req/{rid}"),
    }
}

/// The topic of device `index`'s answer (status 200) to method request `rid`.
pub fn method_response(mode: Mode, index: u32, rid: &str) -> String {
    match mode {
        Mode::Azure => format!("$iothub/methods/res/200/?$rid={rid}"),
        Mode::Raw => format!("sim/{index}/methods/res/{rid}"),
    }
}

/// What a PUBLISH to a device is.
#[derive(Debug, PartialEq, Eq)]
pub enum ToDevice<'a> {
    /// The answer to a twin request: its status (raw answers are successes, 204) and `$rid`.
    TwinAnswer {
        status: u16,
        rid: Option<u32>,
    },
    /// A direct-method request (raw requests have no method name).
    MethodRequest {
        name: &'a str,
        rid: &'a str,
    },
    C2d,
    Other,
}

/// Reads the topic of a PUBLISH a device received.
pub fn to_device(mode: Mode, topic: &str) -> ToDevice<'_> {
    match mode {
        Mode::Azure => {
            if let Some(rest) = topic.strip_prefix("$iothub/twin/res/") {
                // `{status}/?$rid={rid}[&$version={v}]`
                let status = rest.split('/').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                ToDevice::TwinAnswer { status, rid: rid_of(rest).and_then(|r| r.parse().ok()) }
            } else if let Some(rest) = topic.strip_prefix("$iothub/methods/POST/") {
                ToDevice::MethodRequest { name: rest.split('/').next().unwrap_or(""), rid: rid_of(rest).unwrap_or("") }
            } else if topic.contains("/messages/devicebound/") {
                ToDevice::C2d
            } else {
                ToDevice::Other
            }
        }
        Mode::Raw => match raw_parts(topic) {
            Some((_, "twin/res", Some(rid))) => ToDevice::TwinAnswer { status: 204, rid: rid.parse().ok() },
            Some((_, "methods/req", Some(rid))) => ToDevice::MethodRequest { name: "", rid },
            Some((_, "c2d", None)) => ToDevice::C2d,
            _ => ToDevice::Other,
        },
    }
}

/// The topic on which the raw service asks device `index` to run method call `rid`.
pub fn raw_method_request(index: u32, rid: u32) -> String {
    format!("sim/{index}/methods/req/{rid}")
}

/// The topic on which the raw service sends device `index` a C2D message.
pub fn raw_c2d(index: u32) -> String {
    format!("sim/{index}/c2d")
}

/// The topic on which the raw twin responder answers device `index`'s request `rid`.
pub fn raw_twin_response(index: u32, rid: &str) -> String {
    format!("sim/{index}/twin/res/{rid}")
}

/// What a PUBLISH to a raw service client is: a device's method answer or twin request.
#[derive(Debug, PartialEq, Eq)]
pub enum ToService<'a> {
    MethodAnswer { index: u32, rid: u32 },
    TwinRequest { index: u32, rid: &'a str },
    Other,
}

/// Reads the topic of a PUBLISH the raw service client or twin responder received.
pub fn to_service(topic: &str) -> ToService<'_> {
    match raw_parts(topic) {
        Some((index, "methods/res", Some(rid))) => match rid.parse() {
            Ok(rid) => ToService::MethodAnswer { index, rid },
            Err(_) => ToService::Other,
        },
        Some((index, "twin/req", Some(rid))) => ToService::TwinRequest { index, rid },
        _ => ToService::Other,
    }
}

/// `sim/{i}/{kind}[/{rid}]` → (i, kind, rid): `events` and `c2d` have no rid, `methods/req`,
/// `methods/res`, `twin/req` and `twin/res` end with one.
fn raw_parts(topic: &str) -> Option<(u32, &str, Option<&str>)> {
    let rest = topic.strip_prefix("sim/")?;
    let (index, kind) = rest.split_once('/')?;
    let index = index.parse().ok()?;
    if matches!(kind, "events" | "c2d") {
        return Some((index, kind, None));
    }
    let (kind, rid) = kind.rsplit_once('/')?;
    matches!(kind, "methods/req" | "methods/res" | "twin/req" | "twin/res").then_some((index, kind, Some(rid)))
}

/// The `$rid` of a twin or method topic's query: up to the next `&` (Node appends more).
fn rid_of(topic_rest: &str) -> Option<&str> {
    let (_, query) = topic_rest.split_once("?")?;
    query.split('&').find_map(|kv| kv.strip_prefix("$rid=").or_else(|| kv.strip_prefix("%24rid=")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rids_are_read_from_twin_and_method_topics() {
        assert_eq!(rid_of("204/?$rid=17&$version=4"), Some("17"));
        assert_eq!(rid_of("reboot/?$rid=abc"), Some("abc"));
        assert_eq!(rid_of("reboot/"), None);
    }

    #[test]
    fn azure_topics_to_a_device_are_told_apart() {
        let read = |t| to_device(Mode::Azure, t);
        assert_eq!(read("$iothub/twin/res/204/?$rid=3&$version=9"), ToDevice::TwinAnswer { status: 204, rid: Some(3) });
        assert_eq!(read("$iothub/methods/POST/reboot/?$rid=ab"), ToDevice::MethodRequest { name: "reboot", rid: "ab" });
        assert_eq!(read("devices/sim-1/messages/devicebound/%24.mid=m1"), ToDevice::C2d);
        assert_eq!(read("$iothub/twin/PATCH/properties/desired/?$version=2"), ToDevice::Other);
    }

    #[test]
    fn raw_topics_to_a_device_are_told_apart() {
        let read = |t| to_device(Mode::Raw, t);
        assert_eq!(read("sim/4/twin/res/77"), ToDevice::TwinAnswer { status: 204, rid: Some(77) });
        let (request, c2d) = (raw_method_request(4, 9), raw_c2d(4));
        assert_eq!(to_device(Mode::Raw, &request), ToDevice::MethodRequest { name: "", rid: "9" });
        assert_eq!(to_device(Mode::Raw, &c2d), ToDevice::C2d);
        assert_eq!(read("sim/4/events"), ToDevice::Other);
        assert_eq!(read("sim/x/c2d"), ToDevice::Other);
        assert_eq!(read("other/4/c2d"), ToDevice::Other);
    }

    #[test]
    fn raw_topics_to_the_service_name_the_device_and_request() {
        assert_eq!(to_service(&method_response(Mode::Raw, 12, "5")), ToService::MethodAnswer { index: 12, rid: 5 });
        assert_eq!(to_service(&twin_request(Mode::Raw, 3, 8)), ToService::TwinRequest { index: 3, rid: "8" });
        assert_eq!(to_service("sim/3/methods/res/not-a-number"), ToService::Other);
        assert_eq!(to_service("sim/3/events"), ToService::Other);
        assert_eq!(raw_twin_response(3, "8"), "sim/3/twin/res/8");
    }
}
