//! The cluster certificate authority behind `flockerctl ca init|node|user`.
//!
//! Every agent and every user holds a certificate signed by one cluster CA; agents accept
//! only peers whose certificate chains to it (mutual TLS), for the API and for node-to-node
//! volume transfers alike.
//!
//! File layout of a CA directory:
//!
//! ```text
//! DIR/cluster.crt          the CA certificate (PEM), copied to every node and user
//! DIR/cluster.key          the CA private key (PEM, mode 0600), stays with the operator
//! DIR/nodes/ADDR.crt       a node certificate: CN and subjectAltName = ADDR (IP or DNS name),
//! DIR/nodes/ADDR.key         usable as TLS server and client (agent-to-agent pushes)
//! DIR/users/NAME.crt       a user certificate: CN = NAME, TLS client only
//! DIR/users/NAME.key
//! ```
//!
//! Issuing never overwrites an existing file: re-issuing means deleting the old pair first.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

/// The CA certificate inside a CA directory.
pub const CA_CERT: &str = "cluster.crt";
/// The CA private key inside a CA directory.
pub const CA_KEY: &str = "cluster.key";

/// Default lifetime of issued certificates.
const DEFAULT_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// Errors of the CA tooling.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("no cluster CA in {0}: run `flockerctl ca init` first")]
    NoCa(PathBuf),
    #[error("invalid name {0:?}: use letters, digits, '.', '-', '_' or ':'")]
    InvalidName(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The paths of a certificate and its key, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validity window of a certificate; the default starts a minute ago (clock skew) and
/// lasts five years.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Default for Validity {
    fn default() -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(60),
            not_after: now + DEFAULT_VALIDITY,
        }
    }
}

/// Creates a new cluster CA in `dir` (created if missing). `name` goes into the CA's common
/// name. Refuses to overwrite an existing CA.
pub fn init(dir: &Path, name: &str) -> Result<IssuedCert, CaError> {
    let out = IssuedCert {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
    };
    for path in [&out.cert, &out.key] {
        if path.exists() {
            return Err(CaError::Exists(path.clone()));
        }
    }
    create_dir(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(&format!("Flocker cluster CA {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let validity = Validity {
        not_after: SystemTime::now() + 2 * DEFAULT_VALIDITY,
        ..Validity::default()
    };
    set_validity(&mut params, validity);
    let cert = params.self_signed(&key)?;
    write_file(&out.cert, cert.pem().as_bytes(), 0o644)?;
    write_file(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    Ok(out)
}

/// Issues a node certificate for `address` (an IP address or DNS name, as the deployment
/// file spells it) into `DIR/nodes/`.
pub fn issue_node(dir: &Path, address: &str) -> Result<IssuedCert, CaError> {
    issue_node_with(dir, address, Validity::default())
}

/// [`issue_node`] with an explicit validity window (tests use it for expired certificates).
pub fn issue_node_with(
    dir: &Path,
    address: &str,
    validity: Validity,
) -> Result<IssuedCert, CaError> {
    check_name(address)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(address);
    params.subject_alt_names = vec![match address.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(address.try_into()?),
    }];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    issue(dir, "nodes", address, params, validity)
}

/// Issues a user certificate (TLS client only) for `name` into `DIR/users/`.
pub fn issue_user(dir: &Path, name: &str) -> Result<IssuedCert, CaError> {
    issue_user_with(dir, name, Validity::default())
}

/// [`issue_user`] with an explicit validity window.
pub fn issue_user_with(dir: &Path, name: &str, validity: Validity) -> Result<IssuedCert, CaError> {
    check_name(name)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    issue(dir, "users", name, params, validity)
}

fn issue(
    dir: &Path,
    kind: &str,
    name: &str,
    mut params: CertificateParams,
    validity: Validity,
) -> Result<IssuedCert, CaError> {
    let (ca_cert, ca_key) = load_ca(dir)?;
    let sub = dir.join(kind);
    let out = IssuedCert {
        cert: sub.join(format!("{name}.crt")),
        key: sub.join(format!("{name}.key")),
    };
    for path in [&out.cert, &out.key] {
        if path.exists() {
            return Err(CaError::Exists(path.clone()));
        }
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    create_dir(&sub)?;
    write_file(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&out.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(out)
}

/// Loads the CA. rcgen signs with a `Certificate`, so the CA's parameters are parsed back and
/// re-signed with the same key: subject and key are unchanged, hence so is every chain.
fn load_ca(dir: &Path) -> Result<(Certificate, KeyPair), CaError> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    if !cert_path.exists() || !key_path.exists() {
        return Err(CaError::NoCa(dir.to_path_buf()));
    }
    let cert_pem = read_file(&cert_path)?;
    let key_pem = read_file(&key_path)?;
    let key = KeyPair::from_pem(&key_pem)?;
    let params = CertificateParams::from_ca_cert_pem(&cert_pem)?;
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Flocker");
    dn
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    params.not_before = validity.not_before.into();
    params.not_after = validity.not_after.into();
}

/// Names become file names, so they must not be able to escape the CA directory.
fn check_name(name: &str) -> Result<(), CaError> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if ok {
        Ok(())
    } else {
        Err(CaError::InvalidName(name.to_string()))
    }
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn read_file(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_writes_the_documented_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = init(dir.path(), "test").expect("init");
        assert_eq!(ca.cert, dir.path().join("cluster.crt"));
        let node = issue_node(dir.path(), "198.18.0.1").expect("node");
        assert_eq!(node.cert, dir.path().join("nodes/198.18.0.1.crt"));
        let user = issue_user(dir.path(), "alice").expect("user");
        assert_eq!(user.key, dir.path().join("users/alice.key"));
        let pem = fs::read_to_string(&node.cert).expect("read");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn refuses_to_overwrite_and_to_escape() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "test").expect("init");
        assert!(matches!(init(dir.path(), "x"), Err(CaError::Exists(_))));
        issue_user(dir.path(), "bob").expect("user");
        assert!(matches!(
            issue_user(dir.path(), "bob"),
            Err(CaError::Exists(_))
        ));
        assert!(matches!(
            issue_user(dir.path(), "../evil"),
            Err(CaError::InvalidName(_))
        ));
    }

    #[test]
    fn issuing_without_a_ca_names_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = issue_node(dir.path(), "node1").expect_err("no ca");
        assert!(err.to_string().contains("flockerctl ca init"), "{err}");
    }
}
