//! The HTTPS listener (and the plain HTTP one, when configured): actix-server accepting, the
//! rustls acceptor, then actix-http serving the `App` — what `HttpServer::listen_rustls_0_23`
//! builds, with one difference: each connection's I/O passes through
//! [`CaseRestoring`](super::header_case::CaseRestoring), so response header names keep the case
//! an SDK matches (device-protocol §3). `HttpServer` has no way to wrap a connection's I/O.
//!
//! Kept as `HttpServer` had them: the workers count, its HTTP settings (keep-alive 5 s, client
//! request timeout 5 s, disconnect timeout 1 s, half-closed connections allowed), the
//! graceful-shutdown signal that ends idle keep-alive connections, the TLS acceptor's
//! handshake timeout and limit, ALPN `http/1.1` only (actix-web's `http2` feature is off in
//! this build), and `stop(true)` letting in-flight requests finish. The app sees the default
//! `AppConfig` (`HttpServer` passed the listener's address and scheme; nothing here reads them).

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use actix_http::body::MessageBody;
use actix_http::error::DispatchError;
use actix_http::{HttpService, KeepAlive, Protocol, Request, Response};
use actix_server::GracefulShutdownSignal;
use actix_service::{IntoServiceFactory, ServiceFactoryExt, map_config};
use actix_tls::accept::TlsError;
use actix_tls::accept::rustls_0_23::{Acceptor, TlsStream};
use actix_web::dev::{AppConfig, Extensions, Server, Service, ServiceFactory, fn_service};
use actix_web::rt::net::TcpStream;
use tokio::io::{AsyncRead, AsyncWrite};

use super::header_case::{self, CaseRestoring};

/// `HttpServer`'s: how long a new connection has to send its first request head.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// `HttpServer`'s: how long a closing connection waits for the client to shut down.
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts serving `app` on `https` (TLS with `tls`) and, when given, on `plain` (HTTP/1.1
/// without TLS), with `workers` workers. The caller spawns the returned server and stops it
/// through its handle.
pub fn serve<F, I, S, B>(
    app: F,
    https: TcpListener,
    mut tls: rustls::ServerConfig,
    plain: Option<TcpListener>,
    workers: usize,
) -> io::Result<Server>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut builder = Server::build().disable_signals().workers(workers);
    let shutdown = builder.graceful_shutdown_signal();
    let https_addr = https.local_addr()?;
    let https_app = app.clone();
    let https_shutdown = shutdown.clone();
    builder = builder.listen(format!("iothubd-https-{https_addr}"), https, move || {
        let http = http_service::<TlsStream<TcpStream>, _, _, _, _>(https_app.clone(), https_shutdown.clone(), None);
        Acceptor::new(tls.clone())
            .map_err(TlsError::into_service_error)
            .and_then(|io: TlsStream<TcpStream>| async move {
                let peer = io.get_ref().0.peer_addr().ok();
                // Only `http/1.1` is offered, so every TLS connection speaks HTTP/1.x.
                Ok((CaseRestoring::new(io), Protocol::Http1, peer))
            })
            .and_then(http.map_err(TlsError::Service))
    })?;
    if let Some(plain) = plain {
        let addr = plain.local_addr()?;
        builder = builder.listen(format!("iothubd-http-{addr}"), plain, move || {
            let http = http_service::<TcpStream, _, _, _, _>(app.clone(), shutdown.clone(), Some(addr));
            fn_service(|io: TcpStream| async move {
                let peer = io.peer_addr().ok();
                Ok((CaseRestoring::new(io), Protocol::Http1, peer))
            })
            .and_then(http)
        })?;
    }
    Ok(builder.run())
}

/// actix-http serving `app` on connections of `T` passed through [`CaseRestoring`], each flagged
/// so that [`header_case::verbatim`] marks names on it.
fn http_service<T, F, I, S, B>(
    app: F,
    shutdown: GracefulShutdownSignal,
    local_addr: Option<SocketAddr>,
) -> impl ServiceFactory<
    (CaseRestoring<T>, Protocol, Option<SocketAddr>),
    Config = (),
    Response = (),
    Error = DispatchError,
    InitError = (),
>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
    F: Fn() -> I,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let mut http = HttpService::build()
        .keep_alive(KeepAlive::default())
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
        .h1_allow_half_closed(true)
        .graceful_shutdown_signal(move || {
            let shutdown = shutdown.clone();
            async move { shutdown.notified().await }
        })
        .on_connect_ext(|_: &CaseRestoring<T>, ext: &mut Extensions| header_case::flag_connection(ext));
    if let Some(addr) = local_addr {
        http = http.local_addr(addr);
    }
    let app = app().into_factory().map_err(|e| e.into().error_response());
    http.finish(map_config(app, |_| AppConfig::default()))
}
