//! The development CA: created under `<data_dir>/tls` when no certificate is configured, reused on
//! later starts, and issuing server certificates on demand by SNI so that a hub created at runtime
//! gets a valid certificate without a restart.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{Datelike, Days, Months, NaiveDate, Utc};
use dashmap::DashMap;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// Names every issued certificate is valid for, so local clients work with or without SNI.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Lifetime of the CA: long, because every client that trusts it must be re-pointed when it changes.
const CA_VALIDITY_MONTHS: u32 = 120;

/// Lifetime of an issued server certificate. Leaves are re-issued at every start; 825 days is the
/// longest that Apple clients accept for a TLS server certificate.
const LEAF_VALIDITY_DAYS: u64 = 825;

/// Bound of the per-host-name certificate cache; it only guards against a permissive
/// `is_hub_host`, real deployments have far fewer hub host names.
const MAX_CACHED_LEAVES: usize = 10_000;

/// The CA files in `<data_dir>/tls`.
pub(super) struct DevCaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl DevCaFiles {
    pub fn in_data_dir(data_dir: &Path) -> Self {
        let dir = data_dir.join("tls");
        Self { cert: dir.join("ca.pem"), key: dir.join("ca.key") }
    }
}

/// The CA's key and the issuer-side view of its certificate.
struct DevCa {
    key: KeyPair,
    /// Re-made from `key` at every start: the subject and key identifier that leaves carry as their
    /// issuer are derived from the key alone, so they match the `ca.pem` that clients trust.
    issuer: rcgen::Certificate,
}

impl DevCa {
    fn from_key(key: KeyPair) -> anyhow::Result<Self> {
        let issuer = ca_params(&key)?.self_signed(&key).context("signing the dev CA certificate")?;
        Ok(Self { key, issuer })
    }

    /// A server certificate for [`LOCAL_NAMES`] plus `host` (a hub host name), with a fresh key.
    fn issue(&self, host: Option<&str>, provider: &CryptoProvider) -> anyhow::Result<Arc<CertifiedKey>> {
        let mut names: Vec<String> = LOCAL_NAMES.iter().map(|n| (*n).to_owned()).collect();
        names.extend(host.map(str::to_owned));
        let mut params = CertificateParams::new(names).context("server certificate names")?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "iothubd");
        params.distinguished_name.push(DnType::CommonName, host.unwrap_or(LOCAL_NAMES[0]));
        let today = Utc::now().date_naive();
        set_validity(&mut params, today, today.checked_add_days(Days::new(LEAF_VALIDITY_DAYS)))?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // OpenSSL's strict verification (Python >= 3.13 default) rejects leaves without it.
        params.use_authority_key_identifier_extension = true;

        let leaf_key = KeyPair::generate().context("generating a server key")?;
        let leaf = params.signed_by(&leaf_key, &self.issuer, &self.key).context("signing a server certificate")?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let certified = CertifiedKey::from_der(vec![leaf.der().clone()], key_der, provider)
            .context("loading an issued server certificate")?;
        Ok(Arc::new(certified))
    }
}

/// Parameters of the CA certificate. Deterministic in `key` (see [`DevCa::issuer`]); the common name
/// carries a fingerprint of the key so that CAs of different installations are told apart in a
/// trust store.
fn ca_params(key: &KeyPair) -> anyhow::Result<CertificateParams> {
    let digest = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
    let tag = super::upper_hex(&digest.as_ref()[..4]);
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "iothubd");
    params.distinguished_name.push(DnType::CommonName, format!("iothubd development CA {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let today = Utc::now().date_naive();
    set_validity(&mut params, today, today.checked_add_months(Months::new(CA_VALIDITY_MONTHS)))?;
    Ok(params)
}

/// Valid from yesterday (so a client whose clock is slightly behind still accepts the
/// certificate) until `until`, both at 00:00 UTC.
fn set_validity(params: &mut CertificateParams, today: NaiveDate, until: Option<NaiveDate>) -> anyhow::Result<()> {
    let from = today.checked_sub_days(Days::new(1)).context("certificate start date out of range")?;
    let until = until.context("certificate end date out of range")?;
    // chrono's month and day always fit u8.
    let midnight = |d: NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    params.not_before = midnight(from);
    params.not_after = midnight(until);
    Ok(())
}

/// Resolves the server certificate of a handshake from its SNI.
pub(super) struct DevCertResolver {
    ca: DevCa,
    provider: Arc<CryptoProvider>,
    /// For clients without SNI (IP addresses), `localhost` and names that are no hub's.
    default_leaf: Arc<CertifiedKey>,
    hub_leaves: DashMap<String, Arc<CertifiedKey>>,
    is_hub_host: Arc<dyn Fn(&str) -> bool + Send + Sync>,
}

impl fmt::Debug for DevCertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCertResolver").field("hub_leaves", &self.hub_leaves.len()).finish_non_exhaustive()
    }
}

impl ResolvesServerCert for DevCertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls hands the SNI over validated and lower-cased.
        let Some(host) = client_hello.server_name() else {
            return Some(self.default_leaf.clone());
        };
        if LOCAL_NAMES.contains(&host) || !(self.is_hub_host)(host) {
            return Some(self.default_leaf.clone());
        }
        if let Some(leaf) = self.hub_leaves.get(host) {
            return Some(leaf.clone());
        }
        match self.ca.issue(Some(host), &self.provider) {
            Ok(leaf) if self.hub_leaves.len() < MAX_CACHED_LEAVES => {
                // Two first handshakes may race to issue; both certificates are valid, one is kept.
                Some(self.hub_leaves.entry(host.to_owned()).or_insert(leaf).clone())
            }
            Ok(leaf) => Some(leaf),
            Err(e) => {
                let error = format!("{e:#}");
                tracing::warn!(host, error, "cannot issue a server certificate; serving the default");
                Some(self.default_leaf.clone())
            }
        }
    }
}

/// Loads the dev CA from `files`, creating it first when `ca.pem` does not exist, and returns the
/// resolver with whether the CA was created now.
pub(super) fn resolver(
    files: &DevCaFiles,
    provider: Arc<CryptoProvider>,
    is_hub_host: Arc<dyn Fn(&str) -> bool + Send + Sync>,
) -> anyhow::Result<(DevCertResolver, bool)> {
    let (ca, ca_der, created) = load_or_create(files)?;
    let default_leaf = ca.issue(None, &provider)?;
    check_chain(&ca_der, &default_leaf, &provider)
        .with_context(|| format!("{} does not match {}", files.cert.display(), files.key.display()))
        .with_context(|| {
            format!(
                "dev CA in {} is unusable; delete ca.pem and ca.key there to create a new one \
                 (clients then need the new ca.pem)",
                files.cert.parent().unwrap_or(Path::new(".")).display()
            )
        })?;
    let resolver = DevCertResolver { ca, provider, default_leaf, hub_leaves: DashMap::new(), is_hub_host };
    Ok((resolver, created))
}

fn load_or_create(files: &DevCaFiles) -> anyhow::Result<(DevCa, CertificateDer<'static>, bool)> {
    // The key is written before the certificate, so a start interrupted in between leaves no
    // `ca.pem` (nothing a client could have trusted yet) and the CA is simply created again.
    if files.cert.exists() {
        let key_pem = fs::read_to_string(&files.key).with_context(|| {
            format!(
                "reading the dev CA key {} (it belongs with {}; delete both to create a new CA)",
                files.key.display(),
                files.cert.display()
            )
        })?;
        let key =
            KeyPair::from_pem(&key_pem).with_context(|| format!("parsing the dev CA key {}", files.key.display()))?;
        let ca_der = CertificateDer::from_pem_file(&files.cert)
            .with_context(|| format!("reading the dev CA certificate {}", files.cert.display()))?;
        return Ok((DevCa::from_key(key)?, ca_der, false));
    }

    let dir = files.cert.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let key = KeyPair::generate().context("generating the dev CA key")?;
    let ca = DevCa::from_key(key)?;
    write_atomically(&files.key, ca.key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&files.cert, ca.issuer.pem().as_bytes(), 0o644)?;
    let ca_der = ca.issuer.der().clone();
    Ok((ca, ca_der, true))
}

/// Proves that leaves issued now chain to the `ca.pem` that clients trust, so a replaced or
/// mismatched file fails at start rather than at every handshake.
fn check_chain(
    ca_der: &CertificateDer<'static>,
    leaf: &CertifiedKey,
    provider: &Arc<CryptoProvider>,
) -> anyhow::Result<()> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone()).context("not a usable CA certificate")?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("building a certificate verifier")?;
    let end_entity = leaf.end_entity_cert().context("issued certificate chain is empty")?;
    let name = ServerName::try_from(LOCAL_NAMES[0]).context("server name")?;
    verifier
        .verify_server_cert(end_entity, &[], &name, &[], UnixTime::now())
        .context("an issued certificate does not verify against it")?;
    Ok(())
}

/// Writes `path` through a temporary file and a rename, so a crash never leaves half a key or
/// certificate behind, with `mode` set from creation on (the key is never world-readable).
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let file_name = path.file_name().context("file path has no name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => bail!("removing the stale {}: {e}", tmp.display()),
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents).and_then(|()| file.sync_all()).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}
