//! What the broker benchmarks share: starting the release hub (plain MQTT on loopback, dev CA
//! HTTPS) and Mosquitto on free ports, provisioning `bench-0 … bench-N` through bulk import,
//! process CPU and RSS from `/proc`, and a bare MQTT 3.1.1 connection (rumqttc's codec) that
//! CONNECTs as a hub device or a plain client.

#![allow(dead_code)] // each bench uses its own part

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{self, Connect, Login, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Broker {
    pub name: &'static str,
    pub child: Child,
    pub mqtt: SocketAddr,
    /// `Some((host, key))` for the hub: device credentials are SAS tokens.
    pub hub: Option<(String, String)>,
    /// The hub's HTTPS address (service REST).
    pub https: Option<SocketAddr>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// CPU time (user + system) of a process, in microseconds.
pub fn cpu_micros(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15 (1-based).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10_000 // USER_HZ = 100
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn start_hub(dir: &std::path::Path, devices: usize) -> Broker {
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
        https: Some(https),
    };
    provision(dir, https, &key, devices);
    broker
}

/// Creates `bench-0 … bench-N` with one shared key through bulk import.
pub fn provision(dir: &std::path::Path, https: SocketAddr, owner_key: &str, total: usize) {
    let host = "bench.azure-devices.net";
    let client = iothubd::client::builder_trusting(&dir.join("tls").join("ca.pem"))
        .expect("dev CA")
        .resolve(host, https)
        .build()
        .expect("client");
    let token = iothubd::auth::sas::sign(host, owner_key, unix_now() + 3600, Some("iothubowner")).expect("token");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
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
pub const DEVICE_KEY: &str = "YmVuY2htYXJrLWRldmljZS1rZXktMzItYnl0ZXMtISE=";

pub fn start_mosquitto(dir: &std::path::Path) -> Broker {
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
    Broker { name: "mosquitto", child, mqtt: addr, hub: None, https: None }
}

/// One MQTT connection speaking just enough 3.1.1 (rumqttc's codec) to CONNECT and publish.
pub struct Conn {
    pub stream: TcpStream,
    pub read: BytesMut,
    pub topic: String,
    pub next_pkid: u16,
}

pub async fn connect(broker: &Broker, i: usize) -> Conn {
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
    pub async fn next_packet(&mut self) -> Packet {
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
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
