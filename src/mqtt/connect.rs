//! CONNECT (device-protocol §2.1–2.3): who is connecting, are they allowed, and the session
//! that speaks for the identity from now on.
//!
//! Order of checks, each with its CONNACK code (§2.2): username and client id (2 when the
//! client id does not match the username's identity, 4 when the username cannot be read), the
//! hub (5), the password as a SAS token (4 when it is not one), the identity and the token
//! (5: bad signature, expired, unknown or disabled identity, wrong scope, no DeviceConnect),
//! the store being reachable (3). A CONNECT without a password authenticates with the TLS
//! client certificate instead (X.509, device-protocol §1.4). Then the identity's `DeviceActor` takes the session; an
//! older session of the same identity is closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use iothubd_actors::deployment::Deployment;
use iothubd_actors::ingest::{AuthMethod, Ingest, Sender};
use iothubd_actors::messages::{
    AttachSession, C2dDelivery, C2dOutcome, DisconnectReason, MethodRequest, SessionCommand, SettleC2d,
};
use iothubd_actors::model::c2d::FeedbackMode;
use iothubd_actors::model::identity::IdentityKey;
use ntex::time::Seconds;
use ntex_mqtt::v3;
use ntex_mqtt::v3::codec::ConnectAckReason;
use ntex_tls::rustls::PeerCertChain;
use tokio::sync::mpsc;

use super::bag::{PropertyBag, SystemProperties};
use super::session::{MqttSession, SharedFlags};
use super::topic::{self, parse_username};
use crate::auth::{self, Principal, SasToken};

/// Azure's load balancer idle limit: keep-alive is enforced at 1.5 × the client's value, at
/// most this (device-protocol §2.1).
const MAX_IDLE_SECONDS: u16 = 1767;

/// Commands a device actor may queue for a session before it must drain them (room for a full
/// window of C2D deliveries besides method requests and desired patches; tokio allocates the
/// channel's slots in blocks of 32 either way).
const SESSION_COMMAND_QUEUE: usize = 16;

/// What every connection shares (one per process; `Send + Sync`).
pub struct MqttContext {
    pub deployment: Deployment,
    pub ingest: Ingest,
    next_connection_id: AtomicU64,
}

impl MqttContext {
    pub fn new(deployment: Deployment, ingest: Ingest) -> Self {
        Self { deployment, ingest, next_connection_id: AtomicU64::new(1) }
    }
}

/// Errors that end a connection after CONNECT (MQTT 3.1.1 can only close).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Refused(String),
}

impl From<()> for SessionError {
    fn from(_: ()) -> Self {
        SessionError::Refused("service initialization failed".into())
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// 1.5 × keep-alive, capped; 0 (no keep-alive) means no idle limit.
fn idle_timeout(keep_alive: u16) -> Seconds {
    if keep_alive == 0 {
        return Seconds::ZERO;
    }
    Seconds(((u32::from(keep_alive) * 3).div_ceil(2)).min(u32::from(MAX_IDLE_SECONDS)) as u16)
}

pub async fn handshake(
    ctx: Arc<MqttContext>,
    handshake: v3::Handshake,
) -> Result<v3::HandshakeAck<MqttSession>, SessionError> {
    let pkt = handshake.packet().clone();
    let refuse = |code: ConnectAckReason, why: &str| {
        tracing::debug!(client_id = %pkt.client_id, ?code, "CONNECT refused: {why}");
        code
    };
    let Some(username) = pkt.username.as_deref().map(parse_username).and_then(Result::ok) else {
        let code = refuse(ConnectAckReason::BadUserNameOrPassword, "unreadable username");
        return Ok(handshake.failed(code));
    };
    let key = match &username.module_id {
        Some(m) => IdentityKey::module(username.device_id.clone(), m.clone()),
        None => IdentityKey::device(username.device_id.clone()),
    };
    if pkt.client_id.as_str() != key.to_string() {
        let code = refuse(ConnectAckReason::IdentifierRejected, "client id differs from the username's identity");
        return Ok(handshake.failed(code));
    }
    let Some(hub) = ctx.deployment.directory().resolve(&username.host) else {
        return Ok(handshake.failed(refuse(ConnectAckReason::NotAuthorized, "no hub for the host")));
    };
    let description = hub.description();
    let now = unix_now();
    let (identity, method, expiry) = match pkt.password.as_ref() {
        Some(password) => {
            let Ok(password) = std::str::from_utf8(password) else {
                return Ok(handshake.failed(refuse(ConnectAckReason::BadUserNameOrPassword, "password is not UTF-8")));
            };
            let token = match SasToken::parse(password) {
                Ok(t) => t,
                Err(e) => {
                    return Ok(handshake.failed(refuse(ConnectAckReason::BadUserNameOrPassword, &e.to_string())));
                }
            };
            let identity = match ctx.deployment.store().get_identity(hub.name(), &key).await {
                Ok(identity) => identity,
                Err(e) => return Ok(handshake.failed(refuse(ConnectAckReason::ServiceUnavailable, &e.to_string()))),
            };
            let principal = match auth::authorize_identity(&description, &token, identity.as_ref(), &key, now) {
                Ok(p) => p,
                Err(e) => {
                    let code = if e.connack_code() == 4 {
                        ConnectAckReason::BadUserNameOrPassword
                    } else {
                        ConnectAckReason::NotAuthorized
                    };
                    return Ok(handshake.failed(refuse(code, &e.to_string())));
                }
            };
            let Some(identity) = identity else {
                return Ok(handshake.failed(refuse(ConnectAckReason::NotAuthorized, "unknown identity")));
            };
            let method = match principal {
                Principal::Policy { .. } => AuthMethod::PolicySas,
                Principal::Identity(_) => AuthMethod::IdentitySas,
            };
            (identity, method, Some(token.expiry()))
        }
        // X.509 clients send no password (device-protocol §1.4): the TLS client certificate
        // speaks for them.
        None => {
            let chain = handshake.io().query::<PeerCertChain<'static>>();
            let Some(PeerCertChain(chain)) = chain.as_ref() else {
                return Ok(handshake.failed(refuse(ConnectAckReason::NotAuthorized, "no password and no certificate")));
            };
            let identity = match ctx.deployment.store().get_identity(hub.name(), &key).await {
                Ok(identity) => identity,
                Err(e) => return Ok(handshake.failed(refuse(ConnectAckReason::ServiceUnavailable, &e.to_string()))),
            };
            let cas = &description.properties.ca_certificates;
            let kind = match auth::x509::authorize_certificate(identity.as_ref(), &key, chain, cas) {
                Ok(kind) => kind,
                Err(e) => return Ok(handshake.failed(refuse(ConnectAckReason::NotAuthorized, &e.to_string()))),
            };
            let Some(identity) = identity else {
                return Ok(handshake.failed(refuse(ConnectAckReason::NotAuthorized, "unknown identity")));
            };
            (identity, AuthMethod::X509(kind), None)
        }
    };
    let sender = Sender::new(&hub.shared, &identity, method, username.model_id.clone());

    let connection_id = ctx.next_connection_id.fetch_add(1, Ordering::Relaxed);
    let (outbound, mut commands) = mpsc::channel(SESSION_COMMAND_QUEUE);
    let actor = hub.shared.device(&key);
    let attach = AttachSession { connection_id, outbound, clean_session: pkt.clean_session };
    let outcome = match actor.send(attach).await {
        Ok(o) => o,
        Err(e) => return Ok(handshake.failed(refuse(ConnectAckReason::ServiceUnavailable, &e.to_string()))),
    };

    let flags = SharedFlags::new();
    // One task per session carries out the actor's commands on this connection's thread (the
    // sink is tied to it, DESIGN.md §10) and ends the session when its token does
    // (device-protocol §1.3; SDKs reconnect with a new one). One task, not two: an idle
    // connection's memory is what limits how many devices a hub holds.
    let sink = handshake.sink();
    let task_flags = flags.clone();
    let task_actor = actor.clone();
    let (closed, connection_gone) = futures::channel::oneshot::channel::<()>();
    let lifetime = expiry.map(|expiry| std::time::Duration::from_secs(expiry.saturating_sub(now)));
    ntex::rt::spawn(async move {
        let expired = async {
            match lifetime {
                Some(lifetime) => ntex::time::sleep(lifetime).await,
                None => std::future::pending().await,
            }
        };
        let mut expired = std::pin::pin!(expired);
        let mut connection_gone = connection_gone;
        loop {
            tokio::select! {
                biased;
                // The session was dropped: the connection is gone already.
                _ = &mut connection_gone => return,
                command = commands.recv() => match command {
                    Some(SessionCommand::Close(_)) => {
                        task_flags.reason.set(DisconnectReason::TakenOver);
                        sink.close();
                    }
                    // Hub → device requests go at QoS 0: SDKs take any granted QoS up to 1, and
                    // a lost request surfaces as the caller's timeout (device-protocol §2.3, §2.7).
                    Some(SessionCommand::MethodRequest(request)) => {
                        let MethodRequest { name, rid, payload } = *request;
                        let _ = sink.publish(topic::method_request(&name, &rid)).send_at_most_once(payload.into());
                    }
                    Some(SessionCommand::DesiredPatch(patch)) => {
                        let topic = topic::desired_patch(patch.version as i64);
                        let _ = sink.publish(topic).send_at_most_once(patch.body.into());
                    }
                    Some(SessionCommand::C2d(delivery)) => {
                        deliver_c2d(&sink, &task_actor, *delivery);
                    }
                    // The actor let go of this session; only the token can still end it.
                    None => break,
                },
                () = &mut expired => {
                    task_flags.reason.set(DisconnectReason::TokenExpired);
                    sink.close();
                    return;
                }
            }
        }
        if let futures::future::Either::Right(_) = futures::future::select(connection_gone, expired).await {
            task_flags.reason.set(DisconnectReason::TokenExpired);
            sink.close();
        }
    });

    let keep_alive = pkt.keep_alive;
    let session = MqttSession::new(hub.shared.clone(), sender, ctx.ingest.clone(), connection_id, actor, flags, closed);
    Ok(handshake.ack(session, outcome.session_present).idle_timeout(idle_timeout(keep_alive)))
}

/// Publishes a cloud-to-device message on `devices/{d}/messages/devicebound/{bag}`
/// (device-protocol §2.8): at QoS 1 its PUBACK completes it; at QoS 0 (the device subscribed
/// so) it completes when sent. Without a PUBACK (the connection dropped) the actor makes it
/// Enqueued again when the session detaches.
fn deliver_c2d(sink: &v3::MqttSink, actor: &actix::Addr<iothubd_actors::device::DeviceActor>, delivery: C2dDelivery) {
    let C2dDelivery { key, message, lock_token, redelivery, at_most_once } = delivery;
    let to = match &key.module_id {
        Some(module) => format!("/devices/{}/modules/{module}/messages/deviceBound", key.device_id),
        None => format!("/devices/{}/messages/deviceBound", key.device_id),
    };
    let ack = message.ack;
    let bag = PropertyBag {
        system: SystemProperties {
            message_id: message.message_id.as_deref().map(Into::into),
            correlation_id: message.correlation_id.as_deref().map(Into::into),
            user_id: message.user_id.as_deref().map(Into::into),
            to: Some(to.into()),
            content_type: message.content_type.as_deref().map(Into::into),
            content_encoding: message.content_encoding.as_deref().map(Into::into),
            ack: (ack != FeedbackMode::None).then(|| ack.as_str().into()),
            ..Default::default()
        },
        application: message.properties.iter().map(|(k, v)| (k.as_str().into(), Some(v.as_str().into()))).collect(),
    };
    let topic = topic::c2d(&key.device_id, &bag);
    let publish = sink.publish(topic).dup(redelivery);
    let settle = SettleC2d { lock_token, outcome: C2dOutcome::Complete };
    if at_most_once {
        if publish.send_at_most_once(message.body.into()).is_ok() {
            actor.do_send(settle);
        }
        return;
    }
    let acked = publish.send_at_least_once(message.body.into());
    let actor = actor.clone();
    ntex::rt::spawn(async move {
        if acked.await.is_ok() {
            actor.do_send(settle);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timeout_is_one_and_a_half_keep_alives_capped() {
        assert_eq!(idle_timeout(60), Seconds(90));
        assert_eq!(idle_timeout(1), Seconds(2));
        assert_eq!(idle_timeout(1200), Seconds(1767));
        assert_eq!(idle_timeout(0), Seconds::ZERO);
    }
}
