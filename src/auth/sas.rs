//! The SAS token itself (device-protocol §1.3, service-api §1): parsing, signing, signature
//! verification and resource coverage. Nothing here knows about hubs, policies or identities;
//! [`super`] decides which key a token must be signed with and what it may reach.
//!
//! `SharedAccessSignature sr={urlenc(resource)}&sig={urlenc(base64(hmac))}&se={unix}[&skn={policy}]`
//!
//! SDKs disagree on field order and on the case of percent-encoding hex digits, and some
//! encode device IDs a second time inside `sr`; the parser and [`SasToken::covers`] absorb
//! those differences so the rules in [`super`] can be stated once.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::AuthError;

type HmacSha256 = Hmac<Sha256>;

/// The scheme word every token starts with, followed by exactly one space (§1.3).
const SCHEME: &str = "SharedAccessSignature ";

/// What Python's `urllib.parse.quote(s, safe="")` leaves alone: RFC 3986 unreserved
/// characters. Python, Node and C# all encode `/` as upper-case `%2F` with this set.
const SR_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Length of an HMAC-SHA256 result; any other `sig` can never match.
const SIG_LEN: usize = 32;

/// A parsed SAS token, borrowing from the text it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken<'a> {
    /// `sr` exactly as received: the HMAC covers these bytes.
    sr_raw: &'a str,
    /// `sr` percent-decoded once: what coverage is checked against.
    sr: Cow<'a, str>,
    /// `se` exactly as received (digits only): the HMAC covers these bytes.
    se_raw: &'a str,
    se: u64,
    sig: [u8; SIG_LEN],
    skn: Option<Cow<'a, str>>,
}

/// Why a shared access key cannot be used for signing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared access key is not valid base64")]
pub struct InvalidKey;

impl<'a> SasToken<'a> {
    /// Parses `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`, fields in any order.
    ///
    /// Unknown fields are ignored; a repeated, missing or empty `sr`/`sig`/`se`/`skn` is
    /// refused, as is an `se` that is not integer seconds.
    pub fn parse(text: &'a str) -> Result<Self, AuthError> {
        let fields =
            text.strip_prefix(SCHEME).ok_or(AuthError::Malformed("it does not start with 'SharedAccessSignature '"))?;
        if fields.starts_with(' ') {
            return Err(AuthError::Malformed("exactly one space must follow 'SharedAccessSignature'"));
        }
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in fields.split('&') {
            let (name, value) = field
                .split_once('=')
                .ok_or(AuthError::Malformed("every field must be name=value, separated by '&'"))?;
            let slot = match name {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            if value.is_empty() {
                return Err(AuthError::Malformed("sr, sig, se and skn must not be empty"));
            }
            if slot.replace(value).is_some() {
                return Err(AuthError::Malformed("a field appears twice"));
            }
        }
        let sr_raw = sr.ok_or(AuthError::Malformed("the sr field is missing"))?;
        let sig = sig.ok_or(AuthError::Malformed("the sig field is missing"))?;
        let se_raw = se.ok_or(AuthError::Malformed("the se field is missing"))?;
        Ok(Self {
            sr_raw,
            sr: decode(sr_raw).ok_or(AuthError::Malformed("sr is not percent-encoded UTF-8"))?,
            se_raw,
            se: parse_seconds(se_raw).ok_or(AuthError::Malformed("se must be integer Unix seconds"))?,
            sig: decode_signature(sig)
                .ok_or(AuthError::Malformed("sig must be a percent-encoded base64 HMAC-SHA256"))?,
            skn: skn.map(|s| decode(s).ok_or(AuthError::Malformed("skn is not percent-encoded UTF-8"))).transpose()?,
        })
    }

    /// The resource URI (`sr`), percent-decoded once.
    pub fn resource(&self) -> &str {
        &self.sr
    }

    /// Expiry in Unix seconds (`se`).
    pub fn expiry(&self) -> u64 {
        self.se
    }

    /// The policy name (`skn`), percent-decoded; `None` for device and module tokens.
    pub fn key_name(&self) -> Option<&str> {
        self.skn.as_deref()
    }

    /// A token is expired once `se <= now` (§1.3).
    pub fn is_expired(&self, now: u64) -> bool {
        self.se <= now
    }

    /// Whether `sig` is the HMAC-SHA256 of `"{sr}\n{se}"` under the base64 key `key_b64`.
    ///
    /// `sr` is taken exactly as received first (§1.3: encodings differ between SDKs and the
    /// signer hashed what it sent); failing that, the decoded `sr` re-encoded with upper-case
    /// and then lower-case hex (service-api §1), for tokens whose `sr` was re-encoded in
    /// transit. The comparison is constant-time. A key that is not base64 verifies nothing.
    pub fn verify(&self, key_b64: &str) -> bool {
        let Some(keyed) = B64.decode(key_b64).ok().and_then(|k| HmacSha256::new_from_slice(&k).ok()) else {
            return false;
        };
        let mut as_received = keyed.clone();
        as_received.update(self.sr_raw.as_bytes());
        self.signature_matches(as_received)
            || self.signature_matches(encoded_mac(keyed.clone(), &self.sr, false))
            || self.signature_matches(encoded_mac(keyed, &self.sr, true))
    }

    /// Completes `"{sr}\n{se}"` on a MAC already fed with some form of `sr`, then compares.
    fn signature_matches(&self, mut mac: HmacSha256) -> bool {
        mac.update(b"\n");
        mac.update(self.se_raw.as_bytes());
        mac.finalize().into_bytes().ct_eq(&self.sig).into()
    }

    /// Whether the token's `sr` covers `target`, a `{host}/{path}` with decoded IDs, e.g.
    /// `myhub.azure-devices.net/devices/d1`.
    ///
    /// Host compared case-insensitively, path by whole segments (`/a/b` covers `/a/b/c`,
    /// not `/a/bc`), trailing `/` ignored (§1.3). A scheme and port on either side
    /// (`https://host`, `amqps://host:5671/`) are ignored, so CBS audiences can be passed
    /// as they arrive (service-api §1).
    pub fn covers(&self, target: &str) -> bool {
        let (host, path) = split_resource(target);
        self.covers_segments(host, segments(path))
    }

    /// [`Self::covers`] for a target already split into host and path segments.
    pub(super) fn covers_segments<'t>(&self, host: &str, mut target: impl Iterator<Item = &'t str>) -> bool {
        let (sr_host, sr_path) = split_resource(&self.sr);
        !sr_host.is_empty()
            && sr_host.eq_ignore_ascii_case(host)
            && segments(sr_path).all(|s| target.next().is_some_and(|t| segment_matches(s, t)))
    }

    /// How many path segments `sr` has: 0 for hub-wide, 2 for `{host}/devices/{d}`.
    pub(super) fn scope_depth(&self) -> usize {
        segments(split_resource(&self.sr).1).count()
    }
}

/// A token for `resource_uri` (decoded, e.g. `myhub.azure-devices.net/devices/d1`), built the
/// way the Azure SDKs build theirs: `sr` and `sig` percent-encoded with upper-case hex.
pub fn sign(resource_uri: &str, key_b64: &str, expiry_unix: u64, policy: Option<&str>) -> Result<String, InvalidKey> {
    let key = B64.decode(key_b64).map_err(|_| InvalidKey)?;
    let mut mac = HmacSha256::new_from_slice(&key).map_err(|_| InvalidKey)?;
    let sr = utf8_percent_encode(resource_uri, SR_ENCODE_SET).to_string();
    mac.update(sr.as_bytes());
    mac.update(b"\n");
    mac.update(expiry_unix.to_string().as_bytes());
    let sig = B64.encode(mac.finalize().into_bytes());
    let sig = utf8_percent_encode(&sig, SR_ENCODE_SET);
    Ok(match policy {
        Some(p) => {
            let skn = utf8_percent_encode(p, SR_ENCODE_SET);
            format!("{SCHEME}sr={sr}&sig={sig}&se={expiry_unix}&skn={skn}")
        }
        None => format!("{SCHEME}sr={sr}&sig={sig}&se={expiry_unix}"),
    })
}

/// Feeds `decoded` re-encoded with [`SR_ENCODE_SET`] into `mac`, without allocating.
fn encoded_mac(mut mac: HmacSha256, decoded: &str, lower_hex: bool) -> HmacSha256 {
    for chunk in utf8_percent_encode(decoded, SR_ENCODE_SET) {
        // Chunks are either untouched input (never containing '%', which the set encodes)
        // or one "%XX" escape, so lower-casing a chunk only touches hex digits.
        if lower_hex && chunk.starts_with('%') {
            for b in chunk.bytes() {
                mac.update(&[b.to_ascii_lowercase()]);
            }
        } else {
            mac.update(chunk.as_bytes());
        }
    }
    mac
}

/// Plain percent-decoding: `+` stays `+` (it is a base64 digit in `sig`, §1.3).
fn decode(raw: &str) -> Option<Cow<'_, str>> {
    percent_decode_str(raw).decode_utf8().ok()
}

fn decode_signature(raw: &str) -> Option<[u8; SIG_LEN]> {
    let b64 = decode(raw)?;
    let mut sig = [0u8; SIG_LEN];
    // A buffer of exactly SIG_LEN also refuses longer signatures: they cannot be HMAC-SHA256.
    match B64.decode_slice(b64.as_bytes(), &mut sig) {
        Ok(SIG_LEN) => Some(sig),
        _ => None,
    }
}

/// Digits only: `u64::from_str` would also take a leading `+`, which no SDK sends.
fn parse_seconds(raw: &str) -> Option<u64> {
    if raw.bytes().all(|b| b.is_ascii_digit()) { raw.parse().ok() } else { None }
}

/// `[scheme://]host[:port][/path]` → (`host`, `path`).
fn split_resource(resource: &str) -> (&str, &str) {
    let rest = resource.split_once("://").map_or(resource, |(_, r)| r);
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    };
    (host, path)
}

/// Non-empty path segments: tolerates leading, trailing and doubled `/`.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

/// Segments compare case-sensitively (IDs are, device-protocol §1.1). The C# and older Node
/// SDKs percent-encode the device ID before encoding the whole `sr`, so a once-decoded `sr`
/// segment may still be encoded: it matches the target segment raw or decoded.
fn segment_matches(sr_segment: &str, target: &str) -> bool {
    sr_segment == target || (sr_segment.contains('%') && percent_decode_str(sr_segment).eq(target.bytes()))
}

/// `{host}/devices/{d}[/modules/{m}]` in a decoded `sr` → the identity it names.
pub(super) fn identity_scope(sr: &str) -> Option<(String, Option<String>)> {
    let mut parts = segments(split_resource(sr).1);
    let id = |s: &str| decode(s).map(Cow::into_owned);
    let device = match (parts.next(), parts.next()) {
        (Some("devices"), Some(d)) => id(d)?,
        _ => return None,
    };
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => Some((device, None)),
        (Some("modules"), Some(m), None) => Some((device, Some(id(m)?))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "myhub.azure-devices.net";
    /// base64 of the 32 bytes 0x00..0x1f.
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    /// Computed outside this crate with the Azure Python service SDK's recipe:
    /// `sr = quote_plus(uri)`, `sig = b64encode(hmac(b64decode(KEY), f"{sr}\n{se}", sha256))`,
    /// `"SharedAccessSignature " + urlencode({"sr": uri, "sig": sig, "se": se, "skn": ...})`.
    const PYTHON_POLICY_TOKEN: &str = "SharedAccessSignature sr=myhub.azure-devices.net&sig=\
        oqbqnA3y3DPuw84SRwL%2BDU8rdvX9mYAgeVmReZuBhJ0%3D&se=1700000001&skn=iothubowner";
    const PYTHON_DEVICE_TOKEN: &str = "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fd1\
        &sig=ZCplGSwbGfbcjEX5TU%2Fx7zegJf7M4tNaKU6UIvWVBMw%3D&se=1700000001";

    const PYTHON_LOWER_HEX_DEVICE_TOKEN: &str = "SharedAccessSignature \
        sr=myhub.azure-devices.net%2fdevices%2fd1&sig=ihe%2BZI%2BrSCWkkri3NIjskMs4l8JIu76mhVNVf64DKL8%3D\
        &se=1700000001";

    fn parse(text: &str) -> SasToken<'_> {
        SasToken::parse(text).expect("token parses")
    }

    fn malformed(text: &str) -> bool {
        matches!(SasToken::parse(text), Err(AuthError::Malformed(_)))
    }

    #[test]
    fn python_sdk_tokens_verify() {
        let t = parse(PYTHON_POLICY_TOKEN);
        assert_eq!(t.key_name(), Some("iothubowner"));
        assert_eq!(t.expiry(), 1_700_000_001);
        assert!(t.verify(KEY));
        let d = parse(PYTHON_DEVICE_TOKEN);
        assert_eq!(d.resource(), "myhub.azure-devices.net/devices/d1");
        assert!(d.verify(KEY));
    }

    #[test]
    fn sign_reproduces_the_python_sdk_token() {
        let ours = sign(&format!("{HOST}/devices/d1"), KEY, 1_700_000_001, None).unwrap();
        assert_eq!(ours, PYTHON_DEVICE_TOKEN);
        let ours = sign(HOST, KEY, 1_700_000_001, Some("iothubowner")).unwrap();
        assert_eq!(ours, PYTHON_POLICY_TOKEN);
    }

    #[test]
    fn sign_refuses_a_key_that_is_not_base64() {
        assert_eq!(sign(HOST, "not base64!", 1, None), Err(InvalidKey));
    }

    #[test]
    fn lower_case_hex_sr_verifies_as_received() {
        // Signed over the lower-case form the docs' examples use (computed with Python's
        // hmac/hashlib/base64 over exactly this sr), so it verifies as received.
        let t = parse(PYTHON_LOWER_HEX_DEVICE_TOKEN);
        assert!(t.verify(KEY));
        assert_eq!(t.resource(), "myhub.azure-devices.net/devices/d1");
    }

    #[test]
    fn sr_re_encoded_in_transit_still_verifies() {
        // Signed over %2F (upper), received with %2f or decoded: the retries find it.
        let lower = PYTHON_DEVICE_TOKEN.replace("%2Fdevices%2Fd1", "%2fdevices%2fd1");
        assert!(parse(&lower).verify(KEY));
        let decoded = PYTHON_DEVICE_TOKEN.replace("%2Fdevices%2Fd1", "/devices/d1");
        assert!(parse(&decoded).verify(KEY));
    }

    #[test]
    fn signature_with_plus_and_slash_decodes_plainly() {
        // sig of PYTHON_POLICY_TOKEN holds '+', of PYTHON_DEVICE_TOKEN '/': both sent encoded
        // above; here the '+' arrives raw and must stay a base64 digit, not become a space.
        let raw_plus = PYTHON_POLICY_TOKEN.replace("%2B", "+");
        assert!(raw_plus.contains("wL+DU8"));
        assert!(parse(&raw_plus).verify(KEY));
        let raw_slash = PYTHON_DEVICE_TOKEN.replace("TU%2Fx", "TU/x");
        assert!(parse(&raw_slash).verify(KEY));
    }

    #[test]
    fn wrong_key_does_not_verify() {
        let other = B64.encode([7u8; 32]);
        assert!(!parse(PYTHON_POLICY_TOKEN).verify(&other));
        assert!(!parse(PYTHON_POLICY_TOKEN).verify("%%% not a key"));
    }

    #[test]
    fn tampered_expiry_does_not_verify() {
        let t = PYTHON_POLICY_TOKEN.replace("se=1700000001", "se=1700000002");
        assert!(!parse(&t).verify(KEY));
    }

    #[test]
    fn fields_parse_in_any_order() {
        let reordered = "SharedAccessSignature skn=iothubowner&se=1700000001\
            &sig=oqbqnA3y3DPuw84SRwL%2BDU8rdvX9mYAgeVmReZuBhJ0%3D&sr=myhub.azure-devices.net";
        assert!(parse(reordered).verify(KEY));
    }

    #[test]
    fn expiry_is_inclusive() {
        let t = parse(PYTHON_POLICY_TOKEN);
        assert!(!t.is_expired(1_700_000_000));
        assert!(t.is_expired(1_700_000_001));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let sig = "sig=oqbqnA3y3DPuw84SRwL%2BDU8rdvX9mYAgeVmReZuBhJ0%3D";
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&{sig}")), "missing se");
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&se=1")), "missing sig");
        assert!(malformed(&format!("SharedAccessSignature {sig}&se=1")), "missing sr");
        assert!(malformed(&format!("SharedAccessSignature  sr={HOST}&{sig}&se=1")), "two spaces");
        assert!(malformed(&format!("SharedAccessSignaturesr={HOST}&{sig}&se=1")), "no space");
        assert!(malformed(&format!("Bearer sr={HOST}&{sig}&se=1")), "other scheme");
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&{sig}&se=1&se=2")), "duplicate");
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&{sig}&se=1.5")), "float se");
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&{sig}&se=+1")), "signed se");
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&{sig}&se=99999999999999999999")));
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&{sig}&se=1&skn=")), "empty skn");
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&sig=AAAA&se=1")), "short sig");
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&sig=***&se=1")), "not base64");
        assert!(malformed(&format!("SharedAccessSignature sr=%FF&{sig}&se=1")), "sr not UTF-8");
        assert!(malformed(&format!("SharedAccessSignature sr={HOST}&{sig}&se=1&junk")), "no '='");
        assert!(malformed(""));
        assert!(malformed("SharedAccessSignature "));
        assert!(malformed("garbage"));
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let t = format!("{PYTHON_POLICY_TOKEN}&future=1");
        assert!(parse(&t).verify(KEY));
    }

    #[test]
    fn coverage_is_by_whole_segment() {
        let t = parse(PYTHON_DEVICE_TOKEN);
        assert!(t.covers("myhub.azure-devices.net/devices/d1"));
        assert!(t.covers("myhub.azure-devices.net/devices/d1/"));
        assert!(t.covers("myhub.azure-devices.net/devices/d1/messages/events"));
        assert!(t.covers("MyHub.Azure-Devices.NET/devices/d1"));
        assert!(!t.covers("myhub.azure-devices.net/devices/d10"));
        assert!(!t.covers("myhub.azure-devices.net/devices/D1"));
        assert!(!t.covers("myhub.azure-devices.net/devices"));
        assert!(!t.covers("otherhub.azure-devices.net/devices/d1"));
        assert!(!t.covers("myhub.azure-devices.net.evil/devices/d1"));
    }

    #[test]
    fn coverage_tolerates_scheme_port_and_trailing_slash() {
        let hub_wide = sign(&format!("https://{HOST}/"), KEY, 1, Some("service")).unwrap();
        let t = parse(&hub_wide);
        assert!(t.covers(HOST));
        assert!(t.covers(&format!("amqps://{HOST}:5671/")));
        assert!(t.covers(&format!("{HOST}/messages/serviceBound/feedback")));
    }

    #[test]
    fn doubly_encoded_device_id_covers_the_decoded_id() {
        // C# encodes the ID, then the whole sr: "dev:1" → "dev%3A1" → "dev%253A1".
        let text = sign(&format!("{HOST}/devices/dev%3A1"), KEY, 1, None).unwrap();
        assert!(text.contains("dev%253A1"));
        let t = parse(&text);
        assert!(t.covers(&format!("{HOST}/devices/dev:1")));
        assert_eq!(identity_scope(t.resource()), Some(("dev:1".into(), None)));
    }

    #[test]
    fn identity_scope_reads_device_and_module() {
        let scope = |s: &str| identity_scope(s);
        assert_eq!(scope("h/devices/d1"), Some(("d1".into(), None)));
        assert_eq!(scope("h/devices/d1/"), Some(("d1".into(), None)));
        assert_eq!(scope("h/devices/d1/modules/m1"), Some(("d1".into(), Some("m1".into()))));
        assert_eq!(scope("h"), None);
        assert_eq!(scope("h/devices"), None);
        assert_eq!(scope("h/devices/d1/modules"), None);
        assert_eq!(scope("h/devices/d1/messages/events"), None);
        assert_eq!(scope("h/devices/d1/modules/m1/x"), None);
    }
}
