//! What simulated devices send: the telemetry body (a template with `{device}`, `{seq}` and
//! `{ts}`, or a JSON object padded to a size) and the property bag appended to the telemetry
//! topic, encoded once by the hub's own [`PropertyBag`] encoder (device-protocol §2.4).

use std::borrow::Cow;

use anyhow::bail;
use serde_json::{Value, json};

use crate::mqtt::bag::PropertyBag;

/// One piece of a template: literal text or a placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Device,
    Seq,
    Ts,
}

/// A telemetry body, rendered per message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayloadTemplate {
    /// `{"device":"…","seq":N,"ts":T,"pad":"xx…"}` of exactly this many bytes (or the unpadded
    /// object when that is already longer).
    Sized(usize),
    Template(Vec<Piece>),
}

impl PayloadTemplate {
    pub fn sized(bytes: usize) -> Self {
        PayloadTemplate::Sized(bytes)
    }

    /// Reads `{device}`, `{seq}` and `{ts}`; any other brace is literal text (JSON templates
    /// are full of them).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if text.is_empty() {
            bail!("--payload-template is empty");
        }
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while !rest.is_empty() {
            let found = [("{device}", Piece::Device), ("{seq}", Piece::Seq), ("{ts}", Piece::Ts)]
                .into_iter()
                .find(|(name, _)| rest.starts_with(name));
            match found {
                Some((name, piece)) => {
                    if !literal.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut literal)));
                    }
                    pieces.push(piece);
                    rest = &rest[name.len()..];
                }
                None => {
                    let mut chars = rest.chars();
                    if let Some(c) = chars.next() {
                        literal.push(c);
                    }
                    rest = chars.as_str();
                }
            }
        }
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        Ok(PayloadTemplate::Template(pieces))
    }

    /// An upper bound of the rendered size, for the limit check (numbers at their longest).
    pub fn max_hint(&self) -> usize {
        match self {
            PayloadTemplate::Sized(n) => *n,
            PayloadTemplate::Template(pieces) => pieces
                .iter()
                .map(|p| match p {
                    Piece::Text(t) => t.len(),
                    Piece::Device => 128,
                    Piece::Seq | Piece::Ts => 20,
                })
                .sum(),
        }
    }

    pub fn render(&self, device: &str, seq: u64, ts_ms: u64) -> Vec<u8> {
        match self {
            PayloadTemplate::Sized(size) => {
                let mut body = format!(r#"{{"device":"{device}","seq":{seq},"ts":{ts_ms},"pad":""#);
                let pad = size.saturating_sub(body.len() + 2);
                body.extend(std::iter::repeat_n('x', pad));
                body.push_str("\"}");
                body.into_bytes()
            }
            PayloadTemplate::Template(pieces) => {
                let mut out = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Text(t) => out.push_str(t),
                        Piece::Device => out.push_str(device),
                        Piece::Seq => out.push_str(&seq.to_string()),
                        Piece::Ts => out.push_str(&ts_ms.to_string()),
                    }
                }
                out.into_bytes()
            }
        }
    }

    pub fn describe(&self) -> Value {
        match self {
            PayloadTemplate::Sized(n) => json!({ "size": n }),
            PayloadTemplate::Template(pieces) => {
                let text: String = pieces
                    .iter()
                    .map(|p| match p {
                        Piece::Text(t) => t.as_str(),
                        Piece::Device => "{device}",
                        Piece::Seq => "{seq}",
                        Piece::Ts => "{ts}",
                    })
                    .collect();
                json!({ "template": text })
            }
        }
    }
}

/// `k=v,k2=v2` → the encoded bag `k=v&k2=v2`. System properties are given by their MQTT names
/// (`$.ct`) and come out as SDKs send them (`%24.ct`); a bare `k` is a property without a value.
pub fn parse_properties(text: &str) -> anyhow::Result<String> {
    let mut bag = PropertyBag::default();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (pair, None),
        };
        if key.is_empty() {
            bail!("--properties: '{pair}' has no name");
        }
        bag.application.push((Cow::Owned(key.to_owned()), value.map(|v| Cow::Owned(v.to_owned()))));
    }
    let mut out = String::new();
    bag.encode(&mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_bodies_have_the_requested_length_and_are_json() {
        let body = PayloadTemplate::sized(256).render("sim-42", 7, 1_700_000_000_000);
        assert_eq!(body.len(), 256);
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!((v["device"].as_str(), v["seq"].as_u64()), (Some("sim-42"), Some(7)));
        assert!(PayloadTemplate::sized(10).render("sim-1", 1, 1).len() > 10, "too small to pad: unpadded");
    }

    #[test]
    fn templates_replace_only_known_placeholders() {
        let t = PayloadTemplate::parse(r#"{"d":"{device}","n":{seq},"t":{ts},"x":{other}}"#).expect("parses");
        assert_eq!(t.render("a", 3, 9), br#"{"d":"a","n":3,"t":9,"x":{other}}"#);
    }

    #[test]
    fn properties_encode_as_an_sdk_bag() {
        let bag = parse_properties("$.ct=application/json, color=red,flag").expect("parses");
        assert_eq!(bag, "%24.ct=application%2Fjson&color=red&flag");
        let parsed = PropertyBag::parse(&bag).expect("the hub reads it back");
        assert_eq!(parsed.system.content_type.as_deref(), Some("application/json"));
        assert!(parse_properties("=x").is_err());
    }
}
