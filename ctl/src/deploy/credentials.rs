//! The TLS side of talking to agents as a user: the CA directory's user certificate, and
//! trust in agents whose certificate chains to the cluster CA, names the node's address and
//! is not on the CA directory's revocation list (`cluster.crl`, if there is one). The HTTP
//! side is [`flocker_client::AgentClient`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flocker_client::{AgentClient, Timeouts};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// Errors loading a user's credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("tls setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where the credentials of a user live: a CA directory as `flockerctl ca` writes it.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The revocation list agents' certificates are checked against, if any.
    pub crl: Option<PathBuf>,
}

impl Credentials {
    /// `DIR/cluster.crt`, `DIR/users/USER.crt`, `DIR/users/USER.key`, and `DIR/cluster.crl`
    /// if it exists (CA directories made before revocation existed have none).
    pub fn from_ca_dir(dir: &Path, user: &str) -> Credentials {
        let crl = dir.join("cluster.crl");
        Credentials {
            ca_cert: dir.join("cluster.crt"),
            cert: dir.join("users").join(format!("{user}.crt")),
            key: dir.join("users").join(format!("{user}.key")),
            crl: crl.exists().then_some(crl),
        }
    }

    /// The client of every agent at `port`, bounded by `timeout` (see
    /// [`Timeouts::within`]).
    /// A client whose requests take at most `timeout` to be answered, and whose connections
    /// at most `connect` to be accepted.
    pub fn client(
        &self,
        port: u16,
        timeout: Duration,
        connect: Duration,
    ) -> Result<AgentClient, CredentialsError> {
        let timeouts = Timeouts {
            connect,
            ..Timeouts::within(timeout)
        };
        Ok(AgentClient::new(self.tls_config()?, port).with_timeouts(timeouts))
    }

    /// Presents the user certificate; trusts only the cluster CA, minus revoked agents.
    pub fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, CredentialsError> {
        let bad = |path: &Path, reason: String| CredentialsError::Read {
            path: path.to_path_buf(),
            reason,
        };
        let mut roots = RootCertStore::empty();
        let ca_pem = read_pem(&self.ca_cert)?;
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| bad(&self.ca_cert, e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| bad(&self.ca_cert, e.to_string()))?;
        }
        let cert_pem = read_pem(&self.cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&self.cert, e.to_string()))?;
        warn_if_exposed(&self.key);
        let key = PrivateKeyDer::from_pem_slice(&read_pem(&self.key)?)
            .map_err(|e| bad(&self.key, e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if let Some(crl) = &self.crl {
            let crls = CertificateRevocationListDer::pem_slice_iter(&read_pem(crl)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(crl, e.to_string()))?;
            verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
        }
        let verifier = verifier
            .build()
            .map_err(|e| bad(&self.ca_cert, e.to_string()))?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(chain, key)?;
        Ok(Arc::new(config))
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, CredentialsError> {
    std::fs::read(path).map_err(|e| CredentialsError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Warns when a private key can be read by group or others.
fn warn_if_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "private key {} is readable by group or others (mode {mode:o}); `chmod 600` it",
                path.display()
            );
        }
    }
}
