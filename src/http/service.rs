//! The checks every service REST call makes before its handler runs: `api-version` present
//! (service-api §0), the hub found from `Host` (DESIGN.md §5), and a SAS token with the rights
//! the operation needs (service-api §1).

use std::time::{SystemTime, UNIX_EPOCH};

use actix_web::HttpRequest;
use actix_web::http::header;
use iothubd_actors::directory::HubHandle;
use iothubd_actors::model::hub::AccessRights;
use iothubd_actors::model::identity::IdentityKey;
use percent_encoding::percent_decode_str;

use super::AppState;
use super::error::{ApiError, ErrorCode};
use crate::auth::{self, Principal};

/// An authorized service call: the hub it addresses and who is calling.
pub struct ServiceCall {
    pub hub: HubHandle,
    pub principal: Principal,
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The value of one query parameter, percent-decoded.
pub fn query_param(req: &HttpRequest, name: &str) -> Option<String> {
    req.query_string().split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        k.eq_ignore_ascii_case(name).then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
    })
}

/// The host the client addressed (`Host` header, else the URI authority).
pub fn request_host(req: &HttpRequest) -> String {
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().host().map(str::to_owned))
        .unwrap_or_default()
}

/// Raw path segment `index` (0 = first after the leading `/`), fully percent-decoded.
/// IDs may contain `%`, `+` and other characters a router would treat specially, so IDs are
/// read from the raw path, not from the router's partially decoded match.
pub fn path_segment(req: &HttpRequest, index: usize) -> Result<String, ApiError> {
    let raw = req.uri().path().split('/').filter(|s| !s.is_empty()).nth(index).unwrap_or("");
    percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::invalid("the path holds an identifier that is not UTF-8"))
}

/// The identity a path addresses: segment 1 is the device; with a `{mid}` route parameter,
/// segment 3 is the module (`/devices/{id}/modules/{mid}…`, `/twins/{id}/modules/{mid}…`).
pub fn path_identity(req: &HttpRequest) -> Result<IdentityKey, ApiError> {
    let device = path_segment(req, 1)?;
    Ok(match req.match_info().get("mid") {
        Some(_) => IdentityKey::module(device, path_segment(req, 3)?),
        None => IdentityKey::device(device),
    })
}

/// `If-Match` without its quotes: C# sends `"x"` and `"*"`, Python and Node bare values.
pub fn if_match(req: &HttpRequest) -> Option<String> {
    let v = req.headers().get(header::IF_MATCH)?.to_str().ok()?.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    let v = v.trim_matches('"');
    (!v.is_empty()).then(|| v.to_owned())
}

impl ServiceCall {
    /// Runs the common checks; `needed` are the rights the operation requires.
    pub fn authorize(req: &HttpRequest, state: &AppState, needed: AccessRights) -> Result<Self, ApiError> {
        if query_param(req, "api-version").is_none_or(|v| v.is_empty()) {
            return Err(ApiError::new(ErrorCode::ArgumentNull, "the api-version query parameter is required"));
        }
        let host = request_host(req);
        let hub = state.deployment.directory().resolve(&host).ok_or_else(|| {
            ApiError::new(ErrorCode::IotHubUnauthorizedAccess, format!("no hub is served at host '{host}'"))
        })?;
        let token =
            req.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()).ok_or_else(|| {
                ApiError::new(ErrorCode::IotHubUnauthorizedAccess, "the Authorization header is missing")
            })?;
        let description = hub.description();
        let path = percent_decode_str(req.uri().path()).decode_utf8_lossy();
        let target = format!("{}{}", description.properties.host_name, path.trim_end_matches('/'));
        let principal = auth::authorize_service(&description, token, &target, needed, unix_now())?;
        Ok(Self { hub, principal })
    }
}
