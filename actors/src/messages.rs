//! The vocabulary between front-ends and actors. Reading this file teaches the system.
//!
//! Each message says who sends it and what its reply means. Front-ends (HTTP today; MQTT and
//! AMQP sessions next) build these from wire requests; actors answer in domain terms, and the
//! front-end maps the answer to its protocol (HTTP status + `iothub-errorcode`, CONNACK, …).

use actix::Message;

use crate::import::ImportItem;
use crate::model::hub::HubDescription;
use crate::model::identity::{Identity, IdentityError, IdentityKey, IdentitySpec};
use crate::model::twin::Twin;
use crate::store::StoreError;
use serde_json::{Map, Value};

/// One identity-registry write. Sent by the registry REST (service-api §3) and by the bulk
/// import to the hub's `HubActor`; the reply is the identity as written (or as deleted).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Identity, RegistryError>")]
pub enum RegistryWrite {
    /// Create only; `AlreadyExists` when taken.
    Create { key: IdentityKey, spec: IdentitySpec },
    /// Replace mutable fields; `if_match` = `None` means unconditional (`*`).
    Replace { key: IdentityKey, spec: IdentitySpec, if_match: Option<String> },
    /// Delete (a device takes its modules along); `if_match` as for `Replace`.
    Delete { key: IdentityKey, if_match: Option<String> },
}

/// Why a registry write failed, in domain terms.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RegistryError {
    #[error("{0} not found")]
    NotFound(IdentityKey),
    #[error("{0} already exists")]
    AlreadyExists(IdentityKey),
    #[error("the ETag does not match the current one of {0}")]
    PreconditionFailed(IdentityKey),
    #[error(transparent)]
    Invalid(#[from] IdentityError),
    #[error("{0}")]
    Store(StoreError),
    /// An `…IfMatchETag` import item without an `eTag`.
    #[error("the import mode of {0} needs an eTag")]
    ETagRequired(IdentityKey),
    /// An `updateTwinIfMatchETag` import item without a `twinETag`.
    #[error("the import mode of {0} needs a twinETag")]
    TwinETagRequired(IdentityKey),
    /// The twin content of an import item breaks the twin rules (service-api §4).
    #[error("the twin of {key} is invalid: {reason}")]
    InvalidTwin { key: IdentityKey, reason: String },
    /// The hub is being deleted or shut down.
    #[error("the hub is not accepting registry writes")]
    HubStopped,
}

/// Bulk `POST /devices` or the operator import → `HubActor`: apply items in order. The reply
/// has one result per item, in the same order; one failing item does not stop the others.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Vec<Result<(), RegistryError>>")]
pub struct ImportIdentities(pub Vec<ImportItem>);

/// Operator API → `HubActor`: replace the hub's settings (already normalized). The reply is
/// the stored description with its new ETag.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<HubDescription, StoreError>")]
pub struct UpdateHubSettings {
    pub description: HubDescription,
    pub if_match: Option<String>,
}

/// Events API → `HubActor`: store a consumer group's checkpoint of a partition (the last
/// sequence number it processed). The reply is the store's answer.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), StoreError>")]
pub struct SetCheckpoint {
    pub consumer_group: String,
    pub partition: u32,
    pub sequence_number: i64,
}

/// Deployment → `HubActor`: the hub is deleted or the process stops; finish in-flight writes
/// and stop.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct StopHub;

// ---- sessions ↔ DeviceActor -------------------------------------------------------------

/// What a device actor asks of the session attached to it. The session drains these on its own
/// thread (the MQTT sink is tied to its worker: DESIGN.md §10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    /// Close the connection.
    Close(CloseReason),
    /// Send a direct-method request to the device (device-protocol §2.7).
    MethodRequest(Box<MethodRequest>),
    /// Send a desired-properties patch (device-protocol §2.6) if the device subscribed.
    DesiredPatch(Box<DesiredPatch>),
    /// Deliver a cloud-to-device message (device-protocol §2.8).
    C2d(Box<C2dDelivery>),
}

// The large variants are boxed: a command is 16 bytes instead of ~80 in the session channel's
// queue (an idle connection's memory is what limits how many devices a hub holds).

/// A direct-method request for the session to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodRequest {
    pub name: String,
    pub rid: String,
    pub payload: Vec<u8>,
}

/// A desired-properties patch for the session to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPatch {
    pub version: u64,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer session of the same identity connected (Azure: 400027).
    NewerSession,
    /// The identity was disabled or deleted.
    IdentityRevoked,
}

/// Why a session ended, for the `deviceDisconnected` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    ClientDisconnect,
    ConnectionLost,
    TakenOver,
    TokenExpired,
    ProtocolError,
    IdentityRevoked,
}

impl DisconnectReason {
    /// The `disconnectReason` application property of a `deviceDisconnected` event.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientDisconnect => "clientDisconnect",
            Self::ConnectionLost => "connectionLost",
            Self::TakenOver => "newerConnection",
            Self::TokenExpired => "tokenExpired",
            Self::ProtocolError => "protocolError",
            Self::IdentityRevoked => "identityDisabledOrDeleted",
        }
    }
}

/// Session → actor: this connection now speaks for the identity. Any older session is closed.
/// The reply says whether an earlier persistent session's state was kept (MQTT session-present).
#[derive(Debug, Message)]
#[rtype(result = "AttachOutcome")]
pub struct AttachSession {
    pub connection_id: u64,
    pub outbound: flume::Sender<SessionCommand>,
    pub clean_session: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachOutcome {
    pub session_present: bool,
}

/// Session → actor: the connection ended. Ignored when `connection_id` is not the attached
/// one (a late disconnect of a session that was already taken over).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct DetachSession {
    pub connection_id: u64,
    pub reason: DisconnectReason,
}

/// Registry → actor: the identity was disabled or deleted; drop its session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RevokeSession;

// ---- twins: service REST and device sessions ↔ DeviceActor ----------------------------------

/// A twin as read or written, with what its service view needs beside it.
#[derive(Debug, Clone)]
pub struct TwinRead {
    pub twin: Twin,
    pub identity: Identity,
    pub connected: bool,
}

/// Why a twin operation failed, in domain terms.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TwinFailure {
    #[error("{0} not found")]
    NotFound(IdentityKey),
    #[error("the ETag does not match the twin's current one")]
    PreconditionFailed,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Store(StoreError),
}

/// Service twin REST → `DeviceActor`: read the twin (service-api §4).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<TwinRead, TwinFailure>")]
pub struct GetTwin;

/// Service twin REST → `DeviceActor`: PATCH (merge) or PUT (`replace`: tags and desired
/// wholesale) — service-api §4. `if_match` is the twin ETag the caller saw (`None`/`*` =
/// unconditional). The reply is the twin as written.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<TwinRead, TwinFailure>")]
pub struct UpdateTwin {
    pub tags: Option<Map<String, Value>>,
    pub desired: Option<Map<String, Value>>,
    pub replace: bool,
    pub if_match: Option<String>,
}

/// Device session → `DeviceActor`: a reported-properties PATCH (device-protocol §2.6). The
/// reply is the new reported `$version`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<u64, TwinFailure>")]
pub struct ReportProperties(pub Map<String, Value>);

/// Device session → `DeviceActor`: the device's twin GET; the reply is the device view
/// (`{"desired":{…,"$version"},"reported":{…,"$version"}}`).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<Value, TwinFailure>")]
pub struct GetDeviceTwin;

// ---- direct methods: service REST and device sessions ↔ DeviceActor -------------------------

/// Service REST → `DeviceActor`: invoke a direct method (service-api §6). Waits up to
/// `connect_timeout` for the device to be online (connected and subscribed to methods), then
/// up to `response_timeout` for its answer.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<MethodResult, MethodFailure>")]
pub struct InvokeMethod {
    pub name: String,
    /// The request payload, JSON text (`null` when none).
    pub payload: Vec<u8>,
    pub response_timeout: std::time::Duration,
    pub connect_timeout: std::time::Duration,
}

/// The device's answer: its status and payload (JSON text; empty when none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodResult {
    pub status: i32,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodFailure {
    #[error("{0} not found")]
    NotFound(IdentityKey),
    #[error("the device is not online (connected and subscribed to methods)")]
    NotOnline,
    #[error("the device did not answer within the response timeout")]
    Timeout,
    #[error("{0}")]
    Store(StoreError),
}

/// Session → `DeviceActor`: the device answered request `rid`.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct MethodResponse {
    pub connection_id: u64,
    pub rid: String,
    pub status: i32,
    pub payload: Vec<u8>,
}

/// Session → `DeviceActor`: what the session now receives (its SUBSCRIBEs, device-protocol
/// §2.5), so the actor knows whether it is online for methods and desired patches.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct SessionSubscriptions {
    pub connection_id: u64,
    pub methods: bool,
    pub desired: bool,
    /// `devices/{d}/messages/devicebound/#`.
    pub c2d: bool,
    /// That subscription was granted at QoS 0: deliveries are settled when sent.
    pub c2d_at_most_once: bool,
}

// ---- cloud-to-device: service senders and device receivers ↔ DeviceActor ----------------------

/// A cloud-to-device message as the service sends it (service-api §8; the REST send and, later,
/// the AMQP sender). The actor assigns its sequence number and enqueued time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutgoingC2d {
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub user_id: Option<String>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    /// Absolute expiry; `None` = the hub's default TTL. Capped at the 2-day maximum.
    pub expiry_time: Option<chrono::DateTime<chrono::Utc>>,
    pub ack: crate::model::c2d::FeedbackMode,
    pub properties: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Service → `DeviceActor`: enqueue a message. The reply (its sequence number) comes once the
/// message is durable.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<u64, C2dFailure>")]
pub struct SendC2d(pub Box<OutgoingC2d>);

/// Why a cloud-to-device operation failed, in domain terms.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum C2dFailure {
    #[error("{0} not found")]
    NotFound(IdentityKey),
    /// The queue holds its maximum (403004 DeviceMaximumQueueDepthExceeded).
    #[error("the queue of {key} holds its maximum of {max} messages")]
    QueueFull { key: IdentityKey, max: usize },
    /// The lock token is unknown, or its lock expired (412002 DeviceMessageLockLost).
    #[error("the lock token is unknown or its lock expired")]
    LockLost,
    #[error("{0}")]
    Store(StoreError),
}

/// Device (HTTPS) → `DeviceActor`: take the next message, locked for `lock_timeout`. `None`
/// when nothing is waiting.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<Option<crate::model::c2d::C2dMessage>, C2dFailure>")]
pub struct ReceiveC2d {
    pub lock_timeout: std::time::Duration,
}

/// What the device did with a delivered message (device-protocol §3, §4.4; MQTT PUBACK = complete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum C2dOutcome {
    Complete,
    Reject,
    Abandon,
}

/// Device → `DeviceActor`: settle the message holding `lock_token`. From an MQTT session the
/// reply is not awaited (the PUBACK already went).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), C2dFailure>")]
pub struct SettleC2d {
    pub lock_token: String,
    pub outcome: C2dOutcome,
}

/// Service → `DeviceActor`: drop every queued message (`Purged` feedback); the reply is how
/// many were dropped.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<usize, C2dFailure>")]
pub struct PurgeC2d;

/// A message for the session to publish on `devices/{d}/messages/devicebound/{bag}` and settle
/// with its PUBACK (device-protocol §2.8). `redelivery` = an earlier delivery was not settled
/// (DUP=1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C2dDelivery {
    pub key: IdentityKey,
    pub message: crate::model::c2d::C2dMessage,
    pub lock_token: String,
    pub redelivery: bool,
    /// The device subscribed at QoS 0: publish at most once and settle on send.
    pub at_most_once: bool,
}
