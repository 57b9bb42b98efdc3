//! Devices for a run: the hub's credentials (a connection string, or the operator API of a
//! local hub), each device's key, and the bulk import that creates the devices.
//!
//! Keys are derived, not stored: a device's primary key is base64(HMAC-SHA256(seed, device id))
//! (the secondary key the same over `{id}/secondary`). The simulator can then sign any device's
//! SAS token from the seed alone, and a rerun with the same seed and prefix finds its devices
//! ready (`--skip-provision`); a run with another seed re-keys them (`createOrUpdate`).
//!
//! Provisioning is the registry's bulk `POST /devices` (service-api, at most 100 identities a
//! request), a few requests in flight, each authorized by a policy token.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use super::scenario::Scenario;
use crate::auth::ServiceConnectionString;

const API_VERSION: &str = "2021-04-12";
/// Identities per bulk request: the registry's limit.
const BULK_ITEMS: usize = 100;
/// Bulk requests in flight at once.
const BULK_CONCURRENCY: usize = 4;
/// Lifetime of the policy token signed for provisioning.
const TOKEN_LIFETIME_SECS: u64 = 3600;

/// A device's primary key, derived from the scenario seed.
pub fn device_key(seed: &str, device_id: &str) -> String {
    derive(seed, device_id.as_bytes())
}

fn secondary_key(seed: &str, device_id: &str) -> String {
    derive(seed, format!("{device_id}/secondary").as_bytes())
}

fn derive(seed: &str, data: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(seed.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(data);
    B64.encode(mac.finalize().into_bytes())
}

/// The hub's HTTPS endpoint: `--https`, else 127.0.0.1:443, else 127.0.0.1:8443 (where an
/// unprivileged hub serves HTTPS).
pub async fn https_endpoint(scenario: &Scenario) -> anyhow::Result<SocketAddr> {
    if let Some(text) = &scenario.https {
        return tokio::net::lookup_host(text.as_str())
            .await
            .with_context(|| format!("--https {text}: cannot resolve (host:port expected)"))?
            .next()
            .with_context(|| format!("--https {text} resolves to no address"));
    }
    for port in [443, 8443] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let probe = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await;
        if matches!(probe, Ok(Ok(_))) {
            return Ok(addr);
        }
    }
    bail!("no hub answers on 127.0.0.1:443 or 127.0.0.1:8443; start one (iothubd serve) or give --https host:port")
}

/// The login of the scenario: its connection string, or the iothubowner key of a hub read
/// through the operator API with `<data-dir>/operator.key` (a hub on this machine).
pub async fn hub_login(scenario: &Scenario, https: SocketAddr) -> anyhow::Result<ServiceConnectionString> {
    if let Some(cs) = &scenario.connection_string {
        return ServiceConnectionString::parse(cs).context("--connection-string / IOTHUB_CONNECTION_STRING");
    }
    let key_file = scenario.data_dir.join("operator.key");
    let operator_key = std::fs::read_to_string(&key_file)
        .with_context(|| {
            format!(
                "no --connection-string (or IOTHUB_CONNECTION_STRING) and cannot read {} to look the hub up; \
                 pass the connection string the hub printed at start, or --data-dir of the hub",
                key_file.display()
            )
        })?
        .trim()
        .to_owned();
    let client = crate::client::builder_trusting(&scenario.ca)?
        .resolve("localhost", https)
        .timeout(Duration::from_secs(30))
        .build()?;
    let url = format!("https://localhost:{}/operator/hubs", https.port());
    let response = client.get(&url).bearer_auth(&operator_key).send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body: Value = response.json().await.with_context(|| format!("GET {url}: not JSON"))?;
    if !status.is_success() {
        bail!("GET {url}: {status} {}", body.pointer("/error/message").and_then(Value::as_str).unwrap_or(""));
    }
    let hubs = body["value"].as_array().cloned().unwrap_or_default();
    let name_of = |h: &Value| h["name"].as_str().unwrap_or("").to_owned();
    let hub = match &scenario.hub {
        Some(name) => hubs.iter().find(|h| name_of(h) == *name),
        None if hubs.len() == 1 => hubs.first(),
        None => hubs.iter().find(|h| name_of(h) == "myhub"),
    };
    let Some(hub) = hub else {
        let names: Vec<String> = hubs.iter().map(name_of).collect();
        bail!("choose the hub with --hub (hubs: {})", names.join(", "));
    };
    let host = hub.pointer("/properties/hostName").and_then(Value::as_str).context("the hub has no hostName")?;
    let key = hub
        .pointer("/properties/authorizationPolicies")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|p| p["keyName"] == "iothubowner")
        .and_then(|p| p["primaryKey"].as_str())
        .context("the hub has no iothubowner policy")?;
    Ok(ServiceConnectionString { host_name: host.to_owned(), key_name: "iothubowner".into(), key: key.to_owned() })
}

/// Creates (or re-keys) the devices `range` through bulk import; `done` is told how many
/// identities each finished request covered.
pub async fn provision(
    scenario: &Scenario,
    login: &ServiceConnectionString,
    https: SocketAddr,
    range: Range<u32>,
    done: impl Fn(u64),
) -> anyhow::Result<()> {
    let client = crate::client::builder_trusting(&scenario.ca)?
        .resolve(&login.host_name, https)
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = format!("https://{}:{}/devices?api-version={API_VERSION}", login.host_name, https.port());
    let token = login.token(TOKEN_LIFETIME_SECS)?;
    let indexes: Vec<u32> = range.collect();
    let requests = indexes.chunks(BULK_ITEMS).map(|chunk| {
        let items: Vec<Value> = chunk
            .iter()
            .map(|i| {
                let id = format!("{}{i}", scenario.device_prefix);
                json!({
                    "id": id,
                    "importMode": "createOrUpdate",
                    "status": "enabled",
                    "authentication": { "type": "sas", "symmetricKey": {
                        "primaryKey": device_key(&scenario.seed, &id),
                        "secondaryKey": secondary_key(&scenario.seed, &id),
                    } },
                })
            })
            .collect();
        let request = client.post(&url).header("Authorization", &token).json(&items);
        async move {
            let response = request.send().await.context("bulk import request")?;
            let status = response.status();
            if status.is_success() {
                return Ok(items.len() as u64);
            }
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let why = body
                .pointer("/errors/0/errorStatus")
                .or_else(|| body.pointer("/Message"))
                .or_else(|| body.pointer("/message"))
                .and_then(Value::as_str)
                .unwrap_or("no detail");
            bail!("bulk import answered {status}: {why}")
        }
    });
    let mut results = futures::stream::iter(requests).buffer_unordered(BULK_CONCURRENCY);
    while let Some(result) = results.next().await {
        done(result.with_context(|| format!("provisioning devices at {url}"))?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_keys_are_stable_per_seed_and_id() {
        let a = device_key("seed", "sim-1");
        assert_eq!(a, device_key("seed", "sim-1"));
        assert_ne!(a, device_key("seed", "sim-2"));
        assert_ne!(a, device_key("other", "sim-1"));
        assert_ne!(a, secondary_key("seed", "sim-1"));
        assert_eq!(B64.decode(&a).map(|k| k.len()).ok(), Some(32));
    }
}
