//! The settings of `iothubd simulate` as the user writes them: [`ScenarioOptions`] is both the
//! flags (clap) and the scenario file's keys (serde, kebab-case), one list so the two cannot
//! drift apart, with [`Seconds`] for durations. Every field is optional here; the scenario
//! resolves the defaults ([`super::Scenario::resolve`]).

use std::path::PathBuf;
use std::str::FromStr;

use clap::Args;
use serde::{Deserialize, Serialize};

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
    /// Raw mode: a twin request on sim/{i}/twin/req/{rid} (QoS 1), answered by a responder
    /// client on sim/{i}/twin/res/{rid}.
    #[arg(long)]
    pub twin_rate: Option<f64>,
    /// Twin update storm: keep this many reported PATCHes unanswered per device, sending the
    /// next as each answer ($iothub/twin/res/204) arrives (--twin-rate is then ignored).
    #[arg(long)]
    pub twin_in_flight: Option<u32>,
    /// Service side: direct-method calls per second over the devices, once all are connected
    /// (REST POST /twins/{id}/methods; raw mode: a request on sim/{i}/methods/req/{rid}
    /// answered on sim/{i}/methods/res/{rid}), round trip measured at the service; needs
    /// methods in --subscribe [default: 0].
    #[arg(long)]
    pub method_rate: Option<f64>,
    /// Service side: keep this many direct-method calls unanswered, the next made as one is
    /// answered (--method-rate is then ignored).
    #[arg(long)]
    pub method_in_flight: Option<u32>,
    /// Service side: C2D messages per second over the devices, once all are connected (REST
    /// POST /devices/{id}/messages/deviceBound; raw mode: QoS 1 on sim/{i}/c2d); deliveries
    /// and send → receive latency measured at the devices; needs c2d in --subscribe [default: 0].
    #[arg(long)]
    pub c2d_rate: Option<f64>,
    /// Service side: keep this many C2D sends in flight until accepted (the hub's 204, the
    /// broker's PUBACK), the next sent as one is: the C2D fan-out (--c2d-rate is then ignored).
    #[arg(long)]
    pub c2d_in_flight: Option<u32>,
    /// Service side: C2D messages per send, each to its own device (hub: one POST
    /// /messages/deviceBound, the batch send; raw mode: that many QoS 1 PUBLISHes written
    /// together); --c2d-in-flight and --c2d-rate still count messages [default: 1].
    #[arg(long)]
    pub c2d_batch: Option<u32>,
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
    /// --twin-rate or --twin-in-flight is given.
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
    /// Raw mode: plain MQTT to any broker (client id sim-{i}, telemetry on sim/{i}/events, no
    /// SAS, no provisioning), to measure another broker on the same workload. Methods, C2D and
    /// twin requests go over sim/{i}/… topics, the hub's part played by a service client and a
    /// twin responder of the broker (see README, "Simulating a fleet").
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub raw: Option<bool>,
    /// Local addresses to connect from, round-robin: a range 127.0.0.1-127.0.0.8 or a list
    /// a,b,c. Each address has its own ephemeral ports [default: chosen when one address'
    /// ports are not enough for a loopback target].
    #[arg(long)]
    pub source_addrs: Option<String>,
    /// The hub's connection string (a policy with RegistryWrite, e.g. iothubowner) for
    /// provisioning and its host name, and ServiceConnect for the service load [default: read from the hub's operator API with
    /// DATA_DIR/operator.key].
    #[arg(long, env = "IOTHUB_CONNECTION_STRING", hide_env_values = true)]
    pub connection_string: Option<String>,
    /// The hub's HTTPS endpoint host:port for provisioning and the service load [default:
    /// 127.0.0.1:443, then 8443].
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
}
