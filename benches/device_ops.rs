//! Twins, direct methods and cloud-to-device at fleet scale — the twins/methods/C2D issue's
//! benchmark. One release hub (plain MQTT on loopback, embedded store, durability on), N
//! connected devices (default 10,000) speaking bare MQTT 3.1.1, and the service REST API over
//! HTTPS (64 requests in flight):
//!
//! - **twin storm**: every device keeps one reported-properties PATCH in flight for the window;
//!   reported updates acknowledged (`204`) per second.
//! - **desired broadcast**: one service `PATCH /twins/{id}` per device; notifications received
//!   by the devices per second, from the first PATCH to the last notification.
//! - **methods**: direct-method calls paced at 1,000/s over random devices, each answered by its
//!   device at once; round-trip p50 / p99 as the service sees it (HTTPS request to response).
//! - **C2D fan-out**: three messages per device sent through the REST send; deliveries
//!   (PUBLISH, PUBACKed) per second, from the first send to the last delivery. Then the same
//!   through the batch send (`POST /messages/deviceBound`, 250 messages a request, 8 in flight).
//!
//! Hub CPU µs per operation comes from `/proc`. Load generator and hub share the machine.
//!
//! Run: `cargo build --release --bin iothubd && cargo bench --bench device_ops`
//! (`IOTHUBD_BENCH_DEVICES`, `IOTHUBD_BENCH_SECONDS`, `IOTHUBD_BENCH_METHOD_RATE` to change the size;
//! `IOTHUBD_BENCH_ONLY=twin,desired,methods,c2d,c2d-batch` to run some workloads).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use futures::StreamExt;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, Subscribe, SubscribeFilter};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const HOST: &str = "bench.azure-devices.net";
/// Service requests in flight.
const CONCURRENCY: usize = 64;
/// Messages per batch send (`POST /messages/deviceBound`) in the batched fan-out, and batches
/// in flight.
const C2D_BATCH: usize = 250;
const C2D_BATCHES_IN_FLIGHT: usize = 8;

#[derive(Default)]
struct Counters {
    twin_acks: AtomicU64,
    desired: AtomicU64,
    c2d: AtomicU64,
    methods: AtomicU64,
    /// While set, a device sends its next reported PATCH as soon as the last one is acknowledged.
    storm: AtomicBool,
}

/// A device: answers methods, acknowledges C2D, counts desired notifications, and reports
/// properties when told to (and again after each acknowledgement while the storm lasts).
async fn run_device(conn: Conn, counters: Arc<Counters>, mut kick: mpsc::Receiver<()>) {
    let Conn { stream, mut read, .. } = conn;
    let (mut rd, mut wr) = stream.into_split();
    let mut out = BytesMut::new();
    let mut rid: u64 = 0;
    let report = |out: &mut BytesMut, rid: &mut u64| {
        *rid += 1;
        let topic = format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}");
        let body = format!(r#"{{"temperature":{},"status":"ok"}}"#, *rid % 100);
        Publish::new(topic, QoS::AtMostOnce, body).write(out).expect("encode");
    };
    loop {
        tokio::select! {
            k = kick.recv() => {
                if k.is_none() { return; }
                report(&mut out, &mut rid);
            }
            n = rd.read_buf(&mut read) => {
                if !matches!(n, Ok(n) if n > 0) { return; }
                loop {
                    let packet = match rumqttc::mqttbytes::v4::read(&mut read, 1 << 20) {
                        Ok(p) => p,
                        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                        Err(e) => panic!("bad packet: {e:?}"),
                    };
                    let Packet::Publish(p) = packet else { continue };
                    if p.topic.starts_with("$iothub/twin/res/204") {
                        counters.twin_acks.fetch_add(1, Ordering::Relaxed);
                        if counters.storm.load(Ordering::Relaxed) {
                            report(&mut out, &mut rid);
                        }
                    } else if p.topic.starts_with("$iothub/twin/PATCH/properties/desired") {
                        counters.desired.fetch_add(1, Ordering::Relaxed);
                    } else if let Some(rest) = p.topic.strip_prefix("$iothub/methods/POST/") {
                        let rid = rest.split_once("?$rid=").map(|(_, r)| r).unwrap_or("");
                        let topic = format!("$iothub/methods/res/200/?$rid={rid}");
                        Publish::new(topic, QoS::AtMostOnce, "{}").write(&mut out).expect("encode");
                        counters.methods.fetch_add(1, Ordering::Relaxed);
                    } else if p.topic.starts_with("devices/") {
                        if p.qos == QoS::AtLeastOnce {
                            PubAck::new(p.pkid).write(&mut out).expect("encode");
                        }
                        counters.c2d.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
    }
}

/// Connects device `i` and subscribes it to twin responses, desired patches, methods and C2D.
async fn connect_device(broker: &Broker, i: usize) -> Conn {
    let mut conn = connect(broker, i).await;
    let id = format!("bench-{i}");
    let mut subscribe = Subscribe::new_many([
        SubscribeFilter::new("$iothub/twin/res/#".into(), QoS::AtMostOnce),
        SubscribeFilter::new("$iothub/twin/PATCH/properties/desired/#".into(), QoS::AtMostOnce),
        SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtMostOnce),
        SubscribeFilter::new(format!("devices/{id}/messages/devicebound/#"), QoS::AtLeastOnce),
    ]);
    subscribe.pkid = 1;
    let mut out = BytesMut::new();
    subscribe.write(&mut out).expect("encode SUBSCRIBE");
    conn.stream.write_all(&out).await.expect("send SUBSCRIBE");
    match conn.next_packet().await {
        Packet::SubAck(_) => {}
        other => panic!("expected SUBACK, got {other:?}"),
    }
    conn
}

struct Service {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Service {
    fn new(dir: &std::path::Path, broker: &Broker) -> Self {
        let https = broker.https.expect("the hub's HTTPS address");
        let (_, owner_key) = broker.hub.as_ref().expect("hub");
        let client = iothubd::client::builder_trusting(&dir.join("tls").join("ca.pem"))
            .expect("dev CA")
            .resolve(HOST, https)
            .pool_max_idle_per_host(CONCURRENCY * 2)
            .build()
            .expect("client");
        let token = iothubd::auth::sas::sign(HOST, owner_key, unix_now() + 3600, Some("iothubowner")).expect("token");
        Self { client, base: format!("https://{HOST}:{}", https.port()), token }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.client
            .request(method, format!("{}{path}{sep}api-version=2021-04-12", self.base))
            .header("Authorization", &self.token)
    }
}

/// Waits until `counter` reaches `target` (or a minute passes); the time it took from `since`.
async fn until_count(counter: &AtomicU64, target: u64, since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(60);
    while counter.load(Ordering::Relaxed) < target && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    since.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let devices = env_or("IOTHUBD_BENCH_DEVICES", 10_000) as usize;
    let seconds = env_or("IOTHUBD_BENCH_SECONDS", 5);
    let method_rate = env_or("IOTHUBD_BENCH_METHOD_RATE", 1000);
    let only = std::env::var("IOTHUBD_BENCH_ONLY").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|w| w == name);
    let dir = tempfile::tempdir().expect("temp dir");
    let hub = start_hub(dir.path(), devices);
    let pid = hub.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let service = Arc::new(Service::new(dir.path(), &hub));
        let counters = Arc::new(Counters::default());
        let connecting = Instant::now();
        let mut kicks = Vec::with_capacity(devices);
        for i in 0..devices {
            let conn = connect_device(&hub, i).await;
            let (tx, rx) = mpsc::channel(4);
            kicks.push(tx);
            tokio::spawn(run_device(conn, counters.clone(), rx));
        }
        println!(
            "{devices} devices connected and subscribed in {:.1} s; {seconds} s windows",
            connecting.elapsed().as_secs_f64()
        );
        println!("{:<20} {:>14} {:>14} {:>24}", "workload", "ops/s", "hub µs/op", "latency p50 / p99");

        if run("twin") {
            counters.storm.store(true, Ordering::Relaxed);
            let (acks, cpu) = (counters.twin_acks.load(Ordering::Relaxed), cpu_micros(pid));
            let started = Instant::now();
            for k in &kicks {
                let _ = k.try_send(());
            }
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            let done = counters.twin_acks.load(Ordering::Relaxed) - acks;
            let (elapsed, cpu) = (started.elapsed().as_secs_f64(), cpu_micros(pid) - cpu);
            counters.storm.store(false, Ordering::Relaxed);
            println!(
                "{:<20} {:>14.0} {:>14.1} {:>24}",
                "twin storm",
                done as f64 / elapsed,
                cpu as f64 / done as f64,
                ""
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }

        if run("desired") {
            let (seen, cpu) = (counters.desired.load(Ordering::Relaxed), cpu_micros(pid));
            let started = Instant::now();
            let patches = futures::stream::iter(0..devices)
                .map(|i| {
                    let service = service.clone();
                    async move {
                        let r = service
                            .request(reqwest::Method::PATCH, &format!("/twins/bench-{i}"))
                            .json(&json!({ "properties": { "desired": { "setpoint": i % 50 } } }))
                            .send()
                            .await
                            .expect("twin PATCH");
                        assert!(r.status().is_success(), "twin PATCH: {}", r.status());
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect::<Vec<()>>();
            patches.await;
            let elapsed = until_count(&counters.desired, seen + devices as u64, started).await.as_secs_f64();
            let got = counters.desired.load(Ordering::Relaxed) - seen;
            let cpu = cpu_micros(pid) - cpu;
            println!(
                "{:<20} {:>14.0} {:>14.1} {:>24}",
                "desired broadcast",
                got as f64 / elapsed,
                cpu as f64 / got as f64,
                ""
            );
        }

        if run("methods") {
            let calls = (method_rate * seconds) as usize;
            let cpu = cpu_micros(pid);
            let started = Instant::now();
            let mut tasks = Vec::with_capacity(calls);
            for k in 0..calls {
                let at = started + Duration::from_secs_f64(k as f64 / method_rate as f64);
                tokio::time::sleep_until(at.into()).await;
                let service = service.clone();
                let device = (k * 7919) % devices;
                tasks.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let r = service
                        .request(reqwest::Method::POST, &format!("/twins/bench-{device}/methods"))
                        .json(&json!({ "methodName": "ping", "payload": {}, "responseTimeoutInSeconds": 5 }))
                        .send()
                        .await
                        .expect("method call");
                    assert!(r.status().is_success(), "method: {}", r.status());
                    sent.elapsed()
                }));
            }
            let mut latencies = Vec::with_capacity(calls);
            for t in tasks {
                latencies.push(t.await.expect("task"));
            }
            let (elapsed, cpu) = (started.elapsed().as_secs_f64(), cpu_micros(pid) - cpu);
            latencies.sort();
            let (p50, p99) = (percentile(&latencies, 0.50), percentile(&latencies, 0.99));
            println!(
                "{:<20} {:>14.0} {:>14.1} {:>24}",
                format!("methods @{method_rate}/s"),
                calls as f64 / elapsed,
                cpu as f64 / calls as f64,
                format!("{:.2} / {:.2} ms", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3)
            );
        }

        if run("c2d") {
            let per_device = 3;
            let total = (devices * per_device) as u64;
            let (seen, cpu) = (counters.c2d.load(Ordering::Relaxed), cpu_micros(pid));
            let started = Instant::now();
            let sends = futures::stream::iter(0..devices * per_device)
                .map(|k| {
                    let service = service.clone();
                    async move {
                        let r = service
                            .request(
                                reqwest::Method::POST,
                                &format!("/devices/bench-{}/messages/deviceBound", k % devices),
                            )
                            .header("iothub-messageid", k.to_string())
                            .body(format!("command {k}"))
                            .send()
                            .await
                            .expect("C2D send");
                        assert!(r.status().is_success(), "C2D send: {}", r.status());
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .collect::<Vec<()>>();
            sends.await;
            let sent_in = started.elapsed().as_secs_f64();
            let elapsed = until_count(&counters.c2d, seen + total, started).await.as_secs_f64();
            let got = counters.c2d.load(Ordering::Relaxed) - seen;
            let cpu = cpu_micros(pid) - cpu;
            println!(
                "{:<20} {:>14.0} {:>14.1} {:>24}",
                "C2D fan-out",
                got as f64 / elapsed,
                cpu as f64 / got as f64,
                format!("(sends {:.0}/s)", total as f64 / sent_in)
            );
        }
        if run("c2d-batch") {
            let per_device = 3;
            let total = devices * per_device;
            let (seen, cpu) = (counters.c2d.load(Ordering::Relaxed), cpu_micros(pid));
            let started = Instant::now();
            let batches: Vec<Vec<usize>> =
                (0..total).collect::<Vec<_>>().chunks(C2D_BATCH).map(<[usize]>::to_vec).collect();
            let sends = futures::stream::iter(batches)
                .map(|batch| {
                    let service = service.clone();
                    async move {
                        let messages: Vec<serde_json::Value> = batch
                            .iter()
                            .map(|k| {
                                json!({ "deviceId": format!("bench-{}", k % devices), "messageId": k.to_string(),
                                "body": format!("command {k}") })
                            })
                            .collect();
                        let r = service
                            .request(reqwest::Method::POST, "/messages/deviceBound")
                            .json(&messages)
                            .send()
                            .await
                            .expect("C2D batch send");
                        assert!(r.status().is_success(), "C2D batch send: {}", r.status());
                    }
                })
                .buffer_unordered(C2D_BATCHES_IN_FLIGHT)
                .collect::<Vec<()>>();
            sends.await;
            let sent_in = started.elapsed().as_secs_f64();
            let elapsed = until_count(&counters.c2d, seen + total as u64, started).await.as_secs_f64();
            let got = counters.c2d.load(Ordering::Relaxed) - seen;
            let cpu = cpu_micros(pid) - cpu;
            println!(
                "{:<20} {:>14.0} {:>14.1} {:>24}",
                format!("C2D fan-out, {C2D_BATCH}/req"),
                got as f64 / elapsed,
                cpu as f64 / got as f64,
                format!("(sends {:.0}/s)", total as f64 / sent_in)
            );
        }
        drop(kicks);
    });
}
