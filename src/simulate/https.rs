//! `--transport https`: one simulated device over the HTTPS device API (device-protocol §3).
//!
//! Telemetry is `POST /devices/{id}/messages/events` (the device's SAS token in
//! `Authorization`, properties as `iothub-*` headers), acknowledged by a 204; its latency is
//! request sent → response read, into the same ack histogram as PUBACKs. With `c2d` subscribed
//! the device polls `GET /devices/{id}/messages/deviceBound` at most once a second and
//! completes what it gets (`DELETE …/deviceBound/{lockToken}`, the lock being the `ETag`);
//! from its first answer it is ready for the service's C2D messages (`--c2d-rate`).
//!
//! Devices share one `reqwest::Client` (an HTTP/1.1 keep-alive pool to the `--https` address,
//! the hub's host name resolved to it): a device task is only its schedule and the requests it
//! has in flight (boxed, in a `FuturesUnordered`). Pacing is the MQTT path's: open-loop at
//! `--rate` from a random start with at most [`RATE_WINDOW`] requests unanswered, skipping
//! what is more than a second late; or closed-loop with `--in-flight`. A device counts as
//! connected from its first answer; the connect rate spreads the devices' first requests.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, ETAG, HeaderName, HeaderValue};
use tokio::time::{Instant, sleep_until};

use super::device::{RATE_WINDOW, while_running};
use super::fleet::{Fleet, Phase};
use super::provision::device_key;
use super::stats::{ErrorKind, Stats};
use crate::auth::sas;
use crate::mqtt::bag::PropertyBag;

/// The api-version of the device's requests.
const API_VERSION: &str = "2020-09-30";
/// One request (connect included) must be answered within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A device polls for C2D messages at most this often.
const POLL_EVERY: Duration = Duration::from_secs(1);

/// What the HTTPS devices share: the client, the hub's base URL, the property headers.
pub struct HttpsDevices {
    pub client: reqwest::Client,
    /// `https://{host}:{port}`.
    pub base: String,
    /// `iothub-*` headers of every telemetry message, from `--properties`.
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl HttpsDevices {
    /// One client for the fleet, trusting `ca`, with `host` resolved to `https`.
    pub fn new(ca: &std::path::Path, host: &str, https: SocketAddr, property_bag: &str) -> anyhow::Result<Self> {
        let client = crate::client::builder_trusting(ca)?
            .resolve(host, https)
            .timeout(REQUEST_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .context("the HTTPS device client")?;
        Ok(Self { client, base: format!("https://{host}:{}", https.port()), headers: headers_of(property_bag)? })
    }
}

/// The property bag of `--properties` as HTTPS headers: system properties by their `iothub-*`
/// names, application properties as `iothub-app-{name}`. The message id is set per message.
fn headers_of(bag: &str) -> anyhow::Result<Vec<(HeaderName, HeaderValue)>> {
    let bag = PropertyBag::parse(bag).map_err(|e| anyhow::anyhow!("--properties: {e:?}"))?;
    let s = &bag.system;
    let mut pairs: Vec<(String, String)> = [
        ("iothub-correlationid", &s.correlation_id),
        ("iothub-userid", &s.user_id),
        ("iothub-contenttype", &s.content_type),
        ("iothub-contentencoding", &s.content_encoding),
    ]
    .into_iter()
    .filter_map(|(name, v)| v.as_deref().map(|v| (name.to_owned(), v.to_owned())))
    .collect();
    for (k, v) in &bag.application {
        pairs.push((format!("iothub-app-{k}"), v.as_deref().unwrap_or("").to_owned()));
    }
    pairs
        .into_iter()
        .map(|(k, v)| {
            let name =
                HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("--properties: '{k}' is no header"))?;
            let value = HeaderValue::from_str(&v).with_context(|| format!("--properties: '{v}' is no header value"))?;
            Ok((name, value))
        })
        .collect()
}

type Failure = (ErrorKind, String);

/// An answer to one of the device's requests.
enum Answer {
    /// Telemetry: its latency, or why it failed.
    Telemetry(Result<Duration, Failure>),
    /// A C2D poll: the body of the message received and completed, if one was.
    Poll(Result<Option<Vec<u8>>, Failure>),
}

type Request<'a> = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;

/// Runs device `index` over HTTPS until the run stops.
pub async fn run(fleet: Arc<Fleet>, index: u32) {
    if fleet.https.is_none() || fleet.hub.is_none() {
        return;
    }
    if while_running(&fleet, index, sleep_until(fleet.pacer.slot())).await.is_none() {
        return;
    }
    Stats::add(&fleet.stats.counters.connect_attempts, 1);
    let mut device = Device { fleet: &fleet, index, online: false, telemetry_pending: 0 };
    device.run().await;
}

struct Device<'a> {
    fleet: &'a Fleet,
    index: u32,
    /// Counted as connected (from the first answer).
    online: bool,
    /// Telemetry requests sent and not answered.
    telemetry_pending: usize,
}

impl Drop for Device<'_> {
    fn drop(&mut self) {
        self.fleet.stats.answered(self.telemetry_pending);
        if self.online {
            self.fleet.stats.went_offline();
            self.fleet.ready.set(self.index, false);
        }
    }
}

/// A random time within one `period` from now: devices do not send in lock-step.
fn random_start(period: Duration) -> Instant {
    Instant::now() + period.mul_f64(rand::random::<f64>())
}

impl<'a> Device<'a> {
    async fn run(&mut self) {
        let fleet = self.fleet;
        let window = fleet.in_flight.unwrap_or(RATE_WINDOW);
        let interval = fleet.send_every.unwrap_or_default();
        let mut next_send =
            if fleet.in_flight.is_some() { Some(Instant::now()) } else { fleet.send_every.map(random_start) };
        let mut next_poll = fleet.c2d.then(|| random_start(POLL_EVERY));
        let mut polling = false;
        let mut seq = 0u64;
        let mut pending: FuturesUnordered<Request<'a>> = FuturesUnordered::new();
        if next_send.is_none() && next_poll.is_none() {
            // Nothing to send: idle, and online as far as the hub is concerned.
            self.came_online();
        }
        loop {
            let phase_change = fleet.phase.changed(self.index);
            // Draining: no new telemetry, answers still awaited; closing: what is left is dropped.
            let phase = fleet.phase.get();
            if phase == Phase::Closing {
                return;
            }
            let now = Instant::now();
            let mut wake_at = now + Duration::from_secs(3600);
            if phase == Phase::Running
                && let Some(mut due) = next_send
            {
                while due <= now && self.telemetry_pending < window {
                    seq += 1;
                    pending.push(self.telemetry(seq));
                    if fleet.in_flight.is_none() {
                        due += interval;
                    }
                }
                due = fleet.skip_missed(due, now);
                next_send = Some(due);
                match (fleet.in_flight, self.telemetry_pending >= window) {
                    (_, false) => wake_at = wake_at.min(due),
                    (None, true) => wake_at = wake_at.min(due + Duration::from_secs(1)),
                    (Some(_), true) => {}
                }
            }
            // Polling is how the device receives: it goes on while the run drains, so the
            // service's accepted messages still arrive.
            if let Some(due) = next_poll.filter(|_| !polling) {
                if due <= now {
                    pending.push(self.poll());
                    polling = true;
                    next_poll = Some(now + POLL_EVERY);
                } else {
                    wake_at = wake_at.min(due);
                }
            }
            tokio::select! {
                Some(answer) = pending.next(), if !pending.is_empty() => match answer {
                    Answer::Telemetry(result) => {
                        self.telemetry_pending -= 1;
                        fleet.stats.answered(1);
                        match result {
                            Ok(latency) => {
                                self.came_online();
                                fleet.stats.telemetry_acked(latency);
                            }
                            Err((kind, detail)) => fleet.stats.error(kind, || detail),
                        }
                    }
                    Answer::Poll(result) => {
                        polling = false;
                        match result {
                            Ok(received) => {
                                self.came_online();
                                if let Some(body) = received {
                                    fleet.c2d_received(&body);
                                }
                            }
                            Err((kind, detail)) => fleet.stats.error(kind, || detail),
                        }
                    }
                },
                _ = sleep_until(wake_at) => {}
                _ = phase_change => {}
            }
        }
    }

    /// Counted as connected, and ready for the service's C2D messages.
    fn came_online(&mut self) {
        if !self.online {
            self.online = true;
            self.fleet.stats.went_online();
            self.fleet.ready.set(self.index, true);
        }
    }

    fn telemetry(&mut self, seq: u64) -> Request<'a> {
        let (fleet, index) = (self.fleet, self.index);
        self.telemetry_pending += 1;
        fleet.stats.awaiting_answers(1);
        Stats::add(&fleet.stats.counters.telemetry_sent, 1);
        Box::pin(async move {
            let id = fleet.device_id(index);
            let body = fleet.payload.render(&id, seq, super::unix_millis());
            let request = match request(fleet, index, reqwest::Method::POST, "messages/events") {
                Ok(r) => r.header("iothub-messageid", format!("{id}-{seq}")).body(body),
                Err(failure) => return Answer::Telemetry(Err(failure)),
            };
            let request = https_of(fleet).headers.iter().fold(request, |r, (k, v)| r.header(k.clone(), v.clone()));
            let sent = Instant::now();
            let result = match request.send().await {
                Ok(r) if r.status() == StatusCode::NO_CONTENT => Ok(sent.elapsed()),
                Ok(r) => Err(unexpected("POST messages/events", r).await),
                Err(e) => Err(failure(e)),
            };
            Answer::Telemetry(result)
        })
    }

    fn poll(&self) -> Request<'a> {
        let (fleet, index) = (self.fleet, self.index);
        Box::pin(async move { Answer::Poll(receive_c2d(fleet, index).await) })
    }
}

/// One C2D poll: `GET …/deviceBound`; a message (200) is completed by `DELETE …/{lockToken}`.
async fn receive_c2d(fleet: &Fleet, index: u32) -> Result<Option<Vec<u8>>, Failure> {
    let response =
        request(fleet, index, reqwest::Method::GET, "messages/deviceBound")?.send().await.map_err(failure)?;
    match response.status() {
        StatusCode::NO_CONTENT => return Ok(None),
        StatusCode::OK => {}
        _ => return Err(unexpected("GET messages/deviceBound", response).await),
    }
    let lock = response
        .headers()
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches('"').to_owned())
        .ok_or_else(|| (ErrorKind::Protocol, "a C2D message without an ETag".to_owned()))?;
    // Read the body (which also returns the connection to the pool).
    let body = response.bytes().await.map_err(failure)?;
    let path = format!("messages/deviceBound/{lock}");
    let done = request(fleet, index, reqwest::Method::DELETE, &path)?.send().await.map_err(failure)?;
    if done.status() != StatusCode::NO_CONTENT {
        return Err(unexpected("DELETE messages/deviceBound/{lock}", done).await);
    }
    Ok(Some(body.to_vec()))
}

fn https_of(fleet: &Fleet) -> &HttpsDevices {
    fleet.https.as_ref().expect("checked at the start of the device task")
}

/// A request to device `index`'s API path, with its SAS token (signed per request: a device
/// keeps no token).
fn request(fleet: &Fleet, index: u32, method: reqwest::Method, path: &str) -> Result<reqwest::RequestBuilder, Failure> {
    let hub = fleet.hub.as_ref().expect("checked at the start of the device task");
    let https = https_of(fleet);
    let id = fleet.device_id(index);
    let token = sas::sign(&format!("{}/devices/{id}", hub.host), &device_key(&hub.seed, &id), hub.token_expiry, None)
        .map_err(|e| (ErrorKind::Protocol, e.to_string()))?;
    let url = format!("{}/devices/{id}/{path}?api-version={API_VERSION}", https.base);
    Ok(https.client.request(method, url).header(AUTHORIZATION, token))
}

/// A request that failed before an answer: connecting, TLS, a timeout, the connection lost.
pub(super) fn failure(e: reqwest::Error) -> Failure {
    let kind = if e.is_timeout() {
        ErrorKind::ConnectTimeout
    } else if e.is_connect() {
        ErrorKind::TcpConnect
    } else {
        ErrorKind::Io
    };
    (kind, format!("{e:#}"))
}

/// An answer with a status other than expected, with the hub's error text.
pub(super) async fn unexpected(what: &str, response: reqwest::Response) -> Failure {
    let status = response.status();
    let code = response.headers().get("iothub-errorcode").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = response.text().await.unwrap_or_default();
    let body: String = body.chars().take(200).collect();
    (ErrorKind::HttpStatus, format!("{what} answered {status} {code} {body}"))
}
