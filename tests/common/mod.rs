//! A hub started in-process for a test: temporary data dir, ephemeral HTTPS port, its dev CA
//! trusted, its host name resolved to the loopback address (as /etc/hosts would for an SDK).

#![allow(dead_code)] // each test binary uses a different part of this helper

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use iothubd::auth::sas;
use iothubd::config::Config;
use iothubd::server::{self, Server};
use iothubd_actors::model::identity::generate_key;
use reqwest::Method;

pub const API: &str = "api-version=2021-04-12";

pub struct TestHub {
    pub server: Server,
    pub dir: tempfile::TempDir,
    pub name: String,
    pub host: String,
    pub owner_key: String,
    pub registry_read_key: String,
    pub client: reqwest::Client,
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A unique hub name, so tests sharing a PostgreSQL database never meet.
pub fn unique_hub_name() -> String {
    format!("t{}", uuid::Uuid::new_v4().simple().to_string().get(..12).unwrap_or("hub"))
}

/// Configuration for a test hub in `dir`; `store` overrides pick the backend.
pub fn test_config(dir: &std::path::Path, name: &str, owner_key: &str, read_key: &str, postgres: bool) -> Config {
    let mut overrides: Vec<(&str, figment::value::Value)> = vec![
        ("data_dir", dir.display().to_string().into()),
        ("listen.address", "127.0.0.1".into()),
        ("ports.https", 0u64.into()),
        ("ports.mqtts", 0u64.into()),
        ("ports.metrics", 0u64.into()),
        ("hub.name", name.into()),
        ("hub.hostname", format!("{name}.azure-devices.net").into()),
        ("hub.owner_key", owner_key.into()),
        ("hub.registry_read_key", read_key.into()),
        ("operator.key", "operator-secret".into()),
    ];
    if postgres {
        overrides.push(("store.backend", "postgres".into()));
        overrides.push(("store.postgres_url", postgres_url().unwrap_or_default().into()));
    }
    Config::load(None, &overrides).expect("test configuration is valid")
}

/// `IOTHUBD_TEST_POSTGRES_URL`, when the PostgreSQL suites are to run.
pub fn postgres_url() -> Option<String> {
    std::env::var("IOTHUBD_TEST_POSTGRES_URL").ok().filter(|u| !u.is_empty())
}

/// Whether the PostgreSQL variant of a test runs here; says so when it does not.
pub fn postgres_configured() -> bool {
    let configured = postgres_url().is_some();
    if !configured {
        eprintln!("IOTHUBD_TEST_POSTGRES_URL is not set: the PostgreSQL variant is not configured here");
    }
    configured
}

pub fn start() -> TestHub {
    start_with_backend(false)
}

/// A hub that also serves plain MQTT on `port` (for tests that write raw bytes).
pub fn start_with_plain_mqtt(port: u16) -> TestHub {
    let dir = tempfile::tempdir().expect("temp dir");
    let name = unique_hub_name();
    let owner_key = generate_key();
    let registry_read_key = generate_key();
    let mut cfg = test_config(dir.path(), &name, &owner_key, &registry_read_key, false);
    cfg.ports.mqtt_plain = port;
    let server = server::start(cfg).expect("hub starts");
    let host = format!("{name}.azure-devices.net");
    let client = client_for(dir.path(), &host, server.info.https);
    TestHub { server, dir, name, host, owner_key, registry_read_key, client }
}

pub fn start_with_backend(postgres: bool) -> TestHub {
    let dir = tempfile::tempdir().expect("temp dir");
    let name = unique_hub_name();
    let owner_key = generate_key();
    let registry_read_key = generate_key();
    let cfg = test_config(dir.path(), &name, &owner_key, &registry_read_key, postgres);
    let server = server::start(cfg).expect("hub starts");
    let host = format!("{name}.azure-devices.net");
    let client = client_for(dir.path(), &host, server.info.https);
    TestHub { server, dir, name, host, owner_key, registry_read_key, client }
}

/// A client trusting the hub's dev CA that resolves `host` to the hub's address.
pub fn client_for(data_dir: &std::path::Path, host: &str, addr: SocketAddr) -> reqwest::Client {
    let ca = data_dir.join("tls").join("ca.pem");
    iothubd::client::builder_trusting(&ca).expect("dev CA readable").resolve(host, addr).build().expect("client")
}

impl TestHub {
    pub fn url(&self, path_and_query: &str) -> String {
        format!("https://{}:{}{}", self.host, self.server.info.https.port(), path_and_query)
    }

    /// A policy token for the whole hub.
    pub fn policy_token(&self, policy: &str, key: &str) -> String {
        sas::sign(&self.host, key, unix_now() + 3600, Some(policy)).expect("key is base64")
    }

    pub fn owner_token(&self) -> String {
        self.policy_token("iothubowner", &self.owner_key)
    }

    /// A request as the iothubowner policy; `path` without the api-version (it is added).
    pub fn owner(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.with_token(method, path, &self.owner_token())
    }

    pub fn with_token(&self, method: Method, path: &str, token: &str) -> reqwest::RequestBuilder {
        let sep = if path.contains('?') { '&' } else { '?' };
        self.client.request(method, self.url(&format!("{path}{sep}{API}"))).header("Authorization", token)
    }

    /// Disables an identity through the registry (`If-Match: *`).
    pub async fn disable(&self, path: &str) {
        let r = self
            .owner(Method::PUT, path)
            .header("If-Match", "*")
            .json(&serde_json::json!({ "status": "disabled" }))
            .send()
            .await
            .expect("registry answers");
        assert_eq!(r.status(), 200, "disable {path}");
    }

    pub fn operator(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth("operator-secret")
    }
}
