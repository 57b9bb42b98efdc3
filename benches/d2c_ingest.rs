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

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, Publish};
use tokio::io::AsyncWriteExt;

const PAYLOAD: usize = 256;

impl Conn {
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

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` probes bench binaries; nothing to list.
    }
    let seconds = env_or("IOTHUBD_BENCH_SECONDS", 5);
    let rounds = env_or("IOTHUBD_BENCH_ROUNDS", 3) as usize;
    let idle = env_or("IOTHUBD_BENCH_IDLE", 10_000) as usize;
    let dir = tempfile::tempdir().expect("temp dir");
    let hub = start_hub(dir.path(), idle.max(1000));
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
