//! The byte stream under an MQTT session: TLS on 8883, plain TCP on the development port and
//! on the loopback listener the WebSocket bridge relays to (`http::websocket`).
//!
//! Reads go through a buffer on the caller's stack ([`Transport::poll_read`] fills a slice), so
//! an idle connection holds no read buffer; only TLS keeps rustls' own state (boxed: plain
//! connections do not pay for it).

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Transport {
    /// Reads what is available into `buf`; ready with it (its `filled()` part empty at end of
    /// stream). `buf` need not be initialized: zeroing a read buffer on every read costs more
    /// than the read of a small packet.
    pub fn poll_read<'b>(
        &mut self,
        cx: &mut Context<'_>,
        buf: &'b mut [MaybeUninit<u8>],
    ) -> Poll<io::Result<ReadBuf<'b>>> {
        let mut buf = ReadBuf::uninit(buf);
        let polled = match self {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, &mut buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_read(cx, &mut buf),
        };
        polled.map_ok(|()| buf)
    }

    pub fn poll_write_vectored(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    /// TLS buffers records it could not write yet; this pushes them out. Plain TCP has nothing
    /// to flush.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Plain(_) => Poll::Ready(Ok(())),
            Transport::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    pub async fn shutdown(&mut self) {
        use tokio::io::AsyncWriteExt;
        let _ = match self {
            Transport::Plain(s) => s.shutdown().await,
            Transport::Tls(s) => s.shutdown().await,
        };
    }

    /// The client's certificate chain (leaf first), when it presented one over TLS.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        match self {
            Transport::Plain(_) => None,
            Transport::Tls(s) => s.get_ref().1.peer_certificates(),
        }
    }
}
