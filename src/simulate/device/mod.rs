//! One simulated device: a task that connects (paced by the fleet's connect rate), subscribes,
//! sends telemetry and reported-property PATCHes on schedule, answers direct methods, completes
//! C2D messages, pings, churns, reconnects after failures with backoff, and drains its in-flight
//! messages when the run stops. Its topics, in both modes, are in [`super::topics`]. Here:
//! connecting, with backoff; in [`session`]: one connection's life.
//!
//! The task's whole state is its future: the `Session` (socket, the few timers, the packet
//! ids and send times still waiting for an answer) plus the `select!` of one read, one timer
//! and the run's phase signal. Connecting (TCP, TLS, CONNECT/CONNACK) runs in a boxed future so its
//! transient size — a TLS handshake is large — is heap memory only while it runs. Device IDs,
//! topics and tokens are formatted when needed, not kept. A device therefore costs its socket
//! and well under 2 KiB while idle (measured in the report, `memory`).
//!
//! Timing: telemetry is open-loop at `--rate` per device from a random start (devices do not
//! send in lock-step), at QoS 1 with at most [`RATE_WINDOW`] PUBLISHes unacknowledged; a
//! device more than a second behind its schedule skips the missed messages and counts them
//! (`telemetry_skipped`). `--in-flight N` is closed-loop instead: N unacknowledged, the next
//! sent when a PUBACK arrives. Latency is PUBLISH written → PUBACK read. Reported PATCHes go
//! at `--twin-rate` (at most [`TWIN_WINDOW`] unanswered), or closed-loop with
//! `--twin-in-flight N` (the twin update storm).
//!
//! A device is *ready* for the service load ([`super::fleet::ReadySet`]) once its SUBACK
//! arrived (at its CONNACK when it subscribes to nothing), until its session ends.

mod session;

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use super::fleet::{Fleet, Phase};
use super::mqtt::{Connection, Incoming, OpenError, Outbox, Transport};
use super::provision::device_key;
use super::stats::{ErrorKind, Stats};
use super::topics;
use crate::auth::sas;
use session::{End, Session};

/// Most QoS 1 telemetry PUBLISHes a device keeps unacknowledged in rate mode.
pub const RATE_WINDOW: usize = 64;
/// Most reported PATCHes a device keeps unanswered.
const TWIN_WINDOW: usize = 16;
/// TCP connect + TLS + CONNECT → CONNACK must take less than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the last answers are awaited: when the run drains, and before a churn disconnect.
pub const DRAIN: Duration = Duration::from_secs(5);
/// Reconnect backoff after a failure: doubling from the first to the last, ± 50 % jitter.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The api-version sent in the CONNECT username (device-protocol §2.1).
const API_VERSION: &str = "2021-04-12";

/// Runs device `index` until the run stops.
pub async fn run(fleet: Arc<Fleet>, index: u32) {
    let mut seq = 0u64;
    let mut failures = 0u32;
    let mut connected_before = false;
    loop {
        let slot = fleet.pacer.slot();
        if while_running(&fleet, index, sleep_until(slot)).await.is_none() {
            return;
        }
        Stats::add(&fleet.stats.counters.connect_attempts, 1);
        let started = Instant::now();
        let Some(opened) = while_running(&fleet, index, Box::pin(open(&fleet, index))).await else {
            return;
        };
        match opened {
            Ok(conn) => {
                fleet.stats.connected(started.elapsed());
                if !connected_before {
                    connected_before = true;
                    fleet.stats.first_connected();
                }
                let end = Session::new(&fleet, index, conn).run(&mut seq).await;
                fleet.stats.went_offline();
                match end {
                    End::Stopped => return,
                    End::Churn => {
                        failures = 0;
                        continue;
                    }
                    End::Lost => failures += 1,
                }
            }
            Err((kind, detail)) => {
                fleet.stats.error(kind, || detail);
                failures += 1;
            }
        }
        let backoff = BACKOFF_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(5)).min(BACKOFF_MAX);
        let backoff = backoff.mul_f64(0.5 + rand::random::<f64>());
        if while_running(&fleet, index, tokio::time::sleep(backoff)).await.is_none() {
            return;
        }
    }
}

/// Runs `work` unless the run leaves [`Phase::Running`] first (then `None`).
pub(super) async fn while_running<T>(fleet: &Fleet, index: u32, work: impl Future<Output = T>) -> Option<T> {
    let stop = fleet.phase.changed(index);
    if fleet.phase.get() != Phase::Running {
        return None;
    }
    tokio::select! {
        r = work => Some(r),
        _ = stop => None,
    }
}

type Failure = (ErrorKind, String);

/// TCP (+ TLS), CONNECT, CONNACK, SUBSCRIBE — within [`CONNECT_TIMEOUT`].
async fn open(fleet: &Fleet, index: u32) -> Result<Connection, Failure> {
    match tokio::time::timeout(CONNECT_TIMEOUT, handshake(fleet, index)).await {
        Ok(r) => r,
        Err(_) => Err((ErrorKind::ConnectTimeout, format!("no CONNACK within {}s", CONNECT_TIMEOUT.as_secs()))),
    }
}

async fn handshake(fleet: &Fleet, index: u32) -> Result<Connection, Failure> {
    let source = match fleet.source_addrs.len() {
        0 => None,
        n => fleet.source_addrs.get(index as usize % n).copied(),
    };
    let transport = Transport::open(fleet.target, source, fleet.tls.as_ref()).await.map_err(|e| match e {
        OpenError::Tcp(e) => (ErrorKind::TcpConnect, format!("{}: {e}", fleet.target)),
        OpenError::Tls(e) => (ErrorKind::Tls, e.to_string()),
    })?;
    let mut conn = Connection::new(transport);
    let id = fleet.device_id(index);
    let mut out = Outbox::new();
    let (username, password) = match &fleet.hub {
        None => (None, None),
        Some(hub) => {
            let token =
                sas::sign(&format!("{}/devices/{id}", hub.host), &device_key(&hub.seed, &id), hub.token_expiry, None)
                    .map_err(|e| (ErrorKind::Protocol, e.to_string()))?;
            let username = format!("{}/{id}/?api-version={API_VERSION}&DeviceClientType=iothubd-simulate", hub.host);
            (Some(username), Some(token))
        }
    };
    let io = |e: std::io::Error| (ErrorKind::Io, e.to_string());
    out.connect(&id, username, password, fleet.keep_alive).map_err(io)?;
    conn.send(&mut out).await.map_err(io)?;
    fleet.stats.connect_sent();
    loop {
        match conn.next_packet().map_err(|e| (ErrorKind::Protocol, e.to_string()))? {
            Some(Incoming::ConnAck(0)) => break,
            Some(Incoming::ConnAck(code)) => {
                fleet.stats.connack_code(code);
                return Err((ErrorKind::ConnackRefused, format!("CONNACK return code {code}")));
            }
            Some(other) => return Err((ErrorKind::Protocol, format!("{other:?} before CONNACK"))),
            None => {}
        }
        match poll_fn(|cx| conn.poll_fill(cx)).await {
            Ok(0) => return Err((ErrorKind::ClosedByBroker, "closed before CONNACK".into())),
            Ok(_) => {}
            Err(e) => return Err(io(e)),
        }
    }
    let filters = topics::subscriptions(fleet, index);
    if !filters.is_empty() {
        out.subscribe(1, filters).map_err(io)?;
        conn.send(&mut out).await.map_err(io)?;
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use ntex_mqtt::v3::codec::QoS;

    use super::super::fleet::{Pacer, ReadySet, RunPhase};
    use super::super::payload::PayloadTemplate;
    use super::super::scenario::Mode;
    use super::*;

    #[test]
    fn a_device_task_future_fits_in_one_kib() {
        let fleet = Arc::new(Fleet {
            mode: Mode::Azure,
            target: SocketAddr::from(([127, 0, 0, 1], 1)),
            tls: None,
            source_addrs: Vec::new(),
            hub: None,
            https: None,
            prefix: "sim-".into(),
            qos: QoS::AtLeastOnce,
            send_every: Some(Duration::from_secs(1)),
            in_flight: None,
            twin_every: None,
            twin_in_flight: None,
            churn_every: None,
            keep_alive: 60,
            methods: true,
            c2d: true,
            payload: PayloadTemplate::sized(256),
            property_bag: String::new(),
            pacer: Pacer::new(1.0),
            stats: Stats::new(),
            phase: RunPhase::default(),
            ready: ReadySet::new(0, 1),
            run_id: 1,
        });
        let task = run(fleet, 0);
        let size = std::mem::size_of_val(&task);
        eprintln!("device task future: {size} bytes");
        assert!(size <= 1024, "the device future grew to {size} bytes");
    }
}
