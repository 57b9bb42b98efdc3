//! Handshakes between a real rustls client and the server config of [`super::setup`], over
//! in-memory buffers.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::ServerName;
use rustls::{
    ClientConfig, ClientConnection, ProtocolVersion, RootCertStore, ServerConnection, SupportedProtocolVersion,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{TlsSetup, peer_thumbprint_sha1, peer_thumbprint_sha256, setup};
use crate::config::TlsConfig;

const HUB_HOST: &str = "myhub.azure-devices.net";

fn no_files() -> TlsConfig {
    TlsConfig { cert_file: None, key_file: None }
}

fn only_hub(host: &'static str) -> Arc<dyn Fn(&str) -> bool + Send + Sync> {
    Arc::new(move |name| name == host)
}

fn dev_setup(data_dir: &Path) -> TlsSetup {
    setup(&no_files(), data_dir, only_hub(HUB_HOST)).expect("dev CA setup")
}

fn roots_from_pem(pem: &Path) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pem).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("trust anchor");
    }
    roots
}

/// A client trusting `roots`, speaking only `version`, optionally with a client certificate.
fn client_config(
    roots: RootCertStore,
    version: &'static SupportedProtocolVersion,
    client_cert: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[version])
        .expect("protocol version")
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Runs a handshake to completion; the error names the side that failed.
fn handshake(
    server_config: &Arc<rustls::ServerConfig>,
    client_config: Arc<ClientConfig>,
    server_name: &str,
) -> Result<(ClientConnection, ServerConnection), String> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| e.to_string())?;
    let mut client = ClientConnection::new(client_config, name).map_err(|e| e.to_string())?;
    let mut server = ServerConnection::new(server_config.clone()).map_err(|e| e.to_string())?;
    for _ in 0..16 {
        pump(&mut client, &mut server).map_err(|e| format!("server: {e}"))?;
        pump(&mut server, &mut client).map_err(|e| format!("client: {e}"))?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok((client, server));
        }
    }
    Err("handshake did not finish".into())
}

/// Moves every pending TLS record from `from` to `to` and lets `to` process them.
fn pump<A, B, DA, DB>(from: &mut A, to: &mut B) -> Result<(), rustls::Error>
where
    A: std::ops::DerefMut<Target = rustls::ConnectionCommon<DA>>,
    B: std::ops::DerefMut<Target = rustls::ConnectionCommon<DB>>,
{
    let mut bytes = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut bytes).expect("write to a Vec");
    }
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("read from a slice");
        to.process_new_packets()?;
    }
    Ok(())
}

#[test]
fn dev_ca_is_created_on_first_start_and_reused_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = dev_setup(dir.path());
    let ca_file = first.ca_file.clone().expect("dev CA path");
    assert_eq!(ca_file, dir.path().join("tls/ca.pem"));
    assert!(first.ca_created);
    let ca_pem = fs::read(&ca_file).expect("ca.pem");
    let key_pem = fs::read(dir.path().join("tls/ca.key")).expect("ca.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("tls/ca.key")).expect("ca.key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let second = dev_setup(dir.path());
    assert!(!second.ca_created);
    assert_eq!(fs::read(&ca_file).expect("ca.pem"), ca_pem);
    assert_eq!(fs::read(dir.path().join("tls/ca.key")).expect("ca.key"), key_pem);
    // Certificates issued after the restart still chain to the CA clients already trust.
    let client = client_config(roots_from_pem(&ca_file), &rustls::version::TLS13, None);
    handshake(&second.server_config, client, HUB_HOST).expect("handshake after restart");
}

#[test]
fn tls12_client_with_localhost_sni_completes_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dev_setup(dir.path());
    let client = client_config(roots_from_pem(tls.ca_file.as_deref().expect("CA")), &rustls::version::TLS12, None);
    let (client, server) = handshake(&tls.server_config, client, "localhost").expect("handshake");
    assert_eq!(client.protocol_version(), Some(ProtocolVersion::TLSv1_2));
    assert_eq!(server.server_name(), Some("localhost"));
    assert!(server.peer_certificates().is_none(), "client certificates are optional");
}

#[test]
fn tls13_client_with_hub_host_sni_completes_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dev_setup(dir.path());
    let roots = roots_from_pem(tls.ca_file.as_deref().expect("CA"));
    let client = client_config(roots, &rustls::version::TLS13, None);
    let (first, _) = handshake(&tls.server_config, client.clone(), HUB_HOST).expect("handshake");
    assert_eq!(first.protocol_version(), Some(ProtocolVersion::TLSv1_3));
    let (second, _) = handshake(&tls.server_config, client, HUB_HOST).expect("second handshake");
    assert_eq!(first.peer_certificates(), second.peer_certificates(), "the hub's certificate is cached");
}

#[test]
fn tls12_client_with_hub_host_sni_completes_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dev_setup(dir.path());
    let client = client_config(roots_from_pem(tls.ca_file.as_deref().expect("CA")), &rustls::version::TLS12, None);
    let (client, _) = handshake(&tls.server_config, client, HUB_HOST).expect("handshake");
    assert_eq!(client.protocol_version(), Some(ProtocolVersion::TLSv1_2));
}

#[test]
fn hub_created_at_runtime_gets_a_certificate_without_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hubs = Arc::new(RwLock::new(HashSet::<String>::new()));
    let known = hubs.clone();
    let is_hub_host = Arc::new(move |name: &str| known.read().expect("lock").contains(name));
    let tls = setup(&no_files(), dir.path(), is_hub_host).expect("setup");
    let client = client_config(roots_from_pem(tls.ca_file.as_deref().expect("CA")), &rustls::version::TLS13, None);

    let err = handshake(&tls.server_config, client.clone(), "late.azure-devices.net").expect_err("no such hub yet");
    assert!(err.contains("not valid for name"), "{err}");
    hubs.write().expect("lock").insert("late.azure-devices.net".to_owned());
    handshake(&tls.server_config, client, "late.azure-devices.net").expect("handshake once the hub exists");
}

#[test]
fn sni_of_no_hub_gets_the_default_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dev_setup(dir.path());
    let client = client_config(roots_from_pem(tls.ca_file.as_deref().expect("CA")), &rustls::version::TLS13, None);
    let err = handshake(&tls.server_config, client, "other.example.com").expect_err("name must not verify");
    assert!(err.starts_with("client:") && err.contains("not valid for name"), "{err}");
}

#[test]
fn client_without_sni_gets_the_default_certificate_valid_for_loopback_addresses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dev_setup(dir.path());
    let roots = || roots_from_pem(tls.ca_file.as_deref().expect("CA"));
    // rustls sends no SNI when dialling an IP address.
    handshake(&tls.server_config, client_config(roots(), &rustls::version::TLS12, None), "127.0.0.1").expect("IPv4");
    handshake(&tls.server_config, client_config(roots(), &rustls::version::TLS13, None), "::1").expect("IPv6");
}

/// A CA and a server certificate for `conf.example`, written as PEM files like an operator's.
fn write_operator_certificates(dir: &Path) -> (TlsConfig, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["conf.example".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");

    let (ca_file, chain_file, key_file) = (dir.join("ca.pem"), dir.join("chain.pem"), dir.join("server.key"));
    fs::write(&ca_file, ca.pem()).expect("write");
    fs::write(&chain_file, leaf.pem() + &ca.pem()).expect("write");
    fs::write(&key_file, leaf_key.serialize_pem()).expect("write");
    (TlsConfig { cert_file: Some(chain_file), key_file: Some(key_file) }, ca_file)
}

#[test]
fn configured_certificate_files_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, ca_file) = write_operator_certificates(dir.path());
    let data_dir = dir.path().join("data");
    let tls = setup(&cfg, &data_dir, only_hub(HUB_HOST)).expect("setup");
    assert!(tls.ca_file.is_none());
    assert!(!data_dir.join("tls").exists(), "no dev CA with configured files");

    let client = client_config(roots_from_pem(&ca_file), &rustls::version::TLS12, None);
    let (client, _) = handshake(&tls.server_config, client, "conf.example").expect("handshake");
    assert_eq!(client.peer_certificates().map(<[_]>::len), Some(2), "the whole configured chain is sent");
}

#[test]
fn unreadable_certificate_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut cfg, _) = write_operator_certificates(dir.path());
    let missing = dir.path().join("missing.pem");
    let err = setup(&TlsConfig { cert_file: Some(missing.clone()), ..cfg.clone() }, dir.path(), only_hub(HUB_HOST))
        .expect_err("missing file");
    assert!(format!("{err:#}").contains(&*missing.to_string_lossy()), "{err:#}");

    let not_a_key = dir.path().join("ca.pem");
    cfg.key_file = Some(not_a_key.clone());
    let err = setup(&cfg, dir.path(), only_hub(HUB_HOST)).expect_err("no key");
    assert!(format!("{err:#}").contains(&*not_a_key.to_string_lossy()), "{err:#}");
}

#[test]
fn replaced_dev_ca_certificate_is_refused_at_start() {
    let (dir, other) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    dev_setup(dir.path());
    dev_setup(other.path());
    fs::copy(other.path().join("tls/ca.pem"), dir.path().join("tls/ca.pem")).expect("copy");
    let err = setup(&no_files(), dir.path(), only_hub(HUB_HOST)).expect_err("mismatched CA");
    assert!(format!("{err:#}").contains("delete ca.pem and ca.key"), "{err:#}");
}

#[test]
fn client_certificate_is_accepted_and_visible_after_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dev_setup(dir.path());
    let device_key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "x509-device");
    let device_cert = params.self_signed(&device_key).expect("self-signed device certificate");
    let key = PrivateKeyDer::from_pem_slice(device_key.serialize_pem().as_bytes()).expect("key");

    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let roots = roots_from_pem(tls.ca_file.as_deref().expect("CA"));
        let client = client_config(roots, version, Some((device_cert.der().clone(), key.clone_key())));
        let (_, server) = handshake(&tls.server_config, client, HUB_HOST).expect("handshake");
        let presented = server.peer_certificates().and_then(<[_]>::first).expect("client certificate");
        assert_eq!(presented, device_cert.der());
        let expected = format!("{:X}", <sha2::Sha256 as sha2::Digest>::digest(device_cert.der()));
        assert_eq!(peer_thumbprint_sha256(presented), expected);
    }
}

#[test]
fn thumbprints_are_upper_case_hex_digests_of_the_der() {
    let der = CertificateDer::from(b"abc".to_vec());
    assert_eq!(peer_thumbprint_sha1(&der), "A9993E364706816ABA3E25717850C26C9CD0D89D");
    assert_eq!(peer_thumbprint_sha256(&der), "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD");
}
