//! Who may do what: SAS tokens checked against a hub's policies and its identity registry
//! (device-protocol §1.3, service-api §1).
//!
//! - [`sas`]: the token itself — parsing, signing, HMAC verification, resource coverage.
//! - [`authorize_service`]: back-end requests; a policy token with enough rights.
//! - [`device_scope_of`] + [`authorize_identity`]: device endpoints; the caller reads the
//!   identity a token names from the store, then asks whether the token may act as it.
//!
//! Everything here is pure: callers pass the hub, the identity the store returned and the
//! clock, so the rules are tested without I/O. This runs on every MQTT CONNECT, AMQP
//! `put-token` and REST call, so the token borrows its text and the only allocations are the
//! decoded `sr`, each decoded key, the returned [`Principal`] and error texts.
//! Every failure is one [`AuthError`]; HTTP maps them all to 401 `IotHubUnauthorizedAccess`
//! (service-api §2), MQTT to a CONNACK code ([`AuthError::connack_code`], device-protocol §2.2).

pub mod connection_string;
pub mod sas;

use iothubd_actors::model::hub::{AccessRights, AuthorizationPolicy, HubDescription};
use iothubd_actors::model::identity::{AuthenticationType, Identity, IdentityKey};

pub use connection_string::ServiceConnectionString;
pub use sas::{InvalidKey, SasToken, sign};

pub mod x509;

/// Why a token was refused. The texts tell the client what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("malformed SAS token: {0}; expected 'SharedAccessSignature sr=…&sig=…&se=…[&skn=…]'")]
    Malformed(&'static str),
    #[error("the SAS token expired at {expiry} (Unix seconds; the hub's clock reads {now}): issue a new token")]
    Expired { expiry: u64, now: u64 },
    #[error(
        "the SAS token's signature matches neither key of {signer}: check the key, and that \
         the token signs sr and se exactly as sent"
    )]
    BadSignature { signer: String },
    #[error("this hub has no shared access policy named '{0}' (skn)")]
    UnknownPolicy(String),
    #[error("{holder} grants [{granted}] but this operation needs [{needed}]")]
    InsufficientRights { holder: String, granted: AccessRights, needed: AccessRights },
    #[error("the SAS token is scoped to '{scope}', which does not cover '{target}'")]
    WrongScope { scope: String, target: String },
    #[error(
        "a device token (no skn) must be scoped to {{host}}/devices/{{deviceId}}[/modules/{{moduleId}}], \
         not '{scope}'"
    )]
    DeviceTokenNotScoped { scope: String },
    #[error("identity '{0}' is disabled in the registry")]
    IdentityDisabled(IdentityKey),
    #[error("identity '{0}' is not in the registry")]
    UnknownIdentity(IdentityKey),
    #[error("identity '{identity}' authenticates with {kind}, not symmetric keys, so it cannot use a device token")]
    NotSasIdentity { identity: IdentityKey, kind: &'static str },
    #[error("identity '{0}' does not authenticate with X.509 certificates: connect with a SAS token")]
    NotX509Identity(IdentityKey),
    #[error("the client certificate's thumbprint matches neither registered thumbprint of '{0}'")]
    CertificateMismatch(IdentityKey),
    #[error("the client certificate of '{identity}' does not chain to a verified CA of this hub: {reason}")]
    CertificateNotTrusted { identity: IdentityKey, reason: String },
    #[error("the client certificate's common name is '{common_name}', not '{identity}'")]
    CommonNameMismatch { identity: IdentityKey, common_name: String },
}

impl AuthError {
    /// The MQTT CONNACK return code (device-protocol §2.2): 4 when the password is not a
    /// token at all (the C SDK then stops retrying), 5 for every refused token.
    pub fn connack_code(&self) -> u8 {
        match self {
            Self::Malformed(_) => 4,
            _ => 5,
        }
    }
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A shared access policy of the hub (token with `skn`), with its rights.
    Policy { name: String, rights: AccessRights },
    /// A device or module, signed with its own key.
    Identity(IdentityKey),
}

/// Authorizes a back-end request (service-api §1).
///
/// `authorization_header` is the whole `Authorization` value; `target` is `{host}/{path}` of
/// the request with decoded IDs, e.g. `myhub.azure-devices.net/devices/d1`. Only policy
/// tokens are accepted: a device or module token carries no service rights.
pub fn authorize_service(
    hub: &HubDescription,
    authorization_header: &str,
    target: &str,
    needed: AccessRights,
    now: u64,
) -> Result<Principal, AuthError> {
    let token = SasToken::parse(authorization_header)?;
    check_expiry(&token, now)?;
    let Some(name) = token.key_name() else {
        return Err(AuthError::InsufficientRights {
            holder: format!("the device-scoped token for '{}' (no skn)", token.resource()),
            granted: AccessRights::DEVICE_CONNECT,
            needed,
        });
    };
    let policy = verified_policy(hub, &token, name)?;
    if !policy.rights.contains(needed) {
        return Err(AuthError::InsufficientRights {
            holder: format!("policy '{name}'"),
            granted: policy.rights,
            needed,
        });
    }
    if !token.covers(target) {
        return Err(wrong_scope(&token, target.to_owned()));
    }
    Ok(Principal::Policy { name: policy.key_name.clone(), rights: policy.rights })
}

/// The identity a decoded `sr` names: `{host}/devices/{d}` or `{host}/devices/{d}/modules/{m}`
/// (IDs percent-decoded once more, since C# encodes them inside `sr`). `None` for hub-wide
/// or other resources. Pass [`SasToken::resource`].
pub fn device_scope_of(sr: &str) -> Option<IdentityKey> {
    sas::identity_scope(sr).map(|(device_id, module_id)| IdentityKey { device_id, module_id })
}

/// Authorizes a connection acting as `target_identity` on a device endpoint (MQTT, AMQP,
/// device HTTPS) — device-protocol §1.3.
///
/// `identity` is what the store holds under `target_identity` (`None` if absent). Accepted:
/// - a device/module token (no `skn`) signed with the identity's primary or secondary key,
///   scoped to `{host}/devices/{d}` (a module: or `…/modules/{m}`), never hub-wide;
/// - a policy token whose policy has DeviceConnect and whose `sr` covers the identity.
///
/// Either way the identity must exist and be enabled (device-protocol §1.1). For a policy
/// token the returned principal is the policy; the session still belongs to `target_identity`.
pub fn authorize_identity(
    hub: &HubDescription,
    token: &SasToken<'_>,
    identity: Option<&Identity>,
    target_identity: &IdentityKey,
    now: u64,
) -> Result<Principal, AuthError> {
    check_expiry(token, now)?;
    // A store answer for another key would check the token against the wrong keys.
    let identity = identity.filter(|i| i.key == *target_identity);
    let principal = match token.key_name() {
        Some(name) => {
            let policy = verified_policy(hub, token, name)?;
            if !policy.rights.contains(AccessRights::DEVICE_CONNECT) {
                return Err(AuthError::InsufficientRights {
                    holder: format!("policy '{name}'"),
                    granted: policy.rights,
                    needed: AccessRights::DEVICE_CONNECT,
                });
            }
            check_identity_scope(hub, token, target_identity)?;
            Principal::Policy { name: policy.key_name.clone(), rights: policy.rights }
        }
        None => {
            let id = identity.ok_or_else(|| AuthError::UnknownIdentity(target_identity.clone()))?;
            let auth = &id.authentication;
            if auth.kind != AuthenticationType::Sas {
                return Err(AuthError::NotSasIdentity {
                    identity: target_identity.clone(),
                    kind: authentication_name(auth.kind),
                });
            }
            let keys = [&auth.symmetric_key.primary_key, &auth.symmetric_key.secondary_key];
            if !keys.into_iter().flatten().any(|k| token.verify(k)) {
                return Err(AuthError::BadSignature { signer: format!("identity '{target_identity}'") });
            }
            // device-protocol §1.3: a device token names its device; `{host}` or
            // `{host}/devices` would be a hub-wide grant no device key may give.
            if token.scope_depth() < 2 {
                return Err(AuthError::DeviceTokenNotScoped { scope: token.resource().to_owned() });
            }
            check_identity_scope(hub, token, target_identity)?;
            Principal::Identity(target_identity.clone())
        }
    };
    let id = identity.ok_or_else(|| AuthError::UnknownIdentity(target_identity.clone()))?;
    if !id.is_enabled() {
        return Err(AuthError::IdentityDisabled(target_identity.clone()));
    }
    Ok(principal)
}

fn check_expiry(token: &SasToken<'_>, now: u64) -> Result<(), AuthError> {
    if token.is_expired(now) { Err(AuthError::Expired { expiry: token.expiry(), now }) } else { Ok(()) }
}

/// The policy `skn` names, once the token is shown to be signed by one of its keys.
fn verified_policy<'h>(
    hub: &'h HubDescription,
    token: &SasToken<'_>,
    name: &str,
) -> Result<&'h AuthorizationPolicy, AuthError> {
    let policy = hub.policy(name).ok_or_else(|| AuthError::UnknownPolicy(name.to_owned()))?;
    if token.verify(&policy.primary_key) || token.verify(&policy.secondary_key) {
        Ok(policy)
    } else {
        Err(AuthError::BadSignature { signer: format!("policy '{name}'") })
    }
}

/// `sr` must cover `{host}/devices/{d}` or `{host}/devices/{d}/modules/{m}`.
fn check_identity_scope(hub: &HubDescription, token: &SasToken<'_>, target: &IdentityKey) -> Result<(), AuthError> {
    let host = hub.properties.host_name.as_str();
    let (d, m) = (target.device_id.as_str(), target.module_id.as_deref());
    let path = ["devices", d, "modules", m.unwrap_or_default()];
    let depth = if m.is_some() { 4 } else { 2 };
    if token.covers_segments(host, path[..depth].iter().copied()) {
        return Ok(());
    }
    Err(wrong_scope(token, format!("{host}/{}", path[..depth].join("/"))))
}

fn wrong_scope(token: &SasToken<'_>, target: String) -> AuthError {
    AuthError::WrongScope { scope: token.resource().to_owned(), target }
}

/// `authentication.type` as the registry JSON spells it (service-api §3).
fn authentication_name(kind: AuthenticationType) -> &'static str {
    match kind {
        AuthenticationType::Sas => "sas",
        AuthenticationType::SelfSigned => "selfSigned",
        AuthenticationType::CertificateAuthority => "certificateAuthority",
        AuthenticationType::None => "none",
    }
}

#[cfg(test)]
mod tests;
