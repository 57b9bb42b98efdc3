//! Direct methods in a `DeviceActor` (service-api §6, device-protocol §2.7).
//!
//! A call waits for the device to be online — attached and subscribed to
//! `$iothub/methods/POST/#` — for up to its connect timeout (0 = it must be online now), then
//! goes to the session with a fresh `$rid`, and waits for the answer up to its response
//! timeout. Calls are never queued across a disconnect: one waiting for an answer when the
//! session ends fails with a timeout when its time runs out, as on Azure.

use std::time::Duration;

use actix::prelude::*;
use futures::channel::oneshot;

use super::DeviceActor;
use crate::messages::{
    InvokeMethod, MethodFailure, MethodRequest, MethodResponse, MethodResult, SessionCommand, SessionSubscriptions,
};

/// A call waiting for its device to come online.
pub(super) struct Waiting {
    id: u64,
    call: InvokeMethod,
    reply: oneshot::Sender<Result<MethodResult, MethodFailure>>,
}

/// A call sent to the device, waiting for its answer.
pub(super) struct Pending {
    reply: oneshot::Sender<Result<MethodResult, MethodFailure>>,
}

impl DeviceActor {
    fn online_for_methods(&self) -> bool {
        self.session.is_some() && self.methods_subscribed
    }

    /// Sends `call` to the attached session and arms its response timeout.
    fn dispatch(
        &mut self,
        call: InvokeMethod,
        reply: oneshot::Sender<Result<MethodResult, MethodFailure>>,
        ctx: &mut Context<Self>,
    ) {
        let Some(session) = &self.session else {
            let _ = reply.send(Err(MethodFailure::NotOnline));
            return;
        };
        self.next_rid += 1;
        let rid = self.next_rid.to_string();
        let command = SessionCommand::MethodRequest(Box::new(MethodRequest {
            name: call.name,
            rid: rid.clone(),
            payload: call.payload,
        }));
        if session.outbound.try_send(command).is_err() {
            // The session cannot take more: treat it as not reachable rather than queue.
            let _ = reply.send(Err(MethodFailure::NotOnline));
            return;
        }
        self.pending.insert(rid.clone(), Pending { reply });
        ctx.run_later(call.response_timeout, move |actor, _| {
            if let Some(p) = actor.pending.remove(&rid) {
                let _ = p.reply.send(Err(MethodFailure::Timeout));
            }
        });
    }

    /// Sends every waiting call once the device is online.
    pub(super) fn release_waiting(&mut self, ctx: &mut Context<Self>) {
        if !self.online_for_methods() {
            return;
        }
        for waiting in std::mem::take(&mut self.waiting) {
            self.dispatch(waiting.call, waiting.reply, ctx);
        }
    }
}

impl Handler<InvokeMethod> for DeviceActor {
    type Result = ResponseFuture<Result<MethodResult, MethodFailure>>;

    fn handle(&mut self, call: InvokeMethod, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.online_for_methods() {
            self.dispatch(call, tx, ctx);
        } else if call.connect_timeout.is_zero() {
            let _ = tx.send(Err(MethodFailure::NotOnline));
        } else {
            self.next_waiting += 1;
            let id = self.next_waiting;
            let wait = call.connect_timeout;
            self.waiting.push(Waiting { id, call, reply: tx });
            ctx.run_later(wait, move |actor, _| {
                if let Some(i) = actor.waiting.iter().position(|w| w.id == id) {
                    let w = actor.waiting.remove(i);
                    let _ = w.reply.send(Err(MethodFailure::NotOnline));
                }
            });
        }
        let (store, hub, key) = (self.store.clone(), self.hub.name().to_owned(), self.key.clone());
        let me = ctx.address();
        Box::pin(async move {
            match rx.await.unwrap_or(Err(MethodFailure::Timeout)) {
                // "Not online" for an identity that does not exist is "not found".
                Err(MethodFailure::NotOnline) => match store.get_identity(&hub, &key).await {
                    Ok(Some(_)) => Err(MethodFailure::NotOnline),
                    Ok(None) => {
                        me.do_send(StopIfUnknown);
                        Err(MethodFailure::NotFound(key))
                    }
                    Err(e) => Err(MethodFailure::Store(e)),
                },
                other => other,
            }
        })
    }
}

impl Handler<MethodResponse> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: MethodResponse, _: &mut Context<Self>) {
        let from_attached = self.session.as_ref().is_some_and(|s| s.connection_id == msg.connection_id);
        if !from_attached {
            return;
        }
        if let Some(p) = self.pending.remove(&msg.rid) {
            let _ = p.reply.send(Ok(MethodResult { status: msg.status, payload: msg.payload }));
        }
    }
}

impl Handler<SessionSubscriptions> for DeviceActor {
    type Result = ();

    fn handle(&mut self, msg: SessionSubscriptions, ctx: &mut Context<Self>) {
        if self.session.as_ref().is_some_and(|s| s.connection_id == msg.connection_id) {
            self.methods_subscribed = msg.methods;
            self.desired_subscribed = msg.desired;
            self.c2d_subscribed = msg.c2d;
            self.c2d_at_most_once = msg.c2d_at_most_once;
            self.release_waiting(ctx);
            self.start_c2d(ctx);
        }
    }
}

/// Limits of service-api §6.
pub const RESPONSE_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 5..=300;
pub const CONNECT_TIMEOUT_MAX: u64 = 300;

/// The default response timeout (service-api §6).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Sent to itself by an actor that found its identity missing (see `stop_if_unknown`).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub(super) struct StopIfUnknown;

impl Handler<StopIfUnknown> for DeviceActor {
    type Result = ();

    fn handle(&mut self, _: StopIfUnknown, ctx: &mut Context<Self>) {
        self.stop_if_unknown(ctx);
    }
}
