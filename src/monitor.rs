//! `iothubd monitor-events`: a hub's device-to-cloud events printed as they arrive, the way
//! `az iot hub monitor-events` prints them, read from the HTTPS events stream
//! (`GET /events/stream`, [`crate::http::events`]) with a service connection string.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use iothubd_actors::model::event::partition_of;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::auth::ServiceConnectionString;

/// Any api-version the hub accepts (service-api §0).
const API_VERSION: &str = "2021-04-12";
/// Lifetime of the token the monitor signs; the stream is authorized once, when it opens.
const TOKEN_LIFETIME_SECS: u64 = 3600;

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// Only events from this device (only its partition is read).
    #[arg(long, short = 'd', visible_alias = "device-id")]
    device: Option<String>,
    /// Also print each event's system and application properties.
    #[arg(long)]
    properties: bool,
    /// Consumer group to read as.
    #[arg(long, visible_alias = "cg", default_value = "$Default")]
    consumer_group: String,
    /// `end`: only events enqueued from now on (as az does); `start`: every retained event first.
    #[arg(long, value_enum, default_value_t = StartFrom::End)]
    from: StartFrom,
    /// Stop after this many seconds without an event (as az's --timeout); 0 = run until Ctrl-C.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// The hub's HTTPS endpoint; default https://{HostName}:443.
    #[arg(long)]
    url: Option<String>,
    /// A connection string of a policy with ServiceConnect.
    #[arg(long, visible_alias = "hub-connection-string", env = "IOTHUB_CONNECTION_STRING", hide_env_values = true)]
    login: String,
    /// CA certificate to trust (the hub's dev CA by default).
    #[arg(long, default_value = "./iothubd-data/tls/ca.pem")]
    ca: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StartFrom {
    Start,
    End,
}

/// Runs the command on its own runtime; returns when the timeout passes or on Ctrl-C.
pub fn main(args: MonitorArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(monitor(args))
}

async fn monitor(args: MonitorArgs) -> anyhow::Result<()> {
    let login = ServiceConnectionString::parse(&args.login)?;
    let host = login.host_name.as_str();
    let url = reqwest::Url::parse(args.url.as_deref().unwrap_or(&format!("https://{host}:443")))
        .context("--url is not a URL")?;
    let port = url.port_or_known_default().unwrap_or(443);
    let mut client = crate::client::builder_trusting(&args.ca)?.connect_timeout(Duration::from_secs(10));
    // The hub is chosen by the Host it is addressed as and its certificate names that host, so
    // the request always names the hub's host, sent to wherever --url points.
    if !url.host_str().is_some_and(|h| h.eq_ignore_ascii_case(host)) {
        let addr = url
            .socket_addrs(|| Some(port))
            .with_context(|| format!("cannot resolve {url}"))?
            .into_iter()
            .next()
            .with_context(|| format!("{url} resolves to no address"))?;
        client = client.resolve(host, addr);
    }
    let client = client.build()?;
    let base = format!("https://{host}:{port}");
    let token = login.token(TOKEN_LIFETIME_SECS)?;

    let from = match args.from {
        StartFrom::Start => "start",
        StartFrom::End => "end",
    };
    let mut query = vec![("api-version", API_VERSION.to_owned()), ("consumerGroup", args.consumer_group.clone())];
    query.push(("from", from.to_owned()));
    if let Some(device) = &args.device {
        // A device's events are all in one partition (service-api §9); read only that one.
        let listing = client
            .get(format!("{base}/events/partitions"))
            .query(&[("api-version", API_VERSION)])
            .header("Authorization", &token)
            .send()
            .await
            .with_context(|| format!("cannot reach the hub at {url}"))?;
        let listing = success(listing).await?.json::<Value>().await?;
        let count = listing["partitionCount"].as_u64().and_then(|c| u32::try_from(c).ok()).unwrap_or(0);
        if count == 0 {
            bail!("the hub reported no partitions");
        }
        query.push(("partitions", partition_of(device, count).to_string()));
    }
    let response = client
        .get(format!("{base}/events/stream"))
        .query(&query)
        .header("Authorization", &token)
        .send()
        .await
        .with_context(|| format!("cannot reach the hub at {url}"))?;
    let mut response = success(response).await?;

    match &args.device {
        Some(d) => eprintln!("Starting event monitor, filtering on device: {d}, use ctrl-c to stop..."),
        None => eprintln!("Starting event monitor, use ctrl-c to stop..."),
    }
    let idle = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
    let mut deadline = idle.map(|t| Instant::now() + t);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut pending = Vec::new();
    loop {
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk.context("the events stream broke")?,
            () = until(deadline) => return Ok(()),
            _ = &mut ctrl_c => return Ok(()),
        };
        let Some(chunk) = chunk else {
            bail!("the hub closed the events stream");
        };
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            // Blank lines are the stream's keep-alives.
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                eprintln!("iothubd: skipping a line of the events stream that is not JSON");
                continue;
            };
            let origin = event["annotations"]["iothub-connection-device-id"].as_str().unwrap_or("");
            if args.device.as_deref().is_some_and(|d| d != origin) {
                continue;
            }
            println!("{}", serde_json::to_string_pretty(&az_event(&event, args.properties))?);
            deadline = idle.map(|t| Instant::now() + t);
        }
    }
}

/// Sleeps until `deadline`; forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The response when it succeeded, else an error with the IoT Hub error text.
async fn success(response: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    bail!("{status}: {}", body["Message"].as_str().unwrap_or("request failed"));
}

/// An events-stream line in az's shape: `{"event":{"origin","module","payload"[,"properties"]}}`,
/// the payload as JSON when the body is JSON text, else as a string (base64 when not UTF-8).
fn az_event(line: &Value, with_properties: bool) -> Value {
    let annotations = &line["annotations"];
    let payload = match line["body"].as_str() {
        Some(text) => serde_json::from_str(text).unwrap_or_else(|_| json!(text)),
        None => line["bodyBase64"].clone(),
    };
    let mut event = json!({
        "origin": annotations["iothub-connection-device-id"].as_str().unwrap_or(""),
        "module": annotations["iothub-connection-module-id"].as_str().unwrap_or(""),
        "payload": payload,
    });
    if with_properties {
        // az lists the AMQP properties and annotations together, under their AMQP names.
        let mut system = annotations.as_object().cloned().unwrap_or_default();
        system.insert("x-opt-sequence-number".into(), line["sequenceNumber"].clone());
        system.insert("x-opt-offset".into(), line["offset"].clone());
        system.insert("x-opt-enqueued-time".into(), line["enqueuedTimeUtc"].clone());
        for (name, value) in line["properties"].as_object().into_iter().flatten() {
            system.insert(amqp_property_name(name), value.clone());
        }
        let application = line["applicationProperties"].as_object().cloned().unwrap_or_else(Map::new);
        event["properties"] = json!({ "system": system, "application": application });
    }
    json!({ "event": event })
}

/// `messageId` → `message-id`.
fn amqp_property_name(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 2);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('-');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_in_az_shape() {
        let line = json!({
            "sequenceNumber": 3, "offset": "3", "enqueuedTimeUtc": "2024-01-01T00:00:00.0000000Z",
            "body": "{\"t\":21.5}", "bodyBase64": "",
            "properties": { "messageId": "m1", "contentType": "application/json" },
            "applicationProperties": { "alert": "high" },
            "annotations": { "iothub-connection-device-id": "d1", "iothub-connection-module-id": "m" },
        });
        assert_eq!(
            az_event(&line, false),
            json!({ "event": { "origin": "d1", "module": "m", "payload": { "t": 21.5 } } })
        );
        let with = az_event(&line, true);
        assert_eq!(with["event"]["properties"]["system"]["message-id"], "m1");
        assert_eq!(with["event"]["properties"]["system"]["content-type"], "application/json");
        assert_eq!(with["event"]["properties"]["system"]["x-opt-sequence-number"], 3);
        assert_eq!(with["event"]["properties"]["application"]["alert"], "high");
        let text = json!({ "body": "plain text", "annotations": {} });
        assert_eq!(az_event(&text, false)["event"]["payload"], "plain text");
    }
}
