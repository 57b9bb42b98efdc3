//! The stored form of an event's properties, application properties and annotations: the
//! `meta` column of `events`, next to the body kept as-is.
//!
//! Every D2C message is written once and most are read a few times, so this is a small binary
//! format rather than JSON: a typical telemetry message with two annotations encodes in tens of
//! bytes, with no field names and no escaping.
//!
//! Layout (all integers little-endian, lengths and counts as LEB128 varints):
//! - format byte [`FORMAT`];
//! - one byte of presence bits for the seven [`MessageProperties`] fields in declaration order,
//!   then each present one (strings as length + UTF-8, `absolute_expiry_time` as 8 bytes);
//! - count of application properties, each `key`, then 0 (no value) or 1 + `value`;
//! - count of annotations, each `key`, then a tag (0 string, 1 long, 2 timestamp) and the value.

use iothubd_actors::model::event::{AnnotationValue, EventData, MessageProperties};
use iothubd_actors::store::StoreError;

/// Version of the layout above; a reader refuses any other.
const FORMAT: u8 = 1;

const TAG_STRING: u8 = 0;
const TAG_LONG: u8 = 1;
const TAG_TIMESTAMP: u8 = 2;

/// The `meta` column of `event`.
pub(crate) fn encode_meta(event: &EventData) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    out.push(FORMAT);
    let p = &event.properties;
    let strings = [&p.message_id, &p.correlation_id, &p.user_id, &p.to, &p.content_type, &p.content_encoding];
    let mut present = 0u8;
    for (bit, field) in strings.iter().enumerate() {
        if field.is_some() {
            present |= 1 << bit;
        }
    }
    if p.absolute_expiry_time.is_some() {
        present |= 1 << strings.len();
    }
    out.push(present);
    for field in strings.into_iter().flatten() {
        put_str(&mut out, field);
    }
    if let Some(expiry) = p.absolute_expiry_time {
        out.extend_from_slice(&expiry.to_le_bytes());
    }
    put_len(&mut out, event.application_properties.len());
    for (key, value) in &event.application_properties {
        put_str(&mut out, key);
        match value {
            None => out.push(0),
            Some(value) => {
                out.push(1);
                put_str(&mut out, value);
            }
        }
    }
    put_len(&mut out, event.annotations.len());
    for (key, value) in &event.annotations {
        put_str(&mut out, key);
        match value {
            AnnotationValue::String(s) => {
                out.push(TAG_STRING);
                put_str(&mut out, s);
            }
            AnnotationValue::Long(n) => {
                out.push(TAG_LONG);
                out.extend_from_slice(&n.to_le_bytes());
            }
            AnnotationValue::Timestamp(ms) => {
                out.push(TAG_TIMESTAMP);
                out.extend_from_slice(&ms.to_le_bytes());
            }
        }
    }
    out
}

/// The event of a stored `body` and `meta`.
pub(crate) fn decode_event(body: Vec<u8>, meta: &[u8]) -> Result<EventData, StoreError> {
    let mut r = Reader { rest: meta };
    if r.byte()? != FORMAT {
        return Err(corrupt("unknown event metadata format"));
    }
    let present = r.byte()?;
    let field = |bit: u8, r: &mut Reader<'_>| -> Result<Option<String>, StoreError> {
        if present & (1 << bit) == 0 { Ok(None) } else { r.string().map(Some) }
    };
    let mut properties = MessageProperties {
        message_id: field(0, &mut r)?,
        correlation_id: field(1, &mut r)?,
        user_id: field(2, &mut r)?,
        to: field(3, &mut r)?,
        content_type: field(4, &mut r)?,
        content_encoding: field(5, &mut r)?,
        absolute_expiry_time: None,
    };
    if present & (1 << 6) != 0 {
        properties.absolute_expiry_time = Some(r.i64()?);
    }
    let count = r.len()?;
    // Each entry takes at least two bytes, which bounds the allocation by the input.
    let mut application_properties = Vec::with_capacity(count.min(r.rest.len() / 2));
    for _ in 0..count {
        let key = r.string()?;
        let value = match r.byte()? {
            0 => None,
            1 => Some(r.string()?),
            _ => return Err(corrupt("bad application property tag")),
        };
        application_properties.push((key, value));
    }
    let count = r.len()?;
    let mut annotations = Vec::with_capacity(count.min(r.rest.len() / 2));
    for _ in 0..count {
        let key = r.string()?;
        let value = match r.byte()? {
            TAG_STRING => AnnotationValue::String(r.string()?),
            TAG_LONG => AnnotationValue::Long(r.i64()?),
            TAG_TIMESTAMP => AnnotationValue::Timestamp(r.i64()?),
            _ => return Err(corrupt("bad annotation tag")),
        };
        annotations.push((key, value));
    }
    if !r.rest.is_empty() {
        return Err(corrupt("trailing bytes in event metadata"));
    }
    Ok(EventData { body, properties, application_properties, annotations })
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    let mut n = len as u64;
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("event metadata: {what}"))
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.rest.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, StoreError> {
        let bytes: [u8; 8] = self.take(8)?.try_into().map_err(|_| corrupt("truncated"))?;
        Ok(i64::from_le_bytes(bytes))
    }

    fn len(&mut self) -> Result<usize, StoreError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return usize::try_from(value).map_err(|_| corrupt("length out of range"));
            }
        }
        Err(corrupt("length too long"))
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let len = self.len()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("a string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(event: EventData) {
        let meta = encode_meta(&event);
        assert_eq!(decode_event(event.body.clone(), &meta), Ok(event));
    }

    #[test]
    fn empty_event_round_trips_in_four_bytes() {
        assert_eq!(encode_meta(&EventData::default()).len(), 4);
        round_trip(EventData::default());
    }

    #[test]
    fn every_field_round_trips() {
        round_trip(EventData {
            body: b"{\"t\":21.5}".to_vec(),
            properties: MessageProperties {
                message_id: Some("m-1".into()),
                correlation_id: None,
                user_id: Some(String::new()),
                to: Some("/devices/d1/messages/events".into()),
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                absolute_expiry_time: Some(-1),
            },
            application_properties: vec![
                ("a".into(), Some("1".into())),
                ("flag".into(), None),
                ("é".repeat(100), None),
            ],
            annotations: vec![
                ("iothub-connection-device-id".into(), AnnotationValue::String("d1".into())),
                ("x-long".into(), AnnotationValue::Long(i64::MIN)),
                ("iothub-enqueuedtime".into(), AnnotationValue::Timestamp(1_700_000_000_000)),
            ],
        });
    }

    #[test]
    fn damaged_metadata_is_corrupt_not_a_panic() {
        let event = EventData {
            application_properties: vec![("key".into(), Some("value".into()))],
            annotations: vec![("n".into(), AnnotationValue::Long(7))],
            ..Default::default()
        };
        let meta = encode_meta(&event);
        for cut in 0..meta.len() {
            assert!(matches!(decode_event(Vec::new(), &meta[..cut]), Err(StoreError::Corrupt(_))), "cut at {cut}");
        }
        let mut trailing = meta.clone();
        trailing.push(0);
        assert!(matches!(decode_event(Vec::new(), &trailing), Err(StoreError::Corrupt(_))));
        let mut huge_count = vec![FORMAT, 0];
        huge_count.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert!(matches!(decode_event(Vec::new(), &huge_count), Err(StoreError::Corrupt(_))));
    }
}
