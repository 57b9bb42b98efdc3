//! Response header names in the exact case an SDK matches (device-protocol §3).
//!
//! The C device SDK compares header names case-sensitively: the `200` of a C2D receive must
//! carry `ContentType`, `ContentEncoding` and `iothub-app-{name}` with the property's own case.
//! actix-web cannot write that by itself: an `http::HeaderName` holds lower case only, and
//! actix-http's HTTP/1 encoder writes `HeaderName::as_str()` (its one option, Camel-Case, turns
//! `contenttype` into `Contenttype`). So the case travels beside actix:
//!
//! - a handler names such a header with [`verbatim`]. A name with upper case comes back as
//!   `x-verbatim-<token>-<encoded name>`, where an upper-case letter is written `^` and its
//!   lower case and `^` itself `^^` — bytes a header name may hold, which `HeaderName` keeps as
//!   they are. `<token>` is random per process;
//! - [`CaseRestoring`] sits between TLS (or TCP) and actix-http on every connection of the HTTPS
//!   listener (`super::listener`) and writes each marked name as the original ([`Restorer`]).
//!
//! The marker is always rewritten, so it never leaves the process: no client can learn it, and a
//! body cannot hold it unless the process put a marked name there — handlers use marked names
//! only as response header names. [`verbatim`] marks only on a connection that restores (the
//! listener flags each one) and only for HTTP/1.x, whose names go out as text: HTTP/2 requires
//! lower-case names (the listener offers `http/1.1` only, as `HttpServer` did here with
//! actix-web's `http2` feature off, and the C SDK speaks HTTP/1.1).
//!
//! Request header names still arrive lower-cased (`iothub-app-Color` is property `color`). The
//! same trick does not carry over cheaply: there the bytes are the client's, and a body may
//! hold `\r\niothub-app-Color:` as well as a head, so a read-side rewrite would need its own
//! HTTP/1 request framing (`Content-Length`, chunks and trailers, upgrades, pipelining) that
//! agrees with actix-http's on every input, or it would alter bodies.

use std::io;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll, ready};

use actix_web::HttpRequest;
use actix_web::dev::Extensions;
use actix_web::http::Version;
use actix_web::http::header::{HeaderName, InvalidHeaderName};
use actix_web::web::{Buf, BytesMut};
use memchr::memmem;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The start of every marked name: `x-verbatim-<16 hex digits>-`.
struct Marker {
    text: String,
    finder: memmem::Finder<'static>,
}

static MARKER: LazyLock<Marker> = LazyLock::new(|| {
    let text = format!("x-verbatim-{:016x}-", rand::random::<u64>());
    let finder = memmem::Finder::new(text.as_bytes()).into_owned();
    Marker { text, finder }
});

/// Escape byte of the encoding: `^c` is `C`, `^^` is `^`.
const ESCAPE: u8 = b'^';

/// Set on each connection of the HTTPS listener, whose bytes pass through [`CaseRestoring`].
struct RestoresCase;

/// Flags a connection as restoring marked names (the listener's on-connect hook).
pub(crate) fn flag_connection(ext: &mut Extensions) {
    ext.insert(RestoresCase);
}

/// The response header name `name` as the client will read it, exact case included, where the
/// connection allows (HTTP/1.x through the HTTPS listener); elsewhere its lower-case form. A
/// name that is not a valid header name is refused, as `HeaderName` refuses it.
pub fn verbatim(req: &HttpRequest, name: &str) -> Result<HeaderName, InvalidHeaderName> {
    let restores = req.version() <= Version::HTTP_11 && req.conn_data::<RestoresCase>().is_some();
    if restores { mark(name) } else { HeaderName::from_bytes(name.as_bytes()) }
}

/// The marked form of `name` (unmarked when it has no upper case: nothing to restore). Handlers
/// use [`verbatim`], which marks only where the mark is rewritten.
pub fn mark(name: &str) -> Result<HeaderName, InvalidHeaderName> {
    if !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return HeaderName::from_bytes(name.as_bytes());
    }
    let mut marked = Vec::with_capacity(MARKER.text.len() + name.len() + 4);
    marked.extend_from_slice(MARKER.text.as_bytes());
    for b in name.bytes() {
        if b.is_ascii_uppercase() || b == ESCAPE {
            marked.push(ESCAPE);
        }
        marked.push(b.to_ascii_lowercase());
    }
    HeaderName::from_bytes(&marked)
}

/// A byte a header name may hold (RFC 9110 §5.6.2 `tchar`): a marked name ends at the first
/// other byte (the `:` after it).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Rewrites marked names in a byte stream written in pieces: what may be the start of a marker
/// (or a marked name not yet ended) at the end of one piece is held until the next.
#[derive(Debug, Default)]
pub struct Restorer {
    held: Vec<u8>,
}

impl Restorer {
    /// Whether `input` goes out unchanged: nothing held, no marker in it, and no start of one at
    /// its end. The common case: one SIMD search and a look at the last bytes.
    pub fn passes_through(&self, input: &[u8]) -> bool {
        self.held.is_empty() && MARKER.finder.find(input).is_none() && partial_marker_len(input) == 0
    }

    /// Appends `input` to `out` with every complete marked name restored, holding back what may
    /// continue in the next piece.
    pub fn restore(&mut self, input: &[u8], out: &mut BytesMut) {
        if self.held.is_empty() {
            self.restore_from(input, out);
        } else {
            let mut joined = std::mem::take(&mut self.held);
            joined.extend_from_slice(input);
            self.restore_from(&joined, out);
        }
    }

    /// Releases what is held: a flush means the writer has nothing to add to it, so a marked
    /// name there is complete, and anything else was not a marker.
    pub fn release(&mut self, out: &mut BytesMut) {
        match self.held.strip_prefix(MARKER.text.as_bytes()) {
            Some(encoded) => decode(encoded, out),
            None => out.extend_from_slice(&self.held),
        }
        self.held.clear();
    }

    fn restore_from(&mut self, mut rest: &[u8], out: &mut BytesMut) {
        let marker_len = MARKER.text.len();
        while let Some(at) = MARKER.finder.find(rest) {
            out.extend_from_slice(&rest[..at]);
            let encoded = &rest[at + marker_len..];
            let Some(name_len) = encoded.iter().position(|&b| !is_tchar(b)) else {
                // The name may go on in the next piece.
                self.held.extend_from_slice(&rest[at..]);
                return;
            };
            decode(&encoded[..name_len], out);
            rest = &encoded[name_len..];
        }
        let keep = partial_marker_len(rest);
        out.extend_from_slice(&rest[..rest.len() - keep]);
        self.held.extend_from_slice(&rest[rest.len() - keep..]);
    }
}

/// Writes an encoded name as the original: `^x` → `X`, `^^` → `^`.
fn decode(encoded: &[u8], out: &mut BytesMut) {
    let mut bytes = encoded.iter();
    while let Some(&b) = bytes.next() {
        match (b, bytes.as_slice().first()) {
            (ESCAPE, Some(&next)) => {
                out.extend_from_slice(&[next.to_ascii_uppercase()]);
                bytes.next();
            }
            _ => out.extend_from_slice(&[b]),
        }
    }
}

/// Length of the longest end of `input` that begins the marker (0 when none does).
fn partial_marker_len(input: &[u8]) -> usize {
    let marker = MARKER.text.as_bytes();
    let window = input.len().saturating_sub(marker.len() - 1);
    memchr::memchr_iter(marker[0], &input[window..])
        .map(|i| &input[window + i..])
        .find(|tail| marker.starts_with(tail))
        .map_or(0, <[u8]>::len)
}

/// A connection's I/O with marked names restored on the way out; reads pass through.
///
/// A write with no marker goes straight to the inner I/O. A write with one is rewritten into a
/// buffer and accepted whole (the buffer drains before the next write, on flush and on
/// shutdown), so the caller never re-offers rewritten bytes.
pub struct CaseRestoring<T> {
    io: T,
    restorer: Restorer,
    out: BytesMut,
}

impl<T> CaseRestoring<T> {
    pub fn new(io: T) -> Self {
        CaseRestoring { io, restorer: Restorer::default(), out: BytesMut::new() }
    }
}

impl<T: AsyncWrite + Unpin> CaseRestoring<T> {
    /// Writes the rewritten bytes still buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.out.advance(n),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CaseRestoring<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CaseRestoring<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        if this.restorer.passes_through(buf) {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        }
        this.restorer.restore(buf, &mut this.out);
        // Accepted whole; what the inner I/O does not take now drains on the next call.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.restorer.release(&mut this.out);
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.restorer.release(&mut this.out);
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(original: &str) -> String {
        mark(original).expect("valid name").as_str().to_owned()
    }

    /// Runs `pieces` through one restorer, as consecutive writes, then a flush.
    fn restored(pieces: &[&[u8]]) -> Vec<u8> {
        let mut restorer = Restorer::default();
        let mut out = BytesMut::new();
        for piece in pieces {
            restorer.restore(piece, &mut out);
        }
        restorer.release(&mut out);
        out.to_vec()
    }

    #[test]
    fn only_names_with_upper_case_are_marked() {
        assert_eq!(name("iothub-messageid"), "iothub-messageid");
        assert!(name("ContentType").starts_with(&MARKER.text));
        assert!(name("ContentType").ends_with("^content^type"));
        assert!(name("a^B").ends_with("a^^^b"));
        assert!(mark("Bad Name").is_err());
    }

    #[test]
    fn a_head_with_several_marked_names_is_restored() {
        let head = format!(
            "HTTP/1.1 200 OK\r\n{}: application/json\r\n{}: utf-8\r\niothub-ack: none\r\n{}: red\r\n{}: 1\r\n\r\n{{}}",
            name("ContentType"),
            name("ContentEncoding"),
            name("iothub-app-Color"),
            name("iothub-app-x^Y"),
        );
        let expected = "HTTP/1.1 200 OK\r\nContentType: application/json\r\nContentEncoding: utf-8\r\n\
                        iothub-ack: none\r\niothub-app-Color: red\r\niothub-app-x^Y: 1\r\n\r\n{}";
        assert_eq!(String::from_utf8(restored(&[head.as_bytes()])).unwrap(), expected);
    }

    #[test]
    fn a_marker_split_over_two_writes_is_restored() {
        let head = format!("HTTP/1.1 200 OK\r\n{}: application/json\r\n\r\n", name("ContentType"));
        let expected = b"HTTP/1.1 200 OK\r\nContentType: application/json\r\n\r\n";
        // Every split point: inside the marker, inside the encoded name, right after it.
        for split in 1..head.len() {
            let (a, b) = head.as_bytes().split_at(split);
            assert_eq!(restored(&[a, b]), expected, "split at {split}");
        }
    }

    #[test]
    fn bytes_without_a_marker_pass_unchanged() {
        let restorer = Restorer::default();
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert!(restorer.passes_through(plain));
        assert_eq!(restored(&[plain]), plain);
        // A body that merely looks like the head of a marked name, or ends like the start of
        // a marker, is not rewritten (the held end is released as it was).
        let lookalike = b"\r\nx-verbatim-0000000000000000-content^type: x\r\nx-verbatim-";
        assert!(!restorer.passes_through(lookalike), "the end may begin a marker");
        assert_eq!(restored(&[lookalike]), lookalike);
        assert_eq!(restored(&[b"x-ver", b"y"]), b"x-very");
    }

    #[test]
    fn a_marked_name_ending_the_last_write_is_restored_on_flush() {
        assert_eq!(restored(&[b"a ", name("ContentType").as_bytes()]), b"a ContentType");
    }

    #[test]
    fn a_partial_marker_is_held_only_at_the_end() {
        let marker = MARKER.text.as_bytes();
        assert_eq!(partial_marker_len(b"abc"), 0);
        assert_eq!(partial_marker_len(b"abc x"), 1);
        assert_eq!(partial_marker_len(&marker[..marker.len() - 1]), marker.len() - 1);
        assert_eq!(partial_marker_len(b"x-verbatim-q"), 0);
        assert_eq!(partial_marker_len(b""), 0);
    }

    #[tokio::test]
    async fn the_io_writes_restored_names_whatever_the_inner_io_takes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let head = format!("HTTP/1.1 200 OK\r\n{}: red\r\ncontent-length: 0\r\n\r\n", name("iothub-app-Color"));
        // A small duplex buffer takes a few bytes at a time, as a busy socket would.
        let (near, mut far) = tokio::io::duplex(7);
        let mut io = CaseRestoring::new(near);
        let writer = async move {
            io.write_all(head.as_bytes()).await.unwrap();
            io.write_all(b"tail").await.unwrap();
            io.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let (_, read) = tokio::join!(writer, far.read_to_end(&mut got));
        read.unwrap();
        assert_eq!(got, b"HTTP/1.1 200 OK\r\niothub-app-Color: red\r\ncontent-length: 0\r\n\r\ntail");
    }
}
