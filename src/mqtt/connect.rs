//! CONNECT (device-protocol §2.1–2.3): who is connecting, are they allowed, and the session
//! that speaks for the identity from now on.
//!
//! Order of checks, each with its CONNACK code (§2.2): protocol level (1), username and client
//! id (2 when the client id does not match the username's identity or is empty with a
//! persistent session, 4 when the username cannot be read), the hub (5), the Will's topic (5
//! unless it is the device's telemetry), the password as a SAS token (4 when it is not one),
//! the identity and the token (5: bad signature, expired, unknown or disabled identity, wrong
//! scope, no DeviceConnect), the store being reachable (3). A CONNECT without a password
//! authenticates with the TLS client certificate instead (X.509, device-protocol §1.4). Then
//! the identity's `DeviceActor` takes the session; an older session of the same identity is
//! closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use iothubd_actors::deployment::Deployment;
use iothubd_actors::ingest::{AuthMethod, Ingest, Sender};
use iothubd_actors::messages::AttachSession;
use iothubd_actors::model::identity::IdentityKey;
use ntex_mqtt::error::DecodeError;
use ntex_mqtt::v3::codec::{Connect, ConnectAckReason, Decoded, Packet};
use rustls_pki_types::CertificateDer;

use super::frame::{Outbox, decode, frame_len};
use super::session::{self, Attached, MAX_FRAME, Session, Will};
use super::topic::{DeviceTopic, parse_username};
use super::transport::Transport;
use crate::auth::{self, Principal, SasToken};

/// Azure's load balancer idle limit: keep-alive is enforced at 1.5 × the client's value, at
/// most this (device-protocol §2.1).
const MAX_IDLE_SECONDS: u64 = 1767;

/// Commands a device actor may queue for a session before it must drain them (room for a full
/// window of C2D deliveries besides method requests and desired patches).
const SESSION_COMMAND_QUEUE: usize = 16;

/// How long a client has to complete TLS and send CONNECT, and the hub to answer it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// 1.5 × keep-alive, capped; 0 (no keep-alive) means no idle limit.
fn idle_limit(keep_alive: u16) -> Option<Duration> {
    (keep_alive > 0).then(|| Duration::from_secs((u64::from(keep_alive) * 3).div_ceil(2).min(MAX_IDLE_SECONDS)))
}

/// Serves one connection: CONNECT, CONNACK, then the session until it ends.
pub async fn serve(ctx: Arc<MqttContext>, mut io: Transport) {
    let (connect, pending) = match tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut io)).await {
        Ok(Ok(read)) => read,
        Ok(Err(ConnectError::Refuse(code))) => return refuse(io, code).await,
        Ok(Err(ConnectError::Close(why))) => return tracing::debug!("MQTT connection closed before CONNECT: {why}"),
        Err(_) => return tracing::debug!("no CONNECT within {CONNECT_TIMEOUT:?}"),
    };
    // Boxed: its state (a store lookup, an actor round trip) is freed once CONNACK is sent
    // instead of staying in the connection's task for the connection's whole life.
    let accepted = Box::pin(handshake(&ctx, &connect, io.peer_certificates())).await;
    drop(connect);
    let (attached, session_present) = match accepted {
        Ok(accepted) => accepted,
        Err(code) => return refuse(io, code).await,
    };
    let session = Session::new(attached, pending);
    let mut out = Outbox::default();
    out.connack(ConnectAckReason::ConnectionAccepted, session_present);
    if std::future::poll_fn(|cx| out.poll_write(cx, &mut io)).await.is_err() {
        return;
    }
    session::run(session, io).await;
}

/// Why no session starts: a CONNACK refusal, or a connection closed without one.
enum ConnectError {
    Refuse(ConnectAckReason),
    Close(String),
}

/// Reads the first frame, which must be CONNECT; returns it and any bytes after it.
async fn read_connect(io: &mut Transport) -> Result<(Box<Connect>, Vec<u8>), ConnectError> {
    let mut bytes = Vec::new();
    loop {
        if bytes.first().is_some_and(|&first| first != 0x10) {
            return Err(ConnectError::Close("the first packet is not CONNECT".into()));
        }
        match frame_len(&bytes, MAX_FRAME) {
            Ok(Some(len)) if bytes.len() >= len => {
                return match decode(&bytes[..len]) {
                    Ok(Decoded::Packet(Packet::Connect(connect), _)) => Ok((connect, bytes.split_off(len))),
                    Ok(_) => Err(ConnectError::Close("the first packet is not CONNECT".into())),
                    Err(DecodeError::UnsupportedProtocolLevel) => {
                        Err(ConnectError::Refuse(ConnectAckReason::UnacceptableProtocolVersion))
                    }
                    Err(DecodeError::InvalidClientId) => {
                        Err(ConnectError::Refuse(ConnectAckReason::IdentifierRejected))
                    }
                    Err(e) => Err(ConnectError::Close(format!("malformed CONNECT: {e}"))),
                };
            }
            Ok(_) => {}
            Err(e) => return Err(ConnectError::Close(e.to_string())),
        }
        let read = std::future::poll_fn(|cx| {
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
            io.poll_read(cx, &mut chunk).map_ok(|read| {
                bytes.extend_from_slice(read.filled());
                read.filled().len()
            })
        })
        .await;
        match read {
            Ok(0) => return Err(ConnectError::Close("end of stream".into())),
            Ok(_) => {}
            Err(e) => return Err(ConnectError::Close(e.to_string())),
        }
    }
}

/// Answers CONNECT with a refusal and closes.
async fn refuse(mut io: Transport, code: ConnectAckReason) {
    let mut out = Outbox::default();
    out.connack(code, false);
    if std::future::poll_fn(|cx| out.poll_write(cx, &mut io)).await.is_ok() {
        io.shutdown().await;
    }
}

/// Checks a CONNECT (the order and codes in this module's doc) and attaches the session to
/// the identity's actor; returns what the session starts with and MQTT's session-present flag.
async fn handshake(
    ctx: &MqttContext,
    pkt: &Connect,
    certificates: Option<&[CertificateDer<'static>]>,
) -> Result<(Attached, bool), ConnectAckReason> {
    let refuse = |code: ConnectAckReason, why: &str| {
        tracing::debug!(client_id = %pkt.client_id, ?code, "CONNECT refused: {why}");
        code
    };
    let Some(username) = pkt.username.as_deref().map(parse_username).and_then(Result::ok) else {
        return Err(refuse(ConnectAckReason::BadUserNameOrPassword, "unreadable username"));
    };
    let key = match &username.module_id {
        Some(m) => IdentityKey::module(username.device_id.clone(), m.clone()),
        None => IdentityKey::device(username.device_id.clone()),
    };
    if pkt.client_id.as_str() != key.to_string() {
        return Err(refuse(ConnectAckReason::IdentifierRejected, "client id differs from the username's identity"));
    }
    let Some(hub) = ctx.deployment.directory().resolve(&username.host) else {
        return Err(refuse(ConnectAckReason::NotAuthorized, "no hub for the host"));
    };
    // A Will is the device's own telemetry (device-protocol §2.1, §2.3); anything else is a
    // topic the device may not publish on.
    let will = match &pkt.last_will {
        Some(will) => match DeviceTopic::parse(&will.topic, &key) {
            Ok(DeviceTopic::Telemetry { .. }) => Some(Box::new(Will {
                topic: will.topic.to_string(),
                payload: will.message.clone(),
                retain: will.retain,
            })),
            _ => return Err(refuse(ConnectAckReason::NotAuthorized, "the Will topic is not the device's telemetry")),
        },
        None => None,
    };
    let description = hub.description();
    let now = unix_now();
    // Awaited once the credentials are known to be readable (a malformed token needs no lookup).
    let lookup = async {
        let identity = ctx.deployment.store().get_identity(hub.name(), &key).await;
        identity.map_err(|e| refuse(ConnectAckReason::ServiceUnavailable, &e.to_string()))
    };
    let (identity, method, expiry) = match pkt.password.as_ref() {
        Some(password) => {
            let Ok(password) = std::str::from_utf8(password) else {
                return Err(refuse(ConnectAckReason::BadUserNameOrPassword, "password is not UTF-8"));
            };
            let token = SasToken::parse(password)
                .map_err(|e| refuse(ConnectAckReason::BadUserNameOrPassword, &e.to_string()))?;
            let identity = lookup.await?;
            let principal =
                auth::authorize_identity(&description, &token, identity.as_ref(), &key, now).map_err(|e| {
                    let code = if e.connack_code() == 4 {
                        ConnectAckReason::BadUserNameOrPassword
                    } else {
                        ConnectAckReason::NotAuthorized
                    };
                    refuse(code, &e.to_string())
                })?;
            let Some(identity) = identity else {
                return Err(refuse(ConnectAckReason::NotAuthorized, "unknown identity"));
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
            let Some(chain) = certificates.filter(|c| !c.is_empty()) else {
                return Err(refuse(ConnectAckReason::NotAuthorized, "no password and no certificate"));
            };
            let identity = lookup.await?;
            let cas = &description.properties.ca_certificates;
            let kind = auth::x509::authorize_certificate(identity.as_ref(), &key, chain, cas)
                .map_err(|e| refuse(ConnectAckReason::NotAuthorized, &e.to_string()))?;
            let Some(identity) = identity else {
                return Err(refuse(ConnectAckReason::NotAuthorized, "unknown identity"));
            };
            (identity, AuthMethod::X509(kind), None)
        }
    };
    let sender = Sender::new(&hub.shared, &identity, method, username.model_id.clone());

    let connection_id = ctx.next_connection_id.fetch_add(1, Ordering::Relaxed);
    let (outbound, commands) = flume::bounded(SESSION_COMMAND_QUEUE);
    let actor = hub.shared.device(&key);
    let attach = AttachSession { connection_id, outbound, clean_session: pkt.clean_session };
    let outcome = actor.send(attach).await.map_err(|e| refuse(ConnectAckReason::ServiceUnavailable, &e.to_string()))?;
    let attached = Attached {
        hub: hub.shared.clone(),
        sender,
        ingest: ctx.ingest.clone(),
        connection_id,
        actor,
        commands,
        idle_limit: idle_limit(pkt.keep_alive),
        token_lifetime: expiry.map(|expiry| Duration::from_secs(expiry.saturating_sub(now))),
        will,
    };
    Ok((attached, outcome.session_present))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_limit_is_one_and_a_half_keep_alives_capped() {
        assert_eq!(idle_limit(60), Some(Duration::from_secs(90)));
        assert_eq!(idle_limit(1), Some(Duration::from_secs(2)));
        assert_eq!(idle_limit(1200), Some(Duration::from_secs(1767)));
        assert_eq!(idle_limit(0), None);
    }
}
