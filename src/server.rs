//! Boots the hub: the actix System (one Arbiter per core, actors, actix-web) on one thread and
//! the MQTT workers, one thread per core (`mqtt::listener`; see ARCHITECTURE.md for why not the
//! ntex System of DESIGN.md §1, §10).
//!
//! [`start`] returns once every listener is bound; [`Server::shutdown`] stops accepting,
//! finishes in-flight requests, stops the actors and closes (flushes) the store.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use actix_web::middleware::{NormalizePath, from_fn};
use actix_web::{App, HttpServer, web};
use anyhow::{Context, anyhow};
use iothubd_actors::deployment::Deployment;
use iothubd_actors::directory::Limits;
use iothubd_actors::ingest::Ingest;
use tokio::sync::oneshot;

use crate::config::Config;
use crate::http::{self, AppState, observe};
use crate::mqtt::connect::MqttContext;
use crate::{hubs, mqtt, store, tls};

/// What a started hub tells its operator.
#[derive(Debug, Clone)]
pub struct StartupInfo {
    pub https: SocketAddr,
    pub http_plain: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub mqtt_plain: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// The dev CA clients must trust, when iothubd issued the certificate.
    pub ca_file: Option<PathBuf>,
    /// Set when `https` could not be bound and the fallback port was used.
    pub https_fallback_reason: Option<String>,
    /// The default hub's iothubowner connection string.
    pub owner_connection_string: Option<String>,
    pub operator_key: String,
    pub store_backend: &'static str,
}

/// A running hub.
pub struct Server {
    pub info: StartupInfo,
    deployment: Deployment,
    stop: Option<oneshot::Sender<()>>,
    actix: Option<JoinHandle<anyhow::Result<()>>>,
    /// Held for the life of the hub: one process per data directory.
    _data_dir_lock: std::fs::File,
}

impl Server {
    /// The hubs of this process (tests reach the store and the live actors through it).
    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    /// Graceful stop: stop accepting, finish in-flight requests, flush the store.
    pub fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop_all()
    }

    fn stop_all(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.actix.take() {
            Some(thread) => thread.join().map_err(|_| anyhow!("the actix thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop_all();
    }
}

/// Starts the hub and returns once it is ready (every listener bound, default hub in place).
pub fn start(cfg: Config) -> anyhow::Result<Server> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data_dir {}", cfg.data_dir.display()))?;
    // Two processes on one data directory would each believe they own the embedded store's
    // sequence counters and the dev CA: refuse the second one.
    let lock_path = cfg.data_dir.join("iothubd.lock");
    let data_dir_lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    data_dir_lock.try_lock().map_err(|_| {
        anyhow!("another iothubd is using data_dir {} (it holds {})", cfg.data_dir.display(), lock_path.display())
    })?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let actix = std::thread::Builder::new().name("iothubd-actix".into()).spawn(move || {
        let system = actix_rt::System::new();
        let result = system.block_on(run(cfg, ready_tx.clone(), stop_rx));
        if let Err(e) = &result {
            // If start failed, the waiting caller gets the error; nobody else will.
            let _ = ready_tx.send(Err(anyhow!("{e:#}")));
        }
        result
    })?;
    match ready_rx.recv() {
        Ok(Ok((info, deployment))) => {
            Ok(Server { info, deployment, stop: Some(stop_tx), actix: Some(actix), _data_dir_lock: data_dir_lock })
        }
        Ok(Err(e)) => {
            let _ = actix.join();
            Err(e)
        }
        Err(_) => Err(anyhow!("the hub stopped while starting")),
    }
}

/// Connections the kernel queues for a listener before it accepts them. The standard library's
/// 128 overflows when thousands of devices reconnect at once (a hub restart, a load test's
/// connect storm), and an overflowed SYN is only retried a second later.
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, so a restarted
/// hub binds again while old connections linger in TIME_WAIT).
fn bind(addr: impl Into<SocketAddr>) -> std::io::Result<TcpListener> {
    let addr = addr.into();
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Binds `port`, or — when that is not permitted (a privileged port, unprivileged user) —
/// `fallback`, returning why it fell back.
fn bind_with_fallback(
    addr: std::net::IpAddr,
    port: u16,
    fallback: u16,
) -> anyhow::Result<(TcpListener, Option<String>)> {
    match bind((addr, port)) {
        Ok(l) => Ok((l, None)),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && fallback != 0 => {
            let why = format!(
                "HTTPS port {port} needs privileges ({e}); serving HTTPS on {fallback} instead. SDKs dial 443: run \
                 with --https-port, or `sudo setcap cap_net_bind_service=+ep $(which iothubd)`"
            );
            let l = bind((addr, fallback)).with_context(|| format!("cannot bind HTTPS port {fallback}"))?;
            Ok((l, Some(why)))
        }
        Err(e) => Err(e).with_context(|| format!("cannot bind HTTPS port {port}")),
    }
}

fn bind_optional(addr: std::net::IpAddr, port: u16, what: &str) -> anyhow::Result<Option<TcpListener>> {
    if port == 0 {
        return Ok(None);
    }
    bind((addr, port)).map(Some).with_context(|| format!("cannot bind {what} port {port}"))
}

async fn run(
    cfg: Config,
    ready: std::sync::mpsc::Sender<anyhow::Result<(StartupInfo, Deployment)>>,
    stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let store = store::open(&cfg).await.context("cannot open the store")?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let arbiters: Vec<actix::Arbiter> = (0..cores).map(|_| actix::Arbiter::new()).collect();
    let limits = Limits { c2d_queue_depth: cfg.limits.c2d_queue_depth };
    let deployment =
        Deployment::start_with_limits(store.clone(), arbiters.iter().map(|a| a.handle()).collect(), limits)
            .await
            .context("cannot load hubs from the store")?;
    let owner_connection_string = hubs::ensure_default_hub(&deployment, &cfg.hub).await?;
    let operator_key = hubs::operator_key(&cfg)?;

    let directory_view = deployment.clone();
    let is_hub_host: Arc<dyn Fn(&str) -> bool + Send + Sync> =
        Arc::new(move |host| directory_view.directory().is_hub_host(host));
    let tls = tls::setup(&cfg.tls, &cfg.data_dir, is_hub_host)?;

    // MQTT on the ntex System (DESIGN.md §1): TLS always, plain only when configured.
    let mqtts = bind((cfg.listen.address, cfg.ports.mqtts))
        .with_context(|| format!("cannot bind MQTTS port {}", cfg.ports.mqtts))?;
    let mqtts_addr = mqtts.local_addr()?;
    let mqtt_plain = bind_optional(cfg.listen.address, cfg.ports.mqtt_plain, "plain MQTT")?;
    let mqtt_plain_addr = mqtt_plain.as_ref().map(TcpListener::local_addr).transpose()?;
    let mqtt_ctx = Arc::new(MqttContext::new(deployment.clone(), Ingest::new(store.clone())));
    // WebSocket sessions on the HTTPS port are bridged to this loopback-only listener.
    let bridge = bind((std::net::Ipv4Addr::LOCALHOST, 0)).context("cannot bind the MQTT bridge")?;
    let bridge_addr = bridge.local_addr()?;
    let mqtt = mqtt::listener::start(mqtt_ctx, (mqtts, tls.server_config.clone()), mqtt_plain, bridge, cores)?;

    let ready_flag = Arc::new(AtomicBool::new(false));
    let state = web::Data::new(AppState {
        deployment: deployment.clone(),
        operator_key: operator_key.clone(),
        ready: ready_flag.clone(),
        metrics: observe::prometheus(),
        mqtt_bridge: bridge_addr,
    });
    let app_state = state.clone();
    let app = move || {
        App::new()
            .app_data(app_state.clone())
            .wrap(from_fn(observe::track))
            .wrap(NormalizePath::trim())
            .configure(http::configure)
            .default_service(web::to(http::not_found))
    };

    let (https, https_fallback_reason) =
        bind_with_fallback(cfg.listen.address, cfg.ports.https, cfg.ports.https_fallback)?;
    let https_addr = https.local_addr()?;
    let plain = bind_optional(cfg.listen.address, cfg.ports.http_plain, "plain HTTP")?;
    let plain_addr = plain.as_ref().map(TcpListener::local_addr).transpose()?;
    let server = http::listener::serve(app, https, (*tls.server_config).clone(), plain, cores)?;
    let handle = server.handle();
    actix_rt::spawn(server);

    let metrics_listener = bind_optional(cfg.listen.address, cfg.ports.metrics, "metrics")?;
    let metrics_addr = metrics_listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let metrics_handle = match metrics_listener {
        Some(l) => {
            let state = state.clone();
            let srv = HttpServer::new(move || App::new().app_data(state.clone()).configure(observe::configure))
                .disable_signals()
                .workers(1)
                .listen(l)?
                .run();
            let h = srv.handle();
            actix_rt::spawn(srv);
            Some(h)
        }
        None => None,
    };

    ready_flag.store(true, Ordering::Release);
    let info = StartupInfo {
        https: https_addr,
        http_plain: plain_addr,
        mqtts: Some(mqtts_addr),
        mqtt_plain: mqtt_plain_addr,
        metrics: metrics_addr,
        ca_file: tls.ca_file.clone(),
        https_fallback_reason,
        owner_connection_string,
        operator_key,
        store_backend: store.backend(),
    };
    let _ = ready.send(Ok((info, deployment.clone())));

    // A dropped sender (the `Server` value gone) also means stop.
    let _ = stop.await;
    ready_flag.store(false, Ordering::Release);
    // Device sessions first (they stop acknowledging), then HTTPS finishes in-flight requests.
    mqtt.stop();
    handle.stop(true).await;
    if let Some(h) = metrics_handle {
        h.stop(true).await;
    }
    deployment.stop();
    store.close().await.context("cannot flush the store")?;
    for arbiter in arbiters {
        arbiter.stop();
        let _ = arbiter.join();
    }
    Ok(())
}
