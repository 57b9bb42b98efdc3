//! Cloud-to-device messages to many identities in one request: `POST /messages/deviceBound`
//! with a JSON array (service-api §8; **beyond IoT Hub**, like the single REST send in
//! [`super::c2d`]).
//!
//! Azure's service SDKs send C2D over AMQP, many messages on one link; a back end fanning out
//! over REST pays a whole HTTPS request per message instead — most of the hub's work per
//! message. This is the REST form of that one link: up to [`MAX_MESSAGES`] messages, each to
//! its own device or module, each with the fields of a single send:
//!
//! ```json
//! [{"deviceId":"d1","moduleId":null,"body":"{\"on\":true}","messageId":"m1",
//!   "correlationId":"c1","userId":"u","contentType":"application/json",
//!   "contentEncoding":"utf-8","expiryTimeUtc":"2026-12-01T00:00:00Z","ack":"full",
//!   "properties":{"Color":"red"}}]
//! ```
//!
//! `body` is text; `bodyBase64` carries binary instead. Property names keep their case (unlike
//! `iothub-app-*` headers, whose names arrive lower-cased). The answer is `200` once every
//! accepted message is durable: `{"isSuccessful":bool,"results":[…]}` with one result per
//! message in request order — `{"deviceId","moduleId","sequenceNumber"}`, or
//! `{"deviceId","moduleId","errorCode","errorStatus"}` for a message refused alone (unknown
//! identity, full queue, a bad field). Messages to one identity are enqueued in request order;
//! identities are served concurrently. A request that is not such an array is `400`.

use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use iothubd_actors::messages::{OutgoingC2d, SendC2d};
use iothubd_actors::model::c2d::FeedbackMode;
use iothubd_actors::model::hub::AccessRights;
use iothubd_actors::model::identity::{IdentityKey, validate_id};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::c2d::{actor_gone, check_body, check_bound, check_id, check_property, parse_ack, parse_expiry};
use super::error::{ApiError, ErrorCode};
use super::service::ServiceCall;

/// Most messages one request may carry.
pub const MAX_MESSAGES: usize = 1000;
/// Largest request body: room for many maximum-size messages, not for a thousand of them.
pub const MAX_REQUEST: usize = 16 * 1024 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/messages/{bound}")
            .app_data(web::PayloadConfig::new(MAX_REQUEST))
            .route(web::post().to(send_batch)),
    );
}

/// One message of the array.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BatchMessage {
    device_id: String,
    module_id: Option<String>,
    body: Option<String>,
    body_base64: Option<String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    user_id: Option<String>,
    content_type: Option<String>,
    content_encoding: Option<String>,
    expiry_time_utc: Option<String>,
    ack: Option<String>,
    #[serde(default)]
    properties: serde_json::Map<String, Value>,
}

impl BatchMessage {
    fn key(&self) -> IdentityKey {
        match &self.module_id {
            Some(module) => IdentityKey::module(self.device_id.clone(), module.clone()),
            None => IdentityKey::device(self.device_id.clone()),
        }
    }

    /// The message to enqueue, checked as a single send's headers are.
    fn into_outgoing(self, now: DateTime<Utc>) -> Result<OutgoingC2d, ApiError> {
        validate_id(&self.device_id).map_err(|e| ApiError::invalid(e.to_string()))?;
        if let Some(module) = &self.module_id {
            validate_id(module).map_err(|e| ApiError::invalid(e.to_string()))?;
        }
        let body = match (self.body, self.body_base64) {
            (Some(text), None) => text.into_bytes(),
            (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| ApiError::invalid("bodyBase64 is not base64"))?,
            (None, None) => Vec::new(),
            (Some(_), Some(_)) => return Err(ApiError::invalid("give body or bodyBase64, not both")),
        };
        check_body(&body)?;
        for (field, id) in [("messageId", &self.message_id), ("correlationId", &self.correlation_id)] {
            if let Some(id) = id {
                check_id(field, id)?;
            }
        }
        let ack = match self.ack.as_deref() {
            None => FeedbackMode::None,
            Some(ack) => parse_ack("ack", ack)?,
        };
        let expiry_time = self.expiry_time_utc.as_deref().map(|t| parse_expiry("expiryTimeUtc", t, now)).transpose()?;
        let mut properties = Vec::with_capacity(self.properties.len());
        for (name, value) in self.properties {
            let Value::String(value) = value else {
                return Err(ApiError::invalid(format!("application property {name}: values are strings")));
            };
            check_property(&name, &value)?;
            properties.push((name, value));
        }
        Ok(OutgoingC2d {
            message_id: self.message_id,
            correlation_id: self.correlation_id,
            user_id: self.user_id,
            content_type: self.content_type,
            content_encoding: self.content_encoding,
            expiry_time,
            ack,
            properties,
            body,
        })
    }
}

/// The result of one message, in the response.
fn result(key: &IdentityKey, outcome: &Result<u64, ApiError>) -> Value {
    match outcome {
        Ok(sequence_number) => json!({
            "deviceId": key.device_id, "moduleId": key.module_id, "sequenceNumber": sequence_number,
        }),
        Err(e) => json!({
            "deviceId": key.device_id, "moduleId": key.module_id,
            "errorCode": e.code.name(), "errorStatus": e.message,
        }),
    }
}

async fn send_batch(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    check_bound(&req, "deviceBound")?;
    let call = ServiceCall::authorize(&req, &state, AccessRights::SERVICE_CONNECT)?;
    let messages: Vec<BatchMessage> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the body is not a JSON array of cloud-to-device messages: {e}")))?;
    if messages.is_empty() || messages.len() > MAX_MESSAGES {
        return Err(ApiError::invalid(format!("a batch holds 1 to {MAX_MESSAGES} messages")));
    }
    let now = Utc::now();
    let keys: Vec<IdentityKey> = messages.iter().map(BatchMessage::key).collect();
    let mut outcomes: Vec<Option<Result<u64, ApiError>>> = (0..messages.len()).map(|_| None).collect();
    // Each identity's messages in request order, one at a time; identities side by side.
    let mut by_identity: HashMap<&IdentityKey, Vec<(usize, OutgoingC2d)>> = HashMap::new();
    for (index, message) in messages.into_iter().enumerate() {
        match message.into_outgoing(now) {
            Ok(outgoing) => by_identity.entry(&keys[index]).or_default().push((index, outgoing)),
            Err(e) => outcomes[index] = Some(Err(e)),
        }
    }
    let hub = &call.hub.shared;
    let sends = by_identity.into_iter().map(|(key, queued)| async move {
        let actor = hub.device(key);
        let mut done = Vec::with_capacity(queued.len());
        for (index, outgoing) in queued {
            let sent = actor.send(SendC2d(Box::new(outgoing))).await.map_err(actor_gone);
            done.push((index, sent.and_then(|r| r.map_err(ApiError::from))));
        }
        done
    });
    for (index, outcome) in futures::future::join_all(sends).await.into_iter().flatten() {
        outcomes[index] = Some(outcome);
    }
    let mut successful = true;
    let results: Vec<Value> = keys
        .iter()
        .zip(outcomes)
        .map(|(key, outcome)| {
            let outcome = outcome.unwrap_or_else(|| Err(ApiError::new(ErrorCode::ServerError, "not sent")));
            successful &= outcome.is_ok();
            result(key, &outcome)
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "isSuccessful": successful, "results": results })))
}
