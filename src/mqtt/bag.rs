//! The property bag of device-protocol §2.4: `k=v&k2=v2` after a telemetry or C2D topic's base.
//!
//! [`PropertyBag::parse`] reads a device's bag and splits it into the well-known system properties
//! (`$.mid`, `$.ct`, … — the ones §6 shows the back end as message properties or annotations) and
//! the application properties, kept in order. [`PropertyBag::encode`] writes a hub→device bag.
//!
//! Parsing borrows from the topic: a key or value is copied only when percent-decoding changes
//! it, because this runs for every telemetry message.
//!
//! Decoding rules, from what the SDKs send:
//! - Keys are decoded before they are matched: SDKs spell `$` as `%24` (`%24.mid`).
//! - `+` is a literal plus, never a space. Python quotes with `urllib.parse.quote` (its
//!   `mqtt_topic_iothub.py` warns against `quote_plus` for exactly this) and Node with
//!   `encodeURIComponent`; both write a space as `%20`. The C SDK sends raw text unless
//!   `OPTION_AUTO_URL_ENCODE_DECODE` is set, so a `+` it sends is a plus.
//! - A `%` not followed by two hex digits is kept as is, as a WHATWG URL parser does: the C
//!   SDK's default raw text can carry values like `50%`.
//! - Only bytes that decode to invalid UTF-8 are an error ([`BagError`]).

use std::borrow::Cow;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// Everything but RFC 3986's unreserved characters is encoded in a hub→device bag: `/` must be
/// (§2.4: Python and Node take one `/`-segment as the bag), and `&`, `=`, `%`, `+` must be for
/// the bag to read back unchanged.
const ENCODE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Why a bag cannot be read. The only failure is text that is not UTF-8 once decoded; the
/// offending text is kept for the log line (errors are rare, so the allocation is too).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BagError {
    #[error("'{0}' does not percent-decode to UTF-8")]
    NotUtf8(String),
}

/// Percent-decodes `raw`, borrowing it when it holds no `%` (the usual case).
pub(crate) fn decode(raw: &str) -> Result<Cow<'_, str>, BagError> {
    if !raw.contains('%') {
        return Ok(Cow::Borrowed(raw));
    }
    percent_decode_str(raw).decode_utf8().map_err(|_| BagError::NotUtf8(raw.to_owned()))
}

/// The system properties of §2.4's table, named as IoT Hub names them. A system key sent with
/// no value (`%24.mid`) counts as absent; when a key repeats, the last one wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SystemProperties<'a> {
    /// `$.mid`: message-id.
    pub message_id: Option<Cow<'a, str>>,
    /// `$.cid`: correlation-id.
    pub correlation_id: Option<Cow<'a, str>>,
    /// `$.uid`: user-id.
    pub user_id: Option<Cow<'a, str>>,
    /// `$.to`: on C2D, `/devices/{d}/messages/deviceBound`.
    pub to: Option<Cow<'a, str>>,
    /// `$.ct`: content-type.
    pub content_type: Option<Cow<'a, str>>,
    /// `$.ce`: content-encoding.
    pub content_encoding: Option<Cow<'a, str>>,
    /// `$.exp`: absolute expiry time, ISO 8601, as sent.
    pub expiry: Option<Cow<'a, str>>,
    /// `$.ctime`: the device's timestamp; the back end sees `iothub-creation-time-utc` (§6).
    pub creation_time: Option<Cow<'a, str>>,
    /// `$.on`: the output an Edge module sends on.
    pub output_name: Option<Cow<'a, str>>,
    /// `$.ifid`: `iothub-interface-id` (the security agent's is `urn:azureiot:Security:SecurityAgent:1`).
    pub interface_id: Option<Cow<'a, str>>,
    /// `$.schema`: `iothub-message-schema`.
    pub message_schema: Option<Cow<'a, str>>,
    /// `$.sub`: the Plug and Play component; the back end sees `dt-subject` (§6).
    pub component: Option<Cow<'a, str>>,
    /// `$.diagid`: tracing `Diagnostic-Id`.
    pub diagnostic_id: Option<Cow<'a, str>>,
    /// `$.diagctx`: tracing `Correlation-Context`.
    pub correlation_context: Option<Cow<'a, str>>,
    /// `$.cdid`: on hub→device messages, the device ID of the sending connection.
    pub connection_device_id: Option<Cow<'a, str>>,
    /// `$.cmid`: on hub→device messages, the module ID of the sending connection.
    pub connection_module_id: Option<Cow<'a, str>>,
    /// `iothub-ack`: the feedback a C2D message asks for (`none`, `positive`, `negative`, `full`; §5.1).
    pub ack: Option<Cow<'a, str>>,
}

impl<'a> SystemProperties<'a> {
    /// The field a decoded key fills, or `None` for an application property.
    fn slot(&mut self, key: &str) -> Option<&mut Option<Cow<'a, str>>> {
        match key.strip_prefix('$') {
            Some(name) => self.dollar_slot(name),
            None if key == "iothub-ack" => Some(&mut self.ack),
            None => None,
        }
    }

    /// The field of a `$` key, by what follows the `$` (`.mid`).
    fn dollar_slot(&mut self, name: &str) -> Option<&mut Option<Cow<'a, str>>> {
        Some(match name {
            ".mid" => &mut self.message_id,
            ".cid" => &mut self.correlation_id,
            ".uid" => &mut self.user_id,
            ".to" => &mut self.to,
            ".ct" => &mut self.content_type,
            ".ce" => &mut self.content_encoding,
            ".exp" => &mut self.expiry,
            ".ctime" => &mut self.creation_time,
            ".on" => &mut self.output_name,
            ".ifid" => &mut self.interface_id,
            ".schema" => &mut self.message_schema,
            ".sub" => &mut self.component,
            ".diagid" => &mut self.diagnostic_id,
            ".diagctx" => &mut self.correlation_context,
            ".cdid" => &mut self.connection_device_id,
            ".cmid" => &mut self.connection_module_id,
            _ => return None,
        })
    }

    /// Every field with its key as a hub→device bag spells it: `$` already encoded, because the
    /// C SDK matches the raw text `%24.mid` (§2.4).
    fn wire_keys(&self) -> [(&'static str, Option<&str>); 17] {
        [
            ("%24.mid", self.message_id.as_deref()),
            ("%24.cid", self.correlation_id.as_deref()),
            ("%24.uid", self.user_id.as_deref()),
            ("%24.to", self.to.as_deref()),
            ("%24.ct", self.content_type.as_deref()),
            ("%24.ce", self.content_encoding.as_deref()),
            ("%24.exp", self.expiry.as_deref()),
            ("%24.ctime", self.creation_time.as_deref()),
            ("%24.on", self.output_name.as_deref()),
            ("%24.ifid", self.interface_id.as_deref()),
            ("%24.schema", self.message_schema.as_deref()),
            ("%24.sub", self.component.as_deref()),
            ("%24.diagid", self.diagnostic_id.as_deref()),
            ("%24.diagctx", self.correlation_context.as_deref()),
            ("%24.cdid", self.connection_device_id.as_deref()),
            ("%24.cmid", self.connection_module_id.as_deref()),
            ("iothub-ack", self.ack.as_deref()),
        ]
    }
}

/// A decoded property bag. An application property's value is `None` when the bag had a bare
/// `key` and `Some("")` for `key=` (§2.4 keeps the two apart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyBag<'a> {
    pub system: SystemProperties<'a>,
    /// In the order the bag listed them; a repeated key stays repeated.
    pub application: Vec<(Cow<'a, str>, Option<Cow<'a, str>>)>,
}

impl<'a> PropertyBag<'a> {
    /// Reads the text after a base topic's trailing `/`. One leading `?` is tolerated (§2.4)
    /// and empty pairs (`a=1&&b=2`, a trailing `&`) are skipped. A key splits from its value at
    /// the first `=`, so a raw value may hold more.
    pub fn parse(text: &'a str) -> Result<Self, BagError> {
        let text = text.strip_prefix('?').unwrap_or(text);
        let mut bag = PropertyBag::default();
        for pair in text.split('&').filter(|pair| !pair.is_empty()) {
            let (raw_key, raw_value) = match pair.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (pair, None),
            };
            let value = raw_value.map(decode).transpose()?;
            // SDKs spell a system key `%24.mid`: matched as sent, it needs no decoded copy.
            if let Some(name) = raw_key.strip_prefix("%24").filter(|name| !name.contains('%'))
                && let Some(slot) = bag.system.dollar_slot(name)
            {
                *slot = value;
                continue;
            }
            let key = decode(raw_key)?;
            match bag.system.slot(&key) {
                Some(slot) => *slot = value,
                None => bag.application.push((key, value)),
            }
        }
        Ok(bag)
    }

    /// Appends the bag as a hub→device topic carries it (§2.4): system properties first, in a
    /// fixed order, then application properties in theirs; keys and values percent-encoded.
    pub fn encode(&self, out: &mut String) {
        let mut separator = "";
        for (key, value) in self.system.wire_keys() {
            if let Some(value) = value {
                out.push_str(separator);
                out.push_str(key);
                out.push('=');
                out.extend(utf8_percent_encode(value, ENCODE));
                separator = "&";
            }
        }
        for (key, value) in &self.application {
            out.push_str(separator);
            out.extend(utf8_percent_encode(key, ENCODE));
            if let Some(value) = value {
                out.push('=');
                out.extend(utf8_percent_encode(value, ENCODE));
            }
            separator = "&";
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app<'a>(bag: &'a PropertyBag<'_>) -> Vec<(&'a str, Option<&'a str>)> {
        bag.application.iter().map(|(k, v)| (k.as_ref(), v.as_deref())).collect()
    }

    fn encoded(bag: &PropertyBag<'_>) -> String {
        let mut out = String::new();
        bag.encode(&mut out);
        out
    }

    #[test]
    fn python_sdk_bag_decodes_system_and_application_properties() {
        let bag = PropertyBag::parse(
            "%24.mid=0b5f7c2e-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high&with%20space=a%20b%26c%3Dd%2Fe",
        )
        .unwrap();
        assert_eq!(bag.system.message_id.as_deref(), Some("0b5f7c2e-1"));
        assert_eq!(bag.system.content_type.as_deref(), Some("application/json"));
        assert_eq!(bag.system.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(app(&bag), [("alert", Some("high")), ("with space", Some("a b&c=d/e"))]);
    }

    #[test]
    fn encoded_dollar_in_keys_is_decoded_before_matching() {
        let bag = PropertyBag::parse("%24.cid=c1&$.uid=u1&%24.ctime=2021-04-21T11%3A30%3A16Z").unwrap();
        assert_eq!(bag.system.correlation_id.as_deref(), Some("c1"));
        assert_eq!(bag.system.user_id.as_deref(), Some("u1"));
        assert_eq!(bag.system.creation_time.as_deref(), Some("2021-04-21T11:30:16Z"));
        assert!(bag.application.is_empty());
    }

    #[test]
    fn every_system_key_lands_in_its_field() {
        let bag = PropertyBag::parse(
            "%24.to=t&%24.exp=e&%24.on=o&%24.ifid=i&%24.schema=s&%24.sub=c&%24.diagid=d&%24.diagctx=x\
             &%24.cdid=cd&%24.cmid=cm&iothub-ack=full",
        )
        .unwrap();
        let s = &bag.system;
        let fields = [
            &s.to,
            &s.expiry,
            &s.output_name,
            &s.interface_id,
            &s.message_schema,
            &s.component,
            &s.diagnostic_id,
            &s.correlation_context,
            &s.connection_device_id,
            &s.connection_module_id,
            &s.ack,
        ];
        let values: Vec<_> = fields.iter().map(|f| f.as_deref().unwrap()).collect();
        assert_eq!(values, ["t", "e", "o", "i", "s", "c", "d", "x", "cd", "cm", "full"]);
        assert!(bag.application.is_empty());
    }

    #[test]
    fn unknown_dollar_keys_are_application_properties() {
        let bag = PropertyBag::parse("%24.custom=1").unwrap();
        assert_eq!(app(&bag), [("$.custom", Some("1"))]);
    }

    #[test]
    fn null_and_empty_values_stay_distinct() {
        let bag = PropertyBag::parse("bare&empty=&full=v").unwrap();
        assert_eq!(app(&bag), [("bare", None), ("empty", Some("")), ("full", Some("v"))]);
    }

    #[test]
    fn system_key_without_value_is_absent_and_empty_value_is_kept() {
        let bag = PropertyBag::parse("%24.mid&%24.cid=").unwrap();
        assert_eq!(bag.system.message_id, None);
        assert_eq!(bag.system.correlation_id.as_deref(), Some(""));
    }

    #[test]
    fn empty_bag_and_empty_pairs_yield_nothing() {
        assert_eq!(PropertyBag::parse("").unwrap(), PropertyBag::default());
        assert_eq!(PropertyBag::parse("?").unwrap(), PropertyBag::default());
        assert_eq!(app(&PropertyBag::parse("a=1&&b=2&").unwrap()), [("a", Some("1")), ("b", Some("2"))]);
    }

    #[test]
    fn one_leading_question_mark_is_tolerated() {
        let bag = PropertyBag::parse("?%24.mid=1&k=v").unwrap();
        assert_eq!(bag.system.message_id.as_deref(), Some("1"));
        assert_eq!(app(&bag), [("k", Some("v"))]);
    }

    #[test]
    fn plus_is_a_literal_plus() {
        assert_eq!(app(&PropertyBag::parse("a+b=1+2").unwrap()), [("a+b", Some("1+2"))]);
    }

    #[test]
    fn raw_c_sdk_values_survive() {
        let bag = PropertyBag::parse("%24.ct=application/json&level=50%&eq=a=b&sp=a b").unwrap();
        assert_eq!(bag.system.content_type.as_deref(), Some("application/json"));
        assert_eq!(app(&bag), [("level", Some("50%")), ("eq", Some("a=b")), ("sp", Some("a b"))]);
    }

    #[test]
    fn repeated_application_keys_keep_their_order() {
        let bag = PropertyBag::parse("k=1&j=2&k=3").unwrap();
        assert_eq!(app(&bag), [("k", Some("1")), ("j", Some("2")), ("k", Some("3"))]);
    }

    #[test]
    fn unencoded_text_is_borrowed_not_copied() {
        let bag = PropertyBag::parse("%24.mid=1&k=v").unwrap();
        assert!(matches!(bag.system.message_id, Some(Cow::Borrowed(_))));
        assert!(matches!(bag.application[0], (Cow::Borrowed(_), Some(Cow::Borrowed(_)))));
    }

    #[test]
    fn invalid_utf8_is_refused() {
        assert_eq!(PropertyBag::parse("k=%FF%FE"), Err(BagError::NotUtf8("%FF%FE".into())));
        assert_eq!(PropertyBag::parse("%C3=v"), Err(BagError::NotUtf8("%C3".into())));
    }

    #[test]
    fn c2d_bag_encodes_like_the_spec_example() {
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
            encoded(&bag),
            "%24.mid=42&%24.to=%2Fdevices%2Fdev1%2Fmessages%2FdeviceBound&%24.ct=application%2Fjson\
             &iothub-ack=full&color=red"
        );
    }

    #[test]
    fn encode_writes_null_as_bare_key_and_empty_as_key_equals() {
        let bag = PropertyBag {
            application: vec![("bare".into(), None), ("empty".into(), Some("".into()))],
            ..Default::default()
        };
        assert_eq!(encoded(&bag), "bare&empty=");
        assert_eq!(encoded(&PropertyBag::default()), "");
    }

    #[test]
    fn encode_then_parse_round_trips_awkward_text() {
        let bag = PropertyBag {
            system: SystemProperties {
                message_id: Some("id/with&and=%".into()),
                correlation_id: Some("".into()),
                component: Some("thermostat1".into()),
                ..Default::default()
            },
            application: vec![
                ("path".into(), Some("/a/b?c#d".into())),
                ("a&b=c".into(), Some("x=y&z".into())),
                ("percent".into(), Some("100% %41 +1".into())),
                ("unicodé ✓".into(), Some("日本語 😀".into())),
                ("null".into(), None),
                ("$dollar".into(), Some("$.mid".into())),
            ],
        };
        let text = encoded(&bag);
        assert!(!text.contains('/'), "a `/` would end the bag for Python and Node: {text}");
        assert_eq!(PropertyBag::parse(&text).unwrap(), bag);
    }
}
