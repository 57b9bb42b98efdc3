//! Direct methods REST (service-api §6): `POST /twins/{id}/methods` and
//! `/twins/{id}/modules/{mid}/methods`, carried to the device by its `DeviceActor`.
//!
//! Body `{"methodName","payload","responseTimeoutInSeconds":30,"connectTimeoutInSeconds":0}`;
//! 200 `{"status":<device status>,"payload":<device JSON or null>}` whatever the device's
//! status; 404 `DeviceNotOnline` when it is not online within the connect timeout; 504
//! `GatewayTimeout` when it does not answer in time; 413 for a payload over 128 KB.

use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use iothubd_actors::device::methods::{CONNECT_TIMEOUT_MAX, DEFAULT_RESPONSE_TIMEOUT, RESPONSE_TIMEOUT_RANGE};
use iothubd_actors::messages::{InvokeMethod, MethodFailure};
use iothubd_actors::model::hub::AccessRights;
use serde_json::{Value, json};

use super::AppState;
use super::error::{ApiError, ErrorCode};
use super::service::{ServiceCall, path_identity};

/// Largest method payload, each way (device-protocol §5.3).
const MAX_PAYLOAD: usize = 128 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/twins/{id}/methods", web::post().to(invoke))
        .route("/twins/{id}/modules/{mid}/methods", web::post().to(invoke));
}

fn seconds(v: Option<&Value>, name: &str) -> Result<Option<u64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_u64().map(Some).ok_or_else(|| ApiError::invalid(format!("{name} must be a whole number of seconds")))
        }
    }
}

async fn invoke(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::SERVICE_CONNECT)?;
    let key = path_identity(&req)?;
    let doc: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::IotHubFormatError, format!("the body is not valid JSON: {e}")))?;
    let name = doc
        .get("methodName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::new(ErrorCode::ArgumentNull, "methodName is required"))?;
    let response_timeout = seconds(doc.get("responseTimeoutInSeconds"), "responseTimeoutInSeconds")?.map_or(
        Ok(DEFAULT_RESPONSE_TIMEOUT),
        |s| {
            if RESPONSE_TIMEOUT_RANGE.contains(&s) {
                Ok(Duration::from_secs(s))
            } else {
                Err(ApiError::invalid("responseTimeoutInSeconds must be 5-300"))
            }
        },
    )?;
    let connect_timeout = match seconds(doc.get("connectTimeoutInSeconds"), "connectTimeoutInSeconds")? {
        Some(s) if s > CONNECT_TIMEOUT_MAX => return Err(ApiError::invalid("connectTimeoutInSeconds must be 0-300")),
        s => Duration::from_secs(s.unwrap_or(0)),
    };
    let payload = doc.get("payload").cloned().unwrap_or(Value::Null).to_string().into_bytes();
    if payload.len() > MAX_PAYLOAD {
        return Err(ApiError::new(ErrorCode::MessageTooLarge, "the method payload is over 128 KB"));
    }
    let invoke = InvokeMethod { name: name.to_owned(), payload, response_timeout, connect_timeout };
    let result = call
        .hub
        .shared
        .device(&key)
        .send(invoke)
        .await
        .map_err(|_| ApiError::new(ErrorCode::ServiceUnavailable, "the device actor is not running"))?;
    match result {
        Ok(answer) => {
            // The device's payload is JSON or empty; anything else is passed on as a string.
            let payload = if answer.payload.iter().all(u8::is_ascii_whitespace) {
                Value::Null
            } else {
                serde_json::from_slice(&answer.payload)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&answer.payload).into_owned()))
            };
            Ok(HttpResponse::Ok().json(json!({ "status": answer.status, "payload": payload })))
        }
        Err(MethodFailure::NotFound(k)) if k.is_module() => {
            Err(ApiError::new(ErrorCode::ModuleNotFound, format!("{k} not found")))
        }
        Err(MethodFailure::NotFound(k)) => Err(ApiError::new(ErrorCode::DeviceNotFound, format!("{k} not found"))),
        Err(MethodFailure::NotOnline) => {
            Err(ApiError::new(ErrorCode::DeviceNotOnline, MethodFailure::NotOnline.to_string()))
        }
        Err(MethodFailure::Timeout) => {
            Err(ApiError::new(ErrorCode::GatewayTimeout, MethodFailure::Timeout.to_string()))
        }
        Err(MethodFailure::Store(e)) => Err(e.into()),
    }
}
