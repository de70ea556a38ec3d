//! TLS for both listeners, the workload identity taken from a client certificate, and the
//! development PKI.
//!
//! The data plane requires a client certificate issued by the customer's own CA (the configured
//! `client_ca_file`, never the system's public roots). The workload's identity is the first
//! URI SAN of its certificate (a SPIFFE ID such as `spiffe://example.org/ns/prod/sa/billing`),
//! or, when it has none, its subject common name.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A TLS setup the service refuses, naming the file.
#[derive(Debug)]
pub struct TlsError {
    pub path: PathBuf,
    pub reason: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for TlsError {}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError { path: path.to_path_buf(), reason: e.to_string() })
}

/// Checks that a PEM file holds what it should, so a broken setup stops the service at startup
/// with the file named (tonic would otherwise fail at the first handshake).
fn check_pem(path: &Path, want: &str) -> Result<String, TlsError> {
    let text = read(path)?;
    if !text.contains(&format!("-----BEGIN {want}")) {
        return Err(TlsError { path: path.to_path_buf(), reason: format!("no PEM {want} in the file") });
    }
    Ok(text)
}

/// The server's TLS material, loaded and checked at startup.
#[derive(Clone)]
pub struct ServerTls {
    identity: Identity,
    client_ca: Certificate,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerTls")
    }
}

impl ServerTls {
    pub fn load(cert_file: &Path, key_file: &Path, client_ca_file: &Path) -> Result<ServerTls, TlsError> {
        let cert = check_pem(cert_file, "CERTIFICATE")?;
        let key = check_pem(key_file, "")?;
        if !key.contains("PRIVATE KEY") {
            return Err(TlsError { path: key_file.to_path_buf(), reason: "no PEM private key in the file".into() });
        }
        let mode = std::fs::metadata(key_file).map_err(|e| TlsError { path: key_file.to_path_buf(), reason: e.to_string() })?;
        if mode.permissions().mode() & 0o077 != 0 {
            return Err(TlsError { path: key_file.to_path_buf(), reason: "the private key is readable by others; chmod 600 it".into() });
        }
        let ca = check_pem(client_ca_file, "CERTIFICATE")?;
        Ok(ServerTls { identity: Identity::from_pem(cert, key), client_ca: Certificate::from_pem(ca) })
    }

    /// The data plane: mutual TLS, client certificates from the customer's CA only.
    pub fn data_plane(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.client_ca.clone())
    }

    /// The admin plane: server-authenticated TLS (officers authenticate with their own login).
    pub fn admin_plane(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone())
    }
}

/// A rustls client configuration that trusts the certificates of the PEM file `ca` only (never
/// the system's unless `ca` is the system's bundle), with ring's cryptography: for the store's
/// PostgreSQL connections and the facades' outgoing HTTPS calls.
pub fn client_config(ca: &Path) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        roots.add(cert.map_err(|e| format!("{}: {e}", ca.display()))?).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no certificate", ca.display()));
    }
    Ok(rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A rustls server configuration for an HTTPS listener (the XKS facade): the certificate
/// chain and private key from PEM files (the key readable by the service's user only), TLS 1.2
/// and 1.3 with rustls' safe defaults, HTTP/2 and HTTP/1.1 offered by ALPN.
pub fn https_server(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let refuse = |path: &Path, reason: String| TlsError { path: path.to_path_buf(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| refuse(cert_file, format!("no usable PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(refuse(cert_file, "no PEM certificate in the file".into()));
    }
    let mode = std::fs::metadata(key_file).map_err(|e| refuse(key_file, e.to_string()))?;
    if mode.permissions().mode() & 0o077 != 0 {
        return Err(refuse(key_file, "the private key is readable by others; chmod 600 it".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| refuse(key_file, format!("no usable PEM private key: {e}")))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| refuse(cert_file, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| refuse(key_file, format!("the key does not go with the certificate: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The workload identity in a client certificate (DER): its first URI SAN, else its subject CN.
pub fn workload_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                return Some((*uri).to_string());
            }
        }
    }
    cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string)
}

/// The files of the development PKI, under `DIR/pki/`.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub workload_cert: PathBuf,
    pub workload_key: PathBuf,
}

/// The identity of the development workload certificate.
pub const DEV_WORKLOAD_ID: &str = "spiffe://kms.dev/workload/dev";

impl DevPki {
    pub fn paths(dir: &Path) -> DevPki {
        DevPki {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            workload_cert: dir.join("workload.pem"),
            workload_key: dir.join("workload.key"),
        }
    }

    /// Makes a local CA, a server certificate for localhost / 127.0.0.1 / ::1, and one workload
    /// certificate (`DEV_WORKLOAD_ID`), unless they are already there. The CA's key is not kept:
    /// nobody can issue more certificates under this development CA.
    pub fn ensure(dir: &Path) -> Result<DevPki, Box<dyn std::error::Error + Send + Sync>> {
        let pki = DevPki::paths(dir);
        if pki.workload_key.exists() {
            return Ok(pki);
        }
        crate::files::create_dir(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(crate::files::PRIVATE_DIR))?;

        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "kms development CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut server = CertificateParams::new(vec!["localhost".to_string()])?;
        server.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        server.subject_alt_names.push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        server.distinguished_name.push(DnType::CommonName, "kms-server (development)");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &issuer)?;

        let mut workload = CertificateParams::new(Vec::<String>::new())?;
        workload.subject_alt_names.push(SanType::URI(DEV_WORKLOAD_ID.try_into()?));
        workload.distinguished_name.push(DnType::CommonName, "dev-workload");
        workload.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let workload_key = KeyPair::generate()?;
        let workload_cert = workload.signed_by(&workload_key, &issuer)?;

        write_file(&pki.ca_cert, &ca_cert.pem())?;
        write_file(&pki.server_cert, &server_cert.pem())?;
        write_file(&pki.server_key, &server_key.serialize_pem())?;
        write_file(&pki.workload_cert, &workload_cert.pem())?;
        write_file(&pki.workload_key, &workload_key.serialize_pem())?;
        Ok(pki)
    }
}

/// Writes a file readable only by its owner, durably.
fn write_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = crate::files::create(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pki_loads_and_names_the_workload() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        ServerTls::load(&pki.server_cert, &pki.server_key, &pki.ca_cert).unwrap();
        let pem = std::fs::read_to_string(&pki.workload_cert).unwrap();
        let der = pem_to_der(&pem);
        assert_eq!(workload_identity(&der).as_deref(), Some(DEV_WORKLOAD_ID));
        assert_eq!(std::fs::metadata(&pki.server_key).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(dir.path()).unwrap();
        std::fs::set_permissions(&pki.server_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = ServerTls::load(&pki.server_cert, &pki.server_key, &pki.ca_cert).unwrap_err();
        assert!(e.reason.contains("chmod 600"), "{e}");
        let e = ServerTls::load(&pki.server_key, &pki.server_key, &pki.ca_cert).unwrap_err();
        assert!(e.reason.contains("CERTIFICATE"), "{e}");
    }

    fn pem_to_der(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }
}
