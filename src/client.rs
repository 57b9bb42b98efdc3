//! An HTTPS client that trusts one CA (the hub's dev CA, by default): used by the
//! `iothubd hub …` commands, `iothubd simulate` (HTTPS and MQTT over TLS) and the integration tests.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A reqwest client whose only trust anchor is the PEM CA at `ca_file`.
pub fn trusting(ca_file: &Path) -> anyhow::Result<reqwest::Client> {
    Ok(builder_trusting(ca_file)?.build()?)
}

/// As [`trusting`], for callers that set more options (tests resolve hub host names).
pub fn builder_trusting(ca_file: &Path) -> anyhow::Result<reqwest::ClientBuilder> {
    Ok(reqwest::Client::builder().use_preconfigured_tls(tls_config_trusting(ca_file)?))
}

/// A rustls client configuration (ring, TLS 1.2 + 1.3) whose only trust anchors are the PEM
/// certificates in `ca_file` — for HTTPS here and for MQTT over TLS (`iothubd simulate`).
pub fn tls_config_trusting(ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("cannot read the CA certificate {}", ca_file.display()))?
    {
        roots.add(cert.with_context(|| format!("{} holds a bad certificate", ca_file.display()))?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}
