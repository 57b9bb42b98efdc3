//! The stored form of events: an event's properties, application properties and annotations
//! (`meta`, kept next to the body as-is), and the chunk that packs many events with their
//! metadata into one blob (the embedded events log, `embedded::event_writer`).
//!
//! Every D2C message is written once and most are read a few times, so this is a small binary
//! format rather than JSON: a typical telemetry message with two annotations encodes in tens of
//! bytes, with no field names and no escaping.
//!
//! `meta` layout (all integers little-endian, lengths and counts as LEB128 varints):
//! - format byte [`FORMAT`];
//! - one byte of presence bits for the seven [`MessageProperties`] fields in declaration order,
//!   then each present one (strings as length + UTF-8, `absolute_expiry_time` as 8 bytes);
//! - count of application properties, each `key`, then 0 (no value) or 1 + `value`;
//! - count of annotations, each `key`, then a tag (0 string, 1 long, 2 timestamp) and the value.
//!
//! Chunk layout ([`EventChunk`]):
//! - format byte [`CHUNK_FORMAT`];
//! - each event in sequence order: the body's length (4 bytes, little-endian), the body, the
//!   `meta`'s length (4 bytes) and the `meta` above.
//!
//! The number of events is kept beside the blob (the chunk's row), not in it. Lengths are fixed
//! width so that a read starting in the middle of a chunk passes over the events before it by
//! reading two lengths each, decoding nothing.

use iothubd_actors::model::event::{AnnotationValue, EventData, MessageProperties};
use iothubd_actors::store::StoreError;

/// Version of the `meta` layout above; a reader refuses any other.
const FORMAT: u8 = 1;

/// Version of the chunk layout above; a reader refuses any other.
const CHUNK_FORMAT: u8 = 1;

const TAG_STRING: u8 = 0;
const TAG_LONG: u8 = 1;
const TAG_TIMESTAMP: u8 = 2;

/// The `meta` column of `event`.
pub(crate) fn encode_meta(event: &EventData) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    write_meta(&mut out, event);
    out
}

/// Appends the `meta` form of `event` to `out`.
fn write_meta(out: &mut Vec<u8>, event: &EventData) {
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
        put_str(out, field);
    }
    if let Some(expiry) = p.absolute_expiry_time {
        out.extend_from_slice(&expiry.to_le_bytes());
    }
    put_len(out, event.application_properties.len());
    for (key, value) in &event.application_properties {
        put_str(out, key);
        match value {
            None => out.push(0),
            Some(value) => {
                out.push(1);
                put_str(out, value);
            }
        }
    }
    put_len(out, event.annotations.len());
    for (key, value) in &event.annotations {
        put_str(out, key);
        match value {
            AnnotationValue::String(s) => {
                out.push(TAG_STRING);
                put_str(out, s);
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
}

/// The event of a stored `body` and `meta`.
pub(crate) fn decode_event(body: Vec<u8>, meta: &[u8]) -> Result<EventData, StoreError> {
    let mut r = Reader { rest: meta, what: "event metadata" };
    if r.byte()? != FORMAT {
        return Err(r.corrupt("unknown format"));
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
            _ => return Err(r.corrupt("bad application property tag")),
        };
        application_properties.push((key, value));
    }
    let count = r.len()?;
    let mut annotations = Vec::with_capacity(count.min(r.rest.len() / 2));
    for _ in 0..count {
        let key = r.string()?.into();
        let value = match r.byte()? {
            TAG_STRING => AnnotationValue::String(r.string()?.into()),
            TAG_LONG => AnnotationValue::Long(r.i64()?),
            TAG_TIMESTAMP => AnnotationValue::Timestamp(r.i64()?),
            _ => return Err(r.corrupt("bad annotation tag")),
        };
        annotations.push((key, value));
    }
    if !r.rest.is_empty() {
        return Err(r.corrupt("trailing bytes"));
    }
    Ok(EventData { body, properties, application_properties, annotations })
}

/// Events packed in the chunk layout, in the order pushed: a chunk's blob, or a part of one that
/// the events log's writer joins to others ([`EventChunk::append`]).
pub(crate) struct EventChunk {
    blob: Vec<u8>,
    count: i64,
}

impl EventChunk {
    pub(crate) fn new() -> Self {
        Self { blob: vec![CHUNK_FORMAT], count: 0 }
    }

    /// Packs `event` after the events already here. `Unavailable` for a body or metadata of
    /// 4 GiB or more, which the layout cannot hold (no front-end accepts a message that large).
    pub(crate) fn push(&mut self, event: &EventData) -> Result<(), StoreError> {
        let start = self.blob.len();
        self.blob.extend_from_slice(&u32_len(event.body.len())?);
        self.blob.extend_from_slice(&event.body);
        // The metadata is encoded in place, after a placeholder for its length.
        let at = self.blob.len();
        self.blob.extend_from_slice(&[0; 4]);
        write_meta(&mut self.blob, event);
        match u32_len(self.blob.len() - at - 4) {
            Ok(len) => self.blob[at..at + 4].copy_from_slice(&len),
            Err(e) => {
                self.blob.truncate(start);
                return Err(e);
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Packs an event already in its stored form: a body and its `meta`.
    pub(crate) fn push_stored(&mut self, body: &[u8], meta: &[u8]) -> Result<(), StoreError> {
        let (body_len, meta_len) = (u32_len(body.len())?, u32_len(meta.len())?);
        self.blob.extend_from_slice(&body_len);
        self.blob.extend_from_slice(body);
        self.blob.extend_from_slice(&meta_len);
        self.blob.extend_from_slice(meta);
        self.count += 1;
        Ok(())
    }

    /// Packs the events of `other` after this one's.
    pub(crate) fn append(&mut self, other: &EventChunk) {
        self.blob.extend_from_slice(&other.blob[1..]);
        self.count += other.count;
    }

    /// Makes room for `bytes` more bytes of packed events.
    pub(crate) fn reserve(&mut self, bytes: usize) {
        self.blob.reserve(bytes);
    }

    /// How many events are packed.
    pub(crate) fn count(&self) -> i64 {
        self.count
    }

    /// The blob's size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.blob.len()
    }

    /// The chunk's blob.
    pub(crate) fn blob(&self) -> &[u8] {
        &self.blob
    }
}

/// Reads the events of a chunk's blob in order.
pub(crate) struct ChunkReader<'a> {
    reader: Reader<'a>,
    /// Events not read or passed over yet.
    remaining: i64,
}

impl<'a> ChunkReader<'a> {
    /// A reader of `blob`, which its row says holds `count` events.
    pub(crate) fn new(blob: &'a [u8], count: i64) -> Result<Self, StoreError> {
        let mut reader = Reader { rest: blob, what: "event chunk" };
        if reader.byte()? != CHUNK_FORMAT {
            return Err(reader.corrupt("unknown format"));
        }
        if count < 0 {
            return Err(reader.corrupt("negative event count"));
        }
        Ok(Self { reader, remaining: count })
    }

    /// Passes over the next `n` events (at most all that remain) without decoding them.
    pub(crate) fn skip(&mut self, n: i64) -> Result<(), StoreError> {
        for _ in 0..n.min(self.remaining) {
            self.stored()?;
        }
        Ok(())
    }

    /// The next event; `None` after the last, once the blob is seen to hold nothing more.
    pub(crate) fn next_event(&mut self) -> Result<Option<EventData>, StoreError> {
        if self.remaining == 0 {
            if !self.reader.rest.is_empty() {
                return Err(self.reader.corrupt("more events than counted"));
            }
            return Ok(None);
        }
        let (body, meta) = self.stored()?;
        decode_event(body.to_vec(), meta).map(Some)
    }

    /// The next event's stored body and `meta`.
    fn stored(&mut self) -> Result<(&'a [u8], &'a [u8]), StoreError> {
        let body = self.reader.u32_len().and_then(|len| self.reader.take(len))?;
        let meta = self.reader.u32_len().and_then(|len| self.reader.take(len))?;
        self.remaining -= 1;
        Ok((body, meta))
    }
}

/// A length in the chunk layout's 4 bytes.
fn u32_len(len: usize) -> Result<[u8; 4], StoreError> {
    u32::try_from(len)
        .map(u32::to_le_bytes)
        .map_err(|_| StoreError::Unavailable("an event of 4 GiB or more cannot be stored".into()))
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

struct Reader<'a> {
    rest: &'a [u8],
    /// What is being read, for error messages.
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn corrupt(&self, detail: &str) -> StoreError {
        StoreError::Corrupt(format!("{}: {detail}", self.what))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.rest.len() < n {
            return Err(self.corrupt("truncated"));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64, StoreError> {
        let bytes: [u8; 8] = self.take(8)?.try_into().map_err(|_| self.corrupt("truncated"))?;
        Ok(i64::from_le_bytes(bytes))
    }

    fn u32_len(&mut self) -> Result<usize, StoreError> {
        let bytes: [u8; 4] = self.take(4)?.try_into().map_err(|_| self.corrupt("truncated"))?;
        usize::try_from(u32::from_le_bytes(bytes)).map_err(|_| self.corrupt("length out of range"))
    }

    fn len(&mut self) -> Result<usize, StoreError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return usize::try_from(value).map_err(|_| self.corrupt("length out of range"));
            }
        }
        Err(self.corrupt("length too long"))
    }

    fn string(&mut self) -> Result<String, StoreError> {
        let len = self.len()?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.corrupt("a string is not UTF-8"))
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

    /// Telemetry as the hub stores it, numbered so that each event differs.
    fn telemetry(i: usize) -> EventData {
        EventData {
            body: vec![b'x'; i * 7 % 300],
            properties: MessageProperties { message_id: Some(format!("m{i}")), ..Default::default() },
            application_properties: vec![("n".into(), Some(i.to_string()))],
            annotations: vec![
                ("iothub-connection-device-id".into(), AnnotationValue::String(format!("d{i}").into())),
                ("iothub-enqueuedtime".into(), AnnotationValue::Timestamp(1_700_000_000_000)),
            ],
        }
    }

    /// Every event of `blob` after passing over `skip`.
    fn read_chunk(blob: &[u8], count: i64, skip: i64) -> Result<Vec<EventData>, StoreError> {
        let mut reader = ChunkReader::new(blob, count)?;
        reader.skip(skip)?;
        let mut events = Vec::new();
        while let Some(event) = reader.next_event()? {
            events.push(event);
        }
        Ok(events)
    }

    #[test]
    fn chunk_round_trips_its_events_in_order_from_any_event() {
        let events: Vec<EventData> = (0..20).map(telemetry).chain([EventData::default()]).collect();
        let mut chunk = EventChunk::new();
        for event in &events {
            chunk.push(event).expect("packed");
        }
        assert_eq!(chunk.count(), 21);
        for skip in 0..=22 {
            let expected = &events[usize::try_from(skip).expect("small").min(events.len())..];
            assert_eq!(read_chunk(chunk.blob(), chunk.count(), skip).as_deref(), Ok(expected), "from {skip}");
        }
        assert_eq!(read_chunk(EventChunk::new().blob(), 0, 0), Ok(Vec::new()), "an empty chunk");
    }

    #[test]
    fn appended_and_stored_events_pack_like_pushed_ones() {
        let events: Vec<EventData> = (0..10).map(telemetry).collect();
        let mut whole = EventChunk::new();
        let (mut head, mut tail, mut stored) = (EventChunk::new(), EventChunk::new(), EventChunk::new());
        for (i, event) in events.iter().enumerate() {
            whole.push(event).expect("packed");
            if i < 4 { &mut head } else { &mut tail }.push(event).expect("packed");
            stored.push_stored(&event.body, &encode_meta(event)).expect("packed");
        }
        head.append(&tail);
        assert_eq!((head.count(), head.blob()), (whole.count(), whole.blob()));
        assert_eq!((stored.count(), stored.blob()), (whole.count(), whole.blob()));
        assert_eq!(read_chunk(whole.blob(), whole.count(), 0), Ok(events));
    }

    #[test]
    fn damaged_chunk_is_corrupt_not_a_panic() {
        let mut chunk = EventChunk::new();
        for i in 1..4 {
            chunk.push(&telemetry(i)).expect("packed");
        }
        let (blob, count) = (chunk.blob(), chunk.count());
        let corrupt = |result: Result<Vec<EventData>, StoreError>| matches!(result, Err(StoreError::Corrupt(_)));
        for cut in 0..blob.len() {
            assert!(corrupt(read_chunk(&blob[..cut], count, 0)), "cut at {cut}");
            assert!(corrupt(read_chunk(&blob[..cut], count, count - 1)), "cut at {cut}, read from the last");
        }
        assert!(corrupt(read_chunk(blob, count + 1, 0)), "fewer events than counted");
        assert!(corrupt(read_chunk(blob, count - 1, 0)), "more events than counted");
        assert!(corrupt(read_chunk(blob, -1, 0)), "a negative count");
        let mut other_format = blob.to_vec();
        other_format[0] = CHUNK_FORMAT + 1;
        assert!(corrupt(read_chunk(&other_format, count, 0)));
        let mut huge_length = blob.to_vec();
        huge_length[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(corrupt(read_chunk(&huge_length, count, 1)), "even when only passed over");
        // Whatever a damaged byte does, the answer is events or `Corrupt`.
        for at in 0..blob.len() {
            let mut damaged = blob.to_vec();
            damaged[at] ^= 0xa5;
            let result = read_chunk(&damaged, count, 0);
            assert!(result.is_ok() || corrupt(result), "byte {at}");
        }
    }
}
