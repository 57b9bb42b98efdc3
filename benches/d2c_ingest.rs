//! D2C QoS 1 ingest: iothubd against Mosquitto on the same machine, same workload, same run,
//! interleaved (hub, mosquitto, hub, mosquitto, …) — the MQTT issue's benchmark.
//!
//! Workloads (256-byte payloads, QoS 1, plain MQTT on loopback for both brokers so TLS cost
//! does not blur the comparison):
//! - `10x100`: 10 connections, each keeping 100 PUBLISHes in flight;
//! - `1000x1`: 1,000 connections, each with one PUBLISH in flight;
//! - idle memory: RSS growth per connected, idle device at 10,000 connections.
//!
//! Reported: messages/s (median of the rounds), broker CPU µs per message (utime + stime of the
//! broker process over the window), and the hub / Mosquitto ratio. The hub acknowledges only
//! durable messages (group commit, fsync); Mosquitto acknowledges from memory.
//!
//! Run: `cargo build --release --bin iothubd && cargo bench --bench d2c_ingest`
//! (`IOTHUBD_BENCH_SECONDS`, `IOTHUBD_BENCH_ROUNDS`, `IOTHUBD_BENCH_IDLE` to change the size;
//! `IOTHUBD_BENCH_ROUNDS=0` measures idle memory only).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{self, Connect, Login, Packet, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PAYLOAD: usize = 256;

struct Broker {
    name: &'static str,
    child: Child,
    mqtt: SocketAddr,
    /// `Some((host, key))` for the hub: device credentials are SAS tokens.
    hub: Option<(String, String)>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// CPU time (user + system) of a process, in microseconds.
fn cpu_micros(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15 (1-based).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10_000 // USER_HZ = 100
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn start_hub(dir: &std::path::Path) -> Broker {
    let key = iothubd_actors::model::identity::generate_key();
    let mqtt_port = free_port();
    let bin = std::env::var("IOTHUBD_BIN").unwrap_or_else(|_| "target/release/iothubd".into());
    let mut child = Command::new(bin)
        .args(["serve", "--data-dir"])
        .arg(dir)
        .env("IOTHUBD_LISTEN__ADDRESS", "127.0.0.1")
        .env("IOTHUBD_PORTS__HTTPS", "0")
        .env("IOTHUBD_PORTS__MQTTS", "0")
        .env("IOTHUBD_PORTS__METRICS", "0")
        .env("IOTHUBD_PORTS__MQTT_PLAIN", mqtt_port.to_string())
        .env("IOTHUBD_HUB__NAME", "bench")
        .env("IOTHUBD_HUB__HOSTNAME", "bench.azure-devices.net")
        .env("IOTHUBD_HUB__OWNER_KEY", &key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("release hub binary (cargo build --release --bin iothubd)");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let https: SocketAddr = loop {
        let line = lines.next().expect("banner").expect("text");
        if let Some(a) = line.trim().strip_prefix("HTTPS     https://") {
            break a.split_whitespace().next().and_then(|a| a.parse().ok()).expect("HTTPS address");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let broker = Broker {
        name: "iothubd",
        child,
        mqtt: SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
        hub: Some(("bench.azure-devices.net".into(), key.clone())),
    };
    provision(dir, https, &key);
    broker
}

/// Creates `bench-0 … bench-N` with one shared key through bulk import.
fn provision(dir: &std::path::Path, https: SocketAddr, owner_key: &str) {
    let host = "bench.azure-devices.net";
    let client = iothubd::client::builder_trusting(&dir.join("tls").join("ca.pem"))
        .expect("dev CA")
        .resolve(host, https)
        .build()
        .expect("client");
    let token = iothubd::auth::sas::sign(host, owner_key, unix_now() + 3600, Some("iothubowner")).expect("token");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let total = env_or("IOTHUBD_BENCH_IDLE", 10_000).max(1000) as usize;
    rt.block_on(async {
        for chunk in (0..total).collect::<Vec<_>>().chunks(100) {
            let items: Vec<serde_json::Value> = chunk
                .iter()
                .map(|i| serde_json::json!({ "id": format!("bench-{i}"), "importMode": "createOrUpdate",
                    "authentication": { "type": "sas", "symmetricKey": { "primaryKey": DEVICE_KEY, "secondaryKey": DEVICE_KEY } } }))
                .collect();
            let r = client
                .post(format!("https://{host}:{}/devices?api-version=2021-04-12", https.port()))
                .header("Authorization", &token)
                .json(&items)
                .send()
                .await
                .expect("bulk import");
            assert!(r.status().is_success(), "bulk import: {}", r.status());
        }
    });
}

/// The key every benchmark device shares (base64 of 32 bytes).
const DEVICE_KEY: &str = "YmVuY2htYXJrLWRldmljZS1rZXktMzItYnl0ZXMtISE=";

fn start_mosquitto(dir: &std::path::Path) -> Broker {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\nmax_queued_messages 100000\npersistence false\nlog_dest none\n"
        ),
    )
    .expect("mosquitto.conf");
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for _ in 0..100 {
        if std::net::TcpStream::connect(addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Broker { name: "mosquitto", child, mqtt: addr, hub: None }
}

/// One MQTT connection speaking just enough 3.1.1 (rumqttc's codec) to CONNECT and publish.
struct Conn {
    stream: TcpStream,
    read: BytesMut,
    topic: String,
    next_pkid: u16,
}

async fn connect(broker: &Broker, i: usize) -> Conn {
    let id = format!("bench-{i}");
    let mut connect = Connect::new(id.clone());
    connect.keep_alive = 600;
    connect.clean_session = true;
    if let Some((host, _)) = &broker.hub {
        let resource = format!("{host}/devices/{id}");
        let token = iothubd::auth::sas::sign(&resource, DEVICE_KEY, unix_now() + 3600, None).expect("token");
        connect.login = Some(Login::new(format!("{host}/{id}/?api-version=2021-04-12"), token));
    }
    let mut stream = TcpStream::connect(broker.mqtt).await.expect("connect");
    stream.set_nodelay(true).ok();
    let mut buf = BytesMut::new();
    connect.write(&mut buf).expect("encode CONNECT");
    stream.write_all(&buf).await.expect("send CONNECT");
    let mut conn = Conn {
        stream,
        read: BytesMut::with_capacity(4096),
        topic: format!("devices/{id}/messages/events/"),
        next_pkid: 0,
    };
    match conn.next_packet().await {
        Packet::ConnAck(ack) => assert_eq!(ack.code, v4::ConnectReturnCode::Success, "{}: CONNACK", broker.name),
        other => panic!("{}: expected CONNACK, got {other:?}", broker.name),
    }
    conn
}

impl Conn {
    async fn next_packet(&mut self) -> Packet {
        loop {
            match v4::read(&mut self.read, 1 << 20) {
                Ok(p) => return p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet: {e:?}"),
            }
            if self.stream.read_buf(&mut self.read).await.expect("read") == 0 {
                panic!("connection closed by the broker");
            }
        }
    }

    fn publish_into(&mut self, out: &mut BytesMut) {
        self.next_pkid = self.next_pkid % u16::MAX + 1;
        let mut p = Publish::new(self.topic.as_str(), QoS::AtLeastOnce, vec![b'x'; PAYLOAD]);
        p.pkid = self.next_pkid;
        p.write(out).expect("encode PUBLISH");
    }

    /// Keeps `window` PUBLISHes in flight until `until`; returns the PUBACKs received by then.
    async fn saturate(mut self, window: usize, until: Instant) -> u64 {
        let mut out = BytesMut::new();
        for _ in 0..window {
            self.publish_into(&mut out);
        }
        self.stream.write_all(&out).await.expect("send");
        let mut acked = 0;
        while Instant::now() < until {
            match tokio::time::timeout_at(until.into(), self.next_packet()).await {
                Ok(Packet::PubAck(_)) => {
                    acked += 1;
                    out.clear();
                    self.publish_into(&mut out);
                    self.stream.write_all(&out).await.expect("send");
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        acked
    }
}

/// Messages/s and broker CPU µs/message for one workload on one broker.
async fn workload(broker: &Broker, conns: usize, window: usize, seconds: u64) -> (f64, f64) {
    let mut connections = Vec::with_capacity(conns);
    for i in 0..conns {
        connections.push(connect(broker, i).await);
    }
    let pid = broker.child.id();
    let cpu_before = cpu_micros(pid);
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = connections.into_iter().map(|c| tokio::spawn(c.saturate(window, until))).collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_micros(pid) - cpu_before;
    (total as f64 / elapsed, cpu as f64 / total.max(1) as f64)
}

/// RSS growth per idle connection, in KiB.
async fn idle_memory(broker: &Broker, count: usize) -> f64 {
    let pid = broker.child.id();
    let before = rss_kib(pid);
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        held.push(connect(broker, i).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    drop(held);
    (after.saturating_sub(before)) as f64 / count as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` probes bench binaries; nothing to list.
    }
    let seconds = env_or("IOTHUBD_BENCH_SECONDS", 5);
    let rounds = env_or("IOTHUBD_BENCH_ROUNDS", 3) as usize;
    let idle = env_or("IOTHUBD_BENCH_IDLE", 10_000) as usize;
    let dir = tempfile::tempdir().expect("temp dir");
    let hub = start_hub(dir.path());
    let mosquitto = start_mosquitto(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    println!("D2C QoS1 ingest, {PAYLOAD}-byte payloads, {seconds} s windows, {rounds} interleaved rounds");
    println!(
        "{:<8} {:>10} {:>12} {:>10} {:>12} {:>8}",
        "workload", "hub msg/s", "hub µs/msg", "mosq msg/s", "mosq µs/msg", "ratio"
    );
    // `IOTHUBD_BENCH_ROUNDS=0` measures idle memory only.
    let workloads: &[(&str, usize, usize)] =
        if rounds == 0 { &[] } else { &[("10x100", 10, 100), ("1000x1", 1000, 1)] };
    for &(label, conns, window) in workloads {
        let (mut h, mut m) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            h.push(rt.block_on(workload(&hub, conns, window, seconds)));
            m.push(rt.block_on(workload(&mosquitto, conns, window, seconds)));
        }
        let (hr, hc) = (median(h.iter().map(|x| x.0).collect()), median(h.iter().map(|x| x.1).collect()));
        let (mr, mc) = (median(m.iter().map(|x| x.0).collect()), median(m.iter().map(|x| x.1).collect()));
        println!("{label:<8} {hr:>10.0} {hc:>12.1} {mr:>10.0} {mc:>12.1} {:>8.2}", hr / mr);
    }
    let hub_idle = rt.block_on(idle_memory(&hub, idle));
    let mosq_idle = rt.block_on(idle_memory(&mosquitto, idle));
    println!("idle RSS per connected device at {idle}: hub {hub_idle:.2} KiB, mosquitto {mosq_idle:.2} KiB");
}
