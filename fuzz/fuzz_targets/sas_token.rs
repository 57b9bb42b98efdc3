//! Arbitrary UTF-8 through the SAS parser, verifier and authorization rules
//! (device-protocol §1.3): none of them may panic on input from the network.
//!
//! Beyond "no panic", one property is asserted: re-signing whatever a parsed token names
//! yields a token that parses back to the same resource, policy and expiry, and verifies.

#![no_main]

use std::sync::OnceLock;

use iothubd::auth::{self, SasToken};
use iothubd_actors::model::hub::{AccessRights, HubDescription, HubProperties, Sku, builtin_policies};
use iothubd_actors::model::identity::{Identity, IdentityKey, IdentitySpec};
use libfuzzer_sys::fuzz_target;

const HOST: &str = "myhub.azure-devices.net";
const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const NOW: u64 = 1_700_000_000;

fn hub() -> &'static HubDescription {
    static HUB: OnceLock<HubDescription> = OnceLock::new();
    HUB.get_or_init(|| {
        let mut policies = builtin_policies();
        for p in &mut policies {
            p.primary_key = KEY.into();
        }
        HubDescription {
            name: "myhub".into(),
            etag: String::new(),
            sku: Sku::default(),
            properties: HubProperties {
                host_name: HOST.into(),
                authorization_policies: policies,
                ..Default::default()
            },
        }
    })
}

fn identity() -> &'static Identity {
    static IDENTITY: OnceLock<Identity> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        Identity::create(IdentityKey::device("d1"), IdentitySpec::default()).expect("default identity is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let target = format!("{HOST}/devices/d1");
    let _ = auth::authorize_service(hub(), text, &target, AccessRights::REGISTRY_READ, NOW);
    let _ = auth::authorize_service(hub(), text, text, AccessRights::SERVICE_CONNECT, NOW);

    let Ok(token) = SasToken::parse(text) else {
        return;
    };
    let _ = token.verify(KEY);
    let _ = token.verify(text);
    let _ = token.covers(&target);
    let _ = token.covers(text);
    let _ = token.is_expired(NOW);
    let scope = auth::device_scope_of(token.resource());
    let _ = auth::device_scope_of(text);
    let _ = auth::authorize_identity(hub(), &token, Some(identity()), &identity().key, NOW);
    if let Some(key) = &scope {
        let _ = auth::authorize_identity(hub(), &token, None, key, NOW);
    }

    let resigned = auth::sign(token.resource(), KEY, token.expiry(), token.key_name()).expect("KEY is base64");
    let again = SasToken::parse(&resigned).expect("a signed token parses");
    assert_eq!(again.resource(), token.resource());
    assert_eq!(again.key_name(), token.key_name());
    assert_eq!(again.expiry(), token.expiry());
    assert!(again.verify(KEY), "a signed token verifies: {resigned}");
});
