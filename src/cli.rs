//! The command line: `iothubd serve` runs the hub; `iothubd hub …` manages hubs through the
//! operator API of a running hub; `iothubd monitor-events` prints a hub's events.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use figment::value::Value as FigValue;
use serde_json::{Value, json};
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::server;

#[derive(Debug, Parser)]
#[command(name = "iothubd", version, about = "A self-hosted hub for the unmodified Azure IoT SDKs")]
struct Cli {
    /// What to do; without one, `serve` with the defaults (so `cargo run --release` runs a hub).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the hub (default hub, TLS dev CA and embedded store unless configured otherwise).
    Serve(ServeArgs),
    /// Manage the hubs of a running iothubd through its operator API.
    Hub(HubArgs),
    /// Print a hub's device-to-cloud events as they arrive (like `az iot hub monitor-events`).
    MonitorEvents(crate::monitor::MonitorArgs),
    /// Simulate devices against a hub (or, with --raw, any MQTT broker) and report on it.
    Simulate(crate::simulate::SimulateArgs),
}

#[derive(Debug, Default, Args)]
struct ServeArgs {
    /// A TOML file layered over config/default.toml (IOTHUBD_* variables and flags win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the store, the dev CA and generated keys live (data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// HTTPS port (ports.https).
    #[arg(long)]
    https_port: Option<u16>,
    /// MQTT over TLS port (ports.mqtts).
    #[arg(long)]
    mqtts_port: Option<u16>,
    /// AMQP over TLS port (ports.amqps).
    #[arg(long)]
    amqps_port: Option<u16>,
    /// Store backend: embedded or postgres (store.backend).
    #[arg(long)]
    store: Option<String>,
    /// PostgreSQL URL (store.postgres_url).
    #[arg(long)]
    postgres_url: Option<String>,
}

#[derive(Debug, Args)]
struct HubArgs {
    /// Base URL of the hub's HTTPS endpoint.
    #[arg(long, env = "IOTHUBD_URL", default_value = "https://localhost:443", global = true)]
    url: String,
    /// Operator key; default: read from <data-dir>/operator.key.
    #[arg(long, env = "IOTHUBD_OPERATOR_KEY", global = true, hide_env_values = true)]
    operator_key: Option<String>,
    /// CA certificate to trust; default: <data-dir>/tls/ca.pem (the dev CA).
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Data directory of the hub (for the default operator key and CA).
    #[arg(long, env = "IOTHUBD_DATA_DIR", default_value = "./iothubd-data", global = true)]
    data_dir: PathBuf,
    #[command(subcommand)]
    action: HubAction,
}

#[derive(Debug, Subcommand)]
enum HubAction {
    /// Create a hub.
    Create {
        name: String,
        /// Host name clients dial; default <name>.azure-devices.net.
        #[arg(long)]
        host_name: Option<String>,
        /// Partitions of the built-in events endpoint (2-128).
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// Retention of the events endpoint in days (1-7).
        #[arg(long, default_value_t = 1)]
        retention_days: u32,
        #[arg(long, default_value = "S1")]
        sku: String,
        #[arg(long, default_value_t = 1)]
        capacity: u32,
    },
    /// List hubs.
    List,
    /// Show one hub (ARM JSON, keys included).
    Show { name: String },
    /// Delete a hub and all its data.
    Delete { name: String },
    /// Print a hub's connection string for a policy.
    ConnectionString {
        name: String,
        #[arg(long, default_value = "iothubowner")]
        policy: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or_else(|| Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::Hub(args) => hub(args),
        Command::MonitorEvents(args) => crate::monitor::main(args),
        Command::Simulate(args) => crate::simulate::main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iothubd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut overrides: Vec<(&str, FigValue)> = Vec::new();
    if let Some(d) = &args.data_dir {
        overrides.push(("data_dir", d.display().to_string().into()));
    }
    for (key, port) in
        [("ports.https", args.https_port), ("ports.mqtts", args.mqtts_port), ("ports.amqps", args.amqps_port)]
    {
        if let Some(p) = port {
            overrides.push((key, FigValue::from(p as u64)));
        }
    }
    if let Some(s) = &args.store {
        overrides.push(("store.backend", s.clone().into()));
    }
    if let Some(u) = &args.postgres_url {
        overrides.push(("store.postgres_url", u.clone().into()));
    }
    Ok(Config::load(args.config.as_deref(), &overrides)?)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = serve_config(&args)?;
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&cfg.log.filter))?;
    // Logs on stderr, so stdout carries only the banner (and the connection string in it).
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let key_file = crate::hubs::operator_key_file(&cfg);
    let data_dir = cfg.data_dir.clone();
    let server = server::start(cfg)?;
    print_banner(&server.info, &data_dir, key_file.as_deref());
    wait_for_signal()?;
    println!("iothubd: stopping (finishing in-flight requests, flushing the store)");
    server.shutdown()
}

fn print_banner(info: &server::StartupInfo, data_dir: &Path, key_file: Option<&Path>) {
    println!(
        "iothubd {} ready — store: {}, data: {}",
        env!("CARGO_PKG_VERSION"),
        info.store_backend,
        data_dir.display()
    );
    if let Some(why) = &info.https_fallback_reason {
        println!("  note: {why}");
    }
    println!("  HTTPS     https://{}  (service REST, operator API, /health, /metrics)", info.https);
    if let Some(a) = info.mqtts {
        println!("  MQTTS     mqtts://{a}  (devices; MQTT 3.1.1 over TLS)");
    }
    if let Some(a) = info.mqtt_plain {
        println!("  MQTT      mqtt://{a}  (plain, development only)");
    }
    if let Some(a) = info.http_plain {
        println!("  HTTP      http://{a}  (plain, development only)");
    }
    if let Some(a) = info.metrics {
        println!("  metrics   http://{a}/metrics");
    }
    if let Some(ca) = &info.ca_file {
        println!(
            "  TLS       dev CA {} — trust it in clients (REQUESTS_CA_BUNDLE, server_verification_cert, --cacert)",
            ca.display()
        );
    }
    match &info.owner_connection_string {
        Some(cs) => println!("  default hub connection string:\n    {cs}"),
        None => println!("  no default hub configured (hub.name is empty)"),
    }
    match key_file {
        Some(f) => println!("  operator key in {}", f.display()),
        None => println!("  operator key from configuration (operator.key)"),
    }
}

fn wait_for_signal() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    Ok(())
}

fn hub(args: HubArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(hub_command(args))
}

async fn hub_command(args: HubArgs) -> anyhow::Result<()> {
    let key = match &args.operator_key {
        Some(k) => k.clone(),
        None => {
            let path = args.data_dir.join("operator.key");
            std::fs::read_to_string(&path)
                .with_context(|| format!("no --operator-key given and cannot read {}", path.display()))?
                .trim()
                .to_owned()
        }
    };
    let ca = args.ca.clone().unwrap_or_else(|| args.data_dir.join("tls").join("ca.pem"));
    let client = crate::client::trusting(&ca)?;
    let base = args.url.trim_end_matches('/');
    let call = |method: reqwest::Method, path: String| {
        client.request(method, format!("{base}/operator/hubs{path}")).bearer_auth(&key)
    };
    let reply = |r: reqwest::Response| async move {
        let status = r.status();
        let body: Value = if status == reqwest::StatusCode::NO_CONTENT { Value::Null } else { r.json().await? };
        if !status.is_success() {
            bail!("{status}: {}", body.pointer("/error/message").and_then(Value::as_str).unwrap_or("request failed"));
        }
        Ok(body)
    };
    match args.action {
        HubAction::Create { name, host_name, partitions, retention_days, sku, capacity } => {
            let mut props = json!({
                "eventHubEndpoints": { "events": { "partitionCount": partitions, "retentionTimeInDays": retention_days } },
            });
            if let Some(h) = host_name {
                props["hostName"] = json!(h);
            }
            let body = json!({ "name": name, "sku": { "name": sku, "capacity": capacity }, "properties": props });
            let existing = call(reqwest::Method::GET, format!("/{name}")).send().await?;
            if existing.status().is_success() {
                bail!("hub {name} already exists");
            }
            let hub = reply(call(reqwest::Method::PUT, format!("/{name}")).json(&body).send().await?).await?;
            println!(
                "created hub {name} ({})",
                hub.pointer("/properties/hostName").and_then(Value::as_str).unwrap_or("")
            );
            print_connection_string(&hub, "iothubowner")?;
        }
        HubAction::List => {
            let hubs = reply(call(reqwest::Method::GET, String::new()).send().await?).await?;
            for hub in hubs["value"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\tpartitions={}",
                    hub["name"].as_str().unwrap_or(""),
                    hub.pointer("/properties/hostName").and_then(Value::as_str).unwrap_or(""),
                    hub.pointer("/properties/eventHubEndpoints/events/partitionCount").unwrap_or(&Value::Null)
                );
            }
        }
        HubAction::Show { name } => {
            let hub = reply(call(reqwest::Method::GET, format!("/{name}")).send().await?).await?;
            println!("{}", serde_json::to_string_pretty(&hub)?);
        }
        HubAction::Delete { name } => {
            reply(call(reqwest::Method::DELETE, format!("/{name}")).send().await?).await?;
            println!("deleted hub {name}");
        }
        HubAction::ConnectionString { name, policy } => {
            let hub = reply(call(reqwest::Method::GET, format!("/{name}")).send().await?).await?;
            print_connection_string(&hub, &policy)?;
        }
    }
    Ok(())
}

fn print_connection_string(hub: &Value, policy: &str) -> anyhow::Result<()> {
    let host = hub.pointer("/properties/hostName").and_then(Value::as_str).unwrap_or("");
    let policies = hub.pointer("/properties/authorizationPolicies").and_then(Value::as_array);
    let p = policies
        .into_iter()
        .flatten()
        .find(|p| p["keyName"] == policy)
        .with_context(|| format!("the hub has no policy {policy}"))?;
    println!("HostName={host};SharedAccessKeyName={policy};SharedAccessKey={}", p["primaryKey"].as_str().unwrap_or(""));
    Ok(())
}
