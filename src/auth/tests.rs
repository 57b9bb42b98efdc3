//! Authorization rules of device-protocol §1.3 and service-api §1, one behaviour per test.
//! Signing itself is checked against an outside implementation in `sas::tests`.

use iothubd_actors::model::hub::{AccessRights as R, AuthorizationPolicy, HubDescription, HubProperties, Sku};
use iothubd_actors::model::identity::{
    Authentication, AuthenticationType, Identity, IdentityKey, IdentitySpec, IdentityStatus, SymmetricKey,
    X509Thumbprint,
};

use super::*;

const HOST: &str = "myhub.azure-devices.net";
const NOW: u64 = 1_700_000_000;
const LATER: u64 = NOW + 3600;
const OWNER_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const OWNER_KEY2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
const READ_KEY: &str = "QEFCQ0RFRkdISUpLTE1OT1BRUlNUVVZXWFlaW1xdXl8=";
const SERVICE_KEY: &str = "YGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6e3x9fn8=";
const DEVICE_POLICY_KEY: &str = "gIGCg4SFhoeIiYqLjI2Oj5CRkpOUlZaXmJmam5ydnp8=";
const D1_KEY: &str = "oKGio6SlpqeoqaqrrK2ur7CxsrO0tba3uLm6u7y9vr8=";
const D1_KEY2: &str = "wMHCw8TFxsfIycrLzM3Oz9DR0tPU1dbX2Nna29zd3t8=";
const MODULE_KEY: &str = "4OHi4+Tl5ufo6err7O3u7/Dx8vP09fb3+Pn6+/z9/v8=";

fn policy(name: &str, primary: &str, secondary: &str, rights: R) -> AuthorizationPolicy {
    AuthorizationPolicy { key_name: name.into(), primary_key: primary.into(), secondary_key: secondary.into(), rights }
}

fn hub() -> HubDescription {
    let all = R::REGISTRY_READ.union(R::REGISTRY_WRITE).union(R::SERVICE_CONNECT).union(R::DEVICE_CONNECT);
    HubDescription {
        name: "myhub".into(),
        etag: String::new(),
        sku: Sku::default(),
        properties: HubProperties {
            host_name: HOST.into(),
            authorization_policies: vec![
                policy("iothubowner", OWNER_KEY, OWNER_KEY2, all),
                policy("registryRead", READ_KEY, READ_KEY, R::REGISTRY_READ),
                policy("service", SERVICE_KEY, SERVICE_KEY, R::SERVICE_CONNECT),
                policy("device", DEVICE_POLICY_KEY, DEVICE_POLICY_KEY, R::DEVICE_CONNECT),
            ],
            ..Default::default()
        },
    }
}

fn sas_identity(key: IdentityKey, primary: &str, secondary: &str) -> Identity {
    let authentication = Authentication {
        symmetric_key: SymmetricKey { primary_key: Some(primary.into()), secondary_key: Some(secondary.into()) },
        ..Default::default()
    };
    Identity::create(key, IdentitySpec { authentication: Some(authentication), ..Default::default() })
        .expect("valid identity")
}

fn d1() -> Identity {
    sas_identity(IdentityKey::device("d1"), D1_KEY, D1_KEY2)
}

fn token(resource: &str, key: &str, policy: Option<&str>) -> String {
    sign(resource, key, LATER, policy).expect("test keys are base64")
}

fn service(header: &str, target: &str, needed: R) -> Result<Principal, AuthError> {
    authorize_service(&hub(), header, target, needed, NOW)
}

fn device(text: &str, identity: Option<&Identity>, target: &IdentityKey) -> Result<Principal, AuthError> {
    let token = SasToken::parse(text)?;
    authorize_identity(&hub(), &token, identity, target, NOW)
}

#[test]
fn owner_token_authorizes_any_service_operation() {
    let t = token(HOST, OWNER_KEY, Some("iothubowner"));
    let p = service(&t, &format!("{HOST}/devices/d1"), R::REGISTRY_WRITE).unwrap();
    assert!(
        matches!(p, Principal::Policy { name, rights } if name == "iothubowner" && rights.contains(R::REGISTRY_WRITE))
    );
}

#[test]
fn policy_secondary_key_works() {
    let t = token(HOST, OWNER_KEY2, Some("iothubowner"));
    assert!(service(&t, &format!("{HOST}/twins/d1"), R::SERVICE_CONNECT).is_ok());
}

#[test]
fn registry_read_policy_cannot_write() {
    let t = token(HOST, READ_KEY, Some("registryRead"));
    let target = format!("{HOST}/devices/d1");
    assert!(service(&t, &target, R::REGISTRY_READ).is_ok());
    let err = service(&t, &target, R::REGISTRY_WRITE).unwrap_err();
    assert!(matches!(err, AuthError::InsufficientRights { needed: R::REGISTRY_WRITE, .. }));
    assert_eq!(err.to_string(), "policy 'registryRead' grants [RegistryRead] but this operation needs [RegistryWrite]");
}

#[test]
fn unknown_skn_is_refused() {
    let t = token(HOST, OWNER_KEY, Some("nosuchpolicy"));
    assert_eq!(service(&t, HOST, R::SERVICE_CONNECT), Err(AuthError::UnknownPolicy("nosuchpolicy".into())));
}

#[test]
fn token_signed_with_another_policys_key_is_refused() {
    let t = token(HOST, SERVICE_KEY, Some("iothubowner"));
    let err = service(&t, HOST, R::SERVICE_CONNECT).unwrap_err();
    assert_eq!(err, AuthError::BadSignature { signer: "policy 'iothubowner'".into() });
    assert_eq!(err.connack_code(), 5);
}

#[test]
fn expired_token_is_refused() {
    let t = sign(HOST, OWNER_KEY, NOW, Some("iothubowner")).unwrap();
    assert_eq!(service(&t, HOST, R::SERVICE_CONNECT), Err(AuthError::Expired { expiry: NOW, now: NOW }));
}

#[test]
fn policy_token_scoped_to_a_device_covers_only_that_device() {
    let t = token(&format!("{HOST}/devices/d1"), OWNER_KEY, Some("iothubowner"));
    assert!(service(&t, &format!("{HOST}/devices/d1/modules/m1"), R::REGISTRY_READ).is_ok());
    let err = service(&t, &format!("{HOST}/devices/d10"), R::REGISTRY_READ).unwrap_err();
    assert!(matches!(err, AuthError::WrongScope { .. }));
}

#[test]
fn policy_token_for_another_hub_is_refused() {
    let t = token("otherhub.azure-devices.net", OWNER_KEY, Some("iothubowner"));
    assert!(matches!(service(&t, HOST, R::SERVICE_CONNECT), Err(AuthError::WrongScope { .. })));
}

#[test]
fn device_token_is_refused_on_service_endpoints() {
    let t = token(&format!("{HOST}/devices/d1"), D1_KEY, None);
    let err = service(&t, &format!("{HOST}/devices/d1"), R::REGISTRY_READ).unwrap_err();
    assert!(matches!(err, AuthError::InsufficientRights { granted: R::DEVICE_CONNECT, .. }));
}

#[test]
fn malformed_header_maps_to_connack_4() {
    let err = service("Bearer abc", HOST, R::SERVICE_CONNECT).unwrap_err();
    assert!(matches!(err, AuthError::Malformed(_)));
    assert_eq!(err.connack_code(), 4);
    let two_spaces = token(HOST, OWNER_KEY, Some("iothubowner")).replacen(' ', "  ", 1);
    assert!(matches!(service(&two_spaces, HOST, R::SERVICE_CONNECT), Err(AuthError::Malformed(_))));
}

#[test]
fn device_token_authorizes_its_device() {
    let t = token(&format!("{HOST}/devices/d1"), D1_KEY, None);
    let d1 = d1();
    assert_eq!(device(&t, Some(&d1), &d1.key), Ok(Principal::Identity(IdentityKey::device("d1"))));
}

#[test]
fn device_secondary_key_works() {
    let t = token(&format!("{HOST}/devices/d1"), D1_KEY2, None);
    let d1 = d1();
    assert!(device(&t, Some(&d1), &d1.key).is_ok());
}

#[test]
fn device_token_with_wrong_key_is_refused() {
    let t = token(&format!("{HOST}/devices/d1"), OWNER_KEY, None);
    let d1 = d1();
    assert_eq!(device(&t, Some(&d1), &d1.key), Err(AuthError::BadSignature { signer: "identity 'd1'".into() }));
}

#[test]
fn device_token_for_d1_is_refused_for_d2_even_with_the_same_key() {
    let t = token(&format!("{HOST}/devices/d1"), D1_KEY, None);
    let d2 = sas_identity(IdentityKey::device("d2"), D1_KEY, D1_KEY2);
    assert!(matches!(device(&t, Some(&d2), &d2.key), Err(AuthError::WrongScope { .. })));
}

#[test]
fn device_sr_d1_does_not_cover_d10() {
    let t = token(&format!("{HOST}/devices/d1"), D1_KEY, None);
    let d10 = sas_identity(IdentityKey::device("d10"), D1_KEY, D1_KEY2);
    let err = device(&t, Some(&d10), &d10.key).unwrap_err();
    assert_eq!(
        err,
        AuthError::WrongScope { scope: format!("{HOST}/devices/d1"), target: format!("{HOST}/devices/d10") }
    );
}

#[test]
fn hub_wide_device_token_is_refused() {
    let d1 = d1();
    for scope in [HOST.to_owned(), format!("{HOST}/devices")] {
        let t = token(&scope, D1_KEY, None);
        assert_eq!(device(&t, Some(&d1), &d1.key), Err(AuthError::DeviceTokenNotScoped { scope }));
    }
}

#[test]
fn module_token_authorizes_its_module_only() {
    let m1 = sas_identity(IdentityKey::module("d1", "m1"), MODULE_KEY, MODULE_KEY);
    let t = token(&format!("{HOST}/devices/d1/modules/m1"), MODULE_KEY, None);
    assert_eq!(device(&t, Some(&m1), &m1.key), Ok(Principal::Identity(IdentityKey::module("d1", "m1"))));
    let m2 = sas_identity(IdentityKey::module("d1", "m2"), MODULE_KEY, MODULE_KEY);
    assert!(matches!(device(&t, Some(&m2), &m2.key), Err(AuthError::WrongScope { .. })));
    // The module token is not its device's token, even if the keys were shared.
    let d1 = sas_identity(IdentityKey::device("d1"), MODULE_KEY, MODULE_KEY);
    assert!(matches!(device(&t, Some(&d1), &d1.key), Err(AuthError::WrongScope { .. })));
}

#[test]
fn device_key_does_not_sign_for_its_modules() {
    let m1 = sas_identity(IdentityKey::module("d1", "m1"), MODULE_KEY, MODULE_KEY);
    let t = token(&format!("{HOST}/devices/d1/modules/m1"), D1_KEY, None);
    assert!(matches!(device(&t, Some(&m1), &m1.key), Err(AuthError::BadSignature { .. })));
}

#[test]
fn device_policy_token_connects_as_any_device() {
    let d1 = d1();
    let t = token(HOST, DEVICE_POLICY_KEY, Some("device"));
    let p = device(&t, Some(&d1), &d1.key).unwrap();
    assert_eq!(p, Principal::Policy { name: "device".into(), rights: R::DEVICE_CONNECT });
    let scoped = token(&format!("{HOST}/devices/d2"), DEVICE_POLICY_KEY, Some("device"));
    assert!(matches!(device(&scoped, Some(&d1), &d1.key), Err(AuthError::WrongScope { .. })));
}

#[test]
fn policy_without_device_connect_cannot_connect_a_device() {
    let d1 = d1();
    let t = token(HOST, SERVICE_KEY, Some("service"));
    let err = device(&t, Some(&d1), &d1.key).unwrap_err();
    assert!(matches!(err, AuthError::InsufficientRights { needed: R::DEVICE_CONNECT, .. }));
}

#[test]
fn disabled_identity_is_refused() {
    let d1 = d1()
        .replaced(IdentitySpec {
            status: Some(IdentityStatus::Disabled),
            authentication: Some(d1().authentication),
            ..Default::default()
        })
        .unwrap();
    let device_token = token(&format!("{HOST}/devices/d1"), D1_KEY, None);
    assert_eq!(device(&device_token, Some(&d1), &d1.key), Err(AuthError::IdentityDisabled(d1.key.clone())));
    let policy_token = token(HOST, DEVICE_POLICY_KEY, Some("device"));
    assert_eq!(device(&policy_token, Some(&d1), &d1.key), Err(AuthError::IdentityDisabled(d1.key.clone())));
}

#[test]
fn unknown_identity_is_refused() {
    let key = IdentityKey::device("ghost");
    let device_token = token(&format!("{HOST}/devices/ghost"), D1_KEY, None);
    assert_eq!(device(&device_token, None, &key), Err(AuthError::UnknownIdentity(key.clone())));
    let policy_token = token(HOST, DEVICE_POLICY_KEY, Some("device"));
    assert_eq!(device(&policy_token, None, &key), Err(AuthError::UnknownIdentity(key.clone())));
    // An identity stored under another key is no answer for this one.
    assert_eq!(device(&device_token, Some(&d1()), &key), Err(AuthError::UnknownIdentity(key)));
}

#[test]
fn x509_identity_cannot_use_a_device_token() {
    let mut d1 = d1();
    d1.authentication = Authentication {
        symmetric_key: SymmetricKey { primary_key: Some(D1_KEY.into()), secondary_key: None },
        x509_thumbprint: X509Thumbprint::default(),
        kind: AuthenticationType::SelfSigned,
    };
    let t = token(&format!("{HOST}/devices/d1"), D1_KEY, None);
    let err = device(&t, Some(&d1), &d1.key).unwrap_err();
    assert_eq!(err, AuthError::NotSasIdentity { identity: d1.key.clone(), kind: "selfSigned" });
}

#[test]
fn expired_device_token_is_refused() {
    let d1 = d1();
    let t = sign(&format!("{HOST}/devices/d1"), D1_KEY, NOW - 1, None).unwrap();
    assert!(matches!(device(&t, Some(&d1), &d1.key), Err(AuthError::Expired { .. })));
}

#[test]
fn device_scope_reads_the_identity_from_sr() {
    let t = token(&format!("{HOST}/devices/d1/modules/m1"), MODULE_KEY, None);
    let token = SasToken::parse(&t).unwrap();
    assert_eq!(device_scope_of(token.resource()), Some(IdentityKey::module("d1", "m1")));
    assert_eq!(device_scope_of(&format!("https://{HOST}/devices/d%3A1/")), Some(IdentityKey::device("d:1")));
    assert_eq!(device_scope_of(HOST), None);
}
