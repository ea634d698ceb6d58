//! Who is calling, and may they: the role and name a peer's (already verified) certificate
//! carries, and the authorisation rules of the API built on them.
//!
//! `flockerctl ca` writes the role as a URI subjectAltName: `spiffe://flocker/node/ADDR` for a
//! node's agent, `spiffe://flocker/user/NAME` for a user. The agent decides from that alone,
//! never from what a request claims:
//!
//! | endpoint | who |
//! | --- | --- |
//! | `GET /v1/health` | any certificate of the cluster CA |
//! | `GET /v1/state`, `POST /v1/converge` | a user |
//! | `GET /v1/volumes/NAME` | a user or a node |
//! | `POST /v1/volumes/NAME/receive`, `/handoff` | the node the request names as `from` |

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// Role URI prefix of node certificates (as `flocker_ctl::ca` writes it).
const NODE_PREFIX: &str = "spiffe://flocker/node/";
/// Role URI prefix of user certificates.
const USER_PREFIX: &str = "spiffe://flocker/user/";

/// A request refused for who sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("{what} needs a user certificate; this is {caller}")]
    NotUser { what: String, caller: String },
    #[error(
        "{what}: only the agent of {node} may send this, with its node certificate; this is {caller}"
    )]
    NotThatNode {
        what: String,
        node: String,
        caller: String,
    },
    #[error("{what} needs a user or node certificate; this is {caller}")]
    NoRole { what: String, caller: String },
}

/// The identity a verified client certificate establishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The agent of this node (address or name, as the deployment file spells it).
    Node(String),
    /// A user.
    User(String),
    /// A certificate of the cluster CA without a (single, well-formed) role: issued before
    /// roles existed, or by hand.
    Unknown(String),
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Node(n) => write!(f, "the node certificate of {n}"),
            Caller::User(u) => write!(f, "the user certificate of {u}"),
            Caller::Unknown(why) => write!(
                f,
                "a certificate without a role ({why}); reissue it with `flockerctl ca renew node ADDR` or `flockerctl ca renew user NAME`"
            ),
        }
    }
}

impl Caller {
    /// Reads the role from a certificate the TLS layer has already verified against the
    /// cluster CA. Exactly one flocker role URI must be present.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Caller {
        let parsed = match x509_parser::parse_x509_certificate(cert.as_ref()) {
            Ok((_, c)) => c,
            Err(e) => return Caller::Unknown(format!("unparsable certificate: {e}")),
        };
        let names = match parsed.subject_alternative_name() {
            Ok(Some(san)) => san.value.general_names.clone(),
            Ok(None) => Vec::new(),
            Err(e) => return Caller::Unknown(format!("unparsable subjectAltName: {e}")),
        };
        let roles: Vec<Caller> = names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(uri) => Self::from_uri(uri),
                _ => None,
            })
            .collect();
        match roles.as_slice() {
            [one] => one.clone(),
            [] => Caller::Unknown("no spiffe://flocker/... name".into()),
            _ => Caller::Unknown("more than one role".into()),
        }
    }

    fn from_uri(uri: &str) -> Option<Caller> {
        let valid = |name: &str| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        };
        if let Some(node) = uri.strip_prefix(NODE_PREFIX) {
            return Some(if valid(node) {
                Caller::Node(node.to_string())
            } else {
                Caller::Unknown(format!("malformed node name in {uri:?}"))
            });
        }
        if let Some(user) = uri.strip_prefix(USER_PREFIX) {
            return Some(if valid(user) {
                Caller::User(user.to_string())
            } else {
                Caller::Unknown(format!("malformed user name in {uri:?}"))
            });
        }
        None
    }

    /// State and converge: users only.
    pub fn require_user(&self, what: &str) -> Result<(), AuthError> {
        match self {
            Caller::User(_) => Ok(()),
            _ => Err(AuthError::NotUser {
                what: what.to_string(),
                caller: self.to_string(),
            }),
        }
    }

    /// Agent-to-agent requests that act for `node`: only that node's own certificate.
    pub fn require_node(&self, node: &str, what: &str) -> Result<(), AuthError> {
        match self {
            Caller::Node(n) if n == node => Ok(()),
            _ => Err(AuthError::NotThatNode {
                what: what.to_string(),
                node: node.to_string(),
                caller: self.to_string(),
            }),
        }
    }

    /// Read-only volume queries: any user or node.
    pub fn require_role(&self, what: &str) -> Result<(), AuthError> {
        match self {
            Caller::User(_) | Caller::Node(_) => Ok(()),
            Caller::Unknown(_) => Err(AuthError::NoRole {
                what: what.to_string(),
                caller: self.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    fn cert(path: &std::path::Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).expect("pem")
    }

    #[test]
    fn reads_the_role_flockerctl_ca_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        flocker_ctl::ca::init(dir.path(), "t").expect("ca");
        let node = flocker_ctl::ca::issue_node(dir.path(), "198.18.0.5").expect("node");
        let user = flocker_ctl::ca::issue_user(dir.path(), "alice").expect("user");
        assert_eq!(
            Caller::from_certificate(&cert(&node.cert)),
            Caller::Node("198.18.0.5".into())
        );
        assert_eq!(
            Caller::from_certificate(&cert(&user.cert)),
            Caller::User("alice".into())
        );
        let ca = Caller::from_certificate(&cert(&dir.path().join("cluster.crt")));
        assert!(matches!(ca, Caller::Unknown(_)), "{ca:?}");
    }

    #[test]
    fn the_rules() {
        let node = Caller::Node("198.18.0.5".into());
        let user = Caller::User("alice".into());
        let old = Caller::Unknown("no spiffe://flocker/... name".into());
        assert_eq!(user.require_user("converge"), Ok(()));
        let refused = node.require_user("converge").expect_err("node");
        assert_eq!(
            refused.to_string(),
            "converge needs a user certificate; this is the node certificate of 198.18.0.5"
        );
        assert!(old.require_user("state").is_err());
        assert_eq!(node.require_node("198.18.0.5", "push"), Ok(()));
        assert!(node.require_node("198.18.0.6", "push").is_err());
        assert!(user.require_node("198.18.0.5", "push").is_err());
        assert!(old.require_role("volume").is_err());
        assert!(
            old.require_role("volume")
                .expect_err("old")
                .to_string()
                .contains("flockerctl ca renew")
        );
        assert_eq!(user.require_role("volume"), Ok(()));
        assert_eq!(node.require_role("volume"), Ok(()));
        assert_eq!(
            Caller::from_uri("spiffe://flocker/node/../x"),
            Some(Caller::Unknown(
                "malformed node name in \"spiffe://flocker/node/../x\"".into()
            ))
        );
        assert_eq!(Caller::from_uri("https://example.com"), None);
    }
}
