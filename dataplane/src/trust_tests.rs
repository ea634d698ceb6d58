//! Issue 11 ("trust nothing on the wire") end to end, in process: a real agent API over real
//! mutual TLS on loopback, certificates from `flocker_ctl::ca`, a fake container runtime and
//! a directory volume backend. No root needed.
//!
//! - roles: node certificates cannot converge or read state, users cannot push or hand off,
//!   a node cannot speak for another, certificates without a role are refused with the fix;
//! - revocation: a revoked certificate is refused from the next connection, no restart;
//! - floods: idle and stalled connections neither block a user nor stay open;
//! - silent peers: a converge that calls one fails within the peer timeout, naming it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use flocker_client::{AgentClient, ClientError, full, paths};
use flocker_ctl::ca::{self, Role};
use flocker_wire::{Action, ConvergeEvent, ConvergeRequest, DesiredState};
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::agent::Agent;
use crate::containers::{
    ContainerDetails, ContainerError, ContainerRuntime, ContainerSpec, ManagedContainer,
};
use crate::limits::{PeerTimeouts, ServerLimits};
use crate::routes::RouteStore;
use crate::tls::{self, TlsFiles};
use crate::volume::SystemRunner;
use crate::volume::dir::DirBackend;

const A: &str = "127.0.0.1";
const B: &str = "127.0.0.2";
/// Accepts TCP and says nothing.
const SILENT_TCP: &str = "127.0.0.3";
/// Completes the TLS handshake and says nothing.
const SILENT_HTTP: &str = "127.0.0.4";

/// No containers; every call succeeds.
struct NoContainers;

#[async_trait]
impl ContainerRuntime for NoContainers {
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, ContainerError> {
        Ok(vec![])
    }
    async fn ensure_image(&self, _: &str) -> Result<(), ContainerError> {
        Ok(())
    }
    async fn create_and_start(&self, _: &ContainerSpec) -> Result<(), ContainerError> {
        Ok(())
    }
    async fn create(&self, _: &ContainerSpec) -> Result<(), ContainerError> {
        Ok(())
    }
    async fn start(&self, _: &str) -> Result<(), ContainerError> {
        Ok(())
    }
    async fn stop_and_remove(&self, _: &str) -> Result<(), ContainerError> {
        Ok(())
    }
    async fn stop(&self, _: &str) -> Result<(), ContainerError> {
        Ok(())
    }
    async fn details(&self, _: &str) -> Result<ContainerDetails, ContainerError> {
        // Whatever was started runs (and so is ready).
        Ok(ContainerDetails {
            running: true,
            ..ContainerDetails::default()
        })
    }
    async fn disable_docker_restart(&self, _: &str) -> Result<(), ContainerError> {
        Ok(())
    }
    async fn listens_on(&self, _: &str, _: u16) -> Result<bool, ContainerError> {
        Ok(true)
    }
}

struct Setup {
    dir: tempfile::TempDir,
    port: u16,
    agent: Arc<Agent>,
}

impl Setup {
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    fn files(&self, role: Role, name: &str) -> TlsFiles {
        let sub = match role {
            Role::Node => "nodes",
            Role::User => "users",
        };
        TlsFiles {
            ca_cert: self.ca().join("cluster.crt"),
            cert: self.ca().join(format!("{sub}/{name}.crt")),
            key: self.ca().join(format!("{sub}/{name}.key")),
        }
    }

    fn client(&self, files: &TlsFiles) -> AgentClient {
        AgentClient::new(tls::client_config(files).expect("client tls"), self.port)
    }

    /// One request to agent A as `files`; `Err` when the TLS layer refused.
    async fn call(
        &self,
        files: &TlsFiles,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, String), ClientError> {
        let (status, bytes) = self
            .client(files)
            .request(A, method, path, full(body))
            .await?;
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }
}

/// A free port on every loopback address the tests use.
fn free_port() -> u16 {
    for _ in 0..50 {
        let Ok(l) = std::net::TcpListener::bind((A, 0)) else {
            continue;
        };
        let Ok(addr) = l.local_addr() else { continue };
        let free = [B, SILENT_TCP, SILENT_HTTP]
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, addr.port())).is_ok());
        if free {
            return addr.port();
        }
    }
    panic!("no free port on loopback");
}

/// Agent A, checking the CA's revocation list, with `limits` and `peer` timeouts.
async fn setup(limits: ServerLimits, peer: PeerTimeouts) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    ca::init(&ca, "test").expect("ca");
    for node in [A, B, SILENT_HTTP] {
        ca::issue_node(&ca, node).expect("node");
    }
    for user in ["admin", "bob"] {
        ca::issue_user(&ca, user).expect("user");
    }
    let port = free_port();
    let files = TlsFiles {
        ca_cert: ca.join("cluster.crt"),
        cert: ca.join(format!("nodes/{A}.crt")),
        key: ca.join(format!("nodes/{A}.key")),
    };
    let trust = tls::trust(&files, Some(&ca.join("cluster.crl"))).expect("trust");
    let root = dir.path().join("a");
    let volumes =
        Arc::new(DirBackend::open(&root.join("volumes"), Arc::new(SystemRunner)).expect("dir"));
    let peers = AgentClient::new(
        tls::client_config_with(&files, &trust).expect("client tls"),
        port,
    )
    .with_timeouts(peer);
    let agent = Arc::new(Agent::new(
        A.to_string(),
        volumes,
        Arc::new(NoContainers),
        peers,
        RouteStore::open(root.join("routes.json"), None).expect("routes"),
    ));
    let listener = crate::server::bind(format!("{A}:{port}").parse().expect("addr"))
        .await
        .expect("bind");
    let server_tls = tls::server_config_with(&files, &trust).expect("server tls");
    tokio::spawn(crate::server::serve(
        listener,
        server_tls,
        agent.clone(),
        limits,
    ));
    Setup { dir, port, agent }
}

fn converge_body(actions: Vec<Action>) -> Vec<u8> {
    let mut desired = DesiredState::default();
    for node in [A, B, SILENT_TCP, SILENT_HTTP] {
        desired.nodes.insert(node.into(), BTreeSet::new());
    }
    serde_json::to_vec(&ConvergeRequest {
        desired,
        routes: None,
        actions,
        nodes_version: None,
    })
    .expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_certificates_may_not_converge_or_read_state() {
    let s = setup(ServerLimits::default(), PeerTimeouts::default()).await;
    let admin = s.files(Role::User, "admin");
    let (status, body) = s
        .call(&admin, Method::GET, paths::STATE, vec![])
        .await
        .expect("user state");
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = s
        .call(&admin, Method::POST, paths::CONVERGE, converge_body(vec![]))
        .await
        .expect("user converge");
    assert_eq!(status, StatusCode::OK, "{body}");

    // Another node's certificate, and the agent's own.
    for node in [B, A] {
        let files = s.files(Role::Node, node);
        let (status, body) = s
            .call(&files, Method::GET, paths::STATE, vec![])
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("state needs a user certificate"), "{body}");
        let create = Action::CreateVolume {
            volume: "stolen".into(),
            maximum_size: None,
        };
        let (status, body) = s
            .call(
                &files,
                Method::POST,
                paths::CONVERGE,
                converge_body(vec![create]),
            )
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("converge needs a user certificate"), "{body}");
        // Health stays open to every member of the cluster.
        let (status, _) = s
            .call(&files, Method::GET, paths::HEALTH, vec![])
            .await
            .expect("health");
        assert_eq!(status, StatusCode::OK);
    }
    assert!(
        s.agent.volume("stolen").await.is_err(),
        "a node certificate created a volume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_to_agent_endpoints_take_only_the_node_they_name() {
    let s = setup(ServerLimits::default(), PeerTimeouts::default()).await;
    let receive = |from: &str| {
        format!("/v1/volumes/db/receive?snapshot=push-0000000001&owner={from}&epoch=1&from={from}")
    };
    let handoff = |from: &str| {
        serde_json::to_vec(&serde_json::json!({ "epoch": 2, "from": from })).expect("json")
    };
    let admin = s.files(Role::User, "admin");
    let node_b = s.files(Role::Node, B);
    let cases = [
        // A user is no node.
        (
            &admin,
            B,
            "volume push: only the agent of 127.0.0.2 may send this",
        ),
        // B claiming to be another node.
        (
            &node_b,
            "127.0.0.9",
            "volume push: only the agent of 127.0.0.9",
        ),
    ];
    for (files, from, needle) in cases {
        let (status, body) = s
            .call(files, Method::POST, &receive(from), vec![0; 1000])
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains(needle), "{needle:?} not in {body}");
        let (status, body) = s
            .call(files, Method::POST, &paths::handoff("db"), handoff(from))
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("volume handoff: only the agent of"), "{body}");
    }
    // B as itself gets past authorisation (and is refused for what it sends).
    let (status, body) = s
        .call(&node_b, Method::POST, &receive(B), vec![7; 1000])
        .await
        .expect("answer");
    assert_ne!(status, StatusCode::FORBIDDEN, "{body}");
}

/// A certificate of the cluster CA as issued before roles existed: no role URI.
fn issue_without_role(ca_dir: &Path, name: &str) -> TlsFiles {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("cluster.key")).expect("key"))
            .expect("ca key");
    let ca_params = CertificateParams::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("cluster.crt")).expect("crt"),
    )
    .expect("ca params");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("sign");
    let (cert_path, key_path) = (ca_dir.join("old.crt"), ca_dir.join("old.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    TlsFiles {
        ca_cert: ca_dir.join("cluster.crt"),
        cert: cert_path,
        key: key_path,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_without_a_role_are_refused_with_the_fix() {
    let s = setup(ServerLimits::default(), PeerTimeouts::default()).await;
    let old = issue_without_role(&s.ca(), "admin");
    for path in [paths::STATE, &paths::volume("db")] {
        let (status, body) = s
            .call(&old, Method::GET, path, vec![])
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("flockerctl ca renew"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_from_the_next_connection() {
    let s = setup(ServerLimits::default(), PeerTimeouts::default()).await;
    let (admin, bob) = (s.files(Role::User, "admin"), s.files(Role::User, "bob"));
    let (status, _) = s
        .call(&bob, Method::GET, paths::STATE, vec![])
        .await
        .expect("before");
    assert_eq!(status, StatusCode::OK);

    ca::revoke(&s.ca(), Role::User, "bob").expect("revoke");
    let refused = s.call(&bob, Method::GET, paths::STATE, vec![]).await;
    assert!(
        refused.is_err(),
        "revoked certificate accepted: {refused:?}"
    );
    let (status, _) = s
        .call(&admin, Method::GET, paths::STATE, vec![])
        .await
        .expect("others still in");
    assert_eq!(status, StatusCode::OK);

    // An unusable list fails closed, and a good one is picked up again.
    let crl = s.ca().join("cluster.crl");
    let good = std::fs::read(&crl).expect("crl");
    std::fs::write(&crl, "not a CRL").expect("break");
    let refused = s.call(&admin, Method::GET, paths::STATE, vec![]).await;
    assert!(refused.is_err(), "accepted with a broken list: {refused:?}");
    std::fs::write(&crl, good).expect("restore");
    let (status, _) = s
        .call(&admin, Method::GET, paths::STATE, vec![])
        .await
        .expect("list fixed");
    assert_eq!(status, StatusCode::OK);
}

/// Whether the server closed `tcp` (EOF or reset) within `within`.
async fn closed_by_server(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A TLS alert before the close.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_stalled_connections_neither_block_a_user_nor_stay_open() {
    let limits = ServerLimits {
        handshake_timeout: Duration::from_secs(2),
        max_pending_handshakes: 32,
        header_timeout: Duration::from_secs(2),
        ..ServerLimits::default()
    };
    let s = setup(limits, PeerTimeouts::default()).await;
    let addr = format!("{A}:{}", s.port);
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(&addr).await.expect("idle connect"));
    }
    for _ in 0..50 {
        let mut tcp = TcpStream::connect(&addr).await.expect("stalled connect");
        // The start of a TLS handshake record announcing 512 bytes, then nothing.
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
            .await
            .expect("partial hello");
        flood.push(tcp);
    }

    let started = Instant::now();
    let (status, body) = s
        .call(
            &s.files(Role::User, "admin"),
            Method::GET,
            paths::STATE,
            vec![],
        )
        .await
        .expect("user served during the flood");
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(took < Duration::from_secs(1), "user waited {took:?}");

    // Every flood connection is closed by the server: the oldest to make room, the rest by
    // the handshake timeout. Generous bound: the test is about "closed", not "how fast".
    for (i, tcp) in flood.iter_mut().enumerate() {
        assert!(
            closed_by_server(tcp, Duration::from_secs(30)).await,
            "flood connection {i} still open"
        );
    }

    // An authenticated connection that sends no request is closed after header_timeout.
    let tcp = TcpStream::connect(&addr).await.expect("connect");
    let config = tls::client_config(&s.files(Role::User, "admin")).expect("tls");
    let name = rustls_pki_types::ServerName::try_from(A).expect("name");
    let mut quiet = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(30), quiet.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "quiet authenticated connection still open: {closed:?}"
    );
}

/// Accepts connections on `addr` and holds them without a word.
async fn silent_tcp(addr: String) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(&addr).await.expect("bind silent");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    })
}

/// Completes TLS handshakes as the node `SILENT_HTTP`, then says nothing.
async fn silent_http(s: &Setup) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(format!("{SILENT_HTTP}:{}", s.port))
        .await
        .expect("bind");
    let config = tls::server_config(&s.files(Role::Node, SILENT_HTTP)).expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(tls) = acceptor.accept(tcp).await {
                held.push(tls);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_fails_converge_and_peer_calls_within_its_timeout_naming_it() {
    let timeouts = PeerTimeouts {
        connect: Duration::from_secs(1),
        handshake: Duration::from_secs(1),
        idle: Duration::from_secs(1),
        ..PeerTimeouts::default()
    };
    let s = setup(ServerLimits::default(), timeouts).await;
    let tcp = silent_tcp(format!("{SILENT_TCP}:{}", s.port)).await;
    let http = silent_http(&s).await;

    // A direct call to a peer that answers the handshake but never the request.
    let client = s.client(&s.files(Role::Node, A)).with_timeouts(timeouts);
    let started = Instant::now();
    let path = paths::volume("db");
    let call = client.request(SILENT_HTTP, Method::GET, &path, full(vec![]));
    let err = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the client gave up on its own")
        .expect_err("silent peer");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains(SILENT_HTTP), "{err}");

    // A converge pushing to each silent peer fails within the timeouts, naming the peer.
    let create = Action::CreateVolume {
        volume: "db".into(),
        maximum_size: None,
    };
    let (status, body) = s
        .call(
            &s.files(Role::User, "admin"),
            Method::POST,
            paths::CONVERGE,
            converge_body(vec![create]),
        )
        .await
        .expect("create");
    assert!(
        status == StatusCode::OK && !body.contains("failed"),
        "{body}"
    );
    for peer in [SILENT_TCP, SILENT_HTTP] {
        let push = Action::PushVolume {
            volume: "db".into(),
            to: peer.into(),
            last: false,
        };
        let desired: ConvergeRequest =
            serde_json::from_slice(&converge_body(vec![push])).expect("json");
        let started = Instant::now();
        let mut events = s.agent.converge(desired).await.expect("accepted");
        let mut failure = None;
        let drained = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(e) = events.recv().await {
                if let ConvergeEvent::Failed { error, .. } = e {
                    failure = Some(error);
                }
            }
        })
        .await;
        assert!(drained.is_ok(), "converge with silent {peer} still running");
        let error = failure.expect("the push failed");
        assert!(error.contains(peer), "{error}");
        assert!(error.contains("took longer than 1s"), "{error}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        // The lock is free again: the next converge is not stuck behind the silent peer.
        let (status, body) = s
            .call(
                &s.files(Role::User, "admin"),
                Method::POST,
                paths::CONVERGE,
                converge_body(vec![]),
            )
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    tcp.abort();
    http.abort();
}

/// A node named by its IPv6 address: its certificate names that address, the agent listens
/// on it, and users and the node itself reach the API through the client by that name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_named_by_an_ipv6_address_serves_its_api_over_ipv6() {
    const V6: &str = "::1";
    let ip: std::net::IpAddr = V6.parse().expect("ip");
    let Ok(probe) = std::net::TcpListener::bind((ip, 0)) else {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    };
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    ca::init(&ca, "test").expect("ca");
    ca::issue_node(&ca, V6).expect("node");
    ca::issue_user(&ca, "admin").expect("user");
    let node_files = TlsFiles {
        ca_cert: ca.join("cluster.crt"),
        cert: ca.join(format!("nodes/{V6}.crt")),
        key: ca.join(format!("nodes/{V6}.key")),
    };
    let trust = tls::trust(&node_files, Some(&ca.join("cluster.crl"))).expect("trust");
    let root = dir.path().join("v6");
    let volumes =
        Arc::new(DirBackend::open(&root.join("volumes"), Arc::new(SystemRunner)).expect("dir"));
    let peers = AgentClient::new(
        tls::client_config_with(&node_files, &trust).expect("client tls"),
        port,
    );
    let agent = Arc::new(Agent::new(
        V6.to_string(),
        volumes,
        Arc::new(NoContainers),
        peers,
        RouteStore::open(root.join("routes.json"), None).expect("routes"),
    ));
    let listener = crate::server::bind(std::net::SocketAddr::new(ip, port))
        .await
        .expect("bind [::1]");
    let server_tls = tls::server_config_with(&node_files, &trust).expect("server tls");
    tokio::spawn(crate::server::serve(
        listener,
        server_tls,
        agent,
        ServerLimits::default(),
    ));
    let user = TlsFiles {
        ca_cert: ca.join("cluster.crt"),
        cert: ca.join("users/admin.crt"),
        key: ca.join("users/admin.key"),
    };
    let client = AgentClient::new(tls::client_config(&user).expect("client tls"), port);
    let state = client.state(V6).await.expect("state over IPv6");
    assert_eq!(state.address, V6);
    // The node's own certificate is a node's: health yes, state no.
    let node = AgentClient::new(tls::client_config(&node_files).expect("node tls"), port);
    let (status, _) = node
        .request(V6, Method::GET, paths::HEALTH, full(vec![]))
        .await
        .expect("health over IPv6");
    assert_eq!(status, StatusCode::OK);
    let (status, body) = node
        .request(V6, Method::GET, paths::STATE, full(vec![]))
        .await
        .expect("answer");
    assert_eq!(status, StatusCode::FORBIDDEN, "{body:?}");
}
