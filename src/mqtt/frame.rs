//! MQTT 3.1.1 frames on the hub's side: where a frame ends in the bytes read, decoding a whole
//! frame with ntex-mqtt's codec, and the [`Outbox`] the hub's packets are encoded into.
//!
//! Frames are split here, before the codec sees them: the codec then always decodes a complete
//! frame, so a fresh (stateless) codec per frame is enough and a connection keeps no codec
//! state, only the bytes of a frame not yet complete.

use std::io::{self, IoSlice};
use std::num::NonZeroU16;
use std::task::{Context, Poll};

use ntex::codec::{Decoder, Encoder};
use ntex::util::{BytePageSize, BytePages, ByteString, Bytes, BytesMut};
use ntex_mqtt::v3::codec::{Codec, ConnectAckReason, Decoded, Encoded, Packet, Publish, QoS};

use super::transport::Transport;

/// Why bytes from a client are not an MQTT 3.1.1 frame the hub accepts.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("a {size}-byte frame is over the {max}-byte limit")]
    TooLarge { size: usize, max: usize },
}

/// Length of the frame at the start of `buf` (fixed header included), once its header is in;
/// frames over `max` bytes, and a first byte no MQTT 3.1.1 packet starts with, are refused
/// before the rest is read (so garbage closes the connection at once).
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    if let Some(&first) = buf.first()
        && !valid_first_byte(first)
    {
        return Err(FrameError::Malformed(format!("no MQTT packet starts with 0x{first:02x}")));
    }
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let size = 1 + (i + 1) + remaining;
            if size > max {
                return Err(FrameError::TooLarge { size, max });
            }
            return Ok(Some(size));
        }
    }
    if buf.len() >= 5 {
        return Err(FrameError::Malformed("the remaining length is longer than 4 bytes".into()));
    }
    Ok(None)
}

/// MQTT 3.1.1 §2.2: packet types 1–14, with the fixed flags each requires (PUBLISH has its own).
fn valid_first_byte(byte: u8) -> bool {
    match byte >> 4 {
        3 => true,
        6 | 8 | 10 => byte & 0x0f == 0b0010,
        1..=14 => byte & 0x0f == 0,
        _ => false,
    }
}

/// Decodes one complete frame.
pub fn decode(frame: &[u8]) -> Result<Decoded, ntex_mqtt::error::DecodeError> {
    let mut bytes = BytesMut::copy_from_slice(frame);
    match Codec::new().decode(&mut bytes)? {
        Some(decoded) => Ok(decoded),
        None => Err(ntex_mqtt::error::DecodeError::InvalidLength),
    }
}

/// Most byte slices handed to one vectored write.
const WRITE_SLICES: usize = 16;

/// Packets encoded and not yet written. Empty — holding no pages — between bursts: the pages
/// come from (and go back to) ntex's per-thread page cache.
#[derive(Default)]
pub struct Outbox {
    pages: Option<BytePages>,
}

impl Outbox {
    pub fn len(&self) -> usize {
        self.pages.as_ref().map_or(0, BytePages::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn encode(&mut self, item: Encoded) {
        let pages = self.pages.get_or_insert_with(|| BytePages::new(BytePageSize::Size4));
        // The hub's packets are built from checked values (packet ids set for QoS 1, sizes far
        // below the codec's limits), so encoding cannot fail; a failure would be a bug here.
        if let Err(e) = Codec::new().encodev(item, pages) {
            tracing::error!(error = ?e, "an MQTT packet of the hub did not encode");
        }
    }

    pub fn connack(&mut self, return_code: ConnectAckReason, session_present: bool) {
        self.encode(Encoded::Packet(Packet::ConnectAck(ntex_mqtt::v3::codec::ConnectAck {
            return_code,
            session_present,
        })));
    }

    pub fn puback(&mut self, packet_id: NonZeroU16) {
        self.encode(Encoded::Packet(Packet::PublishAck { packet_id }));
    }

    pub fn packet(&mut self, packet: Packet) {
        self.encode(Encoded::Packet(packet));
    }

    /// PUBLISH at QoS 0 (no `packet_id`) or QoS 1.
    pub fn publish(&mut self, topic: String, packet_id: Option<NonZeroU16>, dup: bool, payload: Bytes) {
        let publish = Publish {
            dup,
            retain: false,
            qos: if packet_id.is_some() { QoS::AtLeastOnce } else { QoS::AtMostOnce },
            topic: ByteString::from(topic),
            packet_id,
            payload_size: payload.len() as u32,
        };
        self.encode(Encoded::Publish(publish, Some(payload)));
    }

    /// Writes as much as the transport takes; ready once everything is written (and flushed).
    pub fn poll_write(&mut self, cx: &mut Context<'_>, io: &mut Transport) -> Poll<io::Result<()>> {
        while let Some(pages) = self.pages.as_mut().filter(|p| !p.is_empty()) {
            let mut slices = [IoSlice::new(&[]); WRITE_SLICES];
            let mut count = 0;
            for (slot, page) in slices.iter_mut().zip(pages.iter()) {
                *slot = IoSlice::new(page);
                count += 1;
            }
            match io.poll_write_vectored(cx, &slices[..count]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => pages.advance_to(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // Back to the thread's cache: an idle connection holds no pages.
        self.pages = None;
        io.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_length_reads_the_variable_length_header() {
        assert_eq!(frame_len(&[0x40], 1 << 20).ok().flatten(), None);
        assert_eq!(frame_len(&[0x40, 0x02], 1 << 20).ok().flatten(), Some(4));
        assert_eq!(frame_len(&[0x30, 0xc1, 0x02], 1 << 20).ok().flatten(), Some(3 + 321));
        assert!(matches!(frame_len(&[0x30, 0xc1, 0x02], 100), Err(FrameError::TooLarge { size: 324, max: 100 })));
        assert!(frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX).is_err());
        // Reserved types and wrong fixed flags are refused from the first byte.
        for first in [0x00, 0xf0, 0x47, 0x11, 0x80] {
            assert!(frame_len(&[first], usize::MAX).is_err(), "0x{first:02x}");
        }
        for first in [0x10, 0x32, 0x3b, 0x40, 0x62, 0x82, 0xa2, 0xc0, 0xe0] {
            assert!(frame_len(&[first], usize::MAX).is_ok(), "0x{first:02x}");
        }
    }

    #[test]
    fn a_whole_publish_decodes_with_its_payload() {
        let frame = [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i'];
        match decode(&frame) {
            Ok(Decoded::Publish(p, payload, _)) => {
                assert_eq!(&*p.topic, "a/b");
                assert_eq!(p.packet_id.map(NonZeroU16::get), Some(7));
                assert_eq!(&payload[..], b"hi");
            }
            other => panic!("expected a PUBLISH, got {other:?}"),
        }
    }

    #[test]
    fn outbox_encodes_acks_and_publishes_and_holds_nothing_when_empty() {
        let mut out = Outbox::default();
        assert!(out.is_empty() && out.pages.is_none());
        out.puback(NonZeroU16::new(9).expect("non-zero"));
        out.publish("a/b".into(), None, false, Bytes::from_static(b"hi"));
        let bytes: Vec<u8> = out.pages.as_ref().expect("pages").iter().flatten().copied().collect();
        assert_eq!(bytes, [0x40, 2, 0, 9, 0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']);
    }
}
