//! Identity registry REST (service-api §3): devices, modules, listing, statistics, bulk.
//!
//! Reads go to the store; writes are messages to the hub's `HubActor`. Bodies are read
//! leniently (SDKs send read-only fields and `null`s); the fields a client may set are taken
//! into an `IdentitySpec`, everything else is ignored.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use iothubd_actors::directory::HubHandle;
use iothubd_actors::import::{ImportItem, ImportMode, TwinImport};
use iothubd_actors::messages::{ImportIdentities, RegistryError, RegistryWrite};
use iothubd_actors::model::hub::AccessRights;
use iothubd_actors::model::identity::{
    Authentication, AuthenticationType, ConnectionView, Identity, IdentityKey, IdentitySpec, IdentityStatus,
    SymmetricKey, X509Thumbprint,
};
use serde_json::{Map, Value, json};

use super::AppState;
use super::error::{ApiError, ErrorCode};
use super::service::{ServiceCall, if_match, path_identity, path_segment, query_param};

/// Most items in one bulk request (service-api §3).
const MAX_BULK_ITEMS: usize = 100;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/devices", web::get().to(list_devices))
        .route("/devices", web::post().to(bulk))
        .route("/devices/{id}", web::get().to(get_identity))
        .route("/devices/{id}", web::put().to(put_identity))
        .route("/devices/{id}", web::delete().to(delete_identity))
        .route("/devices/{id}/modules", web::get().to(list_modules))
        .route("/devices/{id}/modules/{mid}", web::get().to(get_identity))
        .route("/devices/{id}/modules/{mid}", web::put().to(put_identity))
        .route("/devices/{id}/modules/{mid}", web::delete().to(delete_identity))
        .route("/statistics/devices", web::get().to(device_statistics))
        .route("/statistics/service", web::get().to(service_statistics));
}

fn not_found(key: &IdentityKey) -> ApiError {
    RegistryError::NotFound(key.clone()).into()
}

fn identity_response(status: StatusCode, identity: &Identity, live: &ConnectionView) -> HttpResponse {
    HttpResponse::build(status).insert_header(("ETag", format!("\"{}\"", identity.etag))).json(identity.json(live))
}

async fn send(call: &ServiceCall, write: RegistryWrite) -> Result<Identity, ApiError> {
    call.hub
        .addr
        .send(write)
        .await
        .map_err(|_| ApiError::new(ErrorCode::ServiceUnavailable, "the hub is shutting down"))?
        .map_err(ApiError::from)
}

async fn get_identity(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::REGISTRY_READ)?;
    let key = path_identity(&req)?;
    let identity =
        state.deployment.store().get_identity(call.hub.name(), &key).await?.ok_or_else(|| not_found(&key))?;
    Ok(identity_response(StatusCode::OK, &identity, &ConnectionView::default()))
}

/// PUT without `If-Match` creates (409 when taken); with `If-Match` (an ETag or `*`) it
/// replaces an existing identity (412 on mismatch, 404 when missing).
async fn put_identity(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::REGISTRY_WRITE)?;
    let key = path_identity(&req)?;
    let body = parse_object(&body)?;
    check_body_ids(&body, &key)?;
    let spec = identity_spec(&body)?;
    let write = match if_match(&req) {
        None => RegistryWrite::Create { key, spec },
        Some(etag) => RegistryWrite::Replace { key, spec, if_match: Some(etag) },
    };
    let identity = send(&call, write).await?;
    Ok(identity_response(StatusCode::OK, &identity, &ConnectionView::default()))
}

async fn delete_identity(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::REGISTRY_WRITE)?;
    let key = path_identity(&req)?;
    send(&call, RegistryWrite::Delete { key, if_match: if_match(&req) }).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn list_devices(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::REGISTRY_READ)?;
    // `top` outside 1–1000 (or absent) means 1000 (service-api §3).
    let top = query_param(&req, "top").and_then(|t| t.parse::<usize>().ok()).filter(|t| (1..=1000).contains(t));
    let devices = state.deployment.store().list_devices(call.hub.name(), None, top.unwrap_or(1000)).await?;
    let live = ConnectionView::default();
    Ok(HttpResponse::Ok().json(devices.iter().map(|d| d.device_json(&live)).collect::<Vec<_>>()))
}

async fn list_modules(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::REGISTRY_READ)?;
    let device = IdentityKey::device(path_segment(&req, 1)?);
    let store = state.deployment.store();
    if store.get_identity(call.hub.name(), &device).await?.is_none() {
        return Err(not_found(&device));
    }
    let modules = store.list_modules(call.hub.name(), &device.device_id).await?;
    let live = ConnectionView::default();
    Ok(HttpResponse::Ok().json(modules.iter().map(|m| m.module_json(&live)).collect::<Vec<_>>()))
}

async fn device_statistics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::REGISTRY_READ)?;
    Ok(HttpResponse::Ok().json(state.deployment.store().device_statistics(call.hub.name()).await?))
}

async fn service_statistics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::REGISTRY_READ)?;
    Ok(HttpResponse::Ok().json(json!({ "connectedDeviceCount": call.hub.shared.connected_count() })))
}

/// Bulk `POST /devices`: 200 when every item succeeded, else 400 with per-item errors.
async fn bulk(req: HttpRequest, state: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let call = ServiceCall::authorize(&req, &state, AccessRights::REGISTRY_WRITE)?;
    let items: Vec<Value> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::IotHubFormatError, format!("the body is not a JSON array: {e}")))?;
    if items.len() > MAX_BULK_ITEMS {
        return Err(ApiError::new(
            ErrorCode::TooManyDevices,
            format!("a bulk request holds at most {MAX_BULK_ITEMS} identities, not {}", items.len()),
        ));
    }
    let items = items.iter().map(import_item).collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = items.iter().find(|i| !seen.insert(&i.key)) {
        return Err(ApiError::new(
            ErrorCode::DeviceDefinedMultipleTimes,
            format!("{} appears more than once in the request", dup.key),
        ));
    }
    let report = run_import(&call.hub, items).await?;
    let status = if report.successful { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    Ok(HttpResponse::build(status).json(report.json()))
}

/// The result of an import, in the shape of the bulk reply.
pub struct ImportReport {
    pub successful: bool,
    pub errors: Vec<Value>,
}

impl ImportReport {
    pub fn json(&self) -> Value {
        json!({ "isSuccessful": self.successful, "errors": self.errors, "warnings": [] })
    }
}

/// Sends `items` to the hub's actor and collects per-item errors in the bulk reply's shape.
pub async fn run_import(hub: &HubHandle, items: Vec<ImportItem>) -> Result<ImportReport, ApiError> {
    let described: Vec<(IdentityKey, ImportMode)> = items.iter().map(|i| (i.key.clone(), i.mode)).collect();
    let results = hub
        .addr
        .send(ImportIdentities(items))
        .await
        .map_err(|_| ApiError::new(ErrorCode::ServiceUnavailable, "the hub is shutting down"))?;
    let errors: Vec<Value> = described
        .into_iter()
        .zip(results)
        .filter_map(|((key, mode), result)| {
            let err = result.err()?;
            let code = ApiError::from(err.clone()).code;
            Some(json!({
                "deviceId": key.device_id,
                "moduleId": key.module_id,
                "errorCode": code.name(),
                "errorStatus": err.to_string(),
                "operation": mode.name(),
            }))
        })
        .collect();
    Ok(ImportReport { successful: errors.is_empty(), errors })
}

/// One item of a bulk request or an import line (Azure's ExportImportDevice shape).
pub fn import_item(v: &Value) -> Result<ImportItem, ApiError> {
    let obj = v.as_object().ok_or_else(|| ApiError::invalid("each item must be a JSON object"))?;
    let id = str_field(obj, "id")
        .or_else(|| str_field(obj, "deviceId"))
        .ok_or_else(|| ApiError::new(ErrorCode::ArgumentNull, "an item has no id"))?;
    let key = match str_field(obj, "moduleId") {
        Some(m) => IdentityKey::module(id, m),
        None => IdentityKey::device(id),
    };
    let mode = match str_field(obj, "importMode") {
        Some(m) => m.parse::<ImportMode>().map_err(ApiError::invalid)?,
        None => ImportMode::default(),
    };
    let etag = str_field(obj, "eTag").or_else(|| str_field(obj, "etag")).map(|e| e.trim_matches('"').to_owned());
    let object = |v: Option<&Value>, what: &str| match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o.clone())),
        Some(_) => Err(ApiError::invalid(format!("{what} must be a JSON object"))),
    };
    let twin = TwinImport {
        tags: object(obj.get("tags"), "tags")?,
        desired: object(obj.get("properties").and_then(|p| p.get("desired")), "properties.desired")?,
        etag: str_field(obj, "twinETag").map(|e| e.trim_matches('"').to_owned()),
    };
    Ok(ImportItem { key, mode, etag, spec: identity_spec(obj)?, twin })
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::new(ErrorCode::IotHubFormatError, "the body must be a JSON object")),
        Err(e) => Err(ApiError::new(ErrorCode::IotHubFormatError, format!("the body is not valid JSON: {e}"))),
    }
}

/// `deviceId` (and `moduleId`) in a body must equal the path's, when given.
fn check_body_ids(body: &Map<String, Value>, key: &IdentityKey) -> Result<(), ApiError> {
    if str_field(body, "deviceId").is_some_and(|d| d != key.device_id) {
        return Err(ApiError::invalid("deviceId in the body differs from the one in the path"));
    }
    if let Some(m) = &key.module_id
        && str_field(body, "moduleId").is_some_and(|b| b != *m)
    {
        return Err(ApiError::invalid("moduleId in the body differs from the one in the path"));
    }
    Ok(())
}

fn str_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    obj.get(name).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn opt_string(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

/// The settable fields of a device or module body; read-only fields and `null`s are ignored.
pub fn identity_spec(obj: &Map<String, Value>) -> Result<IdentitySpec, ApiError> {
    let status = match str_field(obj, "status") {
        None => None,
        Some(s) if s.eq_ignore_ascii_case("enabled") => Some(IdentityStatus::Enabled),
        Some(s) if s.eq_ignore_ascii_case("disabled") => Some(IdentityStatus::Disabled),
        Some(s) => return Err(ApiError::invalid(format!("status '{s}' is neither enabled nor disabled"))),
    };
    let authentication = match obj.get("authentication") {
        None | Some(Value::Null) => None,
        Some(Value::Object(a)) => Some(authentication(a)?),
        Some(_) => return Err(ApiError::invalid("authentication must be an object")),
    };
    let iot_edge = obj.get("capabilities").and_then(|c| c.get("iotEdge")).and_then(Value::as_bool);
    Ok(IdentitySpec {
        status,
        status_reason: opt_string(obj.get("statusReason")),
        authentication,
        iot_edge,
        managed_by: opt_string(obj.get("managedBy")),
        device_scope: opt_string(obj.get("deviceScope")),
    })
}

fn authentication(a: &Map<String, Value>) -> Result<Authentication, ApiError> {
    let kind = match a.get("type").and_then(Value::as_str) {
        None => AuthenticationType::Sas,
        Some(t) => match t.to_ascii_lowercase().as_str() {
            "sas" => AuthenticationType::Sas,
            "selfsigned" => AuthenticationType::SelfSigned,
            "certificateauthority" => AuthenticationType::CertificateAuthority,
            "none" => AuthenticationType::None,
            _ => return Err(ApiError::invalid(format!("authentication.type '{t}' is unknown"))),
        },
    };
    let field = |section: &str, name: &str| opt_string(a.get(section).and_then(|s| s.get(name)));
    Ok(Authentication {
        symmetric_key: SymmetricKey {
            primary_key: field("symmetricKey", "primaryKey"),
            secondary_key: field("symmetricKey", "secondaryKey"),
        },
        x509_thumbprint: X509Thumbprint {
            primary_thumbprint: field("x509Thumbprint", "primaryThumbprint"),
            secondary_thumbprint: field("x509Thumbprint", "secondaryThumbprint"),
        },
        kind,
    })
}
