//! The HTTPS device API for telemetry (device-protocol §3): `POST /devices/{id}/messages/events`
//! and the module form, one message or a batch (`application/vnd.microsoft.iothub.json`), into
//! the same events log as MQTT. `204` only once every message of the request is durable.
//!
//! Application properties from `iothub-app-{name}` headers keep `{name}` as the HTTP stack
//! delivers it — lower-case, since header names are case-insensitive; batch items keep their
//! property names' case.
//!
//! Authentication is the device's SAS token in `Authorization` (a device, module or policy
//! token with DeviceConnect), checked like an MQTT CONNECT. `api-version` is optional on device
//! endpoints (device-protocol, global tolerance).

use actix_web::http::header::HeaderMap;
use actix_web::{HttpRequest, HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use iothubd_actors::directory::HubHandle;
use iothubd_actors::ingest::{AuthMethod, Ingest, Sender};
use iothubd_actors::model::event::{EventData, MessageProperties};
use serde_json::Value;

use super::AppState;
use super::error::{ApiError, ErrorCode};
use super::service::{path_identity, request_host, unix_now};
use crate::auth::{self, Principal, SasToken};

/// Largest message, and largest batch (device-protocol §5.4).
const MAX_SIZE: usize = 256 * 1024;
/// Most messages in one batch.
const MAX_BATCH: usize = 500;
const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource(["/devices/{id}/messages/events", "/devices/{id}/modules/{mid}/messages/events"])
            .app_data(web::PayloadConfig::new(MAX_SIZE + 64 * 1024))
            .route(web::post().to(send_events)),
    );
}

/// The hub, the identity addressed by the path, and the session-like stamps of its sender.
pub(super) async fn authorize_device(req: &HttpRequest, state: &AppState) -> Result<(HubHandle, Sender), ApiError> {
    let key = path_identity(req)?;
    let host = request_host(req);
    let unauthorized = |why: String| ApiError::new(ErrorCode::IotHubUnauthorizedAccess, why);
    let hub = state.deployment.directory().resolve(&host).ok_or_else(|| unauthorized(format!("no hub at '{host}'")))?;
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| unauthorized("the Authorization header is missing".into()))?;
    let token = SasToken::parse(header)?;
    let identity = state.deployment.store().get_identity(hub.name(), &key).await?;
    let principal = auth::authorize_identity(&hub.description(), &token, identity.as_ref(), &key, unix_now())?;
    let identity = identity.ok_or_else(|| unauthorized(format!("{key} is not in the registry")))?;
    let method = match principal {
        Principal::Policy { .. } => AuthMethod::PolicySas,
        Principal::Identity(_) => AuthMethod::IdentitySas,
    };
    let sender = Sender::new(&hub.shared, &identity, method, None);
    Ok((hub, sender))
}

/// Message properties from `iothub-*` names (headers, or a batch item's `properties`); names
/// are case-insensitive (Node sends `IoTHub-MessageId`).
fn message_from<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>, body: Vec<u8>) -> EventData {
    let mut properties = MessageProperties::default();
    let mut application_properties = Vec::new();
    for (name, value) in pairs {
        let lower = name.to_ascii_lowercase();
        let v = Some(value.to_owned());
        match lower.as_str() {
            "iothub-messageid" => properties.message_id = v,
            "iothub-correlationid" => properties.correlation_id = v,
            "iothub-userid" => properties.user_id = v,
            "iothub-contenttype" => properties.content_type = v,
            "iothub-contentencoding" => properties.content_encoding = v,
            "iothub-expiry" => {
                properties.absolute_expiry_time =
                    chrono::DateTime::parse_from_rfc3339(value).ok().map(|t| t.timestamp_millis());
            }
            "iothub-interface-id" | "iothub-creation-time-utc" => application_properties.push((lower, v)),
            _ => {
                // `iothub-app-{name}`: the name as delivered (see the module doc on case).
                if lower.starts_with("iothub-app-") {
                    application_properties.push((name["iothub-app-".len()..].to_owned(), v));
                }
            }
        }
    }
    EventData { body, properties, application_properties, annotations: Vec::new() }
}

fn size_of(e: &EventData) -> usize {
    let p = &e.properties;
    e.body.len()
        + [&p.message_id, &p.correlation_id, &p.user_id, &p.content_type, &p.content_encoding]
            .into_iter()
            .map(|v| v.as_ref().map_or(0, String::len))
            .sum::<usize>()
        + e.application_properties.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, String::len)).sum::<usize>()
}

fn header_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers.iter().filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
}

/// A batch item: `{"body":"<base64>","base64Encoded"?:bool,"properties":{…}}`.
fn batch_item(item: &Value) -> Result<EventData, ApiError> {
    let bad = |why: &str| ApiError::new(ErrorCode::IotHubFormatError, format!("batch item: {why}"));
    let raw = item.get("body").and_then(Value::as_str).ok_or_else(|| bad("body must be a string"))?;
    let body = if item.get("base64Encoded").and_then(Value::as_bool).unwrap_or(true) {
        B64.decode(raw).map_err(|_| bad("body is not base64"))?
    } else {
        raw.as_bytes().to_vec()
    };
    let props = item.get("properties").and_then(Value::as_object);
    let pairs = props.into_iter().flatten().filter_map(|(k, v)| v.as_str().map(|v| (k.as_str(), v)));
    Ok(message_from(pairs, body))
}

async fn send_events(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let (hub, sender) = authorize_device(&req, &state).await?;
    let batch = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with(BATCH_CONTENT_TYPE));
    let messages = if batch {
        let items: Vec<Value> = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(ErrorCode::IotHubFormatError, format!("the batch is not a JSON array: {e}")))?;
        if items.len() > MAX_BATCH {
            return Err(ApiError::invalid(format!("a batch holds at most {MAX_BATCH} messages")));
        }
        items.iter().map(batch_item).collect::<Result<Vec<_>, _>>()?
    } else {
        vec![message_from(header_pairs(req.headers()), body.to_vec())]
    };
    if messages.iter().map(size_of).sum::<usize>() > MAX_SIZE {
        return Err(ApiError::new(ErrorCode::MessageTooLarge, "messages are at most 256 KB (a batch in total)"));
    }
    let ingest = Ingest::new(state.deployment.store().clone());
    let appends = messages.into_iter().map(|m| ingest.telemetry(&hub.shared, &sender, m));
    for result in futures::future::join_all(appends).await {
        result?;
    }
    Ok(HttpResponse::NoContent().finish())
}
