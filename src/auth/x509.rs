//! X.509 device authentication (device-protocol §1.4): a client certificate presented in the
//! TLS handshake instead of a SAS token. The TLS layer already proved that the client holds
//! the certificate's key (`tls::AnyClientCert` checks the handshake signature).
//!
//! - `selfSigned` identities register the SHA-1 (or, on newer hubs, SHA-256) thumbprint of
//!   their leaf certificate; the presented leaf's thumbprints are compared with the primary and
//!   secondary ones, case-insensitively.
//! - `certificateAuthority` identities present a chain that must validate (signatures, validity
//!   period, CA constraints — rustls' webpki verifier) to a CA certificate registered *and
//!   verified* on the hub, with the leaf's common name equal to the device ID (`{d}/{m}` for a
//!   module). No revocation checks, as on Azure.

use std::sync::Arc;

use iothubd_actors::model::hub::CaCertificate;
use iothubd_actors::model::identity::{AuthenticationType, Identity, IdentityKey};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::AuthError;
use crate::tls::{peer_thumbprint_sha1, peer_thumbprint_sha256};

/// Authorizes the presented `chain` (leaf first) for `target`; the identity as loaded from the
/// store (`None` when absent) and the hub's CA certificates. Returns how the identity
/// authenticates, for `iothub-connection-auth-method`.
pub fn authorize_certificate(
    identity: Option<&Identity>,
    target: &IdentityKey,
    chain: &[CertificateDer<'_>],
    cas: &[CaCertificate],
) -> Result<AuthenticationType, AuthError> {
    let identity = identity.filter(|i| i.key == *target).ok_or_else(|| AuthError::UnknownIdentity(target.clone()))?;
    if !identity.is_enabled() {
        return Err(AuthError::IdentityDisabled(target.clone()));
    }
    let untrusted = |reason: &str| AuthError::CertificateNotTrusted { identity: target.clone(), reason: reason.into() };
    let (leaf, intermediates) = chain.split_first().ok_or_else(|| untrusted("no certificate was presented"))?;
    match identity.authentication.kind {
        AuthenticationType::SelfSigned => {
            let registered = &identity.authentication.x509_thumbprint;
            let presented = [peer_thumbprint_sha1(leaf), peer_thumbprint_sha256(leaf)];
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
        AuthenticationType::CertificateAuthority => {
            verify_chain(leaf, intermediates, cas).map_err(|reason| untrusted(&reason))?;
            let common_name = common_name(leaf).unwrap_or_default();
            if common_name == target.to_string() {
                Ok(AuthenticationType::CertificateAuthority)
            } else {
                Err(AuthError::CommonNameMismatch { identity: target.clone(), common_name })
            }
        }
        AuthenticationType::Sas | AuthenticationType::None => Err(AuthError::NotX509Identity(target.clone())),
    }
}

/// Validates `leaf` (with `intermediates`) against the hub's verified CAs.
fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    cas: &[CaCertificate],
) -> Result<(), String> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas.iter().filter(|c| c.is_verified) {
        for cert in CertificateDer::pem_slice_iter(ca.certificate.as_bytes()).flatten() {
            roots.add(cert).map_err(|e| format!("CA '{}' is unusable: {e}", ca.name))?;
        }
    }
    if roots.is_empty() {
        return Err("no verified CA certificate is registered".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().map_err(|e| e.to_string())?;
    verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).map(drop).map_err(|e| e.to_string())
}

/// The subject's common name of a certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Checks a CA certificate being registered: one PEM certificate that is a CA; returns its
/// SHA-1 thumbprint.
pub fn check_ca_certificate(pem: &str) -> Result<String, String> {
    let mut certs = CertificateDer::pem_slice_iter(pem.as_bytes());
    let cert = match (certs.next(), certs.next()) {
        (Some(Ok(cert)), None) => cert,
        (None, _) => return Err("the certificate is not PEM".into()),
        (Some(Err(e)), _) => return Err(format!("the certificate is not valid PEM: {e}")),
        (Some(Ok(_)), Some(_)) => return Err("give exactly one certificate".into()),
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| format!("not X.509: {e}"))?;
    if !parsed.is_ca() {
        return Err("the certificate is not a CA (basicConstraints CA:TRUE)".into());
    }
    Ok(peer_thumbprint_sha1(&cert))
}

#[cfg(test)]
mod tests {
    use iothubd_actors::model::identity::{Authentication, IdentitySpec, IdentityStatus, X509Thumbprint};
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    use super::*;

    fn self_signed(cn: &str) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![]).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        (params.self_signed(&key).expect("cert").der().clone(), key)
    }

    /// A CA, and a leaf with common name `cn` it signed.
    fn ca_and_leaf(cn: &str) -> (CaCertificate, CertificateDer<'static>) {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(vec![]).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "test CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let leaf_key = KeyPair::generate().expect("key");
        let mut leaf_params = CertificateParams::new(vec![]).expect("params");
        leaf_params.distinguished_name.push(DnType::CommonName, cn);
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).expect("leaf");
        let registered =
            CaCertificate { name: "root".into(), certificate: ca.pem(), is_verified: true, thumbprint: String::new() };
        (registered, leaf.der().clone())
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
        let (cert, _) = self_signed("d1");
        let key = IdentityKey::device("d1");
        for thumbprint in [peer_thumbprint_sha1(&cert).to_ascii_lowercase(), peer_thumbprint_sha256(&cert)] {
            let id = identity(AuthenticationType::SelfSigned, Some(thumbprint), IdentityStatus::Enabled);
            assert_eq!(
                authorize_certificate(Some(&id), &key, &[cert.clone()], &[]),
                Ok(AuthenticationType::SelfSigned)
            );
        }
    }

    #[test]
    fn other_certificates_disabled_and_non_x509_identities_are_refused() {
        let ((cert, _), (other, _)) = (self_signed("d1"), self_signed("d1"));
        let key = IdentityKey::device("d1");
        let chain = [cert.clone()];
        let id = identity(AuthenticationType::SelfSigned, Some(peer_thumbprint_sha1(&other)), IdentityStatus::Enabled);
        assert_eq!(
            authorize_certificate(Some(&id), &key, &chain, &[]),
            Err(AuthError::CertificateMismatch(key.clone()))
        );
        let off = identity(AuthenticationType::SelfSigned, Some(peer_thumbprint_sha1(&cert)), IdentityStatus::Disabled);
        assert_eq!(authorize_certificate(Some(&off), &key, &chain, &[]), Err(AuthError::IdentityDisabled(key.clone())));
        let sas = identity(AuthenticationType::Sas, None, IdentityStatus::Enabled);
        assert_eq!(authorize_certificate(Some(&sas), &key, &chain, &[]), Err(AuthError::NotX509Identity(key.clone())));
        assert_eq!(authorize_certificate(None, &key, &chain, &[]), Err(AuthError::UnknownIdentity(key)));
    }

    #[test]
    fn ca_signed_leaf_with_the_device_id_as_common_name_authenticates() {
        let key = IdentityKey::device("d1");
        let id = identity(AuthenticationType::CertificateAuthority, None, IdentityStatus::Enabled);
        let (ca, leaf) = ca_and_leaf("d1");
        assert_eq!(
            authorize_certificate(Some(&id), &key, &[leaf], std::slice::from_ref(&ca)),
            Ok(AuthenticationType::CertificateAuthority)
        );

        let (_, wrong_cn) = ca_and_leaf("d2");
        let (ca2, leaf2) = ca_and_leaf("d2");
        assert!(matches!(
            authorize_certificate(Some(&id), &key, &[leaf2.clone()], &[ca2.clone()]),
            Err(AuthError::CommonNameMismatch { .. })
        ));
        // A leaf of another CA, or of an unverified CA, is not trusted.
        assert!(matches!(
            authorize_certificate(Some(&id), &key, &[wrong_cn], &[ca.clone()]),
            Err(AuthError::CertificateNotTrusted { .. })
        ));
        let unverified = CaCertificate { is_verified: false, ..ca2 };
        assert!(matches!(
            authorize_certificate(Some(&id), &key, &[leaf2], &[unverified]),
            Err(AuthError::CertificateNotTrusted { .. })
        ));
        let (self_signed_leaf, _) = self_signed("d1");
        assert!(matches!(
            authorize_certificate(Some(&id), &key, &[self_signed_leaf], &[ca]),
            Err(AuthError::CertificateNotTrusted { .. })
        ));
    }

    #[test]
    fn only_single_ca_certificates_can_be_registered() {
        let (ca, leaf) = ca_and_leaf("d1");
        assert!(check_ca_certificate(&ca.certificate).is_ok());
        let leaf_pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, leaf.as_ref())
        );
        assert!(check_ca_certificate(&leaf_pem).unwrap_err().contains("not a CA"));
        assert!(check_ca_certificate("garbage").is_err());
        assert!(check_ca_certificate(&format!("{}{}", ca.certificate, ca.certificate)).is_err());
    }
}
