//! X.509 device authentication (device-protocol §1.4): a client certificate presented in the
//! TLS handshake instead of a SAS token.
//!
//! `selfSigned` identities register the SHA-1 (or, on newer hubs, SHA-256) thumbprint of their
//! leaf certificate; the hub compares the presented certificate's thumbprints with the primary
//! and secondary ones, case-insensitively. The TLS layer already proved that the client holds
//! the certificate's key (`tls::AnyClientCert` checks the handshake signature).

use iothubd_actors::model::identity::{AuthenticationType, Identity, IdentityKey};
use rustls_pki_types::CertificateDer;

use super::AuthError;
use crate::tls::{peer_thumbprint_sha1, peer_thumbprint_sha256};

/// Authorizes `certificate` for `target`; the identity as loaded from the store (`None` when
/// absent). Returns how the identity authenticates, for `iothub-connection-auth-method`.
pub fn authorize_certificate(
    identity: Option<&Identity>,
    target: &IdentityKey,
    certificate: &CertificateDer<'_>,
) -> Result<AuthenticationType, AuthError> {
    let identity = identity.filter(|i| i.key == *target).ok_or_else(|| AuthError::UnknownIdentity(target.clone()))?;
    if !identity.is_enabled() {
        return Err(AuthError::IdentityDisabled(target.clone()));
    }
    match identity.authentication.kind {
        AuthenticationType::SelfSigned => {
            let registered = &identity.authentication.x509_thumbprint;
            let presented = [peer_thumbprint_sha1(certificate), peer_thumbprint_sha256(certificate)];
            let matches = [&registered.primary_thumbprint, &registered.secondary_thumbprint]
                .into_iter()
                .flatten()
                .any(|t| presented.iter().any(|p| p.eq_ignore_ascii_case(t)));
            if matches {
                Ok(AuthenticationType::SelfSigned)
            } else {
                Err(AuthError::CertificateMismatch(target.clone()))
            }
        }
        AuthenticationType::CertificateAuthority => Err(AuthError::NoVerifiedCa(target.clone())),
        AuthenticationType::Sas | AuthenticationType::None => Err(AuthError::NotX509Identity(target.clone())),
    }
}

#[cfg(test)]
mod tests {
    use iothubd_actors::model::identity::{Authentication, IdentitySpec, IdentityStatus, X509Thumbprint};

    use super::*;

    fn certificate() -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["d1".into()]).expect("params").self_signed(&key).expect("cert");
        cert.der().clone()
    }

    fn identity(kind: AuthenticationType, primary: Option<String>, status: IdentityStatus) -> Identity {
        let spec = IdentitySpec {
            status: Some(status),
            authentication: Some(Authentication {
                kind,
                x509_thumbprint: X509Thumbprint { primary_thumbprint: primary, secondary_thumbprint: None },
                ..Default::default()
            }),
            ..Default::default()
        };
        Identity::create(IdentityKey::device("d1"), spec).expect("valid identity")
    }

    #[test]
    fn registered_sha1_or_sha256_thumbprint_authenticates_in_any_case() {
        let cert = certificate();
        let key = IdentityKey::device("d1");
        for thumbprint in [peer_thumbprint_sha1(&cert).to_ascii_lowercase(), peer_thumbprint_sha256(&cert)] {
            let id = identity(AuthenticationType::SelfSigned, Some(thumbprint), IdentityStatus::Enabled);
            assert_eq!(authorize_certificate(Some(&id), &key, &cert), Ok(AuthenticationType::SelfSigned));
        }
    }

    #[test]
    fn other_certificates_disabled_and_non_x509_identities_are_refused() {
        let (cert, other) = (certificate(), certificate());
        let key = IdentityKey::device("d1");
        let id = identity(AuthenticationType::SelfSigned, Some(peer_thumbprint_sha1(&other)), IdentityStatus::Enabled);
        assert_eq!(authorize_certificate(Some(&id), &key, &cert), Err(AuthError::CertificateMismatch(key.clone())));
        let off = identity(AuthenticationType::SelfSigned, Some(peer_thumbprint_sha1(&cert)), IdentityStatus::Disabled);
        assert_eq!(authorize_certificate(Some(&off), &key, &cert), Err(AuthError::IdentityDisabled(key.clone())));
        let sas = identity(AuthenticationType::Sas, None, IdentityStatus::Enabled);
        assert_eq!(authorize_certificate(Some(&sas), &key, &cert), Err(AuthError::NotX509Identity(key.clone())));
        assert_eq!(authorize_certificate(None, &key, &cert), Err(AuthError::UnknownIdentity(key)));
    }
}
