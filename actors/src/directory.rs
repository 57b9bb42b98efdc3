//! Where a request's hub is found: by name, or by the host name the client dialled.
//!
//! [`HubDirectory::resolve`] is the one function every front-end uses to map a host name
//! (HTTP `Host`, TLS SNI, MQTT username, SAS `sr`) to a hub (DESIGN.md §5); an unknown host
//! maps to the default hub when one is configured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use actix::{Actor, Addr, ArbiterHandle, Supervisor};
use dashmap::DashMap;
use tokio::sync::watch;

use crate::device::DeviceActor;
use crate::hub::HubActor;
use crate::model::hub::HubDescription;
use crate::model::identity::IdentityKey;
use crate::router::{ConnectionSequence, RouterActor, SystemEvent};
use crate::store::Store;

/// What everyone may read about a hub without asking its actor, and where its live device
/// actors are.
pub struct HubShared {
    name: String,
    description: RwLock<Arc<HubDescription>>,
    connected: AtomicU64,
    devices: DashMap<IdentityKey, Addr<DeviceActor>>,
    arbiters: Arc<[ArbiterHandle]>,
    store: Arc<dyn Store>,
    /// Bumped after every append to the hub's events log; readers wait on it.
    events_appended: watch::Sender<u64>,
    /// The router input for non-telemetry events; set once the router actor runs.
    router: OnceLock<Addr<RouterActor>>,
    connection_sequence: ConnectionSequence,
    limits: Limits,
    /// Feedback batches the service holds locks on (service-api §8).
    feedback: crate::feedback::FeedbackLocks,
}

/// Process-wide limits every hub applies (config `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most messages one identity's cloud-to-device queue holds (device-protocol §5.1: 50).
    pub c2d_queue_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { c2d_queue_depth: 50 }
    }
}

impl HubShared {
    pub fn new(
        description: HubDescription,
        arbiters: Arc<[ArbiterHandle]>,
        store: Arc<dyn Store>,
        limits: Limits,
    ) -> Self {
        Self {
            name: description.name.clone(),
            description: RwLock::new(Arc::new(description)),
            connected: 0.into(),
            devices: DashMap::new(),
            arbiters,
            store,
            events_appended: watch::channel(0).0,
            router: OnceLock::new(),
            connection_sequence: ConnectionSequence::default(),
            limits,
            feedback: Default::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn feedback(&self) -> &crate::feedback::FeedbackLocks {
        &self.feedback
    }

    pub(crate) fn set_router(&self, router: Addr<RouterActor>) {
        let _ = self.router.set(router);
    }

    /// Hands a non-telemetry event to the router; when its bounded input is full the event is
    /// counted and dropped rather than queued without bound.
    pub fn route(&self, event: SystemEvent) {
        let Some(router) = self.router.get() else { return };
        if router.try_send(event).is_err() {
            metrics::counter!("iothubd_router_dropped_total", "hub" => self.name.clone()).increment(1);
            tracing::warn!(hub = self.name, "router input full: a system event was dropped");
        }
    }

    /// The next `sequenceNumber` of a connection-state event (service-api §11).
    pub fn next_connection_sequence(&self) -> String {
        self.connection_sequence.next()
    }

    /// The identity's actor, started (on the arbiter its key hashes to) when not live.
    pub fn device(self: &Arc<Self>, key: &IdentityKey) -> Addr<DeviceActor> {
        if let Some(addr) = self.devices.get(key).filter(|a| a.connected()) {
            return addr.clone();
        }
        self.devices
            .entry(key.clone())
            .and_modify(|addr| {
                if !addr.connected() {
                    *addr = self.start_device(key);
                }
            })
            .or_insert_with(|| self.start_device(key))
            .clone()
    }

    fn start_device(self: &Arc<Self>, key: &IdentityKey) -> Addr<DeviceActor> {
        let (hub, actor_key, store) = (self.clone(), key.clone(), self.store.clone());
        let make = move |_: &mut actix::Context<DeviceActor>| DeviceActor::new(hub, actor_key, store);
        match arbiter_for(&self.arbiters, key) {
            Some(arbiter) => Supervisor::start_in_arbiter(&arbiter, make),
            None => DeviceActor::create(make),
        }
    }

    /// The identity's actor if it is live (no activation).
    pub fn live_device(&self, key: &IdentityKey) -> Option<Addr<DeviceActor>> {
        self.devices.get(key).map(|a| a.clone()).filter(Addr::connected)
    }

    /// Live actors of the modules of `device_id`.
    pub fn live_modules_of(&self, device_id: &str) -> Vec<Addr<DeviceActor>> {
        self.devices
            .iter()
            .filter(|e| e.key().is_module() && e.key().device_id == device_id)
            .map(|e| e.value().clone())
            .collect()
    }

    /// Called by a stopping device actor: forget it, unless a newer actor took its place.
    pub(crate) fn forget_device(&self, key: &IdentityKey, addr: &Addr<DeviceActor>) {
        self.devices.remove_if(key, |_, live| live == addr);
    }

    /// Live device actors (for tests and metrics).
    pub fn live_device_count(&self) -> usize {
        self.devices.len()
    }

    /// Tells readers of the events log that something was appended.
    pub fn signal_events_appended(&self) {
        self.events_appended.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that changes whenever events are appended to the hub's log.
    pub fn watch_events(&self) -> watch::Receiver<u64> {
        self.events_appended.subscribe()
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

/// The arbiter an actor with `key` lives on: a stable spread over the System's arbiters.
pub fn arbiter_for<K: std::hash::Hash + ?Sized>(arbiters: &[ArbiterHandle], key: &K) -> Option<ArbiterHandle> {
    use std::hash::Hasher;
    if arbiters.is_empty() {
        return None;
    }
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    Some(arbiters[(h.finish() % arbiters.len() as u64) as usize].clone())
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
