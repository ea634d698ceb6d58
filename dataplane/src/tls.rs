//! Mutual TLS for the agent: a server that accepts only peers whose certificate chains to
//! the cluster CA (no certificate, another CA's or an expired one are refused during the
//! handshake), and the client configuration agents use to talk to each other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors loading certificates or building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Where the cluster CA certificate and this node's certificate and key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(path)? {
        store.add(cert)?;
    }
    Ok(Arc::new(store))
}

/// The server side: client certificates are mandatory and must chain to the cluster CA.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(&files.ca_cert)?, provider()).build()?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side: trusts only the cluster CA and presents this node's (or user's)
/// certificate.
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&files.ca_cert)?)
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether a peer's (already verified) certificate is the node certificate of `node`, i.e.
/// valid for that address or name. Agent-to-agent endpoints require it, so a user
/// certificate, or another node's, cannot speak for a node.
pub fn is_node_certificate(cert: &CertificateDer<'_>, node: &str) -> bool {
    let Ok(name) = rustls_pki_types::ServerName::try_from(node) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .and_then(|c| c.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_certificates_speak_only_for_their_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        flocker_ctl::ca::init(dir.path(), "t").expect("ca");
        let node = flocker_ctl::ca::issue_node(dir.path(), "198.18.0.5").expect("node");
        let user = flocker_ctl::ca::issue_user(dir.path(), "198.18.0.5").expect("user");
        let node_cert = certs(&node.cert).expect("pem").remove(0);
        let user_cert = certs(&user.cert).expect("pem").remove(0);
        assert!(is_node_certificate(&node_cert, "198.18.0.5"));
        assert!(!is_node_certificate(&node_cert, "198.18.0.6"));
        assert!(!is_node_certificate(&user_cert, "198.18.0.5"));
        assert!(!is_node_certificate(&node_cert, "not a name"));
    }
}
