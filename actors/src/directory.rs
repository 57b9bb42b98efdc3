//! Where a request's hub is found: by name, or by the host name the client dialled.
//!
//! [`HubDirectory::resolve`] is the one function every front-end uses to map a host name
//! (HTTP `Host`, TLS SNI, MQTT username, SAS `sr`) to a hub (DESIGN.md §5); an unknown host
//! maps to the default hub when one is configured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use actix::Addr;
use dashmap::DashMap;

use crate::hub::HubActor;
use crate::model::hub::HubDescription;

/// What everyone may read about a hub without asking its actor.
pub struct HubShared {
    name: String,
    description: RwLock<Arc<HubDescription>>,
    connected: AtomicU64,
}

impl HubShared {
    pub fn new(description: HubDescription) -> Self {
        Self { name: description.name.clone(), description: RwLock::new(Arc::new(description)), connected: 0.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current settings (a cheap snapshot: an `Arc` clone).
    pub fn description(&self) -> Arc<HubDescription> {
        match self.description.read() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set_description(&self, next: HubDescription) {
        let next = Arc::new(next);
        match self.description.write() {
            Ok(mut d) => *d = next,
            Err(poisoned) => *poisoned.into_inner() = next,
        }
    }

    /// Identities with a live session, kept by the sessions as they attach and detach.
    pub fn connected_count(&self) -> u64 {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn session_attached(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn session_detached(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A live hub: its shared snapshot and its actor.
#[derive(Clone)]
pub struct HubHandle {
    pub shared: Arc<HubShared>,
    pub addr: Addr<HubActor>,
}

impl HubHandle {
    pub fn name(&self) -> &str {
        self.shared.name()
    }

    pub fn description(&self) -> Arc<HubDescription> {
        self.shared.description()
    }
}

/// Live hubs by name and by host name.
#[derive(Default)]
pub struct HubDirectory {
    by_name: DashMap<String, HubHandle>,
    by_host: DashMap<String, String>,
    default_hub: RwLock<Option<String>>,
}

/// `Host`/SNI text → the bare, lower-case host name (no port, no trailing dot).
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let bare = match host.strip_prefix('[') {
        // IPv6 literal: `[::1]:443`
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
            _ => host,
        },
    };
    bare.trim_end_matches('.').to_ascii_lowercase()
}

impl HubDirectory {
    /// The hub a client addressed by `host`; the default hub for an unknown host.
    pub fn resolve(&self, host: &str) -> Option<HubHandle> {
        let host = normalize_host(host);
        if let Some(name) = self.by_host.get(&host) {
            return self.get(name.value());
        }
        let default = self.default_hub.read().ok()?.clone()?;
        self.get(&default)
    }

    pub fn get(&self, name: &str) -> Option<HubHandle> {
        self.by_name.get(name).map(|h| h.value().clone())
    }

    /// Whether `host` is the host name of a hub (the TLS layer issues dev certificates for it).
    pub fn is_hub_host(&self, host: &str) -> bool {
        self.by_host.contains_key(&normalize_host(host))
    }

    pub fn all(&self) -> Vec<HubHandle> {
        let mut hubs: Vec<HubHandle> = self.by_name.iter().map(|h| h.value().clone()).collect();
        hubs.sort_by(|a, b| a.name().cmp(b.name()));
        hubs
    }

    pub fn set_default(&self, name: Option<String>) {
        if let Ok(mut d) = self.default_hub.write() {
            *d = name;
        }
    }

    pub(crate) fn insert(&self, handle: HubHandle) {
        let host = handle.description().properties.host_name.clone();
        self.by_host.insert(host, handle.name().to_owned());
        self.by_name.insert(handle.name().to_owned(), handle);
    }

    pub(crate) fn rehost(&self, name: &str, old_host: &str, new_host: &str) {
        if old_host != new_host {
            self.by_host.remove(old_host);
            self.by_host.insert(new_host.to_owned(), name.to_owned());
        }
    }

    pub(crate) fn remove(&self, name: &str) -> Option<HubHandle> {
        let (_, handle) = self.by_name.remove(name)?;
        self.by_host.remove(&handle.description().properties.host_name);
        Some(handle)
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_host;

    #[test]
    fn hosts_lose_port_and_case() {
        assert_eq!(normalize_host("MyHub.Azure-Devices.NET:443"), "myhub.azure-devices.net");
        assert_eq!(normalize_host("myhub.example."), "myhub.example");
        assert_eq!(normalize_host("[::1]:8443"), "::1");
        assert_eq!(normalize_host("127.0.0.1"), "127.0.0.1");
    }
}
