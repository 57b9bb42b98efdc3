//! A simulation scenario: every setting of `iothubd simulate`, from a TOML file
//! (`--scenario FILE`, keys spelled as the flags: `connect-rate = 500`) and from flags — a flag
//! wins over the file — checked and resolved with its defaults into a [`Scenario`].
//!
//! [`ScenarioOptions`] ([`options`]) is both the flags (clap) and the file (serde): one list of
//! settings, so the two cannot drift apart. Every field is optional there; defaults are applied
//! once, in [`Scenario::resolve`], and each flag's help names its default.

mod options;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use ntex_mqtt::v3::codec::QoS;
use serde_json::{Value, json};

pub use options::{ScenarioOptions, Seconds, SimulateArgs};

use super::payload::{PayloadTemplate, parse_properties};
use super::service::{Load, MAX_C2D_BATCH, ServiceLoad};
use super::system::parse_source_addrs;

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
    pub twin_in_flight: Option<u32>,
    /// What the service does to the devices (methods, C2D).
    pub service: ServiceLoad,
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
            if o.twin_in_flight.is_some() {
                refuse("--twin-in-flight")?;
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
        let c2d_batch = o.c2d_batch.unwrap_or(1);
        if c2d_batch == 0 || c2d_batch as usize > MAX_C2D_BATCH {
            bail!("--c2d-batch must be between 1 and {MAX_C2D_BATCH}");
        }
        let service = ServiceLoad {
            methods: Load::of("method", o.method_rate, o.method_in_flight)?,
            c2d: Load::of("c2d", o.c2d_rate, o.c2d_in_flight)?,
            c2d_batch: c2d_batch as usize,
        };
        if service.methods.is_on() && !methods {
            bail!("--method-rate / --method-in-flight need devices that answer: add methods to --subscribe");
        }
        if service.c2d.is_on() && !c2d {
            bail!("--c2d-rate / --c2d-in-flight need devices that receive: add c2d to --subscribe");
        }
        if let Some(n) = o.twin_in_flight
            && (n == 0 || n > 10_000)
        {
            bail!("--twin-in-flight must be between 1 and 10000");
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
            twin_in_flight: o.twin_in_flight,
            service,
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
            "twin_in_flight": self.twin_in_flight,
            "service": {
                "methods": self.service.methods.describe(),
                "c2d": self.service.c2d.describe(),
                "c2d_batch": self.service.c2d_batch,
            },
            "churn": self.churn,
            "keep_alive_s": self.keep_alive,
            "subscribe": {
                "methods": self.methods,
                "c2d": self.c2d,
                "twin": self.twin_rate > 0.0 || self.twin_in_flight.is_some(),
            },
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
        assert!(bad(ScenarioOptions { twin_in_flight: Some(1), ..https() }).contains("--twin-in-flight"));
    }

    #[test]
    fn service_load_needs_the_devices_to_subscribe() {
        let bad = |o: ScenarioOptions| Scenario::resolve(o).expect_err("refused").to_string();
        let only = |what: &str| ScenarioOptions { subscribe: Some(what.into()), ..Default::default() };
        assert!(bad(ScenarioOptions { method_rate: Some(10.0), ..only("c2d") }).contains("add methods"));
        assert!(bad(ScenarioOptions { c2d_in_flight: Some(8), ..only("methods") }).contains("add c2d"));
        assert!(bad(ScenarioOptions { twin_in_flight: Some(0), ..Default::default() }).contains("--twin-in-flight"));
        let raw = ScenarioOptions {
            raw: Some(true),
            method_rate: Some(100.0),
            c2d_in_flight: Some(64),
            ..only("methods,c2d")
        };
        let s = Scenario::resolve(raw).expect("raw service load is valid");
        assert_eq!(s.service, ServiceLoad { methods: Load::Rate(100.0), c2d: Load::InFlight(64), c2d_batch: 1 });
        assert_eq!(s.describe()["service"]["c2d"]["in_flight"], 64);
    }
}
