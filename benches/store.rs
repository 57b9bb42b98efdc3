//! Store throughput: identity create and get, one caller at a time and 64 at once; event
//! appends, one caller at a time and from 256 tasks at once.
//!
//! One at a time, each embedded create waits for a commit of its own (one fsync). With 64
//! callers the writer thread commits whatever has queued in one transaction (group commit), so
//! the cost per create should fall far below the sequential figure — that gap is what this
//! measures. PostgreSQL is measured too when `IOTHUBD_TEST_POSTGRES_URL` is set, in a schema of
//! its own that is dropped afterwards.
//!
//! `append_256_tasks` is the MQTT ingest pattern (DESIGN.md §3): 256 devices, each publishing
//! one 256-byte QoS 1 message at a time and sending the next once the previous one is durable.
//! Its throughput (elements/s) is messages per second. On a shared machine it follows the
//! disk's fsync latency more than the store's own work, so the same pattern is then run for a
//! fixed number of messages and its CPU time per message printed (Linux, from `/proc`): the
//! whole process's, and the embedded events log writer thread's — the one thread every
//! message of a hub goes through.
//!
//! `cargo bench --bench store -- --warm-up-time 1 --measurement-time 3`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use figment::Figment;
use figment::providers::{Format, Toml};
use futures::future::join_all;
use iothubd::config::{Config, DEFAULT_TOML, StoreBackend};
use iothubd_actors::model::event::{AnnotationValue, EventData, partition_of};
use iothubd_actors::model::hub::{HubDescription, HubProperties, Sku};
use iothubd_actors::model::identity::{Identity, IdentityKey, IdentitySpec, new_etag};
use iothubd_actors::store::Store;
use tokio::runtime::Runtime;
use tokio_postgres::NoTls;

const HUB: &str = "bench";
/// Devices created before the get benchmarks, which read them round-robin.
const PRELOADED: u64 = 1_000;
const CONCURRENCY: u64 = 64;
/// Devices publishing at once in `append_256_tasks`.
const PUBLISHERS: u64 = 256;
const PARTITIONS: u32 = 4;
/// Messages per publisher in the CPU measurement after `append_256_tasks`.
const CPU_ROUNDS: u64 = 500;
/// The events log writer's thread name as `/proc` shows it (cut to 15 bytes).
const EVENTS_WRITER_THREAD: &str = "iothubd-events-";

/// Unique device IDs across every benchmark and iteration.
static NEXT_DEVICE: AtomicU64 = AtomicU64::new(0);

fn new_device() -> Identity {
    let id = format!("dev-{}", NEXT_DEVICE.fetch_add(1, Ordering::Relaxed));
    Identity::create(IdentityKey::device(id), IdentitySpec::default()).expect("a valid device")
}

fn bench_hub() -> HubDescription {
    let mut hub = HubDescription {
        name: HUB.into(),
        etag: new_etag(),
        sku: Sku::default(),
        properties: HubProperties { host_name: "bench.example.net".into(), ..Default::default() },
    };
    hub.normalize().expect("a valid hub");
    hub
}

/// A 256-byte telemetry message with the annotations the hub stamps on every D2C message.
fn telemetry(device_id: &str) -> EventData {
    let text = |s: &str| AnnotationValue::String(s.into());
    EventData {
        body: vec![b'x'; 256],
        annotations: vec![
            ("iothub-connection-device-id".into(), text(device_id)),
            ("iothub-connection-auth-generation-id".into(), text("638000000000000000")),
            ("iothub-connection-auth-method".into(), text(r#"{"scope":"device","type":"sas","issuer":"iothub"}"#)),
            ("iothub-enqueuedtime".into(), AnnotationValue::Timestamp(1_700_000_000_000)),
            ("iothub-message-source".into(), text("Telemetry")),
        ],
        ..Default::default()
    }
}

/// One device's message, to the device's partition.
async fn publish(store: &Arc<dyn Store>, device_id: &str) {
    let events = vec![(partition_of(device_id, PARTITIONS), telemetry(device_id))];
    store.append_events(HUB, events).await.expect("append");
}

/// `rounds` messages from each of `PUBLISHERS` devices, each sent once the previous is durable.
async fn publish_from_all(store: &Arc<dyn Store>, rounds: u64) {
    let publishers = (0..PUBLISHERS).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let device_id = format!("device-{i}");
            for _ in 0..rounds {
                publish(&store, &device_id).await;
            }
        })
    });
    for result in join_all(publishers).await {
        result.expect("publisher");
    }
}

/// User + system CPU seconds of this process and of its thread named `thread` (if any).
fn cpu_seconds(thread: &str) -> Option<(f64, Option<f64>)> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let ticks = |stat: &str| -> Option<f64> {
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let (utime, stime): (f64, f64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
        // USER_HZ, 100 on Linux.
        Some((utime + stime) / 100.0)
    };
    let process = ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let named = std::fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        (comm.trim_end() == thread).then(|| std::fs::read_to_string(task.path().join("stat")).ok()).flatten()
    });
    Some((process, named.as_deref().and_then(ticks)))
}

/// Prints the CPU time per message of `append_256_tasks`'s pattern (see the module doc).
fn report_append_cpu(rt: &Runtime, store: &Arc<dyn Store>) {
    // A listing or a test pass of the benches measures nothing.
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let Some(start) = cpu_seconds(EVENTS_WRITER_THREAD) else { return };
    let started = Instant::now();
    rt.block_on(publish_from_all(store, CPU_ROUNDS));
    let elapsed = started.elapsed().as_secs_f64();
    let Some(end) = cpu_seconds(EVENTS_WRITER_THREAD) else { return };
    let messages = (CPU_ROUNDS * PUBLISHERS) as f64;
    let per_message = |from: f64, to: f64| (to - from) * 1e6 / messages;
    let writer = match (start.1, end.1) {
        (Some(from), Some(to)) => format!(", events writer thread {:.2} µs", per_message(from, to)),
        _ => String::new(),
    };
    println!(
        "store/{}/append_{PUBLISHERS}_tasks CPU per message: process {:.2} µs{writer} ({messages} messages, {:.0} msg/s)",
        store.backend(),
        per_message(start.0, end.0),
        messages / elapsed,
    );
}

fn measure_appends(c: &mut Criterion, rt: &Runtime, store: &Arc<dyn Store>) {
    let mut group = c.benchmark_group(format!("store/{}", store.backend()));
    group.throughput(Throughput::Elements(1));
    group.bench_function("append", |b| b.to_async(rt).iter(|| publish(store, "device-0")));
    // Each iteration is one message; the iterations are shared out among the publishers.
    group.bench_function(format!("append_{PUBLISHERS}_tasks"), |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let per_publisher = iters.div_ceil(PUBLISHERS);
            let started = Instant::now();
            publish_from_all(store, per_publisher).await;
            // Scaled back to `iters` messages: the last round may have sent a few more.
            started.elapsed().mul_f64(iters as f64 / (per_publisher * PUBLISHERS) as f64)
        })
    });
    group.finish();
}

fn measure(c: &mut Criterion, rt: &Runtime, store: &Arc<dyn Store>) {
    let preload: Vec<Identity> = (0..PRELOADED).map(|_| new_device()).collect();
    rt.block_on(async {
        store.create_hub(&bench_hub()).await.expect("create the hub");
        for result in join_all(preload.iter().map(|d| store.create_identity(HUB, d))).await {
            result.expect("preload a device");
        }
    });
    let preloaded: Vec<IdentityKey> = preload.into_iter().map(|d| d.key).collect();
    let next_get = AtomicU64::new(0);
    let pick = || preloaded[(next_get.fetch_add(1, Ordering::Relaxed) % PRELOADED) as usize].clone();

    let mut group = c.benchmark_group(format!("store/{}", store.backend()));
    group.throughput(Throughput::Elements(1));
    group.bench_function("create", |b| {
        b.to_async(rt).iter_batched(
            new_device,
            |device| async move { store.create_identity(HUB, &device).await.expect("create") },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("get", |b| {
        b.to_async(rt).iter_batched(
            pick,
            |key| async move { store.get_identity(HUB, &key).await.expect("get").expect("present") },
            BatchSize::SmallInput,
        )
    });

    group.throughput(Throughput::Elements(CONCURRENCY));
    group.bench_function(format!("create_{CONCURRENCY}_concurrent"), |b| {
        b.to_async(rt).iter_batched(
            || (0..CONCURRENCY).map(|_| new_device()).collect::<Vec<_>>(),
            |devices| async move {
                let tasks = devices.into_iter().map(|device| {
                    let store = store.clone();
                    tokio::spawn(async move { store.create_identity(HUB, &device).await })
                });
                for result in join_all(tasks).await {
                    result.expect("task").expect("create");
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function(format!("get_{CONCURRENCY}_concurrent"), |b| {
        b.to_async(rt).iter_batched(
            || (0..CONCURRENCY).map(|_| pick()).collect::<Vec<_>>(),
            |keys| async move {
                let tasks = keys.into_iter().map(|key| {
                    let store = store.clone();
                    tokio::spawn(async move { store.get_identity(HUB, &key).await })
                });
                for result in join_all(tasks).await {
                    result.expect("task").expect("get").expect("present");
                }
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    measure_appends(c, rt, store);
    report_append_cpu(rt, store);
    rt.block_on(store.close()).expect("close");
}

fn default_config() -> Config {
    Figment::from(Toml::string(DEFAULT_TOML)).extract().expect("the default configuration")
}

fn embedded(c: &mut Criterion) {
    let rt = Runtime::new().expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut config = default_config();
    config.data_dir = dir.path().to_owned();
    config.store.backend = StoreBackend::Embedded;
    let store = rt.block_on(iothubd::store::open(&config)).expect("open the embedded store");
    measure(c, &rt, &store);
}

fn postgres(c: &mut Criterion) {
    let Ok(url) = std::env::var("IOTHUBD_TEST_POSTGRES_URL") else {
        println!("IOTHUBD_TEST_POSTGRES_URL is not set: PostgreSQL not measured");
        return;
    };
    let rt = Runtime::new().expect("a tokio runtime");
    let schema = format!("iothubd_bench_{}", uuid::Uuid::new_v4().simple());
    let admin = |sql: String| {
        let url = url.clone();
        async move {
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await.expect("connect to PostgreSQL");
            tokio::spawn(connection);
            client.batch_execute(&sql).await.expect("administer the bench schema");
        }
    };
    rt.block_on(admin(format!("CREATE SCHEMA {schema}")));
    let mut config = default_config();
    config.store.backend = StoreBackend::Postgres;
    let separator = if url.contains('?') { '&' } else { '?' };
    config.store.postgres_url = format!("{url}{separator}options=-c%20search_path%3D{schema}");
    let store = rt.block_on(iothubd::store::open(&config)).expect("open the PostgreSQL store");
    measure(c, &rt, &store);
    rt.block_on(admin(format!("DROP SCHEMA {schema} CASCADE")));
}

criterion_group!(benches, embedded, postgres);
criterion_main!(benches);
