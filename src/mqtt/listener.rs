//! The MQTT listeners — TLS on 8883, plain for development when configured, and the
//! loopback listener the WebSocket bridge relays to (`http::websocket`) — and the worker
//! threads their connections run on.
//!
//! One worker per core, each a tokio current-thread runtime with a local task set (telemetry
//! batches per thread: `actors::ingest`). A listener accepts on one worker and hands each
//! connection to the workers in turn; from then on the connection is one task on that worker
//! ([`super::connect::serve`], then [`super::session`]). Every transport ends in the same
//! session code.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsAcceptor;

use super::connect::{self, CONNECT_TIMEOUT, MqttContext};
use super::transport::Transport;

/// Accepted connections waiting to be taken up by a worker; a full queue slows accepting.
const HANDOFF_QUEUE: usize = 1024;

/// An accepted connection on its way to a worker, and whether it speaks TLS.
type Handoff = (std::net::TcpStream, bool);

/// The running listeners and their worker threads.
pub struct MqttListeners {
    workers: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl MqttListeners {
    /// Stops accepting and closes every connection; unacknowledged PUBLISHes are not lost
    /// (the device sends them again), sessions detach from their actors.
    pub fn stop(self) {
        let threads: Vec<JoinHandle<()>> = self
            .workers
            .into_iter()
            .map(|(stop, thread)| {
                let _ = stop.send(());
                thread
            })
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// What one worker thread runs: the listeners it accepts on, the queue of connections handed
/// to it, and everyone's queues to hand connections on.
struct Worker {
    index: usize,
    listeners: Vec<(TcpListener, bool)>,
    handoff: mpsc::Receiver<Handoff>,
    peers: Arc<[mpsc::Sender<Handoff>]>,
    next: Arc<AtomicUsize>,
    ctx: Arc<MqttContext>,
    tls: TlsAcceptor,
}

/// Starts `workers` threads serving the listeners; returns once they accept. `bridge` is the
/// loopback listener WebSocket sessions are relayed to (plain MQTT, never exposed).
pub fn start(
    ctx: Arc<MqttContext>,
    tls: (TcpListener, Arc<rustls::ServerConfig>),
    plain: Option<TcpListener>,
    bridge: TcpListener,
    workers: usize,
) -> anyhow::Result<MqttListeners> {
    let workers = workers.max(1);
    let (tls_listener, config) = tls;
    let mut listeners: Vec<(TcpListener, bool)> = vec![(tls_listener, true), (bridge, false)];
    listeners.extend(plain.map(|l| (l, false)));
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..workers).map(|_| mpsc::channel(HANDOFF_QUEUE)).unzip();
    let peers: Arc<[mpsc::Sender<Handoff>]> = senders.into();
    let next = Arc::new(AtomicUsize::new(0));
    let tls = TlsAcceptor::from(config);
    let mut assigned: Vec<Vec<(TcpListener, bool)>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, listener) in listeners.into_iter().enumerate() {
        listener.0.set_nonblocking(true).context("cannot make an MQTT listener non-blocking")?;
        assigned[i % workers].push(listener);
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let mut running = Vec::with_capacity(workers);
    for (index, (handoff, listeners)) in receivers.into_iter().zip(assigned).enumerate() {
        let worker = Worker {
            index,
            listeners,
            handoff,
            peers: peers.clone(),
            next: next.clone(),
            ctx: ctx.clone(),
            tls: tls.clone(),
        };
        let (stop_tx, stop_rx) = oneshot::channel();
        let ready = ready_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("iothubd-mqtt-{index}"))
            .spawn(move || worker.run(stop_rx, ready))
            .context("cannot start an MQTT worker thread")?;
        running.push((stop_tx, thread));
    }
    drop(ready_tx);
    let listeners = MqttListeners { workers: running };
    for _ in 0..workers {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                listeners.stop();
                return Err(e);
            }
            Err(_) => {
                listeners.stop();
                return Err(anyhow!("an MQTT worker stopped while starting"));
            }
        }
    }
    Ok(listeners)
}

impl Worker {
    fn run(self, stop: oneshot::Receiver<()>, ready: std::sync::mpsc::Sender<anyhow::Result<()>>) {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(anyhow!("cannot start an MQTT worker runtime: {e}")));
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let Worker { index, listeners, mut handoff, peers, next, ctx, tls } = self;
            for (listener, secure) in listeners {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(anyhow!("cannot serve an MQTT listener: {e}")));
                        return;
                    }
                };
                let acceptor =
                    Acceptor { index, peers: peers.clone(), next: next.clone(), ctx: ctx.clone(), tls: tls.clone() };
                tokio::task::spawn_local(acceptor.run(listener, secure));
            }
            let _ = ready.send(Ok(()));
            let handoffs = async {
                while let Some((stream, secure)) = handoff.recv().await {
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => {
                            tokio::task::spawn_local(connection(ctx.clone(), stream, secure.then(|| tls.clone())));
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot take up an MQTT connection"),
                    }
                }
            };
            tokio::select! {
                _ = stop => {}
                () = handoffs => {}
            }
        });
        // Dropping the local set drops every connection: sessions detach from their actors.
        drop(local);
    }
}

/// Accepts on one listener and deals the connections out to the workers in turn.
struct Acceptor {
    index: usize,
    peers: Arc<[mpsc::Sender<Handoff>]>,
    next: Arc<AtomicUsize>,
    ctx: Arc<MqttContext>,
    tls: TlsAcceptor,
}

impl Acceptor {
    async fn run(self, listener: tokio::net::TcpListener, secure: bool) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors (or similar): let connections end before
                    // trying again instead of spinning on the error.
                    tracing::warn!(error = %e, "MQTT accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let target = self.next.fetch_add(1, Ordering::Relaxed) % self.peers.len();
            if target == self.index {
                let tls = secure.then(|| self.tls.clone());
                tokio::task::spawn_local(connection(self.ctx.clone(), stream, tls));
                continue;
            }
            match stream.into_std() {
                Ok(stream) => {
                    if self.peers[target].send((stream, secure)).await.is_err() {
                        return; // the worker stopped: so does the process
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot hand over an MQTT connection"),
            }
        }
    }
}

/// One connection: TLS when the listener is the TLS one, then CONNECT and the session.
async fn connection(ctx: Arc<MqttContext>, stream: tokio::net::TcpStream, tls: Option<TlsAcceptor>) {
    // PUBACKs and responses are small and must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let io = match tls {
        None => Transport::Plain(stream),
        // Boxed: the handshake's state is freed once it is done.
        Some(acceptor) => match tokio::time::timeout(CONNECT_TIMEOUT, Box::pin(acceptor.accept(stream))).await {
            Ok(Ok(stream)) => Transport::Tls(Box::new(stream)),
            Ok(Err(e)) => return tracing::debug!(error = %e, "MQTT TLS handshake failed"),
            Err(_) => return tracing::debug!("MQTT TLS handshake timed out"),
        },
    };
    connect::serve(ctx, io).await;
}
