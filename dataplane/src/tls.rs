//! Mutual TLS for the agent: a server that accepts only peers whose certificate chains to
//! the cluster CA and is not on its revocation list (no certificate, another CA's, an
//! expired or a revoked one are refused during the handshake), and the client configuration
//! agents use to talk to each other. What a certificate may do once accepted is
//! [`crate::identity`]'s business.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::revocation::{RevocationError, Trust};

/// Errors loading certificates or building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {detail}")]
    Pem { path: PathBuf, detail: String },
    #[error("{path}: no certificate found")]
    NoCertificate { path: PathBuf },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    Revocation(#[from] RevocationError),
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
    warn_if_exposed(path);
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

/// Warns when a secret file (a private key) can be read by group or others.
pub fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "private key is readable by group or others; `chmod 600` it"
            );
        }
    }
}

/// Warns when the certificate at `path` has expired or expires within two weeks.
pub fn warn_if_expiring(path: &Path) {
    let Some(cert) = certs(path).ok().and_then(|c| c.into_iter().next()) else {
        return;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return;
    };
    match parsed.validity().time_to_expiration() {
        None => tracing::warn!(
            path = %path.display(),
            "certificate has expired: peers refuse it; `flockerctl ca renew` it"
        ),
        Some(left) if left.whole_days() < 14 => tracing::warn!(
            path = %path.display(),
            days = left.whole_days(),
            "certificate expires soon; `flockerctl ca renew` it and restart the agent"
        ),
        Some(left) => {
            tracing::info!(path = %path.display(), days = left.whole_days(), "certificate valid")
        }
    }
}

/// The cluster CA of `files`, with the revocation list at `crl` if given (see
/// [`crate::revocation`]).
pub fn trust(files: &TlsFiles, crl: Option<&Path>) -> Result<Arc<Trust>, TlsError> {
    Ok(Trust::new(roots(&files.ca_cert)?, provider(), crl)?)
}

/// The server side without a revocation list (tests); see [`server_config_with`].
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(files, &trust(files, None)?)
}

/// The server side: client certificates are mandatory, must chain to the cluster CA and
/// must not be revoked.
pub fn server_config_with(
    files: &TlsFiles,
    trust: &Arc<Trust>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(trust.client_verifier())
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side without a revocation list (tests); see [`client_config_with`].
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    client_config_with(files, &trust(files, None)?)
}

/// The client side: trusts only the cluster CA, refuses revoked servers, and presents this
/// node's (or user's) certificate.
pub fn client_config_with(
    files: &TlsFiles,
    trust: &Arc<Trust>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(trust.server_verifier())
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
