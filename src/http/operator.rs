//! The operator API: hub management, the resource-provider analogue (DESIGN.md §5).
//!
//! Authenticated by `Authorization: Bearer <operator key>` (config `operator.key`). Hubs are
//! read and written in the ARM shape (`HubDescription`); identities are exported and imported
//! as JSON lines of Azure's ExportImportDevice shape, keys optional.
//!
//! | call | answer |
//! |---|---|
//! | `GET /operator/hubs` | `{"value":[hub…]}` |
//! | `GET /operator/hubs/{name}` | hub, 404 |
//! | `PUT /operator/hubs/{name}` | 201 created / 200 replaced (`If-Match` optional), 400, 409, 412 |
//! | `DELETE /operator/hubs/{name}` | 204, 404 — the hub's data goes with it |
//! | `GET /operator/hubs/{name}/identities[?keys=false]` | `application/x-ndjson`, one identity a line |
//! | `POST /operator/hubs/{name}/identities` | JSON lines in, the bulk reply out (200 / 400) |
//! | `GET /operator/hubs/{name}/certificates` | `{"value":[{name, properties:{certificate, isVerified, thumbprint}}]}` |
//! | `PUT /operator/hubs/{name}/certificates/{cert}` | `{"properties":{"certificate":"<PEM>","isVerified":true}}` → 201 / 200, 400 |
//! | `DELETE /operator/hubs/{name}/certificates/{cert}` | 204, 404 |
//!
//! CA certificates serve X.509 `certificateAuthority` devices. Proof of possession is the
//! operator's call: a certificate is trusted once registered with `isVerified: true` (Azure
//! also allows verifying on upload).

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures::stream;
use iothubd_actors::deployment::HubAdminError;
use iothubd_actors::directory::HubHandle;
use iothubd_actors::model::hub::{CaCertificate, HubDescription};
use iothubd_actors::model::identity::Identity;
use iothubd_actors::store::Store;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::OperatorError;
use super::registry::{import_item, run_import};
use super::service::{if_match, query_param};

/// Identities read from the store per export page.
const EXPORT_PAGE: usize = 1000;
/// Import items sent to the hub actor per message.
const IMPORT_CHUNK: usize = 100;
/// Largest import body accepted.
const IMPORT_LIMIT: usize = 256 * 1024 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/operator/hubs", web::get().to(list_hubs))
        .route("/operator/hubs/{name}", web::get().to(get_hub))
        .route("/operator/hubs/{name}", web::put().to(put_hub))
        .route("/operator/hubs/{name}", web::delete().to(delete_hub))
        .route("/operator/hubs/{name}/identities", web::get().to(export_identities))
        .route("/operator/hubs/{name}/certificates", web::get().to(list_certificates))
        .route("/operator/hubs/{name}/certificates/{cert}", web::put().to(put_certificate))
        .route("/operator/hubs/{name}/certificates/{cert}", web::delete().to(delete_certificate))
        .service(
            web::resource("/operator/hubs/{name}/identities")
                .app_data(web::PayloadConfig::new(IMPORT_LIMIT))
                .route(web::post().to(import_identities)),
        );
}

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), OperatorError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(state.operator_key.as_bytes())) && !presented.is_empty() {
        Ok(())
    } else {
        Err(OperatorError::new(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the operator API needs `Authorization: Bearer <operator key>`",
        ))
    }
}

fn hub_name(req: &HttpRequest) -> String {
    req.match_info().get("name").unwrap_or_default().to_owned()
}

fn find_hub(state: &AppState, name: &str) -> Result<HubHandle, OperatorError> {
    state.deployment.directory().get(name).ok_or_else(|| HubAdminError::NotFound.into())
}

fn hub_response(status: StatusCode, hub: &HubDescription) -> HttpResponse {
    HttpResponse::build(status).insert_header(("ETag", format!("\"{}\"", hub.etag))).json(hub)
}

async fn list_hubs(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, OperatorError> {
    authorize(&req, &state)?;
    let hubs: Vec<_> = state.deployment.directory().all().iter().map(|h| h.description()).collect();
    let hubs: Vec<&HubDescription> = hubs.iter().map(|h| h.as_ref()).collect();
    Ok(HttpResponse::Ok().json(json!({ "value": hubs })))
}

async fn get_hub(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, OperatorError> {
    authorize(&req, &state)?;
    let hub = find_hub(&state, &hub_name(&req))?;
    Ok(hub_response(StatusCode::OK, &hub.description()))
}

/// Creates the hub (201) or replaces its settings (200). A missing `properties.hostName`
/// defaults to `{name}.azure-devices.net`, so SDK connection strings look as on Azure.
async fn put_hub(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, OperatorError> {
    authorize(&req, &state)?;
    let name = hub_name(&req);
    let bad = |why: String| OperatorError::new(StatusCode::BAD_REQUEST, "InvalidHub", why);
    let mut doc: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(format!("the body is not valid JSON: {e}")))?
    };
    let obj = doc.as_object_mut().ok_or_else(|| bad("the body must be a JSON object".into()))?;
    if obj.get("name").and_then(Value::as_str).is_some_and(|n| n != name) {
        return Err(bad("name in the body differs from the one in the path".into()));
    }
    obj.insert("name".into(), json!(name));
    let props = obj.entry("properties").or_insert_with(|| json!({}));
    let props = props.as_object_mut().ok_or_else(|| bad("properties must be an object".into()))?;
    if props.get("hostName").and_then(Value::as_str).is_none_or(str::is_empty) {
        props.insert("hostName".into(), json!(format!("{name}.azure-devices.net")));
    }
    let description: HubDescription =
        serde_json::from_value(doc).map_err(|e| bad(format!("the hub description is invalid: {e}")))?;
    if state.deployment.directory().get(&name).is_some() {
        let updated = state.deployment.update_hub(description, if_match(&req)).await?;
        Ok(hub_response(StatusCode::OK, &updated))
    } else {
        let created = state.deployment.create_hub(description).await?;
        Ok(hub_response(StatusCode::CREATED, &created))
    }
}

async fn delete_hub(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, OperatorError> {
    authorize(&req, &state)?;
    state.deployment.delete_hub(&hub_name(&req)).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// One export line: Azure's ExportImportDevice shape; keys left out unless asked for.
fn export_line(identity: &Identity, with_keys: bool) -> Value {
    let mut auth = serde_json::to_value(&identity.authentication).unwrap_or(Value::Null);
    if !with_keys && let Some(sk) = auth.get_mut("symmetricKey") {
        *sk = json!({ "primaryKey": null, "secondaryKey": null });
    }
    json!({
        "id": identity.key.device_id,
        "moduleId": identity.key.module_id,
        "eTag": identity.etag,
        "status": identity.status.as_str(),
        "statusReason": identity.status_reason,
        "authentication": auth,
        "capabilities": { "iotEdge": identity.iot_edge },
        "managedBy": identity.managed_by,
        "deviceScope": identity.device_scope,
    })
}

/// Streams every identity of the hub, a page of devices (and their modules) at a time.
async fn export_identities(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, OperatorError> {
    authorize(&req, &state)?;
    let hub = find_hub(&state, &hub_name(&req))?;
    let with_keys = query_param(&req, "keys").is_none_or(|k| !k.eq_ignore_ascii_case("false"));
    let store = state.deployment.store().clone();
    let hub_name = hub.name().to_owned();
    // Stream state: `None` = finished; `Some(None)` = first page; `Some(Some(id))` = the page
    // after device `id`.
    let pages = stream::unfold(Some(None::<String>), move |cursor| {
        let store = store.clone();
        let hub = hub_name.clone();
        async move {
            let after = cursor?;
            match export_page(&*store, &hub, after.as_deref(), with_keys).await {
                Ok((bytes, next)) => Some((Ok::<_, actix_web::Error>(web::Bytes::from(bytes)), next.map(Some))),
                Err(e) => Some((Err(actix_web::error::ErrorServiceUnavailable(e.to_string())), None)),
            }
        }
    });
    Ok(HttpResponse::Ok().content_type("application/x-ndjson").streaming(pages))
}

/// One page of export lines and the cursor for the next page (`None` after the last).
async fn export_page(
    store: &dyn Store,
    hub: &str,
    after: Option<&str>,
    with_keys: bool,
) -> Result<(Vec<u8>, Option<String>), iothubd_actors::store::StoreError> {
    let devices = store.list_devices(hub, after, EXPORT_PAGE).await?;
    let mut out = Vec::new();
    for device in &devices {
        push_line(&mut out, &export_line(device, with_keys));
        for module in store.list_modules(hub, &device.key.device_id).await? {
            push_line(&mut out, &export_line(&module, with_keys));
        }
    }
    let next = (devices.len() == EXPORT_PAGE).then(|| devices.last().map(|d| d.key.device_id.clone())).flatten();
    Ok((out, next))
}

fn push_line(out: &mut Vec<u8>, v: &Value) {
    out.extend_from_slice(v.to_string().as_bytes());
    out.push(b'\n');
}

/// Applies JSON lines (default mode createOrUpdate); devices before their modules so a file
/// in any order imports.
async fn import_identities(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, OperatorError> {
    authorize(&req, &state)?;
    let hub = find_hub(&state, &hub_name(&req))?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| OperatorError::new(StatusCode::BAD_REQUEST, "InvalidImport", "the body is not UTF-8"))?;
    let mut items = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |why: String| {
            OperatorError::new(StatusCode::BAD_REQUEST, "InvalidImport", format!("line {}: {why}", n + 1))
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        items.push(import_item(&v).map_err(|e| bad(e.message))?);
    }
    items.sort_by_key(|i| i.key.is_module());
    let mut errors = Vec::new();
    let mut imported = 0usize;
    for chunk in items.chunks(IMPORT_CHUNK) {
        let report = run_import(&hub, chunk.to_vec())
            .await
            .map_err(|e| OperatorError::new(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", e.message))?;
        imported += chunk.len() - report.errors.len();
        errors.extend(report.errors);
    }
    let status = if errors.is_empty() { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    Ok(HttpResponse::build(status).json(json!({
        "isSuccessful": errors.is_empty(),
        "importedCount": imported,
        "errors": errors,
        "warnings": [],
    })))
}

fn certificate_json(c: &CaCertificate) -> Value {
    json!({ "name": c.name, "properties": {
        "certificate": c.certificate, "isVerified": c.is_verified, "thumbprint": c.thumbprint } })
}

async fn list_certificates(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, OperatorError> {
    authorize(&req, &state)?;
    let hub = find_hub(&state, &hub_name(&req))?;
    let list: Vec<Value> = hub.description().properties.ca_certificates.iter().map(certificate_json).collect();
    Ok(HttpResponse::Ok().json(json!({ "value": list })))
}

fn certificate_name(req: &HttpRequest) -> Result<String, OperatorError> {
    let name = req.match_info().get("cert").unwrap_or_default();
    let ok = (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(OperatorError::new(
            StatusCode::BAD_REQUEST,
            "InvalidCertificate",
            "certificate names are 1-64 of A-Z a-z 0-9 - . _",
        ))
    }
}

/// Registers (201) or replaces (200) a CA certificate of the hub.
async fn put_certificate(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Bytes,
) -> Result<HttpResponse, OperatorError> {
    authorize(&req, &state)?;
    let hub = find_hub(&state, &hub_name(&req))?;
    let name = certificate_name(&req)?;
    let bad = |why: String| OperatorError::new(StatusCode::BAD_REQUEST, "InvalidCertificate", why);
    let doc: Value = serde_json::from_slice(&body).map_err(|e| bad(format!("the body is not valid JSON: {e}")))?;
    let props = doc.get("properties").unwrap_or(&doc);
    let pem = props
        .get("certificate")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("properties.certificate (PEM) is required".into()))?;
    let thumbprint = crate::auth::x509::check_ca_certificate(pem).map_err(bad)?;
    let certificate = CaCertificate {
        name: name.clone(),
        certificate: pem.to_owned(),
        is_verified: props.get("isVerified").and_then(Value::as_bool).unwrap_or(false),
        thumbprint,
    };
    let mut description = (*hub.description()).clone();
    let cas = &mut description.properties.ca_certificates;
    let existed = cas.iter().any(|c| c.name == name);
    cas.retain(|c| c.name != name);
    cas.push(certificate.clone());
    state.deployment.update_hub(description, None).await?;
    let status = if existed { StatusCode::OK } else { StatusCode::CREATED };
    Ok(HttpResponse::build(status).json(certificate_json(&certificate)))
}

async fn delete_certificate(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, OperatorError> {
    authorize(&req, &state)?;
    let hub = find_hub(&state, &hub_name(&req))?;
    let name = certificate_name(&req)?;
    let mut description = (*hub.description()).clone();
    let before = description.properties.ca_certificates.len();
    description.properties.ca_certificates.retain(|c| c.name != name);
    if description.properties.ca_certificates.len() == before {
        return Err(OperatorError::new(
            StatusCode::NOT_FOUND,
            "CertificateNotFound",
            format!("no certificate '{name}'"),
        ));
    }
    state.deployment.update_hub(description, None).await?;
    Ok(HttpResponse::NoContent().finish())
}
