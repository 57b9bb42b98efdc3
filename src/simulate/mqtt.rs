//! The simulator's MQTT 3.1.1 client: just what a simulated device needs, over a plain TCP or
//! a rustls TLS stream, with the packets encoded and decoded by `ntex_mqtt::v3::codec` (the
//! codec the hub's own endpoint uses).
//!
//! Why not an MQTT client crate: rumqttc's `EventLoop` keeps read and write buffers of several
//! KiB per connection for its whole life, which is more than the ≤ 2 KiB per idle device this
//! tool aims at (ten thousand devices in one process). Here a connection owns its socket and a
//! `Vec` of not-yet-decoded bytes that is empty — unallocated — between packets: bytes are read
//! through a buffer on the stack of the poll ([`Connection::poll_fill`]), and only a partial
//! frame is kept on the heap. Outgoing packets are encoded into a [`Outbox`] that lives only
//! until it is written.
//!
//! The codec's decoder streams large PUBLISH payloads in chunks when the frame is incomplete;
//! [`Connection::next_packet`] hands it only complete frames, so every PUBLISH decodes whole
//! and a fresh (stateless) codec per frame is enough.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ntex::codec::{Decoder, Encoder};
use ntex::util::{BytePageSize, BytePages, ByteString, Bytes, BytesMut};
use ntex_mqtt::v3::codec::{Codec, Connect, Decoded, Encoded, Packet, Publish, QoS, SubscribeReturnCode};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::mqtt::frame::FrameError;

/// Largest frame accepted from the broker: a direct-method payload is ≤ 128 KB and a C2D
/// message ≤ 64 KB (device-protocol §5), so 1 MiB is room to spare, not a limit in practice.
const MAX_FRAME: usize = 1024 * 1024;
/// Bytes read per `read` call, on the poll's stack.
const READ_CHUNK: usize = 2048;
/// Reading stops after this many bytes in one poll, so one busy connection cannot starve the
/// others on its worker thread.
const READ_BUDGET: usize = 64 * 1024;

/// TLS settings shared by every device: the connector (trusting the hub's CA) and the name
/// presented as SNI and checked against the certificate (the hub's host name).
#[derive(Clone)]
pub struct TlsTarget {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl TlsTarget {
    /// Trusts only the PEM certificates in `ca_file`; `host` is the name the server must prove.
    pub fn new(ca_file: &std::path::Path, host: &str) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let config = crate::client::tls_config_trusting(ca_file)?;
        let server_name = ServerName::try_from(host.to_owned())
            .with_context(|| format!("'{host}' is not a valid TLS server name"))?;
        Ok(Self { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), server_name })
    }
}

/// Why a connection could not be opened, kept apart because the report counts them apart.
#[derive(Debug)]
pub enum OpenError {
    Tcp(io::Error),
    Tls(io::Error),
}

/// The byte stream under MQTT. The TLS stream is boxed: rustls' connection state is large and
/// only TLS runs pay for it.
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Transport {
    /// Dials `target`, first binding `source` (any port) when given: each local address has its
    /// own ephemeral-port range, which is how one process opens more connections to one
    /// broker than the range allows.
    pub async fn open(target: SocketAddr, source: Option<IpAddr>, tls: Option<&TlsTarget>) -> Result<Self, OpenError> {
        let socket =
            if target.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(OpenError::Tcp)?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).map_err(OpenError::Tcp)?;
        }
        let stream = socket.connect(target).await.map_err(OpenError::Tcp)?;
        stream.set_nodelay(true).map_err(OpenError::Tcp)?;
        match tls {
            None => Ok(Transport::Plain(stream)),
            Some(tls) => {
                let stream = tls.connector.connect(tls.server_name.clone(), stream).await.map_err(OpenError::Tls)?;
                Ok(Transport::Tls(Box::new(stream)))
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Transport::Plain(s) => s.write_all(bytes).await,
            Transport::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }
}

/// A packet from the broker, in the simulator's terms.
#[derive(Debug)]
pub enum Incoming {
    /// CONNACK with its return code (0 = accepted, device-protocol §2.2).
    ConnAck(u8),
    PubAck(u16),
    /// SUBACK: how many of the filters were refused (0x80).
    SubAck {
        refused: usize,
    },
    Publish {
        topic: ByteString,
        qos: QoS,
        packet_id: Option<u16>,
        payload: Bytes,
    },
    PingResp,
    /// Anything a client does not expect from a server (CONNECT, SUBSCRIBE, QoS 2 flows).
    Unexpected(&'static str),
}

/// A broker that sent bytes which are not MQTT 3.1.1.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("a {0}-byte frame is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
}

/// One MQTT connection: the transport and the bytes of a frame not yet complete.
pub struct Connection {
    io: Transport,
    /// Undecoded bytes; empty and unallocated whenever no partial frame is waiting.
    pending: Vec<u8>,
}

impl Connection {
    pub fn new(io: Transport) -> Self {
        Self { io, pending: Vec::new() }
    }

    /// Writes everything queued in `out` (and empties it).
    pub async fn send(&mut self, out: &mut Outbox) -> io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let bytes = out.take();
        self.io.write_all(&bytes).await
    }

    /// Reads what the socket has, into `pending`; ready with the number of bytes read once at
    /// least one arrived, `Ok(0)` at end of stream. The read buffer lives on this poll's stack,
    /// so an idle connection holds none.
    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut total = 0;
        loop {
            let mut chunk = [0u8; READ_CHUNK];
            let mut buf = ReadBuf::new(&mut chunk);
            match self.io.poll_read(cx, &mut buf) {
                Poll::Pending if total > 0 => return Poll::Ready(Ok(total)),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let filled = buf.filled();
                    if filled.is_empty() {
                        return Poll::Ready(Ok(total));
                    }
                    self.pending.extend_from_slice(filled);
                    total += filled.len();
                    if total >= READ_BUDGET || filled.len() < READ_CHUNK {
                        return Poll::Ready(Ok(total));
                    }
                }
            }
        }
    }

    /// Whether a complete frame (or bytes that cannot be one) waits in the read bytes.
    pub fn has_frame(&self) -> bool {
        match frame_len(&self.pending) {
            Ok(Some(len)) => self.pending.len() >= len,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// The next complete packet among the bytes read so far, if there is one.
    pub fn next_packet(&mut self) -> Result<Option<Incoming>, ProtocolError> {
        let Some(len) = frame_len(&self.pending)? else {
            return Ok(None);
        };
        if self.pending.len() < len {
            return Ok(None);
        }
        let mut frame = BytesMut::copy_from_slice(&self.pending[..len]);
        if self.pending.len() == len {
            // Frees the buffer: an idle connection keeps no heap bytes.
            self.pending = Vec::new();
        } else {
            self.pending.drain(..len);
        }
        let decoded = Codec::new()
            .decode(&mut frame)
            .map_err(|e| ProtocolError::Malformed(format!("{e:?}")))?
            .ok_or_else(|| ProtocolError::Malformed("a complete frame did not decode".into()))?;
        Ok(Some(incoming(decoded)))
    }
}

fn incoming(decoded: Decoded) -> Incoming {
    match decoded {
        Decoded::Publish(p, payload, _) => {
            Incoming::Publish { topic: p.topic, qos: p.qos, packet_id: p.packet_id.map(NonZeroU16::get), payload }
        }
        Decoded::PayloadChunk(..) => Incoming::Unexpected("a payload chunk"),
        Decoded::Packet(packet, _) => match packet {
            Packet::ConnectAck(ack) => Incoming::ConnAck(u8::from(ack.return_code)),
            Packet::PublishAck { packet_id } => Incoming::PubAck(packet_id.get()),
            Packet::SubscribeAck { status, .. } => {
                Incoming::SubAck { refused: status.iter().filter(|s| **s == SubscribeReturnCode::Failure).count() }
            }
            Packet::PingResponse => Incoming::PingResp,
            Packet::Connect(_) => Incoming::Unexpected("CONNECT"),
            Packet::PublishReceived { .. } | Packet::PublishRelease { .. } | Packet::PublishComplete { .. } => {
                Incoming::Unexpected("a QoS 2 packet")
            }
            Packet::Subscribe { .. } | Packet::Unsubscribe { .. } => Incoming::Unexpected("SUBSCRIBE/UNSUBSCRIBE"),
            Packet::UnsubscribeAck { .. } => Incoming::Unexpected("UNSUBACK"),
            Packet::PingRequest => Incoming::Unexpected("PINGREQ"),
            Packet::Disconnect => Incoming::Unexpected("DISCONNECT"),
        },
    }
}

/// Length of the frame at the start of `buf` (fixed header included), once its header is in:
/// the hub's own framing (`crate::mqtt::frame`), in the simulator's error terms.
fn frame_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    crate::mqtt::frame::frame_len(buf, MAX_FRAME).map_err(|e| match e {
        FrameError::TooLarge { size, .. } => ProtocolError::TooLarge(size),
        FrameError::Malformed(why) => ProtocolError::Malformed(why),
    })
}

/// Packets encoded and waiting to be written together (one `write` for a burst of PUBLISHes and
/// the PUBACKs that came due with them).
pub struct Outbox {
    pages: BytePages,
}

impl Default for Outbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Outbox {
    pub fn new() -> Self {
        Self { pages: BytePages::new(BytePageSize::Size4) }
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    fn take(&mut self) -> Bytes {
        self.pages.freeze()
    }

    fn packet(&mut self, packet: Packet) -> io::Result<()> {
        Codec::new().encodev(Encoded::Packet(packet), &mut self.pages).map_err(encode_error)
    }

    /// CONNECT with a clean session (every connection subscribes afresh).
    pub fn connect(
        &mut self,
        client_id: &str,
        username: Option<String>,
        password: Option<String>,
        keep_alive: u16,
    ) -> io::Result<()> {
        let connect = Connect {
            clean_session: true,
            keep_alive,
            last_will: None,
            client_id: ByteString::from(client_id),
            username: username.map(ByteString::from),
            password: password.map(Bytes::from),
        };
        self.packet(Packet::Connect(Box::new(connect)))
    }

    /// PUBLISH at QoS 0 (`packet_id` ignored) or QoS 1.
    pub fn publish(&mut self, topic: String, qos: QoS, packet_id: u16, payload: Bytes) -> io::Result<()> {
        let publish = Publish {
            dup: false,
            retain: false,
            qos,
            topic: ByteString::from(topic),
            packet_id: if qos == QoS::AtMostOnce { None } else { NonZeroU16::new(packet_id) },
            payload_size: u32::try_from(payload.len()).map_err(|_| io::Error::other("payload over 4 GiB"))?,
        };
        Codec::new().encodev(Encoded::Publish(publish, Some(payload)), &mut self.pages).map_err(encode_error)
    }

    pub fn subscribe(&mut self, packet_id: u16, filters: Vec<(String, QoS)>) -> io::Result<()> {
        let packet_id = NonZeroU16::new(packet_id).ok_or_else(|| io::Error::other("packet id 0"))?;
        let topic_filters = filters.into_iter().map(|(f, q)| (ByteString::from(f), q)).collect();
        self.packet(Packet::Subscribe { packet_id, topic_filters })
    }

    pub fn puback(&mut self, packet_id: u16) -> io::Result<()> {
        let packet_id = NonZeroU16::new(packet_id).ok_or_else(|| io::Error::other("packet id 0"))?;
        self.packet(Packet::PublishAck { packet_id })
    }

    pub fn ping(&mut self) -> io::Result<()> {
        self.packet(Packet::PingRequest)
    }

    pub fn disconnect(&mut self) -> io::Result<()> {
        self.packet(Packet::Disconnect)
    }
}

fn encode_error(e: ntex_mqtt::error::EncodeError) -> io::Error {
    io::Error::other(format!("cannot encode an MQTT packet: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(fill: impl FnOnce(&mut Outbox)) -> Vec<u8> {
        let mut out = Outbox::new();
        fill(&mut out);
        out.take().to_vec()
    }

    #[test]
    fn frame_errors_are_the_simulators_protocol_errors() {
        assert_eq!(frame_len(&[0x40, 0x02]).ok().flatten(), Some(4));
        // 2 MiB announced: over the 1 MiB the simulator takes from a broker.
        assert!(matches!(frame_len(&[0x30, 0xff, 0xff, 0x7f]), Err(ProtocolError::TooLarge(2_097_155))));
        assert!(matches!(frame_len(&[0xf0]), Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn publish_encodes_as_mqtt_3_1_1() {
        let bytes = encoded(|o| {
            o.publish("a/b".into(), QoS::AtLeastOnce, 7, Bytes::from_static(b"hi")).expect("encodes");
        });
        assert_eq!(bytes, [0x32, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i']);
    }

    #[test]
    fn decodes_acks_and_publishes_from_complete_frames_only() {
        let publish = encoded(|o| {
            o.publish("$iothub/methods/POST/reboot/?$rid=1".into(), QoS::AtMostOnce, 0, Bytes::from_static(b"{}"))
                .expect("encodes");
        });
        let mut bytes = vec![0x20, 2, 0, 0, 0x40, 2, 0, 9];
        bytes.extend_from_slice(&publish);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            let io = Transport::open(addr, None, None).await.expect("connects");
            let mut conn = Connection::new(io);
            // Half a frame is not a packet.
            conn.pending.extend_from_slice(&bytes[..5]);
            assert!(matches!(conn.next_packet(), Ok(Some(Incoming::ConnAck(0)))));
            assert!(matches!(conn.next_packet(), Ok(None)));
            conn.pending.extend_from_slice(&bytes[5..]);
            assert!(matches!(conn.next_packet(), Ok(Some(Incoming::PubAck(9)))));
            match conn.next_packet() {
                Ok(Some(Incoming::Publish { topic, payload, packet_id: None, .. })) => {
                    assert_eq!(&*topic, "$iothub/methods/POST/reboot/?$rid=1");
                    assert_eq!(&payload[..], b"{}");
                }
                other => panic!("expected the PUBLISH, got {other:?}"),
            }
            assert!(conn.pending.capacity() == 0, "the buffer is released once drained");
        });
    }
}
