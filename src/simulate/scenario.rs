//! A simulation scenario: every setting of `iothubd simulate`, from a TOML file
//! (`--scenario FILE`, keys spelled as the flags: `connect-rate = 500`) and from flags — a flag
//! wins over the file — checked and resolved with its defaults into a [`Scenario`].
//!
//! [`ScenarioOptions`] is both the flags (clap) and the file (serde): one list of settings, so
//! the two cannot drift apart. Every field is optional there; defaults are applied once, in
//! [`Scenario::resolve`], and each flag's help names its default.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use ntex_mqtt::v3::codec::QoS;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::payload::{PayloadTemplate, parse_properties};
use super::system::parse_source_addrs;

/// `iothubd simulate`: simulated devices against a hub (or, with `--raw`, any MQTT broker).
#[derive(Debug, Clone, Default, Args)]
pub struct SimulateArgs {
    /// A TOML file with the scenario's settings, keys named as the flags (`connect-rate = 500`);
    /// flags given on the command line win over it.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// Boxed: the settings are many and the command enum holds this by value.
    #[command(flatten)]
    pub options: Box<ScenarioOptions>,
}

/// Every setting of a run; `None` = not given here (the file, then the default decides).
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ScenarioOptions {
    /// Simulated devices in the whole run, over all shards [default: 100].
    #[arg(long)]
    pub devices: Option<u32>,
    /// Device IDs are this prefix and the device's index: sim-0, sim-1, … [default: sim-].
    #[arg(long)]
    pub device_prefix: Option<String>,
    /// Secret the device keys are derived from (HMAC-SHA256(seed, device id)), so a rerun with
    /// the same seed needs no provisioning [default: iothubd-simulate].
    #[arg(long)]
    pub seed: Option<String>,
    /// New connections per second over the fleet, reconnects included [default: 500].
    #[arg(long)]
    pub connect_rate: Option<f64>,
    /// Telemetry messages per second per device; fractional is fine (0.1 = one every 10 s),
    /// 0 = no telemetry (idle devices) [default: 1].
    #[arg(long)]
    pub rate: Option<f64>,
    /// QoS of telemetry: 0 or 1 [default: 1].
    #[arg(long)]
    pub qos: Option<u8>,
    /// Telemetry body size in bytes: a JSON object with the device, sequence number, time and
    /// padding [default: 256]. Ignored with --payload-template.
    #[arg(long)]
    pub payload_size: Option<usize>,
    /// Telemetry body with `{device}`, `{seq}` and `{ts}` (Unix ms) replaced per message,
    /// e.g. '{"temp":21.5,"seq":{seq}}'.
    #[arg(long)]
    pub payload_template: Option<String>,
    /// Message properties on every telemetry message, `k=v,k2=v2`; system properties by their
    /// MQTT names (`$.ct=application/json,$.ce=utf-8`). Not sent in --raw mode.
    #[arg(long)]
    pub properties: Option<String>,
    /// How long to run: 90, 90s, 5m, 1h [default: 60s]. Ctrl-C ends it early (the report is
    /// still written).
    #[arg(long)]
    pub duration: Option<Seconds>,
    /// Reported-property PATCHes per second per device (fractional; 0 = none) [default: 0].
    #[arg(long)]
    pub twin_rate: Option<f64>,
    /// Reconnects per second over the fleet: a random connected device disconnects and
    /// connects again [default: 0].
    #[arg(long)]
    pub churn: Option<f64>,
    /// Saturation mode: keep this many telemetry PUBLISHes unacknowledged per device, sending
    /// the next as each PUBACK arrives (--rate is then ignored; needs QoS 1).
    #[arg(long)]
    pub in_flight: Option<u32>,
    /// MQTT keep-alive in seconds [default: 60].
    #[arg(long)]
    pub keep_alive: Option<u16>,
    /// What devices subscribe to: `methods` (answered with 200), `c2d` (completed), both
    /// comma-separated, or `none` [default: methods,c2d]. Twin responses are subscribed when
    /// --twin-rate > 0.
    #[arg(long)]
    pub subscribe: Option<String>,
    /// How devices talk to the hub: `mqtt`, or `https` (telemetry by `POST …/messages/events`,
    /// C2D by polling `GET …/messages/deviceBound` at most once a second; no twin, methods or
    /// churn) to the --https endpoint [default: mqtt].
    #[arg(long)]
    pub transport: Option<String>,
    /// MQTT endpoint host:port [default: 127.0.0.1:8883 (TLS); with --raw 127.0.0.1:1883].
    #[arg(long)]
    pub mqtt: Option<String>,
    /// Plain MQTT (no TLS) to the hub's development port (ports.mqtt_plain); needs --mqtt.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub plain: Option<bool>,
    /// Raw mode: plain MQTT to any broker (client id sim-{i}, topic sim/{i}/events, no SAS,
    /// no provisioning, no twin/methods/C2D), to measure another broker on the same workload.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub raw: Option<bool>,
    /// Local addresses to connect from, round-robin: a range 127.0.0.1-127.0.0.8 or a list
    /// a,b,c. Each address has its own ephemeral ports [default: chosen when one address'
    /// ports are not enough for a loopback target].
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// The hub's connection string (a policy with RegistryWrite, e.g. iothubowner) for
    /// provisioning and its host name [default: read from the hub's operator API with
    /// DATA_DIR/operator.key].
    #[arg(long, env = "IOTHUB_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// The hub's HTTPS endpoint host:port for provisioning [default: 127.0.0.1:443, then 8443].
    #[arg(long)]
    pub https: Option<String>,
    /// The hub's data directory: the dev CA and the operator key [default: ./iothubd-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// CA certificate to trust for HTTPS and MQTT over TLS [default: DATA_DIR/tls/ca.pem].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Hub name to look up through the operator API when no connection string is given
    /// [default: the only hub, or myhub].
    #[arg(long)]
    pub hub: Option<String>,
    /// Do not bulk-import the devices (they exist from a run with the same seed and prefix).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub skip_provision: Option<bool>,
    /// Run only shard i of N (1-based): devices [(i-1)·D/N, i·D/N) of the D devices, so a run
    /// larger than one process' open-file limit is split over N processes.
    #[arg(long)]
    pub shard: Option<String>,
    /// Where report.json and report.html go [default: ./simulate-report].
    #[arg(long)]
    pub report_dir: Option<PathBuf>,
    /// No live progress lines (the summary and the reports are still written).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub quiet: Option<bool>,
}

/// A duration in seconds, written `90`, `90s`, `500ms`, `5m` or `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(into = "f64")]
pub struct Seconds(pub f64);

impl From<Seconds> for f64 {
    fn from(s: Seconds) -> f64 {
        s.0
    }
}

impl FromStr for Seconds {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (number, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
            Some(i) => s.split_at(i),
            None => (s, "s"),
        };
        let n: f64 = number.trim().parse().map_err(|_| format!("'{s}' is not a duration like 90s, 5m or 1h"))?;
        let factor = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("'{s}': the unit must be ms, s, m or h")),
        };
        let secs = n * factor;
        if !secs.is_finite() || secs <= 0.0 {
            return Err(format!("'{s}' must be a positive duration"));
        }
        Ok(Seconds(secs))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Seconds::from_str(&n.to_string()).map_err(serde::de::Error::custom),
            Raw::Text(t) => Seconds::from_str(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// Azure IoT Hub devices, or plain MQTT clients of any broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Azure,
    Raw,
}

/// The device protocol of an Azure run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTransport {
    Mqtt,
    /// The HTTPS device API (device-protocol §3): one shared HTTP/1.1 client for the fleet.
    Https,
}

impl DeviceTransport {
    pub fn name(self) -> &'static str {
        match self {
            DeviceTransport::Mqtt => "mqtt",
            DeviceTransport::Https => "https",
        }
    }
}

/// This process' part of the fleet: shard `index` (1-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 1, count: 1 };

    fn parse(text: &str) -> anyhow::Result<Self> {
        let (i, n) = text.split_once('/').with_context(|| format!("--shard '{text}' must be i/N, e.g. 2/4"))?;
        let index: u32 = i.trim().parse().with_context(|| format!("--shard '{text}': i is not a number"))?;
        let count: u32 = n.trim().parse().with_context(|| format!("--shard '{text}': N is not a number"))?;
        if count == 0 || index == 0 || index > count {
            bail!("--shard '{text}': i must be between 1 and N");
        }
        Ok(Shard { index, count })
    }

    /// The device indexes of this shard among `devices`.
    pub fn range(&self, devices: u32) -> std::ops::Range<u32> {
        let at = |k: u32| u32::try_from(u64::from(devices) * u64::from(k) / u64::from(self.count)).unwrap_or(devices);
        at(self.index - 1)..at(self.index)
    }
}

/// A checked scenario with every default applied.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub devices: u32,
    pub device_prefix: String,
    pub seed: String,
    pub connect_rate: f64,
    pub rate: f64,
    pub qos: QoS,
    pub payload: PayloadTemplate,
    /// Application and system properties, already encoded as a property bag (§2.4).
    pub property_bag: String,
    pub duration: Duration,
    pub twin_rate: f64,
    pub churn: f64,
    pub in_flight: Option<u32>,
    pub keep_alive: u16,
    pub methods: bool,
    pub c2d: bool,
    pub mode: Mode,
    pub transport: DeviceTransport,
    pub mqtt: String,
    pub tls: bool,
    /// `None`: choose automatically.
    pub source_addrs: Option<Vec<IpAddr>>,
    pub connection_string: Option<String>,
    pub https: Option<String>,
    pub data_dir: PathBuf,
    pub ca: PathBuf,
    pub hub: Option<String>,
    pub provision: bool,
    pub shard: Shard,
    pub report_dir: PathBuf,
    pub progress: bool,
}

/// Largest telemetry body: IoT Hub's D2C message limit (device-protocol §5.4).
const MAX_PAYLOAD: usize = 256 * 1024;

impl Scenario {
    /// The scenario of `args`: the file (if any), overridden by the flags, then the defaults.
    pub fn from_args(args: &SimulateArgs) -> anyhow::Result<Self> {
        let mut figment = Figment::new();
        if let Some(path) = &args.scenario {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the scenario file {}", path.display()))?;
            figment = figment.merge(Toml::string(&text));
        }
        // Flags not given serialize as null; dropping them lets the file's values stand.
        let mut flags = serde_json::to_value(&args.options).context("flags")?;
        if let Value::Object(map) = &mut flags {
            map.retain(|_, v| !v.is_null());
        }
        let options: ScenarioOptions = figment.merge(Serialized::defaults(flags)).extract().map_err(|e| {
            let file = args.scenario.as_ref().map(|p| format!(" (scenario {})", p.display())).unwrap_or_default();
            anyhow::anyhow!("bad simulate setting{file}: {e}")
        })?;
        Self::resolve(options)
    }

    /// Applies the defaults to `o` and checks every value.
    pub fn resolve(o: ScenarioOptions) -> anyhow::Result<Self> {
        let rate_flag = |name: &str, v: Option<f64>, default: f64| -> anyhow::Result<f64> {
            let v = v.unwrap_or(default);
            if !v.is_finite() || v < 0.0 {
                bail!("--{name} must be a number ≥ 0, not {v}");
            }
            Ok(v)
        };
        let devices = o.devices.unwrap_or(100);
        if devices == 0 {
            bail!("--devices must be at least 1");
        }
        let connect_rate = rate_flag("connect-rate", o.connect_rate, 500.0)?;
        if connect_rate == 0.0 {
            bail!("--connect-rate must be above 0");
        }
        let qos = match o.qos.unwrap_or(1) {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            q => bail!("--qos must be 0 or 1 (IoT Hub refuses QoS 2, device-protocol §2.3), not {q}"),
        };
        if let Some(n) = o.in_flight {
            if n == 0 || n > 10_000 {
                bail!("--in-flight must be between 1 and 10000");
            }
            if qos == QoS::AtMostOnce {
                bail!("--in-flight counts unacknowledged PUBLISHes, so it needs --qos 1");
            }
        }
        let payload = match &o.payload_template {
            Some(t) => PayloadTemplate::parse(t)?,
            None => PayloadTemplate::sized(o.payload_size.unwrap_or(256)),
        };
        if payload.max_hint() > MAX_PAYLOAD {
            bail!("telemetry bodies are at most {MAX_PAYLOAD} bytes (IoT Hub's D2C limit)");
        }
        let properties = parse_properties(o.properties.as_deref().unwrap_or(""))?;
        let mode = if o.raw.unwrap_or(false) { Mode::Raw } else { Mode::Azure };
        let transport = match o.transport.as_deref().map(str::trim) {
            None | Some("mqtt") => DeviceTransport::Mqtt,
            Some("https") => DeviceTransport::Https,
            Some(other) => bail!("--transport must be mqtt or https, not '{other}'"),
        };
        let https_transport = transport == DeviceTransport::Https;
        // Over HTTPS a device can only poll for C2D: that is its default subscription.
        let subscribe_default = if https_transport { "c2d" } else { "methods,c2d" };
        let (methods, c2d) = parse_subscribe(o.subscribe.as_deref().unwrap_or(subscribe_default))?;
        if https_transport {
            let refuse = |what: &str| -> anyhow::Result<()> {
                bail!("{what} does not apply to --transport https (the HTTPS device API has no twin, methods or churn)")
            };
            if mode == Mode::Raw {
                bail!("--raw is plain MQTT: it does not go with --transport https");
            }
            if o.twin_rate.is_some_and(|r| r > 0.0) {
                refuse("--twin-rate")?;
            }
            if methods {
                refuse("--subscribe methods")?;
            }
            if o.churn.is_some_and(|c| c > 0.0) {
                refuse("--churn")?;
            }
            if qos == QoS::AtMostOnce {
                bail!("--qos 0 does not apply to --transport https: every HTTPS message is acknowledged (204)");
            }
        }
        let plain = o.plain.unwrap_or(false) || mode == Mode::Raw;
        let mqtt = match (o.mqtt, mode, plain) {
            (Some(m), ..) => m,
            (None, Mode::Raw, _) => "127.0.0.1:1883".to_owned(),
            (None, Mode::Azure, false) => "127.0.0.1:8883".to_owned(),
            (None, Mode::Azure, true) => {
                bail!("--plain needs --mqtt host:port: the hub's plain MQTT port (ports.mqtt_plain) is off by default")
            }
        };
        let keep_alive = o.keep_alive.unwrap_or(60);
        if keep_alive == 0 {
            bail!("--keep-alive must be at least 1 second");
        }
        let data_dir = o.data_dir.unwrap_or_else(|| PathBuf::from("./iothubd-data"));
        Ok(Scenario {
            devices,
            device_prefix: o.device_prefix.unwrap_or_else(|| "sim-".into()),
            seed: o.seed.unwrap_or_else(|| "iothubd-simulate".into()),
            connect_rate,
            rate: rate_flag("rate", o.rate, 1.0)?,
            qos,
            payload,
            property_bag: properties,
            duration: Duration::from_secs_f64(o.duration.map_or(60.0, |s| s.0)),
            twin_rate: rate_flag("twin-rate", o.twin_rate, 0.0)?,
            churn: rate_flag("churn", o.churn, 0.0)?,
            in_flight: o.in_flight,
            keep_alive,
            methods,
            c2d,
            mode,
            transport,
            mqtt,
            tls: !plain,
            source_addrs: o.source_addrs.as_deref().map(parse_source_addrs).transpose()?,
            connection_string: o.connection_string.filter(|c| !c.trim().is_empty()),
            https: o.https,
            ca: o.ca.unwrap_or_else(|| data_dir.join("tls").join("ca.pem")),
            data_dir,
            hub: o.hub,
            provision: mode == Mode::Azure && !o.skip_provision.unwrap_or(false),
            shard: o.shard.as_deref().map(Shard::parse).transpose()?.unwrap_or(Shard::WHOLE),
            report_dir: o.report_dir.unwrap_or_else(|| PathBuf::from("./simulate-report")),
            progress: !o.quiet.unwrap_or(false),
        })
    }

    /// The scenario as the report shows it (no secrets).
    pub fn describe(&self) -> Value {
        json!({
            "mode": match self.mode { Mode::Azure => "azure", Mode::Raw => "raw" },
            "transport": self.transport.name(),
            "https": self.https,
            "mqtt": self.mqtt,
            "tls": self.tls,
            "devices": self.devices,
            "device_prefix": self.device_prefix,
            "shard": format!("{}/{}", self.shard.index, self.shard.count),
            "connect_rate": self.connect_rate,
            "rate": self.rate,
            "in_flight": self.in_flight,
            "qos": u8::from(self.qos),
            "payload": self.payload.describe(),
            "property_bag": self.property_bag,
            "duration_s": self.duration.as_secs_f64(),
            "twin_rate": self.twin_rate,
            "churn": self.churn,
            "keep_alive_s": self.keep_alive,
            "subscribe": { "methods": self.methods, "c2d": self.c2d, "twin": self.twin_rate > 0.0 },
            "provisioned": self.provision,
        })
    }
}

fn parse_subscribe(text: &str) -> anyhow::Result<(bool, bool)> {
    let (mut methods, mut c2d) = (false, false);
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "methods" => methods = true,
            "c2d" => c2d = true,
            "none" => {}
            other => bail!("--subscribe: '{other}' is not one of methods, c2d, none"),
        }
    }
    Ok((methods, c2d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!("90".parse::<Seconds>(), Ok(Seconds(90.0)));
        assert_eq!("1.5m".parse::<Seconds>(), Ok(Seconds(90.0)));
        assert_eq!("500ms".parse::<Seconds>(), Ok(Seconds(0.5)));
        assert!("-1".parse::<Seconds>().is_err());
        assert!("3 days".parse::<Seconds>().is_err());
    }

    #[test]
    fn shards_split_the_devices_without_gaps() {
        let shards: Vec<_> = (1..=3).map(|i| Shard { index: i, count: 3 }.range(10)).collect();
        assert_eq!(shards, [0..3, 3..6, 6..10]);
        assert!(Shard::parse("0/2").is_err());
        assert!(Shard::parse("3/2").is_err());
        assert_eq!(Shard::parse("2/2").ok(), Some(Shard { index: 2, count: 2 }));
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("s.toml");
        std::fs::write(&file, "devices = 20\nrate = 0.5\nduration = \"2m\"\nraw = true\n").expect("write");
        let args = SimulateArgs {
            scenario: Some(file.clone()),
            options: Box::new(ScenarioOptions { rate: Some(3.0), ..Default::default() }),
        };
        let s = Scenario::from_args(&args).expect("valid");
        assert_eq!((s.devices, s.rate, s.duration), (20, 3.0, Duration::from_secs(120)));
        assert_eq!((s.mode, s.mqtt.as_str(), s.tls, s.provision), (Mode::Raw, "127.0.0.1:1883", false, false));

        std::fs::write(&file, "devcies = 20\n").expect("write");
        let err = Scenario::from_args(&args).expect_err("typo refused").to_string();
        assert!(err.contains("devcies"), "{err}");
    }

    #[test]
    fn the_example_scenarios_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/scenarios") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let args = SimulateArgs { scenario: Some(path.clone()), options: Box::default() };
                Scenario::from_args(&args).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3, "{seen} example scenarios");
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_name() {
        let bad = |o: ScenarioOptions| Scenario::resolve(o).expect_err("refused").to_string();
        assert!(bad(ScenarioOptions { qos: Some(2), ..Default::default() }).contains("--qos"));
        assert!(bad(ScenarioOptions { rate: Some(-1.0), ..Default::default() }).contains("--rate"));
        assert!(bad(ScenarioOptions { plain: Some(true), ..Default::default() }).contains("--mqtt"));
        let saturating_qos0 = ScenarioOptions { in_flight: Some(4), qos: Some(0), ..Default::default() };
        assert!(bad(saturating_qos0).contains("--in-flight"));
        let https = || ScenarioOptions { transport: Some("https".into()), ..Default::default() };
        assert!(bad(ScenarioOptions { twin_rate: Some(1.0), ..https() }).contains("--twin-rate"));
        assert!(bad(ScenarioOptions { subscribe: Some("methods".into()), ..https() }).contains("--subscribe methods"));
        assert!(bad(ScenarioOptions { transport: Some("amqp".into()), ..Default::default() }).contains("--transport"));
        let s = Scenario::resolve(https()).expect("https alone is valid");
        assert_eq!((s.transport, s.methods, s.c2d), (DeviceTransport::Https, false, true));
    }
}
