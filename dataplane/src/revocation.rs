//! Certificate revocation: the agent checks every peer certificate (clients of its API, and
//! the agents it connects to) against the cluster's revocation list, an X.509 CRL signed by
//! the cluster CA that `flockerctl ca revoke` writes (`cluster.crl`).
//!
//! The list is a file the operator copies to each node. The agent looks at the file's
//! metadata at every handshake and re-reads it when it changed, so a revocation takes effect
//! on the next connection without a restart. A list that cannot be read or parsed, or that
//! the cluster CA did not sign, fails closed: every peer is refused (and the error logged
//! once per change) until the file is fixed. Copy a new list into place atomically (to a
//! temporary name, then rename).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};

/// Errors building the verifiers or loading the list at start.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("revocation list {path}: {detail}")]
    List { path: PathBuf, detail: String },
    #[error("certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The verifiers for one state of the list.
struct Verifiers {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<dyn ServerCertVerifier>,
}

/// What identifies a version of the list file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

struct Loaded {
    stamp: Option<Stamp>,
    verifiers: Result<Arc<Verifiers>, String>,
}

/// The cluster CA and (optionally) its revocation list, shared by the server and client
/// sides of an agent.
pub struct Trust {
    roots: Arc<RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Without a list: accepts what chains to the CA.
    base: Arc<Verifiers>,
    list: Option<(PathBuf, Mutex<Loaded>)>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("list", &self.list.as_ref().map(|(p, _)| p))
            .finish()
    }
}

impl Trust {
    /// Trust in `roots`, checking certificates against the list at `crl` if given. The list
    /// must be readable now; later breakage fails closed (see the module docs).
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<rustls::crypto::CryptoProvider>,
        crl: Option<&Path>,
    ) -> Result<Arc<Trust>, RevocationError> {
        let base = Arc::new(build(&roots, &provider, Vec::new())?);
        let list = match crl {
            None => None,
            Some(path) => {
                let (stamp, crls) = read_list(path).map_err(|detail| RevocationError::List {
                    path: path.to_path_buf(),
                    detail,
                })?;
                let verifiers = Arc::new(build(&roots, &provider, crls)?);
                let loaded = Loaded {
                    stamp: Some(stamp),
                    verifiers: Ok(verifiers),
                };
                Some((path.to_path_buf(), Mutex::new(loaded)))
            }
        };
        Ok(Arc::new(Trust {
            roots,
            provider,
            base,
            list,
        }))
    }

    /// The verifiers for the list as it is on disk now.
    fn current(&self) -> Result<Arc<Verifiers>, rustls::Error> {
        let Some((path, loaded)) = &self.list else {
            return Ok(self.base.clone());
        };
        let mut loaded = loaded
            .lock()
            .map_err(|_| rustls::Error::General("revocation list lock poisoned".into()))?;
        let stamp = std::fs::metadata(path).ok().map(|m| stamp(&m));
        // Unchanged (including "still missing"): nothing to read, nothing new to log.
        if stamp != loaded.stamp {
            loaded.stamp = stamp;
            loaded.verifiers = read_list(path).and_then(|(_, crls)| {
                build(&self.roots, &self.provider, crls)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            });
            match &loaded.verifiers {
                Ok(_) => tracing::info!(path = %path.display(), "revocation list reloaded"),
                Err(e) => tracing::error!(
                    path = %path.display(),
                    error = %e,
                    "revocation list unusable: refusing every peer until it is fixed"
                ),
            }
        }
        loaded.verifiers.clone().map_err(|e| {
            rustls::Error::General(format!(
                "revocation list {}: {e}; refusing every peer until it is fixed",
                path.display()
            ))
        })
    }

    /// A client certificate verifier for the server: certificates must chain to the cluster
    /// CA and not be on the list.
    pub fn client_verifier(self: &Arc<Self>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(CheckClients(self.clone()))
    }

    /// A server certificate verifier for clients: the same rules for the agents we call.
    pub fn server_verifier(self: &Arc<Self>) -> Arc<dyn ServerCertVerifier> {
        Arc::new(CheckServers(self.clone()))
    }
}

fn stamp(m: &std::fs::Metadata) -> Stamp {
    Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    }
}

fn read_list(path: &Path) -> Result<(Stamp, Vec<CertificateRevocationListDer<'static>>), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if crls.is_empty() {
        return Err("no X509 CRL in the file".into());
    }
    Ok((stamp(&meta), crls))
}

fn build(
    roots: &Arc<RootCertStore>,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Verifiers, rustls::server::VerifierBuilderError> {
    // Unknown revocation status stays an error: a list the cluster CA did not sign covers
    // nothing, and that must not pass for "not revoked".
    let with_list = !crls.is_empty();
    let mut client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
    let mut server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone());
    if with_list {
        client = client
            .with_crls(crls.clone())
            .only_check_end_entity_revocation();
        server = server.with_crls(crls).only_check_end_entity_revocation();
    }
    Ok(Verifiers {
        client: client.build()?,
        server: server.build()?,
    })
}

#[derive(Debug)]
struct CheckClients(Arc<Trust>);

impl ClientCertVerifier for CheckClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.base.client.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()?
            .client
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .base
            .client
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .base
            .client
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.base.client.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct CheckServers(Arc<Trust>);

impl ServerCertVerifier for CheckServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current()?.server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .base
            .server
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .base
            .server
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.base.server.supported_verify_schemes()
    }
}
