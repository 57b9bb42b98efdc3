//! The default hub and the operator key, from configuration (foundation issue items 6–7).
//!
//! The default hub is created at first start from `[hub]`; on later starts the keys and host
//! name the configuration *gives* win over the stored ones (the conformance harness and
//! docker-compose pass `IOTHUBD_HUB__OWNER_KEY` every time), and keys it leaves empty keep
//! their stored (generated) values.

use std::io::Write;

use anyhow::Context;
use iothubd_actors::deployment::Deployment;
use iothubd_actors::model::hub::{
    EventHubEndpoints, EventsEndpoint, HubDescription, HubProperties, Sku, builtin_policies,
};
use iothubd_actors::model::identity::generate_key;

use crate::config::{Config, DefaultHubConfig};

/// The host name of the default hub: configured, or `{name}.azure-devices.net`.
pub fn default_host(cfg: &DefaultHubConfig) -> String {
    if cfg.hostname.is_empty() { format!("{}.azure-devices.net", cfg.name) } else { cfg.hostname.clone() }
}

/// Applies the keys the configuration gives to a hub's built-in policies.
fn apply_configured_keys(hub: &mut HubDescription, cfg: &DefaultHubConfig) -> bool {
    let mut changed = false;
    for (policy, key) in [
        ("iothubowner", &cfg.owner_key),
        ("service", &cfg.service_key),
        ("device", &cfg.device_key),
        ("registryRead", &cfg.registry_read_key),
        ("registryReadWrite", &cfg.registry_read_write_key),
    ] {
        if key.is_empty() {
            continue;
        }
        if let Some(p) = hub.properties.authorization_policies.iter_mut().find(|p| p.key_name == policy)
            && p.primary_key != *key
        {
            p.primary_key = key.clone();
            changed = true;
        }
    }
    changed
}

/// Creates or reconciles the default hub; returns its iothubowner connection string.
pub async fn ensure_default_hub(deployment: &Deployment, cfg: &DefaultHubConfig) -> anyhow::Result<Option<String>> {
    if cfg.name.is_empty() {
        deployment.directory().set_default(None);
        return Ok(None);
    }
    let host = default_host(cfg).to_ascii_lowercase();
    let hub = match deployment.directory().get(&cfg.name) {
        None => {
            let mut hub = HubDescription {
                name: cfg.name.clone(),
                etag: String::new(),
                sku: Sku::default(),
                properties: HubProperties {
                    host_name: host,
                    authorization_policies: builtin_policies(),
                    event_hub_endpoints: EventHubEndpoints {
                        events: EventsEndpoint {
                            partition_count: cfg.partition_count,
                            retention_time_in_days: cfg.retention_days,
                            ..Default::default()
                        },
                    },
                    ..Default::default()
                },
            };
            apply_configured_keys(&mut hub, cfg);
            deployment.create_hub(hub).await.context("cannot create the default hub")?
        }
        Some(handle) => {
            let mut hub = (*handle.description()).clone();
            let mut changed = apply_configured_keys(&mut hub, cfg);
            if hub.properties.host_name != host {
                hub.properties.host_name = host;
                changed = true;
            }
            if changed { deployment.update_hub(hub, None).await.context("cannot update the default hub")? } else { hub }
        }
    };
    deployment.directory().set_default(Some(hub.name.clone()));
    Ok(hub.connection_string("iothubowner"))
}

/// The operator API key: configured, or kept in `data_dir/operator.key` (generated once).
pub fn operator_key(cfg: &Config) -> anyhow::Result<String> {
    if !cfg.operator.key.is_empty() {
        return Ok(cfg.operator.key.clone());
    }
    let path = cfg.data_dir.join("operator.key");
    if let Ok(key) = std::fs::read_to_string(&path) {
        let key = key.trim().to_owned();
        if !key.is_empty() {
            return Ok(key);
        }
    }
    let key = generate_key();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(key.as_bytes())?;
    file.sync_all()?;
    Ok(key)
}

/// Path of the generated operator key file (for the start-up banner).
pub fn operator_key_file(cfg: &Config) -> Option<std::path::PathBuf> {
    cfg.operator.key.is_empty().then(|| cfg.data_dir.join("operator.key"))
}
