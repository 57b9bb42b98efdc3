//! Cloud-to-device over HTTPS: the service's send, purge and feedback, and the device's
//! receive / complete / reject / abandon (device-protocol §3, §5.1; service-api §8). The queue
//! itself lives in each identity's `DeviceActor` (`iothubd_actors::device::c2d`).
//!
//! Service side (a policy with ServiceConnect; `api-version` required):
//! - `POST /devices/{id}/messages/deviceBound` (module form `/devices/{id}/modules/{mid}/…`):
//!   the body is the message; headers `iothub-messageid`, `iothub-correlationid`,
//!   `iothub-userid`, `iothub-contenttype`, `iothub-contentencoding`, `iothub-expiry` (absolute,
//!   RFC 3339), `iothub-ack` (`none`|`positive`|`negative`|`full`) and `iothub-app-{name}` for
//!   application properties. `204` once the message is durable, with `iothub-sequencenumber`;
//!   `403` 403004 when the queue is full, `404` for an unknown identity, `413` over 64 KB.
//!   Azure has no REST send (its SDKs send over AMQP, which iothubd's AMQP endpoint will serve
//!   on the same queue); this one is iothubd's, shaped like the device API's headers. Many
//!   messages in one request: [`super::c2d_batch`].
//! - `DELETE /devices/{id}/commands`: purge → `200 {"totalMessagesPurged":n,"deviceId","moduleId"}`.
//! - `GET /messages/serviceBound/feedback`: `200` with a JSON array of feedback records
//!   (`application/vnd.microsoft.iothub.feedback.json`) and the batch's lock token as a quoted
//!   `ETag`, or `204`; `DELETE /messages/serviceBound/feedback/{lockToken}` completes the
//!   batch, `POST …/{lockToken}/abandon` gives it back (Azure's former HTTPS feedback API).
//!
//! Device side (the device's SAS token, as for telemetry; `api-version` optional):
//! `GET /devices/{id}/messages/deviceBound` → `200` with the message and its headers, or `204`;
//! `DELETE …/deviceBound/{lockToken}` completes (`reject` anywhere in the query rejects);
//! `POST …/deviceBound/{lockToken}/abandon`; a stale lock token → `412` 412002.
//!
//! The C SDK matches the receive's header names case-sensitively: `ContentType`,
//! `ContentEncoding` and `iothub-app-{name}` go out in exactly that case through
//! [`header_case::verbatim`] (the other names are lower case, as the SDKs read them). Request
//! header names arrive lower-cased, so a REST-sent property `Color` is stored as `color`.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, SecondsFormat, Utc};
use iothubd_actors::feedback::{self, FeedbackError};
use iothubd_actors::messages::{C2dOutcome, OutgoingC2d, PurgeC2d, ReceiveC2d, SendC2d, SettleC2d};
use iothubd_actors::model::c2d::{C2dMessage, FeedbackMode};
use iothubd_actors::model::hub::AccessRights;
use iothubd_actors::model::identity::IdentityKey;
use serde_json::json;

use super::AppState;
use super::device::authorize_device;
use super::error::{ApiError, ErrorCode};
use super::header_case;
use super::service::{ServiceCall, path_identity, path_segment};

/// Largest C2D message body (device-protocol §5.4).
const MAX_BODY: usize = 64 * 1024;
/// Lock of an HTTPS receive when the device asks for none (device-protocol §5.1).
const DEFAULT_LOCK: Duration = Duration::from_secs(60);
const FEEDBACK_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.feedback.json";

pub fn configure(cfg: &mut web::ServiceConfig) {
    // `{bound}` is `deviceBound` in any case (SDKs write `deviceBound`, people `devicebound`),
    // checked by the handlers: one pattern per path instead of one per spelling keeps route
    // matching (a regex per pattern, tried in order) cheap for every request.
    for base in ["/devices/{id}", "/devices/{id}/modules/{mid}"] {
        cfg.service(
            web::resource(format!("{base}/messages/{{bound}}"))
                .app_data(web::PayloadConfig::new(MAX_BODY + 1024))
                .route(web::post().to(send))
                .route(web::get().to(receive)),
        )
        .route(&format!("{base}/messages/{{bound}}/{{lock}}"), web::delete().to(complete_or_reject))
        .route(&format!("{base}/messages/{{bound}}/{{lock}}/abandon"), web::post().to(abandon))
        .route(&format!("{base}/commands"), web::delete().to(purge));
    }
    cfg.route("/messages/{bound}/feedback", web::get().to(receive_feedback))
        .route("/messages/{bound}/feedback/{lock}", web::delete().to(complete_feedback))
        .route("/messages/{bound}/feedback/{lock}/abandon", web::post().to(abandon_feedback));
}

/// The `{bound}` segment must name this API (`deviceBound` or `serviceBound`, any case).
pub(super) fn check_bound(req: &HttpRequest, expected: &str) -> Result<(), ApiError> {
    match req.match_info().get("bound") {
        Some(bound) if bound.eq_ignore_ascii_case(expected) => Ok(()),
        _ => Err(ApiError::new(
            ErrorCode::InvalidOperation,
            format!("{} {} is not an operation of this hub", req.method(), req.path()),
        )),
    }
}

/// Characters allowed in message and correlation ids (device-protocol §5.4).
fn valid_id(id: &str) -> bool {
    id.len() <= 128 && id.chars().all(|c| c.is_ascii_alphanumeric() || "-:.+%_#*?!(),=@;$'".contains(c))
}

/// Characters allowed in C2D property names and values (device-protocol §5.4).
fn valid_property_text(text: &str) -> bool {
    text.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c))
}

// The rules of a message's fields, for the single send (headers) and the batch send (JSON
// keys) alike; `field` names the header or key in the error.

pub(super) fn check_body(body: &[u8]) -> Result<(), ApiError> {
    if body.len() > MAX_BODY {
        return Err(ApiError::new(ErrorCode::MessageTooLarge, "cloud-to-device messages are at most 64 KB"));
    }
    Ok(())
}

pub(super) fn check_id(field: &str, id: &str) -> Result<(), ApiError> {
    if !valid_id(id) {
        return Err(ApiError::invalid(format!(
            "{field} must be at most 128 ASCII letters, digits and -:.+%_#*?!(),=@;$'"
        )));
    }
    Ok(())
}

pub(super) fn parse_ack(field: &str, text: &str) -> Result<FeedbackMode, ApiError> {
    FeedbackMode::parse(text)
        .ok_or_else(|| ApiError::invalid(format!("{field} must be none, positive, negative or full")))
}

pub(super) fn parse_expiry(field: &str, text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
    let expiry = DateTime::parse_from_rfc3339(text)
        .map_err(|_| ApiError::invalid(format!("{field} must be an RFC 3339 time")))?
        .with_timezone(&Utc);
    if expiry <= now {
        return Err(ApiError::invalid(format!("{field} is in the past")));
    }
    Ok(expiry)
}

pub(super) fn check_property(name: &str, value: &str) -> Result<(), ApiError> {
    if !valid_property_text(name) || !valid_property_text(value) {
        return Err(ApiError::invalid(format!(
            "application property {name}: names and values are ASCII letters, digits and !#$%&'*+-.^_`|~"
        )));
    }
    Ok(())
}

/// The message a send request describes.
fn outgoing(req: &HttpRequest, body: &[u8]) -> Result<OutgoingC2d, ApiError> {
    check_body(body)?;
    let mut message = OutgoingC2d { body: body.to_vec(), ..Default::default() };
    for (name, value) in req.headers() {
        let name = name.as_str();
        let Ok(value) = value.to_str() else {
            if name.starts_with("iothub-") {
                return Err(ApiError::invalid(format!("the {name} header is not ASCII")));
            }
            continue;
        };
        let text = Some(value.to_owned());
        match name {
            "iothub-messageid" => {
                check_id(name, value)?;
                message.message_id = text;
            }
            "iothub-correlationid" => {
                check_id(name, value)?;
                message.correlation_id = text;
            }
            "iothub-userid" => message.user_id = text,
            "iothub-contenttype" => message.content_type = text,
            "iothub-contentencoding" => message.content_encoding = text,
            "iothub-ack" => message.ack = parse_ack(name, value)?,
            "iothub-expiry" => message.expiry_time = Some(parse_expiry(name, value, Utc::now())?),
            _ => {
                if let Some(property) = name.strip_prefix("iothub-app-") {
                    check_property(property, value)?;
                    message.properties.push((property.to_owned(), value.to_owned()));
                }
            }
        }
    }
    Ok(message)
}

async fn send(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    check_bound(&req, "deviceBound")?;
    let call = ServiceCall::authorize(&req, &state, AccessRights::SERVICE_CONNECT)?;
    let key = path_identity(&req)?;
    let message = outgoing(&req, &body)?;
    let sequence_number = call.hub.shared.device(&key).send(SendC2d(Box::new(message))).await.map_err(actor_gone)??;
    Ok(HttpResponse::NoContent().insert_header(("iothub-sequencenumber", sequence_number.to_string())).finish())
}

async fn purge(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::SERVICE_CONNECT)?;
    let key = path_identity(&req)?;
    let purged = call.hub.shared.device(&key).send(PurgeC2d).await.map_err(actor_gone)??;
    Ok(HttpResponse::Ok().json(json!({
        "totalMessagesPurged": purged,
        "deviceId": key.device_id,
        "moduleId": key.module_id,
    })))
}

pub(super) fn actor_gone(_: actix::MailboxError) -> ApiError {
    ApiError::new(ErrorCode::ServiceUnavailable, "the device actor is not running")
}

fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// `/devices/{d}/messages/deviceBound` (or the module form): the `to` of a C2D message.
fn device_bound_path(key: &IdentityKey) -> String {
    match &key.module_id {
        Some(module) => format!("/devices/{}/modules/{module}/messages/deviceBound", key.device_id),
        None => format!("/devices/{}/messages/deviceBound", key.device_id),
    }
}

/// The `200` of a device receive: the body, the lock token as a quoted `ETag`, and the
/// message's properties as headers (device-protocol §3).
fn delivery_response(req: &HttpRequest, key: &IdentityKey, message: C2dMessage) -> Result<HttpResponse, ApiError> {
    // Sends check property names, so a bad one is the hub's fault.
    let name = |name: &str| {
        header_case::verbatim(req, name)
            .map_err(|_| ApiError::new(ErrorCode::ServerError, format!("{name} is not a valid header name")))
    };
    let mut response = HttpResponse::Ok();
    if let Some(lock) = &message.lock {
        response.insert_header(("ETag", format!("\"{}\"", lock.token)));
    }
    let optional = [
        ("iothub-messageid", &message.message_id),
        ("iothub-correlationid", &message.correlation_id),
        ("iothub-userid", &message.user_id),
        ("ContentType", &message.content_type),
        ("ContentEncoding", &message.content_encoding),
    ];
    for (header, value) in optional {
        if let Some(value) = value {
            response.insert_header((name(header)?, value.as_str()));
        }
    }
    response
        .insert_header(("iothub-to", device_bound_path(key)))
        .insert_header(("iothub-ack", message.ack.as_str()))
        .insert_header(("iothub-sequencenumber", message.sequence_number.to_string()))
        .insert_header(("iothub-enqueuedtime", time(message.enqueued_time)))
        .insert_header(("iothub-deliverycount", message.delivery_count.to_string()))
        .insert_header(("iothub-expiry", time(message.expiry_time)));
    for (property, value) in &message.properties {
        response.append_header((name(&format!("iothub-app-{property}"))?, value.as_str()));
    }
    Ok(response.body(message.body))
}

async fn receive(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    check_bound(&req, "deviceBound")?;
    let (hub, _) = authorize_device(&req, &state).await?;
    let key = path_identity(&req)?;
    let lock_timeout = match req.headers().get("iothub-messagelocktimeout") {
        None => DEFAULT_LOCK,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|s| (5..=300).contains(s))
            .map(Duration::from_secs)
            .ok_or_else(|| ApiError::invalid("IotHub-MessageLockTimeout must be 5-300 seconds"))?,
    };
    let received = hub.shared.device(&key).send(ReceiveC2d { lock_timeout }).await.map_err(actor_gone)??;
    Ok(match received {
        Some(message) => delivery_response(&req, &key, message)?,
        None => HttpResponse::NoContent().finish(),
    })
}

/// The `{lock}` path segment without the quotes some clients keep from the `ETag`.
fn lock_token(req: &HttpRequest, index: usize) -> Result<String, ApiError> {
    Ok(path_segment(req, index)?.trim_matches('"').to_owned())
}

/// Index of the `{lock}` segment: after `deviceBound`.
fn lock_index(req: &HttpRequest) -> usize {
    if req.match_info().get("mid").is_some() { 6 } else { 4 }
}

async fn settle(req: &HttpRequest, state: &AppState, outcome: C2dOutcome) -> Result<HttpResponse, ApiError> {
    check_bound(req, "deviceBound")?;
    let (hub, _) = authorize_device(req, state).await?;
    let key = path_identity(req)?;
    let lock_token = lock_token(req, lock_index(req))?;
    hub.shared.device(&key).send(SettleC2d { lock_token, outcome }).await.map_err(actor_gone)??;
    Ok(HttpResponse::NoContent().finish())
}

async fn complete_or_reject(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    // `reject` anywhere in the query, with or without a value (device-protocol §3).
    let reject = req.query_string().split('&').any(|pair| pair.split('=').next().is_some_and(|k| k == "reject"));
    settle(&req, &state, if reject { C2dOutcome::Reject } else { C2dOutcome::Complete }).await
}

async fn abandon(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    settle(&req, &state, C2dOutcome::Abandon).await
}

async fn receive_feedback(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    check_bound(&req, "serviceBound")?;
    let call = ServiceCall::authorize(&req, &state, AccessRights::SERVICE_CONNECT)?;
    let Some(batch) = feedback::receive(&call.hub.shared).await? else {
        return Ok(HttpResponse::NoContent().finish());
    };
    let records: Vec<_> = batch
        .records
        .iter()
        .map(|r| {
            json!({
                "originalMessageId": r.original_message_id,
                "deviceGenerationId": r.device_generation_id,
                "deviceId": r.device_id,
                "moduleId": r.module_id,
                "enqueuedTimeUtc": time(r.enqueued_time_utc),
                "statusCode": r.status.as_str(),
                "description": r.description,
            })
        })
        .collect();
    let body = serde_json::to_vec(&records).map_err(|e| ApiError::new(ErrorCode::ServerError, e.to_string()))?;
    Ok(HttpResponse::Ok()
        .insert_header(("ETag", format!("\"{}\"", batch.lock_token)))
        .insert_header(("iothub-enqueuedtime", time(Utc::now())))
        .content_type(FEEDBACK_CONTENT_TYPE)
        .body(body))
}

fn feedback_error(e: FeedbackError) -> ApiError {
    match e {
        FeedbackError::LockLost => ApiError::new(ErrorCode::DeviceMessageLockLost, e.to_string()),
        FeedbackError::Store(s) => s.into(),
    }
}

async fn complete_feedback(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    check_bound(&req, "serviceBound")?;
    let call = ServiceCall::authorize(&req, &state, AccessRights::SERVICE_CONNECT)?;
    feedback::complete(&call.hub.shared, &lock_token(&req, 3)?).await.map_err(feedback_error)?;
    Ok(HttpResponse::NoContent().finish())
}

async fn abandon_feedback(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    check_bound(&req, "serviceBound")?;
    let call = ServiceCall::authorize(&req, &state, AccessRights::SERVICE_CONNECT)?;
    feedback::abandon(&call.hub.shared, &lock_token(&req, 3)?).await.map_err(feedback_error)?;
    Ok(HttpResponse::NoContent().finish())
}
