//! Service twin REST (service-api §4): `GET|PATCH|PUT /twins/{id}` and
//! `/twins/{id}/modules/{mid}`. The identity's `DeviceActor` reads and writes the twin.
//!
//! Bodies: `{"tags":{…},"properties":{"desired":{…}}}`; read-only fields (`deviceId`, `etag`,
//! `$metadata`, `$version`, …) are ignored; `properties.reported` from the service is refused
//! (400, chosen in the spec). `If-Match` takes quoted or bare ETags, `*` = unconditional.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use iothubd_actors::directory::HubHandle;
use iothubd_actors::messages::{GetTwin, TwinFailure, TwinRead, UpdateTwin};
use iothubd_actors::model::hub::AccessRights;
use iothubd_actors::model::identity::{ConnectionView, IdentityKey};
use iothubd_actors::model::twin::TwinIdentity;
use serde_json::{Map, Value};

use super::AppState;
use super::error::{ApiError, ErrorCode};
use super::service::{ServiceCall, if_match, path_identity};

pub fn configure(cfg: &mut web::ServiceConfig) {
    for path in ["/twins/{id}", "/twins/{id}/modules/{mid}"] {
        cfg.route(path, web::get().to(get_twin))
            .route(path, web::patch().to(patch_twin))
            .route(path, web::put().to(put_twin));
    }
}

fn twin_error(e: TwinFailure) -> ApiError {
    match e {
        TwinFailure::NotFound(k) if k.is_module() => ApiError::new(ErrorCode::ModuleNotFound, format!("{k} not found")),
        TwinFailure::NotFound(k) => ApiError::new(ErrorCode::DeviceNotFound, format!("{k} not found")),
        TwinFailure::PreconditionFailed => ApiError::new(ErrorCode::PreconditionFailed, e.to_string()),
        TwinFailure::Invalid(reason) => ApiError::invalid(reason),
        TwinFailure::Store(s) => s.into(),
    }
}

/// Sends a twin message to the identity's actor and maps its failure.
async fn ask<M>(hub: &HubHandle, key: &IdentityKey, msg: M) -> Result<TwinRead, ApiError>
where
    M: actix::Message<Result = Result<TwinRead, TwinFailure>> + Send + 'static,
    iothubd_actors::device::DeviceActor: actix::Handler<M>,
{
    hub.shared
        .device(key)
        .send(msg)
        .await
        .map_err(|_| ApiError::new(ErrorCode::ServiceUnavailable, "the device actor is not running"))?
        .map_err(twin_error)
}

fn twin_response(read: &TwinRead) -> HttpResponse {
    let live = ConnectionView { connected: read.connected, ..Default::default() };
    let body = read.twin.service_json(&TwinIdentity::new(&read.identity, &live, ""));
    HttpResponse::build(StatusCode::OK).insert_header(("ETag", format!("\"{}\"", read.twin.etag()))).json(body)
}

async fn get_twin(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::SERVICE_CONNECT)?;
    let key = path_identity(&req)?;
    Ok(twin_response(&ask(&call.hub, &key, GetTwin).await?))
}

async fn patch_twin(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    update(req, state, body, false).await
}

async fn put_twin(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    update(req, state, body, true).await
}

/// A section of the body: an object, or absent/`null`.
fn section(v: Option<&Value>, name: &str) -> Result<Option<Map<String, Value>>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o.clone())),
        Some(_) => Err(ApiError::invalid(format!("{name} must be a JSON object"))),
    }
}

async fn update(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
    replace: bool,
) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::SERVICE_CONNECT)?;
    let key = path_identity(&req)?;
    let doc: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::IotHubFormatError, format!("the body is not valid JSON: {e}")))?;
    let obj =
        doc.as_object().ok_or_else(|| ApiError::new(ErrorCode::IotHubFormatError, "the body must be a JSON object"))?;
    let properties = obj.get("properties");
    if properties.and_then(|p| p.get("reported")).is_some_and(|r| !r.is_null()) {
        return Err(ApiError::invalid("properties.reported is written by the device, not by the service"));
    }
    let update = UpdateTwin {
        tags: section(obj.get("tags"), "tags")?,
        desired: section(properties.and_then(|p| p.get("desired")), "properties.desired")?,
        replace,
        if_match: if_match(&req),
    };
    Ok(twin_response(&ask(&call.hub, &key, update).await?))
}
