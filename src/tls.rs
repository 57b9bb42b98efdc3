//! TLS for every listener: one rustls [`ServerConfig`] shared by MQTT (8883), AMQP (5671) and
//! HTTPS (443), built by [`setup`].
//!
//! - Crypto is rustls' ring provider only, passed explicitly (`builder_with_provider`): with two
//!   providers compiled in, rustls' `builder()` would panic (DESIGN §10).
//! - TLS 1.3 and 1.2: the Python device SDK speaks only TLS 1.2 (conformance README).
//! - Server certificate: the configured PEM chain and key, or, when none is configured, a
//!   development CA kept in `<data_dir>/tls` ([`dev_ca`]) that issues a certificate per hub host
//!   name on demand, so hubs created at runtime are served a valid certificate without a restart.
//! - Client certificates are requested but not required, and any chain is accepted during the
//!   handshake ([`AnyClientCert`]): device X.509 authentication (device-protocol §1.4) compares the
//!   certificate with the identity's thumbprints or CA after the handshake, when the identity is
//!   known. The handshake signatures are still verified, so a peer certificate proves possession
//!   of its key.

mod dev_ca;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::version::{TLS12, TLS13};
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use crate::config::TlsConfig;

/// What [`setup`] built.
#[derive(Debug)]
pub struct TlsSetup {
    /// For every TLS listener. No ALPN protocols are set; a listener that needs some (HTTP/2)
    /// clones the config and sets `alpn_protocols` on its copy.
    pub server_config: Arc<ServerConfig>,
    /// The dev CA certificate (PEM) that SDK clients must trust; `None` when certificate files are
    /// configured. The caller prints it at start.
    pub ca_file: Option<PathBuf>,
    /// Whether the dev CA was created by this start (rather than reused from an earlier one).
    pub ca_created: bool,
}

/// Builds the server TLS configuration from `cfg`: the configured certificate files, or the dev
/// CA in `<data_dir>/tls` (created on first start). `is_hub_host` says whether a TLS SNI name is
/// the host name of an existing hub; it is asked at handshakes and must be exact (a certificate
/// is issued and cached for every name it accepts). It is not used with configured files.
///
/// After a handshake, the client's certificate chain (end-entity first), if it sent one, is
/// `ServerConnection::peer_certificates()`; see [`peer_thumbprint_sha1`].
pub fn setup(
    cfg: &TlsConfig,
    data_dir: &Path,
    is_hub_host: Arc<dyn Fn(&str) -> bool + Send + Sync>,
) -> anyhow::Result<TlsSetup> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&TLS13, &TLS12])
        .context("TLS protocol versions")?
        .with_client_cert_verifier(Arc::new(AnyClientCert::new(&provider)));
    let (server_config, ca_file, ca_created) = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let chain = load_chain(cert_file)?;
            let key = PrivateKeyDer::from_pem_file(key_file)
                .with_context(|| format!("tls.key_file {}: no usable private key", key_file.display()))?;
            let config = builder.with_single_cert(chain, key).with_context(|| {
                format!("tls.key_file {} does not fit tls.cert_file {}", key_file.display(), cert_file.display())
            })?;
            (config, None, false)
        }
        (None, None) => {
            let files = dev_ca::DevCaFiles::in_data_dir(data_dir);
            let (resolver, created) = dev_ca::resolver(&files, provider, is_hub_host)?;
            (builder.with_cert_resolver(Arc::new(resolver)), Some(files.cert), created)
        }
        _ => bail!("tls.cert_file and tls.key_file go together"),
    };
    Ok(TlsSetup { server_config: Arc::new(server_config), ca_file, ca_created })
}

/// The certificates of a PEM file, end-entity first.
fn load_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let what = || format!("tls.cert_file {}", path.display());
    let chain =
        CertificateDer::pem_file_iter(path).with_context(what)?.collect::<Result<Vec<_>, _>>().with_context(what)?;
    if chain.is_empty() {
        bail!("{}: no CERTIFICATE block", what());
    }
    Ok(chain)
}

/// SHA-1 thumbprint of a certificate (DER) in upper-case hex, as IoT Hub registers X.509
/// self-signed devices (`x509Thumbprint.primaryThumbprint`).
pub fn peer_thumbprint_sha1(cert: &CertificateDer<'_>) -> String {
    upper_hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert).as_ref())
}

/// SHA-256 thumbprint of a certificate (DER) in upper-case hex.
pub fn peer_thumbprint_sha256(cert: &CertificateDer<'_>) -> String {
    upper_hex(ring::digest::digest(&ring::digest::SHA256, cert).as_ref())
}

fn upper_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    bytes.iter().flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 0x0f)]]).map(char::from).collect()
}

/// Requests a client certificate, does not require one, and accepts any well-formed chain; see
/// the module documentation for why.
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AnyClientCert {
    fn new(provider: &CryptoProvider) -> Self {
        Self { algorithms: provider.signature_verification_algorithms }
    }
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients then offer whatever certificate they have.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Only well-formedness here; trust is decided per identity after the handshake.
        ParsedCertificate::try_from(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
