//! Configuration: one source of truth, `config/default.toml` (every key commented), overridden
//! by `IOTHUBD_<SECTION>__<KEY>` environment variables and then CLI flags (figment).
//!
//! A bad value fails at start with figment's message, which names the key and where it came from.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The defaults, compiled in so a binary without its source tree still starts.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the embedded store, the dev CA and generated keys live.
    pub data_dir: PathBuf,
    pub listen: ListenConfig,
    pub ports: PortsConfig,
    pub tls: TlsConfig,
    pub hub: DefaultHubConfig,
    pub store: StoreConfig,
    pub operator: OperatorConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Address every listener binds.
    pub address: IpAddr,
}

/// Listener ports; 0 binds an ephemeral port (tests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortsConfig {
    pub mqtts: u16,
    pub amqps: u16,
    pub https: u16,
    /// Used instead of `https` when the process may not bind a privileged port.
    pub https_fallback: u16,
    /// Prometheus metrics; 0 = only `/metrics` on the HTTPS port.
    pub metrics: u16,
    /// Plain MQTT for development; 0 = off. Never 1883 by default (other brokers own it).
    pub mqtt_plain: u16,
    /// Plain HTTP for development; 0 = off.
    pub http_plain: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain to serve; empty = a dev CA under `data_dir/tls` issues one.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// The hub created at first start; unknown host names map to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultHubConfig {
    /// Empty = no default hub (hubs only through the operator API).
    pub name: String,
    /// Host name clients use (`HostName=`); empty = `{name}.azure-devices.net`.
    pub hostname: String,
    /// Base64 keys of the built-in policies; empty = generated at first start.
    pub owner_key: String,
    pub service_key: String,
    pub device_key: String,
    pub registry_read_key: String,
    pub registry_read_write_key: String,
    pub partition_count: u32,
    pub retention_days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Embedded,
    Postgres,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// `postgres://user@host:port/db` when `backend = "postgres"`.
    pub postgres_url: String,
    /// PostgreSQL connection pool size.
    pub pool_size: usize,
    /// Embedded store: most writes committed by one fsync.
    pub max_batch: usize,
    /// Embedded store: bound of the write queue (backpressure beyond it).
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// Key of the operator (hub management) API; empty = generated into `data_dir/operator.key`.
    pub key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most messages one identity's cloud-to-device queue holds (Azure: 50).
    pub c2d_queue_depth: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// tracing `EnvFilter` directive, e.g. `info` or `iothubd=debug,info`.
    pub filter: String,
}

impl Config {
    /// Defaults ← optional TOML file ← `IOTHUBD_*` environment ← `overrides` (CLI flags).
    pub fn load(file: Option<&Path>, overrides: &[(&str, figment::value::Value)]) -> Result<Self, figment::Error> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(f) = file {
            fig = fig.merge(Toml::file_exact(f));
        }
        // Only `IOTHUBD_DATA_DIR` and `IOTHUBD_<SECTION>__<KEY>` are configuration: other
        // IOTHUBD_ variables (IOTHUBD_TEST_POSTGRES_URL, the CLI's IOTHUBD_URL) are not, and an
        // unknown `<SECTION>__<KEY>` still fails with its name.
        let env = Env::prefixed("IOTHUBD_")
            .filter(|k| k == "data_dir" || k.as_str().contains("__"))
            .split("__")
            .map(|k| k.as_str().to_ascii_lowercase().into());
        fig = fig.merge(env);
        for (key, value) in overrides {
            fig = fig.merge(Serialized::global(key, value.clone()));
        }
        let cfg: Config = fig.extract()?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), figment::Error> {
        let bad = |key: &str, why: &str| Err(figment::Error::from(format!("invalid value for `{key}`: {why}")));
        if self.store.backend == StoreBackend::Postgres && self.store.postgres_url.is_empty() {
            return bad("store.postgres_url", "required when store.backend = \"postgres\"");
        }
        if self.store.pool_size == 0 || self.store.max_batch == 0 || self.store.queue_capacity == 0 {
            return bad("store", "pool_size, max_batch and queue_capacity must be at least 1");
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return bad("tls", "cert_file and key_file go together");
        }
        if !self.hub.name.is_empty() && !(2..=128).contains(&self.hub.partition_count) {
            return bad("hub.partition_count", "must be 2-128");
        }
        if !(1..=7).contains(&self.hub.retention_days) {
            return bad("hub.retention_days", "must be 1-7");
        }
        if !(1..=100_000).contains(&self.limits.c2d_queue_depth) {
            return bad("limits.c2d_queue_depth", "must be 1-100000");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_env_overrides_them() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("IOTHUBD_PORTS__HTTPS", "8443");
            jail.set_env("IOTHUBD_TEST_POSTGRES_URL", "postgres://ignored");
            jail.set_env("IOTHUBD_URL", "https://ignored");
            let cfg = Config::load(None, &[]).map_err(|e| e.to_string())?;
            assert_eq!(cfg.ports.https, 8443);
            assert_eq!(cfg.ports.mqtts, 8883);
            assert_eq!(cfg.store.backend, StoreBackend::Embedded);
            Ok(())
        });
    }

    #[test]
    fn flags_override_env() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("IOTHUBD_PORTS__HTTPS", "8443");
            let cfg = Config::load(None, &[("ports.https", 9443u64.into())]).map_err(|e| e.to_string())?;
            assert_eq!(cfg.ports.https, 9443);
            Ok(())
        });
    }

    #[test]
    fn bad_value_names_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("IOTHUBD_PORTS__HTTPS", "not-a-port");
            let err = Config::load(None, &[]).expect_err("a bad port must fail").to_string();
            assert!(err.to_ascii_lowercase().contains("ports.https"), "{err}");
            jail.set_env("IOTHUBD_PORTS__HTTPS", "443");
            jail.set_env("IOTHUBD_STORE__BACKEND", "postgres");
            let err = Config::load(None, &[]).expect_err("postgres without url must fail").to_string();
            assert!(err.contains("store.postgres_url"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unknown_section_key_is_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("IOTHUBD_PORTS__HTTPZ", "1");
            let err = Config::load(None, &[]).expect_err("unknown key must fail").to_string();
            assert!(err.to_ascii_lowercase().contains("httpz"), "{err}");
            Ok(())
        });
    }
}
