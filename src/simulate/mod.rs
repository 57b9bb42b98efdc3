//! `iothubd simulate`: thousands of simulated devices against a hub — or, with `--raw`, the
//! same workload against any MQTT broker — with live progress and a JSON and HTML report.
//!
//! - [`scenario`]: the settings (flags and a TOML file, flags winning) and their defaults.
//! - [`provision`]: the hub's credentials, derived device keys, bulk import of the devices.
//! - [`device`]: one task per device — connect, subscribe, telemetry, twin, methods, C2D, churn.
//! - [`https`]: the same device over the HTTPS device API (`--transport https`): telemetry
//!   POSTs and C2D polling through one shared HTTP/1.1 client.
//! - [`service`]: the service side — direct-method calls and C2D sends to the devices, through
//!   the hub's REST API or, in raw mode, MQTT clients of the broker in the hub's part.
//! - [`topics`]: every topic of a device and of the raw service, in both modes.
//! - [`fleet`]: what the device tasks share: settings, connect pacing, stats, which devices are
//!   ready, the run's phase.
//! - [`mqtt`]: the minimal MQTT 3.1.1 client under it (ntex-mqtt's codec, plain or TLS).
//! - [`payload`]: telemetry bodies and the property bag.
//! - [`stats`]: counters, latency histograms, the connect storm; [`timeline`]: the per-second
//!   samples made from them.
//! - [`progress`]: the live lines in the terminal (indicatif).
//! - [`report`], [`html`]: `report.json` and a self-contained `report.html` with SVG plots.
//! - [`system`]: open-file limit, local addresses and ports, resident memory.
//!
//! Decisions, and why:
//! - **One small task per device, no MQTT client crate.** A device is a tokio task owning its
//!   socket; idle, it holds no read or write buffer (see [`mqtt`]) and its future stays well
//!   under 2 KiB (a unit test pins the size). The report measures RSS before the devices and
//!   once all are connected, so "bytes per idle device" is a number, not a hope.
//! - **Reuse the hub's protocol code**: SAS tokens from [`crate::auth::sas::sign`], the
//!   property bag from [`crate::mqtt::bag`], the wire format from `ntex_mqtt::v3::codec`.
//! - **Azure mode** behaves like an SDK device (device-protocol §2): client id = device id,
//!   username `{host}/{id}/?api-version=2021-04-12&DeviceClientType=iothubd-simulate`, SAS
//!   password for `{host}/devices/{id}`, clean session, telemetry on
//!   `devices/{id}/messages/events/{bag}`, twin PATCH with `$rid` and its 204 answer, method
//!   requests answered with 200 at QoS 0, C2D received at QoS 1 and completed by the PUBACK.
//!   **Raw mode** speaks plain MQTT: client id `{prefix}{i}`, telemetry on `sim/{i}/events`, no
//!   credentials — the same workload for any broker, methods, C2D and twin requests on
//!   `sim/{i}/…` topics with MQTT clients of the broker doing the hub's part ([`topics`]).
//! - **The service side is part of the tool** ([`service`]): a load tester's back end invokes
//!   methods and sends C2D messages to the fleet; against a hub that is its REST API, and the
//!   report measures it as the service and the devices see it.
//! - **Devices are provisioned by bulk import** with keys derived from `--seed`, so reruns skip
//!   provisioning. Without a connection string the hub is found through its operator API
//!   (`<data-dir>/operator.key`), so `iothubd simulate` works against a local hub as is.
//! - **Pacing**: connects (including reconnects) share one token bucket (`--connect-rate`);
//!   telemetry is open-loop per device from a random start, or closed-loop with `--in-flight`.
//!   Failures reconnect with jittered exponential backoff; `--churn` disconnects random devices
//!   (a Poisson process at the fleet rate).
//! - **Limits up front**: the open-file limit is raised to the hard limit and checked against
//!   the devices; a run that does not fit is refused with the number of `--shard i/N`
//!   processes it needs. Against a loopback target, more devices than one address' ephemeral
//!   ports get 127.0.0.x source addresses automatically.
//! - **Ending** in two steps ([`fleet::Phase`]): after `--duration` or at Ctrl-C devices and
//!   the service stop sending and the run waits up to [`device::DRAIN`] for every answer (and
//!   accepted C2D message) still due, connections open — so the last latencies are not
//!   measured behind the broker closing thousands of connections at once; then every device
//!   sends DISCONNECT. The report is written either way; the command fails when no device
//!   connected.

pub mod device;
pub mod fleet;
pub mod html;
pub mod https;
pub mod mqtt;
pub mod payload;
pub mod progress;
pub mod provision;
pub mod report;
pub mod scenario;
pub mod service;
pub mod stats;
pub mod system;
pub mod timeline;
pub mod topics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tokio::task::JoinSet;
use tokio::time::Instant;

pub use report::Report;
pub use scenario::{Scenario, ScenarioOptions, SimulateArgs};

use crate::auth::ServiceConnectionString;
use fleet::{Fleet, HubDevices, Pacer, Phase, ReadySet, RunPhase};
use mqtt::TlsTarget;
use progress::Progress;
use scenario::{DeviceTransport, Mode};
use service::{Backend, broker};
use stats::Stats;
use timeline::Sampler;

/// How long the run waits for device tasks to disconnect before it abandons them.
const FINISH_GRACE: Duration = Duration::from_secs(5);

pub(crate) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub(crate) fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The command: runs the scenario on a multi-threaded runtime, prints the summary, writes the
/// reports; an error when no device connected.
pub fn main(args: SimulateArgs) -> anyhow::Result<()> {
    let scenario = Scenario::from_args(&args)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(run(scenario.clone()))?;
    // Device tasks abandoned after the grace period must not hold the process.
    rt.shutdown_timeout(Duration::from_secs(1));
    println!("{}", report.summary());
    let (json, html) = report.write(&scenario.report_dir)?;
    println!("reports: {} and {}", json.display(), html.display());
    if report.counts.totals.connects == 0 {
        bail!("no device connected to {} (see the errors above)", report.target);
    }
    Ok(())
}

/// Runs a scenario to its end (duration or Ctrl-C) and returns its report.
pub async fn run(scenario: Scenario) -> anyhow::Result<Report> {
    let open_files = system::raise_open_file_limit()?;
    let range = scenario.shard.range(scenario.devices);
    let shard_devices = range.end - range.start;
    if shard_devices == 0 {
        bail!("shard {}/{} of {} devices is empty", scenario.shard.index, scenario.shard.count, scenario.devices);
    }
    system::check_fits(shard_devices, scenario.devices, open_files)?;
    let over_https = scenario.transport == DeviceTransport::Https;
    let progress = Progress::new(scenario.progress, u64::from(shard_devices));
    let HubSide { devices: hub, tls, https: https_addr, login } = match scenario.mode {
        Mode::Raw => HubSide::default(),
        Mode::Azure => prepare_hub(&scenario, range.clone(), &progress).await?,
    };
    let hub_host = hub.as_ref().map(|h| h.host.clone());
    // HTTPS devices share the client's pooled connections: no per-device source addresses.
    let (target, https, source_addrs) = match (over_https, https_addr, &hub) {
        (true, Some(addr), Some(h)) => {
            let devices = https::HttpsDevices::new(&scenario.ca, &h.host, addr, &scenario.property_bag)?;
            (addr, Some(devices), Vec::new())
        }
        (true, ..) => bail!("--transport https needs the hub's HTTPS endpoint (--https)"),
        (false, ..) => {
            let target = resolve(&scenario.mqtt).await?;
            let source_addrs = match &scenario.source_addrs {
                Some(addrs) => addrs.clone(),
                None => system::auto_source_addrs(target, shard_devices)?,
            };
            (target, None, source_addrs)
        }
    };
    let every = |rate: f64| (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let fleet = Arc::new(Fleet {
        mode: scenario.mode,
        target,
        tls,
        source_addrs: source_addrs.clone(),
        hub,
        https,
        prefix: scenario.device_prefix.clone(),
        qos: scenario.qos,
        send_every: every(scenario.rate),
        in_flight: scenario.in_flight.map(|n| n as usize),
        twin_every: every(scenario.twin_rate),
        twin_in_flight: scenario.twin_in_flight.map(|n| n as usize),
        churn_every: (scenario.churn > 0.0).then(|| f64::from(shard_devices) / scenario.churn),
        keep_alive: scenario.keep_alive,
        methods: scenario.methods,
        c2d: scenario.c2d,
        payload: scenario.payload.clone(),
        property_bag: scenario.property_bag.clone(),
        pacer: Pacer::new(scenario.connect_rate),
        stats: Stats::new(),
        phase: RunPhase::default(),
        ready: ReadySet::new(range.start, shard_devices),
        run_id: rand::random(),
    });
    let mut devices = JoinSet::new();
    start_service(&scenario, &fleet, https_addr, login.as_ref(), &mut devices).await?;

    let started_at = chrono::Utc::now();
    let rss_before = system::rss_kib();
    // The run's clock starts with its stats: the service connections count as part of the run.
    let started = Instant::from_std(fleet.stats.epoch());
    for index in range.clone() {
        if over_https {
            devices.spawn(https::run(fleet.clone(), index));
        } else {
            devices.spawn(device::run(fleet.clone(), index));
        }
    }

    let mut run = RunState::new(started, rss_before, shard_devices);
    let deadline = started + scenario.duration;
    let mut tick = tokio::time::interval_at(started + Duration::from_secs(1), Duration::from_secs(1));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut interrupted = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut ctrl_c => {
                interrupted = true;
                break;
            }
        }
        run.sample(&fleet.stats, &progress);
    }
    let stopped_at = Instant::now();
    progress.note(if interrupted { "interrupted: draining in-flight messages" } else { "time is up: draining" });
    wind_down(&fleet, &mut devices, &mut tick, &mut run, &progress).await;
    run.sample(&fleet.stats, &progress);
    progress.finish();
    Ok(Report::new(report::Inputs {
        scenario: &scenario,
        target,
        hub_host,
        first_device: range.start,
        shard_devices,
        open_files,
        source_addrs: &source_addrs,
        started_at,
        elapsed: started.elapsed(),
        sending: stopped_at.duration_since(started),
        interrupted,
        stats: &fleet.stats,
        memory: run.memory,
        all_online_at: run.all_online_at,
        timeline: run.timeline,
    }))
}

/// The hub side of an Azure run (all `None` in raw mode).
#[derive(Default)]
struct HubSide {
    /// What device credentials derive from.
    devices: Option<HubDevices>,
    /// TLS settings for the hub's MQTT endpoint.
    tls: Option<TlsTarget>,
    /// The hub's HTTPS endpoint, when one was needed.
    https: Option<SocketAddr>,
    /// The service's login (the connection string, or iothubowner through the operator API).
    login: Option<ServiceConnectionString>,
}

/// The hub side of an Azure run: its login, the devices provisioned (unless skipped), the TLS
/// settings for its MQTT endpoint, its HTTPS endpoint (when one was needed).
async fn prepare_hub(scenario: &Scenario, range: std::ops::Range<u32>, progress: &Progress) -> anyhow::Result<HubSide> {
    // HTTPS is needed to provision, to find the hub without a connection string, for HTTPS
    // devices and for the service load.
    let needs_https = scenario.transport == DeviceTransport::Https || scenario.service.is_on();
    let https = match (scenario.provision, &scenario.connection_string) {
        (false, Some(_)) if !needs_https => None,
        _ => Some(provision::https_endpoint(scenario).await?),
    };
    let over_https = scenario.transport == DeviceTransport::Https;
    let login = match (https, &scenario.connection_string) {
        (None, Some(cs)) => crate::auth::ServiceConnectionString::parse(cs).context("--connection-string")?,
        (Some(https), _) => provision::hub_login(scenario, https).await?,
        (None, None) => bail!("a hub run needs --connection-string or the hub's HTTPS endpoint"),
    };
    if let (true, Some(https)) = (scenario.provision, https) {
        let count = range.end - range.start;
        let bar = progress.provisioning(u64::from(count));
        provision::provision(scenario, &login, https, range, |n| bar.inc(n)).await?;
        bar.finish_and_clear();
        progress.note(&format!("provisioned {count} devices on {}", login.host_name));
    }
    let tls = if scenario.tls && !over_https { Some(TlsTarget::new(&scenario.ca, &login.host_name)?) } else { None };
    let token_expiry = unix_now() + scenario.duration.as_secs() + 3600;
    let devices = HubDevices { host: login.host_name.clone(), seed: scenario.seed.clone(), token_expiry };
    Ok(HubSide { devices: Some(devices), tls, https, login: Some(login) })
}

/// The service side, started before the devices: against a hub, a REST client; in raw mode,
/// the service client and the twin responder of the broker, connected and subscribed (so no
/// device's request goes unheard). Their tasks go into `tasks`, ended with the devices'.
async fn start_service(
    scenario: &Scenario,
    fleet: &Arc<Fleet>,
    https: Option<SocketAddr>,
    login: Option<&ServiceConnectionString>,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<()> {
    let shard = scenario.shard.index;
    let twin_load = fleet.twin_every.is_some() || fleet.twin_in_flight.is_some();
    if scenario.mode == Mode::Raw && twin_load {
        let responder = broker::TwinResponder::start(fleet.clone(), format!("{}twin-responder-{shard}", fleet.prefix));
        tasks.spawn(responder.await?.run());
    }
    if !scenario.service.is_on() {
        return Ok(());
    }
    let backend = match (scenario.mode, https, login) {
        (Mode::Raw, ..) => {
            let client_id = format!("{}service-{shard}", fleet.prefix);
            let (client, serving) = broker::ServiceClient::start(fleet.clone(), client_id).await?;
            tasks.spawn(serving);
            Backend::Broker(client)
        }
        (Mode::Azure, Some(https), Some(login)) => {
            let lifetime = scenario.duration + Duration::from_secs(3600);
            Backend::Rest(service::rest::Rest::new(&scenario.ca, https, login, lifetime)?)
        }
        (Mode::Azure, ..) => bail!("the service load needs the hub's HTTPS endpoint (--https)"),
    };
    tasks.spawn(service::run(fleet.clone(), scenario.service, backend));
    Ok(())
}

/// The end of a run (see [`Phase`]): drain — no new messages, wait up to [`device::DRAIN`] for
/// every answer still due, connections open — then close. A second Ctrl-C skips the wait, a
/// third abandons the devices; so do devices still running [`FINISH_GRACE`] after closing.
async fn wind_down(
    fleet: &Fleet,
    devices: &mut JoinSet<()>,
    tick: &mut tokio::time::Interval,
    run: &mut RunState,
    progress: &Progress,
) {
    fleet.phase.enter(Phase::Draining);
    let drained = tokio::time::sleep(device::DRAIN);
    // Checked only after a first pause: a device already past its phase check when the drain
    // began may still count one last message as awaited.
    let poll = Duration::from_millis(50);
    let again = tokio::signal::ctrl_c();
    tokio::pin!(drained, again);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(poll) => if fleet.stats.awaiting() == 0 { break },
            _ = tick.tick() => run.sample(&fleet.stats, progress),
            _ = &mut drained => break,
            _ = &mut again => break,
        }
    }
    fleet.phase.enter(Phase::Closing);
    let finish = tokio::time::sleep(FINISH_GRACE);
    let again = tokio::signal::ctrl_c();
    tokio::pin!(finish, again);
    loop {
        tokio::select! {
            next = devices.join_next() => if next.is_none() { break },
            _ = tick.tick() => run.sample(&fleet.stats, progress),
            _ = &mut finish => {
                devices.abort_all();
                break;
            }
            _ = &mut again => {
                devices.abort_all();
                break;
            }
        }
    }
}

/// `host:port` → the first address it resolves to.
async fn resolve(text: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(text)
        .await
        .with_context(|| format!("--mqtt {text}: cannot resolve (host:port expected)"))?
        .next()
        .with_context(|| format!("--mqtt {text} resolves to no address"))
}

/// What the controller learns while the run goes: the timeline and the memory sample.
struct RunState {
    sampler: Sampler,
    timeline: Vec<timeline::Sample>,
    memory: report::Memory,
    /// Seconds into the run when every device of the shard was first online.
    all_online_at: Option<f64>,
    /// The memory sample is final (taken a tick after every device came online).
    memory_settled: bool,
    shard_devices: u32,
}

impl RunState {
    fn new(started: Instant, rss_before_kib: u64, shard_devices: u32) -> Self {
        Self {
            sampler: Sampler::new(started.into_std()),
            timeline: Vec::new(),
            memory: report::Memory { rss_before_kib, ..Default::default() },
            all_online_at: None,
            memory_settled: false,
            shard_devices,
        }
    }

    /// One tick: a timeline point, the live lines, and the memory per connected device —
    /// at each new peak of connected devices, then once more a tick after all are online (the
    /// connect burst's transient allocations freed), where it stays.
    fn sample(&mut self, stats: &Stats, progress: &Progress) {
        let (sample, snapshot) = self.sampler.sample(stats);
        let online = snapshot.online;
        if !self.memory_settled {
            if self.all_online_at.is_some() {
                self.memory.rss_connected_kib = system::rss_kib();
                self.memory.devices_at_sample = online;
                self.memory_settled = true;
            } else if online > self.memory.devices_at_sample {
                self.memory.rss_connected_kib = system::rss_kib();
                self.memory.devices_at_sample = online;
            }
        }
        if online == u64::from(self.shard_devices) && self.all_online_at.is_none() {
            self.all_online_at = Some(sample.t_s);
        }
        progress.update(&sample, &snapshot);
        self.timeline.push(sample);
    }
}
