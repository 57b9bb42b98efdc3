//! The twin side of a `DeviceActor` (service-api §4, device-protocol §2.6).
//!
//! Twin operations are atomic per identity: each handler holds the actor's mailbox
//! (`AtomicResponse`) while it reads, changes and writes the twin, so two writers never
//! interleave. The store write is guarded by the version read; a write made elsewhere (a bulk
//! import) makes it fail, and the operation is retried once on a fresh read.

use actix::prelude::*;
use chrono::Utc;
use serde_json::Value;

use super::DeviceActor;
use crate::messages::{
    DesiredPatch, GetDeviceTwin, GetTwin, ReportProperties, SessionCommand, TwinFailure, TwinRead, UpdateTwin,
};
use crate::model::identity::{Identity, IdentityKey};
use crate::model::twin::{DesiredUpdate, Twin};
use crate::router::{EventSource, SystemEvent};
use crate::store::{Store, StoreError};

/// What a twin change produced besides the new twin.
struct Changed {
    twin: Twin,
    /// Read when the caller needs it (the service view), skipped on the device's hot path.
    identity: Option<Identity>,
    event: Option<(&'static str, Value)>,
    desired: Option<DesiredUpdate>,
}

/// What applying a change to a twin yields: the change event, and the desired-properties
/// notification for the device when desired changed.
type Applied = (Option<(&'static str, Value)>, Option<DesiredUpdate>);

fn store_failure(key: &IdentityKey, e: StoreError) -> TwinFailure {
    match e {
        StoreError::NotFound => TwinFailure::NotFound(key.clone()),
        StoreError::PreconditionFailed => TwinFailure::PreconditionFailed,
        other => TwinFailure::Store(other),
    }
}

/// The identity and its twin (the cached one when given, else the stored one, else new). The
/// identity is read only when `need_identity` or when nothing is cached (a new twin takes its
/// creation time): a device's reported patches touch only the twin.
async fn load(
    store: &dyn Store,
    hub: &str,
    key: &IdentityKey,
    cached: Option<Twin>,
    need_identity: bool,
) -> Result<(Option<Identity>, Twin, Option<u64>), TwinFailure> {
    let cached = match cached {
        Some(twin) if !need_identity => {
            let version = twin.version();
            return Ok((None, twin, Some(version)));
        }
        other => other,
    };
    let identity = store
        .get_identity(hub, key)
        .await
        .map_err(|e| store_failure(key, e))?
        .ok_or_else(|| TwinFailure::NotFound(key.clone()))?;
    let stored = match cached {
        Some(twin) => Some(twin),
        None => store.get_twin(hub, key).await.map_err(|e| store_failure(key, e))?,
    };
    let expected = stored.as_ref().map(Twin::version);
    let twin = stored.unwrap_or_else(|| Twin::new(identity.created_time));
    Ok((Some(identity), twin, expected))
}

/// Read, change with `apply`, write — retried once on a fresh read if the stored twin moved.
async fn change<F>(
    store: std::sync::Arc<dyn Store>,
    hub: String,
    key: IdentityKey,
    cached: Option<Twin>,
    need_identity: bool,
    apply: F,
) -> Result<Changed, TwinFailure>
where
    F: Fn(&mut Twin) -> Result<Applied, TwinFailure>,
{
    let mut cached = cached;
    for attempt in 0..2 {
        let (identity, mut twin, expected) = load(&*store, &hub, &key, cached.take(), need_identity).await?;
        let (event, desired) = apply(&mut twin)?;
        match store.replace_twin(&hub, &key, &twin, expected).await {
            Ok(()) => return Ok(Changed { twin, identity, event, desired }),
            Err(StoreError::PreconditionFailed) if attempt == 0 => continue,
            Err(e) => return Err(store_failure(&key, e)),
        }
    }
    Err(TwinFailure::PreconditionFailed)
}

impl DeviceActor {
    /// An actor activated for an identity that does not exist stops at once instead of
    /// waiting out the passivation timeout, so requests for random IDs cannot pile up actors.
    pub(super) fn stop_if_unknown(&self, ctx: &mut Context<Self>) {
        if self.session.is_none() && self.pending.is_empty() && self.waiting.is_empty() {
            ctx.stop();
        }
    }

    /// Desired changes go only to a connected, subscribed device; nothing is queued offline
    /// (device-protocol §2.6: devices re-GET after reconnecting).
    fn push_desired(&self, desired: DesiredUpdate) {
        if let (Some(session), true) = (&self.session, self.desired_subscribed) {
            let body = desired.body.to_string().into_bytes();
            let patch = DesiredPatch { version: desired.version, body };
            let _ = session.outbound.try_send(SessionCommand::DesiredPatch(Box::new(patch)));
        }
    }

    fn twin_event(&self, op_type: &'static str, body: Value) {
        self.hub.route(SystemEvent {
            source: EventSource::TwinChange,
            key: self.key.clone(),
            op_type,
            body,
            properties: Vec::new(),
        });
    }
}

impl Handler<GetTwin> for DeviceActor {
    type Result = AtomicResponse<Self, Result<TwinRead, TwinFailure>>;

    fn handle(&mut self, _: GetTwin, _: &mut Context<Self>) -> Self::Result {
        let (store, hub, key, cached) =
            (self.store.clone(), self.hub.name().to_owned(), self.key.clone(), self.twin.clone());
        let connected = self.session.is_some();
        let fut = async move {
            let (identity, twin, _) = load(&*store, &hub, &key, cached, true).await?;
            let identity = identity.ok_or_else(|| TwinFailure::NotFound(key.clone()))?;
            Ok(TwinRead { twin, identity, connected })
        };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|res: Result<TwinRead, TwinFailure>, actor, ctx| {
            match &res {
                Ok(read) => actor.twin = Some(read.twin.clone()),
                Err(TwinFailure::NotFound(_)) => actor.stop_if_unknown(ctx),
                Err(_) => {}
            }
            res
        })))
    }
}

impl Handler<UpdateTwin> for DeviceActor {
    type Result = AtomicResponse<Self, Result<TwinRead, TwinFailure>>;

    fn handle(&mut self, msg: UpdateTwin, _: &mut Context<Self>) -> Self::Result {
        let (store, hub, key, cached) =
            (self.store.clone(), self.hub.name().to_owned(), self.key.clone(), self.twin.clone());
        let apply = move |twin: &mut Twin| {
            if let Some(expected) = msg.if_match.as_deref().filter(|e| *e != "*") {
                if expected != twin.etag() {
                    return Err(TwinFailure::PreconditionFailed);
                }
            }
            let now = Utc::now();
            if msg.replace {
                let desired = twin
                    .replace(msg.tags.clone().unwrap_or_default(), msg.desired.clone().unwrap_or_default(), now)
                    .map_err(|e| TwinFailure::Invalid(e.to_string()))?;
                Ok((Some(("replaceTwin", Value::Null)), Some(desired)))
            } else {
                let update = twin
                    .patch(msg.tags.clone(), msg.desired.clone(), now)
                    .map_err(|e| TwinFailure::Invalid(e.to_string()))?;
                Ok((update.change_event.map(|body| ("updateTwin", body)), update.desired))
            }
        };
        let missing = key.clone();
        let fut = change(store, hub, key, cached, true, apply);
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |res, actor, ctx| {
            let changed = match res.and_then(|c| match c.identity {
                Some(identity) => Ok((c.twin, identity, c.event, c.desired)),
                None => Err(TwinFailure::NotFound(missing)),
            }) {
                Ok(c) => c,
                Err(e) => {
                    // The cache may be stale after a failed write; read afresh next time.
                    actor.twin = None;
                    if matches!(e, TwinFailure::NotFound(_)) {
                        actor.stop_if_unknown(ctx);
                    }
                    return Err(e);
                }
            };
            let (twin, identity, event, desired) = changed;
            actor.twin = Some(twin.clone());
            if let Some(desired) = desired {
                actor.push_desired(desired);
            }
            if let Some((op_type, body)) = event {
                // A replace's event body is the whole twin as written (service-api §11).
                let body = if body.is_null() {
                    let view = crate::model::twin::TwinIdentity::new(
                        &identity,
                        &crate::model::identity::ConnectionView::default(),
                        "",
                    );
                    twin.service_json(&view)
                } else {
                    body
                };
                actor.twin_event(op_type, body);
            }
            Ok(TwinRead { twin, identity, connected: actor.session.is_some() })
        })))
    }
}

impl Handler<ReportProperties> for DeviceActor {
    type Result = AtomicResponse<Self, Result<u64, TwinFailure>>;

    fn handle(&mut self, msg: ReportProperties, _: &mut Context<Self>) -> Self::Result {
        // Taken, not cloned: the mailbox waits for this change, and a failure drops the cache.
        let (store, hub, key, cached) =
            (self.store.clone(), self.hub.name().to_owned(), self.key.clone(), self.twin.take());
        let apply = move |twin: &mut Twin| {
            let update = twin.report(msg.0.clone(), Utc::now()).map_err(|e| TwinFailure::Invalid(e.to_string()))?;
            Ok((update.change_event.map(|body| ("updateTwin", body)), None))
        };
        let fut = change(store, hub, key, cached, false, apply);
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|res, actor, _| match res {
            Ok(changed) => {
                let version = changed.twin.reported_version();
                actor.twin = Some(changed.twin);
                if let Some((op_type, body)) = changed.event {
                    actor.twin_event(op_type, body);
                }
                Ok(version)
            }
            Err(e) => {
                actor.twin = None;
                Err(e)
            }
        })))
    }
}

impl Handler<GetDeviceTwin> for DeviceActor {
    type Result = AtomicResponse<Self, Result<Value, TwinFailure>>;

    fn handle(&mut self, _: GetDeviceTwin, _: &mut Context<Self>) -> Self::Result {
        let (store, hub, key, cached) =
            (self.store.clone(), self.hub.name().to_owned(), self.key.clone(), self.twin.take());
        let fut = async move { load(&*store, &hub, &key, cached, false).await.map(|(_, twin, _)| twin) };
        AtomicResponse::new(Box::pin(fut.into_actor(self).map(|res: Result<Twin, TwinFailure>, actor, _| {
            res.map(|twin| {
                let view = twin.device_json();
                actor.twin = Some(twin);
                view
            })
        })))
    }
}
