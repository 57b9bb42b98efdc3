//! Device-to-cloud telemetry over MQTT (device-protocol §2.4, §2.5, §5.4, §6): the property
//! bag becomes message properties, the payload the body; the message is appended to the hub's
//! events log and the PUBLISH returns (so ntex-mqtt sends PUBACK) only once it is durable.

use iothubd_actors::model::event::{EventData, MessageProperties};

use super::bag::PropertyBag;

/// Largest D2C message: body plus system property values plus application property names and
/// values (device-protocol §5.4).
pub const MAX_MESSAGE_SIZE: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryError {
    #[error("the message is {0} bytes; at most {MAX_MESSAGE_SIZE} are accepted")]
    TooLarge(usize),
}

/// The event a PUBLISH becomes. `retain` is forwarded as app property `mqtt-retain=true`
/// (device-protocol §2.3); `$.ctime` as `iothub-creation-time-utc`, `$.sub` as `dt-subject`
/// (§6).
pub fn event_from_publish(bag: PropertyBag<'_>, body: &[u8], retain: bool) -> Result<EventData, TelemetryError> {
    let sys = bag.system;
    let own = |v: Option<std::borrow::Cow<'_, str>>| v.map(|s| s.into_owned());
    let mut size = body.len();
    let mut count = |v: &Option<std::borrow::Cow<'_, str>>| size += v.as_ref().map_or(0, |s| s.len());
    for v in [&sys.message_id, &sys.correlation_id, &sys.user_id, &sys.to, &sys.content_type, &sys.content_encoding] {
        count(v);
    }
    let mut application_properties: Vec<(String, Option<String>)> = Vec::with_capacity(bag.application.len() + 4);
    for (k, v) in bag.application {
        size += k.len() + v.as_ref().map_or(0, |v| v.len());
        application_properties.push((k.into_owned(), v.map(|v| v.into_owned())));
    }
    let mut extra = |name: &str, value: Option<std::borrow::Cow<'_, str>>| {
        if let Some(v) = value {
            size += name.len() + v.len();
            application_properties.push((name.to_owned(), Some(v.into_owned())));
        }
    };
    extra("iothub-creation-time-utc", sys.creation_time);
    extra("iothub-interface-id", sys.interface_id);
    extra("iothub-message-schema", sys.message_schema);
    extra("iothub-outputname", sys.output_name);
    extra("dt-subject", sys.component);
    extra("Diagnostic-Id", sys.diagnostic_id);
    extra("Correlation-Context", sys.correlation_context);
    if retain {
        extra("mqtt-retain", Some("true".into()));
    }
    if size > MAX_MESSAGE_SIZE {
        return Err(TelemetryError::TooLarge(size));
    }
    let absolute_expiry_time =
        sys.expiry.as_deref().and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok()).map(|t| t.timestamp_millis());
    Ok(EventData {
        body: body.to_vec(),
        properties: MessageProperties {
            message_id: own(sys.message_id),
            correlation_id: own(sys.correlation_id),
            user_id: own(sys.user_id),
            to: own(sys.to),
            content_type: own(sys.content_type),
            content_encoding: own(sys.content_encoding),
            absolute_expiry_time,
        },
        application_properties,
        annotations: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bag_becomes_properties_and_app_properties() {
        let bag = PropertyBag::parse("%24.mid=m1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high&flag").unwrap();
        let e = event_from_publish(bag, b"{}", true).unwrap();
        assert_eq!(e.properties.message_id.as_deref(), Some("m1"));
        assert_eq!(e.properties.content_type.as_deref(), Some("application/json"));
        assert_eq!(e.properties.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(
            e.application_properties,
            vec![
                ("alert".into(), Some("high".into())),
                ("flag".into(), None),
                ("mqtt-retain".into(), Some("true".into()))
            ]
        );
    }

    #[test]
    fn creation_time_and_component_map_to_their_properties() {
        let bag = PropertyBag::parse("%24.ctime=2021-04-21T11%3A30%3A16Z&%24.sub=thermostat1").unwrap();
        let e = event_from_publish(bag, b"", false).unwrap();
        assert!(
            e.application_properties
                .contains(&("iothub-creation-time-utc".into(), Some("2021-04-21T11:30:16Z".into())))
        );
        assert!(e.application_properties.contains(&("dt-subject".into(), Some("thermostat1".into()))));
    }

    #[test]
    fn size_counts_body_and_properties() {
        let body = vec![0u8; MAX_MESSAGE_SIZE - 4];
        assert!(event_from_publish(PropertyBag::parse("ab=cd").unwrap(), &body, false).is_ok());
        assert_eq!(
            event_from_publish(PropertyBag::parse("ab=cde").unwrap(), &body, false),
            Err(TelemetryError::TooLarge(MAX_MESSAGE_SIZE + 1))
        );
    }
}
