//! A 200 on `PUT /devices/{id}` means the identity is durable: the hub process is killed with
//! SIGKILL right after the answer, restarted on the same data, and the device is there.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::{API, client_for, postgres_url, unique_hub_name, unix_now};
use iothubd::auth::sas;
use iothubd_actors::model::identity::generate_key;
use serde_json::json;

struct HubProcess {
    child: Child,
    https: SocketAddr,
}

/// Starts the real binary and reads the HTTPS address from its start-up banner.
fn spawn_hub(data_dir: &std::path::Path, name: &str, owner_key: &str, postgres: bool) -> HubProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iothubd"));
    cmd.args(["serve", "--data-dir"])
        .arg(data_dir)
        .env("IOTHUBD_LISTEN__ADDRESS", "127.0.0.1")
        .env("IOTHUBD_PORTS__HTTPS", "0")
        .env("IOTHUBD_PORTS__METRICS", "0")
        .env("IOTHUBD_HUB__NAME", name)
        .env("IOTHUBD_HUB__HOSTNAME", format!("{name}.azure-devices.net"))
        .env("IOTHUBD_HUB__OWNER_KEY", owner_key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped());
    if postgres {
        cmd.env("IOTHUBD_STORE__BACKEND", "postgres")
            .env("IOTHUBD_STORE__POSTGRES_URL", postgres_url().expect("postgres url"));
    }
    let mut child = cmd.spawn().expect("hub binary starts");
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    let https = loop {
        let line = lines.next().expect("hub printed its banner").expect("banner is text");
        if let Some(addr) = line.trim().strip_prefix("HTTPS     https://") {
            let addr = addr.split_whitespace().next().unwrap_or_default();
            break addr.parse().expect("banner has the HTTPS address");
        }
    };
    // Keep draining stdout so the hub never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    HubProcess { child, https }
}

async fn acknowledged_device_survives_sigkill(postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_hub_name();
    let host = format!("{name}.azure-devices.net");
    let owner_key = generate_key();
    let token = sas::sign(&host, &owner_key, unix_now() + 3600, Some("iothubowner")).unwrap();

    let mut hub = spawn_hub(dir.path(), &name, &owner_key, postgres);
    let client = client_for(dir.path(), &host, hub.https);
    let url = |https: SocketAddr, id: &str| format!("https://{host}:{}/devices/{id}?{API}", https.port());
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        let id = format!("durable-{i}");
        let r = client.put(url(hub.https, &id)).header("Authorization", &token).json(&json!({})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        acknowledged.push(id);
    }
    hub.child.kill().expect("SIGKILL");
    hub.child.wait().unwrap();

    let mut hub = spawn_hub(dir.path(), &name, &owner_key, postgres);
    let client = client_for(dir.path(), &host, hub.https);
    for id in &acknowledged {
        let r = client.get(url(hub.https, id)).header("Authorization", &token).send().await.unwrap();
        assert_eq!(r.status(), 200, "{id} was acknowledged before SIGKILL but is gone after restart");
    }
    hub.child.kill().unwrap();
    hub.child.wait().unwrap();
}

#[tokio::test]
async fn acknowledged_device_survives_sigkill_embedded() {
    acknowledged_device_survives_sigkill(false).await;
}

#[tokio::test]
async fn acknowledged_device_survives_sigkill_postgres() {
    if postgres_url().is_none() {
        eprintln!("IOTHUBD_TEST_POSTGRES_URL is not set: the PostgreSQL variant is not configured here");
        return;
    }
    acknowledged_device_survives_sigkill(true).await;
}
