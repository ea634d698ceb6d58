//! The cluster certificate authority behind `flockerctl ca init|node|user|renew|revoke`.
//!
//! Every agent and every user holds a certificate signed by one cluster CA; agents accept
//! only peers whose certificate chains to it (mutual TLS), for the API and for node-to-node
//! volume transfers alike. A certificate also says in which **role** it may act, as a URI
//! subjectAltName in the style of SPIFFE IDs, which agents read to authorise each request:
//!
//! ```text
//! spiffe://flocker/node/ADDR   the agent of node ADDR: pushes to and hands off to its peers
//! spiffe://flocker/user/NAME   a user: may read state and converge
//! ```
//!
//! Certificates issued before roles existed carry no such name and are refused by agents;
//! reissue them with `flockerctl ca renew node ADDR` / `renew user NAME`.
//!
//! File layout of a CA directory:
//!
//! ```text
//! DIR/cluster.crt          the CA certificate (PEM), copied to every node and user
//! DIR/cluster.key          the CA private key (PEM, mode 0600), stays with the operator
//! DIR/cluster.crl          the revocation list (PEM X.509 CRL signed by the CA), copied to
//!                            every node; `revoke` rewrites it
//! DIR/nodes/ADDR.crt       a node certificate: CN and subjectAltName = ADDR (IP or DNS name),
//! DIR/nodes/ADDR.key         usable as TLS server and client (agent-to-agent pushes)
//! DIR/users/NAME.crt       a user certificate: CN = NAME, TLS client only
//! DIR/users/NAME.key
//! ```
//!
//! Issuing never overwrites an existing file; `renew` replaces a pair on purpose (new key,
//! new validity), and every file is written to a temporary name first and renamed, so a
//! reader never sees half a file.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};

/// The CA certificate inside a CA directory.
pub const CA_CERT: &str = "cluster.crt";
/// The CA private key inside a CA directory.
pub const CA_KEY: &str = "cluster.key";
/// The certificate revocation list inside a CA directory.
pub const CA_CRL: &str = "cluster.crl";

/// The role URI of a node certificate is this prefix followed by the node's address.
pub const NODE_URI_PREFIX: &str = "spiffe://flocker/node/";
/// The role URI of a user certificate is this prefix followed by the user's name.
pub const USER_URI_PREFIX: &str = "spiffe://flocker/user/";

/// Default lifetime of node and user certificates, in days: short enough that a leaked key
/// stops working on its own within a season, long enough that `renew` is a quarterly chore.
pub const DEFAULT_DAYS: u32 = 90;
/// Lifetime of the CA certificate, in days.
const CA_DAYS: u32 = 10 * 365;
/// The longest lifetime `--days` accepts for node and user certificates.
const MAX_DAYS: u32 = 5 * 365;
const DAY: Duration = Duration::from_secs(24 * 3600);

/// Errors of the CA tooling.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} already exists; refusing to overwrite it (`flockerctl ca renew` replaces a certificate)"
    )]
    Exists(PathBuf),
    #[error("no cluster CA in {0}: run `flockerctl ca init` first")]
    NoCa(PathBuf),
    #[error("no certificate {path}: issue one with `flockerctl ca {role} {name}`")]
    NotIssued {
        path: PathBuf,
        role: Role,
        name: String,
    },
    #[error("invalid name {0:?}: use letters, digits, '.', '-', '_' or ':'")]
    InvalidName(String),
    #[error("invalid lifetime of {0} days: use 1 to {MAX_DAYS}")]
    InvalidDays(u32),
    #[error("{path}: {detail}")]
    Parse { path: PathBuf, detail: String },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What a certificate may do; written into it as a URI subjectAltName.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A node's agent: serves the API and pushes to / hands off to its peers as itself.
    Node,
    /// A person or tool: reads state and converges.
    User,
}

impl Role {
    /// The subdirectory of the CA directory holding this role's certificates.
    fn dir(self) -> &'static str {
        match self {
            Role::Node => "nodes",
            Role::User => "users",
        }
    }

    /// The role URI naming `name` in this role.
    pub fn uri(self, name: &str) -> String {
        match self {
            Role::Node => format!("{NODE_URI_PREFIX}{name}"),
            Role::User => format!("{USER_URI_PREFIX}{name}"),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Node => "node",
            Role::User => "user",
        })
    }
}

/// The paths of a certificate and its key, as written, and when the certificate expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after: SystemTime,
}

/// The validity window of a certificate; it starts a minute ago (clock skew).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// From a minute ago until `days` from now; `days` must be 1 to 5 years' worth.
    pub fn days(days: u32) -> Result<Self, CaError> {
        if days == 0 || days > MAX_DAYS {
            return Err(CaError::InvalidDays(days));
        }
        Ok(Self::unchecked_days(days))
    }

    fn unchecked_days(days: u32) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now - Duration::from_secs(60),
            not_after: now + DAY * days,
        }
    }
}

impl Default for Validity {
    fn default() -> Self {
        Self::unchecked_days(DEFAULT_DAYS)
    }
}

/// What `revoke` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The rewritten revocation list.
    pub crl: PathBuf,
    /// The revoked certificate's serial number, in hex.
    pub serial: String,
    /// The certificate was already on the list (the list is rewritten all the same).
    pub already: bool,
}

/// Creates a new cluster CA in `dir` (created if missing), with an empty revocation list.
/// `name` goes into the CA's common name. Refuses to overwrite an existing CA.
pub fn init(dir: &Path, name: &str) -> Result<IssuedCert, CaError> {
    let validity = Validity::unchecked_days(CA_DAYS);
    let out = IssuedCert {
        cert: dir.join(CA_CERT),
        key: dir.join(CA_KEY),
        not_after: validity.not_after,
    };
    for path in [&out.cert, &out.key, &dir.join(CA_CRL)] {
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
    set_validity(&mut params, validity);
    let cert = params.self_signed(&key)?;
    write_new(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&out.cert, cert.pem().as_bytes(), 0o644)?;
    write_crl(dir, &cert, &key, Vec::new())?;
    Ok(out)
}

/// Issues a node certificate for `address` (an IP address or DNS name, as the deployment
/// file spells it) into `DIR/nodes/`.
pub fn issue_node(dir: &Path, address: &str) -> Result<IssuedCert, CaError> {
    issue(dir, Role::Node, address, Validity::default())
}

/// [`issue_node`] with an explicit validity window (tests use it for expired certificates).
pub fn issue_node_with(
    dir: &Path,
    address: &str,
    validity: Validity,
) -> Result<IssuedCert, CaError> {
    issue(dir, Role::Node, address, validity)
}

/// Issues a user certificate (TLS client only) for `name` into `DIR/users/`.
pub fn issue_user(dir: &Path, name: &str) -> Result<IssuedCert, CaError> {
    issue(dir, Role::User, name, Validity::default())
}

/// [`issue_user`] with an explicit validity window.
pub fn issue_user_with(dir: &Path, name: &str, validity: Validity) -> Result<IssuedCert, CaError> {
    issue(dir, Role::User, name, validity)
}

/// Issues a certificate for `name` in `role`; refuses to overwrite an existing one.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    validity: Validity,
) -> Result<IssuedCert, CaError> {
    check_name(name)?;
    let out = paths(dir, role, name, validity);
    for path in [&out.cert, &out.key] {
        if path.exists() {
            return Err(CaError::Exists(path.clone()));
        }
    }
    sign(dir, role, name, &out, validity)?;
    Ok(out)
}

/// Replaces the certificate of `name` in `role` with a new key and certificate valid for
/// `validity`. The old certificate stays valid until it expires (revoke it if its key
/// leaked); agents and users pick the new pair up when restarted.
pub fn renew(
    dir: &Path,
    role: Role,
    name: &str,
    validity: Validity,
) -> Result<IssuedCert, CaError> {
    check_name(name)?;
    let out = paths(dir, role, name, validity);
    if !out.cert.exists() {
        return Err(CaError::NotIssued {
            path: out.cert,
            role,
            name: name.to_string(),
        });
    }
    sign(dir, role, name, &out, validity)?;
    Ok(out)
}

/// Adds the certificate of `name` in `role` to `DIR/cluster.crl` (created if missing) and
/// signs the list anew. Agents reading that file refuse the certificate from their next
/// handshake on.
pub fn revoke(dir: &Path, role: Role, name: &str) -> Result<Revoked, CaError> {
    check_name(name)?;
    let cert_path = dir.join(role.dir()).join(format!("{name}.crt"));
    if !cert_path.exists() {
        return Err(CaError::NotIssued {
            path: cert_path,
            role,
            name: name.to_string(),
        });
    }
    let serial = certificate_serial(&cert_path)?;
    let (ca_cert, ca_key) = load_ca(dir)?;
    let mut entries = read_crl(dir)?;
    let already = entries
        .iter()
        .any(|e| e.serial_number.as_ref() == serial.as_slice());
    if !already {
        entries.push(RevokedCertParams {
            serial_number: SerialNumber::from(serial.clone()),
            revocation_time: SystemTime::now().into(),
            reason_code: None,
            invalidity_date: None,
        });
    }
    let crl = write_crl(dir, &ca_cert, &ca_key, entries)?;
    Ok(Revoked {
        crl,
        serial: hex(&serial),
        already,
    })
}

/// The serial numbers (big-endian, no leading zeros) on `DIR/cluster.crl`.
pub fn revoked_serials(dir: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    Ok(read_crl(dir)?
        .into_iter()
        .map(|e| e.serial_number.to_bytes())
        .collect())
}

fn paths(dir: &Path, role: Role, name: &str, validity: Validity) -> IssuedCert {
    let sub = dir.join(role.dir());
    IssuedCert {
        cert: sub.join(format!("{name}.crt")),
        key: sub.join(format!("{name}.key")),
        not_after: validity.not_after,
    }
}

fn sign(
    dir: &Path,
    role: Role,
    name: &str,
    out: &IssuedCert,
    validity: Validity,
) -> Result<(), CaError> {
    let (ca_cert, ca_key) = load_ca(dir)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    let role_uri = SanType::URI(Ia5String::try_from(role.uri(name))?);
    match role {
        Role::Node => {
            let address = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.try_into()?),
            };
            params.subject_alt_names = vec![address, role_uri];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        Role::User => {
            params.subject_alt_names = vec![role_uri];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, validity);
    // rcgen derives the serial number from the public key: a fresh key, a fresh serial, so
    // revoking one certificate never revokes its renewal.
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
    create_dir(&dir.join(role.dir()))?;
    write_replace(&out.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_replace(&out.cert, cert.pem().as_bytes(), 0o644)
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

fn certificate_serial(path: &Path) -> Result<Vec<u8>, CaError> {
    let parse = |detail: String| CaError::Parse {
        path: path.to_path_buf(),
        detail,
    };
    let pem = fs::read(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| parse(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| parse(e.to_string()))?;
    Ok(cert.serial.to_bytes_be())
}

/// The entries of `DIR/cluster.crl`; none if the file does not exist (CAs made before
/// revocation existed).
fn read_crl(dir: &Path) -> Result<Vec<RevokedCertParams>, CaError> {
    let path = dir.join(CA_CRL);
    let parse = |detail: String| CaError::Parse {
        path: path.clone(),
        detail,
    };
    let pem = match fs::read(&path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CaError::Io { path, source }),
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| parse(e.to_string()))?;
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).map_err(|e| parse(e.to_string()))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| RevokedCertParams {
            serial_number: SerialNumber::from(r.serial().to_bytes_be()),
            revocation_time: r.revocation_date.to_datetime(),
            reason_code: None,
            invalidity_date: None,
        })
        .collect())
}

fn write_crl(
    dir: &Path,
    ca_cert: &Certificate,
    ca_key: &KeyPair,
    revoked_certs: Vec<RevokedCertParams>,
) -> Result<PathBuf, CaError> {
    let now = SystemTime::now();
    // Seconds since the epoch: grows with every rewrite, as RFC 5280 asks of a CRL number.
    let number = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let params = CertificateRevocationListParams {
        this_update: now.into(),
        // Agents do not enforce nextUpdate (the list is a file the operator distributes, not
        // fetched), so it only needs to lie after thisUpdate.
        next_update: (now + DAY * CA_DAYS).into(),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(ca_cert, ca_key)?;
    let path = dir.join(CA_CRL);
    write_replace(&path, crl.pem()?.as_bytes(), 0o644)?;
    Ok(path)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    if path.exists() {
        return Err(CaError::Exists(path.to_path_buf()));
    }
    write_replace(path, data, mode)
}

/// Writes `data` to a temporary file beside `path` with `mode`, then renames it over `path`.
fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(data).map_err(io)?;
    file.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_issue_writes_the_documented_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = init(dir.path(), "test").expect("init");
        assert_eq!(ca.cert, dir.path().join("cluster.crt"));
        assert!(dir.path().join("cluster.crl").exists());
        let node = issue_node(dir.path(), "198.18.0.1").expect("node");
        assert_eq!(node.cert, dir.path().join("nodes/198.18.0.1.crt"));
        let user = issue_user(dir.path(), "alice").expect("user");
        assert_eq!(user.key, dir.path().join("users/alice.key"));
        let pem = fs::read_to_string(&node.cert).expect("read");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&user.key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    fn uris(path: &Path) -> Vec<String> {
        let pem = fs::read(path).expect("read");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let san = cert
            .subject_alternative_name()
            .expect("san")
            .expect("has san");
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn certificates_carry_their_role_and_a_short_default_lifetime() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "test").expect("init");
        let node = issue_node(dir.path(), "198.18.0.1").expect("node");
        let user = issue_user(dir.path(), "alice").expect("user");
        assert_eq!(uris(&node.cert), ["spiffe://flocker/node/198.18.0.1"]);
        assert_eq!(uris(&user.cert), ["spiffe://flocker/user/alice"]);
        let days = node
            .not_after
            .duration_since(SystemTime::now())
            .expect("future")
            .as_secs()
            / 86400;
        assert!((89..=90).contains(&days), "{days}");
        assert!(matches!(Validity::days(0), Err(CaError::InvalidDays(0))));
        assert!(Validity::days(365).is_ok());
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

    #[test]
    fn renew_replaces_the_pair_with_a_new_key_and_serial() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "test").expect("init");
        let err = renew(dir.path(), Role::User, "carol", Validity::default()).expect_err("none");
        assert!(
            err.to_string().contains("flockerctl ca user carol"),
            "{err}"
        );
        let first = issue_user(dir.path(), "carol").expect("user");
        let old_serial = certificate_serial(&first.cert).expect("serial");
        let old_key = fs::read(&first.key).expect("key");
        let validity = Validity::days(7).expect("days");
        let renewed = renew(dir.path(), Role::User, "carol", validity).expect("renew");
        assert_eq!(renewed.cert, first.cert);
        assert_ne!(
            certificate_serial(&renewed.cert).expect("serial"),
            old_serial
        );
        assert_ne!(fs::read(&renewed.key).expect("key"), old_key);
        assert_eq!(uris(&renewed.cert), ["spiffe://flocker/user/carol"]);
    }

    #[test]
    fn revoke_adds_the_serial_to_the_list_and_keeps_earlier_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "test").expect("init");
        assert_eq!(
            revoked_serials(dir.path()).expect("crl"),
            Vec::<Vec<u8>>::new()
        );
        let a = issue_user(dir.path(), "a").expect("a");
        let b = issue_node(dir.path(), "198.18.0.9").expect("b");
        let first = revoke(dir.path(), Role::User, "a").expect("revoke a");
        assert!(!first.already);
        revoke(dir.path(), Role::Node, "198.18.0.9").expect("revoke b");
        let again = revoke(dir.path(), Role::User, "a").expect("again");
        assert!(again.already);
        let serials = revoked_serials(dir.path()).expect("crl");
        assert_eq!(
            serials,
            [
                certificate_serial(&a.cert).expect("a"),
                certificate_serial(&b.cert).expect("b")
            ]
        );
        let err = revoke(dir.path(), Role::User, "nobody").expect_err("missing");
        assert!(err.to_string().contains("users/nobody.crt"), "{err}");
    }
}
