//! Acknowledged means durable. A 200 on `PUT /devices/{id}` and an MQTT PUBACK both survive
//! the hub process being killed with SIGKILL right after them: it is restarted on the same
//! data and everything acknowledged is there. The same holds for a `204` on a cloud-to-device send.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use common::{API, client_for, postgres_configured, postgres_url, unique_hub_name, unix_now};
use iothubd::auth::sas;
use iothubd_actors::model::identity::generate_key;
use serde_json::json;

struct HubProcess {
    child: Child,
    https: SocketAddr,
    mqtts: SocketAddr,
}

/// Starts the real binary and reads the HTTPS address from its start-up banner.
fn spawn_hub(data_dir: &std::path::Path, name: &str, owner_key: &str, postgres: bool) -> HubProcess {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_iothubd"));
    cmd.args(["serve", "--data-dir"])
        .arg(data_dir)
        .env("IOTHUBD_LISTEN__ADDRESS", "127.0.0.1")
        .env("IOTHUBD_PORTS__HTTPS", "0")
        .env("IOTHUBD_PORTS__MQTTS", "0")
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
    let (mut https, mut mqtts) = (None, None);
    while https.is_none() || mqtts.is_none() {
        let line = lines.next().expect("hub printed its banner").expect("banner is text");
        let address = |prefix: &str| {
            line.trim().strip_prefix(prefix).and_then(|a| a.split_whitespace().next()?.parse::<SocketAddr>().ok())
        };
        https = https.or_else(|| address("HTTPS     https://"));
        mqtts = mqtts.or_else(|| address("MQTTS     mqtts://"));
    }
    // Keep draining stdout so the hub never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    HubProcess { child, https: https.unwrap_or_else(|| unreachable!()), mqtts: mqtts.unwrap_or_else(|| unreachable!()) }
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
    if !postgres_configured() {
        return;
    }
    acknowledged_device_survives_sigkill(true).await;
}

/// N QoS 1 messages, SIGKILL right after the last PUBACK, restart: all N are in the log.
async fn acknowledged_telemetry_survives_sigkill(postgres: bool) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
    const N: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let name = unique_hub_name();
    let host = format!("{name}.azure-devices.net");
    let owner_key = generate_key();
    let token = sas::sign(&host, &owner_key, unix_now() + 3600, Some("iothubowner")).unwrap();

    let mut hub = spawn_hub(dir.path(), &name, &owner_key, postgres);
    let client = client_for(dir.path(), &host, hub.https);
    let url = format!("https://{host}:{}/devices/pub?{API}", hub.https.port());
    let device: serde_json::Value =
        client.put(&url).header("Authorization", &token).json(&json!({})).send().await.unwrap().json().await.unwrap();
    let key = device["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap();

    let mut opts = MqttOptions::new("pub", "localhost", hub.mqtts.port());
    let password = sas::sign(&format!("{host}/devices/pub"), key, unix_now() + 600, None).unwrap();
    opts.set_credentials(format!("{host}/pub/?api-version=2021-04-12"), password);
    opts.set_inflight(100);
    let ca = std::fs::read(dir.path().join("tls").join("ca.pem")).unwrap();
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    let (mqtt, mut eventloop) = AsyncClient::new(opts, N);
    let publisher = tokio::spawn(async move {
        for i in 0..N {
            let topic = format!("devices/pub/messages/events/%24.mid=msg-{i}");
            mqtt.publish(topic, QoS::AtLeastOnce, false, format!("payload {i}")).await.unwrap();
        }
        mqtt
    });
    let mut acked = 0;
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while acked < N {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.expect("connection stays up") {
                acked += 1;
            }
        }
    })
    .await
    .expect("every PUBACK in time");
    hub.child.kill().expect("SIGKILL right after the last PUBACK");
    hub.child.wait().unwrap();
    drop(publisher);

    let mut hub = spawn_hub(dir.path(), &name, &owner_key, postgres);
    let client = client_for(dir.path(), &host, hub.https);
    let mut ids = std::collections::BTreeSet::new();
    for p in 0..4 {
        let url = format!("https://{host}:{}/events/partitions/{p}?{API}&max=256", hub.https.port());
        let mut next = 0;
        loop {
            let page = format!("{url}&from=sequence:{next}");
            let text = client.get(&page).header("Authorization", &token).send().await.unwrap().text().await.unwrap();
            let lines: Vec<serde_json::Value> =
                text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
            if lines.is_empty() {
                break;
            }
            for e in &lines {
                ids.insert(e["properties"]["messageId"].as_str().unwrap().to_owned());
            }
            next = lines.last().unwrap()["sequenceNumber"].as_i64().unwrap() + 1;
        }
    }
    let expected: std::collections::BTreeSet<String> = (0..N).map(|i| format!("msg-{i}")).collect();
    assert_eq!(ids, expected, "every acknowledged message is in the log after SIGKILL");
    hub.child.kill().unwrap();
    hub.child.wait().unwrap();
}

#[tokio::test]
async fn acknowledged_telemetry_survives_sigkill_embedded() {
    acknowledged_telemetry_survives_sigkill(false).await;
}

#[tokio::test]
async fn acknowledged_telemetry_survives_sigkill_postgres() {
    if !postgres_configured() {
        return;
    }
    acknowledged_telemetry_survives_sigkill(true).await;
}

/// Cloud-to-device: 20 sends answered 204, SIGKILL, restart: the device receives all 20, in
/// order, over HTTPS — and a message completed before the kill does not come back.
async fn acknowledged_c2d_survives_sigkill(postgres: bool) {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_hub_name();
    let host = format!("{name}.azure-devices.net");
    let owner_key = generate_key();
    let token = sas::sign(&host, &owner_key, unix_now() + 3600, Some("iothubowner")).unwrap();
    let base = |https: SocketAddr| format!("https://{host}:{}", https.port());

    let mut hub = spawn_hub(dir.path(), &name, &owner_key, postgres);
    let client = client_for(dir.path(), &host, hub.https);
    let r = client
        .put(format!("{}/devices/c2d-dev?{API}", base(hub.https)))
        .header("Authorization", &token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let device: serde_json::Value = r.json().await.unwrap();
    let key = device["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap().to_owned();
    let device_token = sas::sign(&format!("{host}/devices/c2d-dev"), &key, unix_now() + 3600, None).unwrap();
    let receive = |https: SocketAddr| {
        client_for(dir.path(), &host, https)
            .get(format!("{}/devices/c2d-dev/messages/deviceBound?{API}", base(https)))
            .header("Authorization", device_token.clone())
    };
    for i in 0..21 {
        let r = client
            .post(format!("{}/devices/c2d-dev/messages/deviceBound?{API}", base(hub.https)))
            .header("Authorization", &token)
            .header("iothub-messageid", format!("m{i}"))
            .body(format!("command {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    // The first is received and completed before the kill.
    let first = receive(hub.https).send().await.unwrap();
    assert_eq!(first.headers()["iothub-messageid"], "m0");
    let lock = first.headers()["etag"].to_str().unwrap().trim_matches('"').to_owned();
    let done = client
        .delete(format!("{}/devices/c2d-dev/messages/deviceBound/{lock}?{API}", base(hub.https)))
        .header("Authorization", &device_token)
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 204);
    hub.child.kill().expect("SIGKILL");
    hub.child.wait().unwrap();

    let mut hub = spawn_hub(dir.path(), &name, &owner_key, postgres);
    let client = client_for(dir.path(), &host, hub.https);
    for i in 1..21 {
        let r = receive(hub.https).send().await.unwrap();
        assert_eq!(r.status(), 200, "message m{i} was acknowledged before SIGKILL but is gone after restart");
        assert_eq!(r.headers()["iothub-messageid"], format!("m{i}").as_str());
        let lock = r.headers()["etag"].to_str().unwrap().trim_matches('"').to_owned();
        let done = client
            .delete(format!("{}/devices/c2d-dev/messages/deviceBound/{lock}?{API}", base(hub.https)))
            .header("Authorization", &device_token)
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 204);
    }
    assert_eq!(receive(hub.https).send().await.unwrap().status(), 204, "the queue is empty");
    hub.child.kill().unwrap();
    hub.child.wait().unwrap();
}

#[tokio::test]
async fn acknowledged_c2d_survives_sigkill_embedded() {
    acknowledged_c2d_survives_sigkill(false).await;
}

#[tokio::test]
async fn acknowledged_c2d_survives_sigkill_postgres() {
    if !postgres_configured() {
        return;
    }
    acknowledged_c2d_survives_sigkill(true).await;
}
