//! Two agents in one process on loopback addresses (127.0.0.1 and 127.0.0.2), talking to
//! each other over real mutual TLS and moving a real directory volume, with a fake container
//! runtime in place of Docker. No root needed; the privileged end-to-end test with real
//! Docker and ZFS lives in `tests/agent_e2e.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use flocker_client::{AgentClient, paths};
use flocker_wire::{
    Action, Application, ConvergeEvent, ConvergeRequest, DesiredState, Image, RestartPolicy,
    RouteMap, VolumeSpec,
};

use crate::agent::{Agent, TakeOverRequest};
use crate::containers::{
    ContainerDetails, ContainerError, ContainerRuntime, ContainerSpec, ManagedContainer,
};
use crate::routes::RouteStore;
use crate::tls::{TlsFiles, client_config, server_config};
use crate::volume::SystemRunner;
use crate::volume::VolumeBackend;
use crate::volume::dir::DirBackend;

const A: &str = "127.0.0.1";
const B: &str = "127.0.0.2";

/// Containers in memory; images from a fixed set.
#[derive(Default)]
struct FakeRuntime {
    containers: Mutex<BTreeMap<String, ManagedContainer>>,
    images: BTreeSet<String>,
    /// Exit codes of stopped containers.
    exit_codes: Mutex<BTreeMap<String, i64>>,
    starts: Mutex<u32>,
    /// The bind mounts each container was created with.
    binds: Mutex<BTreeMap<String, Vec<String>>>,
    /// The address the next container gets (172.17.0.2 when unset), as Docker may hand a
    /// container created anew another one.
    next_ip: Mutex<Option<String>>,
    /// How many of the next starts of an existing container Docker fails (a 500).
    failing_starts: Mutex<u32>,
    /// Running containers whose holder was started again without them.
    left_by_holder: Mutex<BTreeSet<String>>,
}

impl FakeRuntime {
    /// The container's process exits with `code`, as a crash would.
    fn exit(&self, name: &str, code: i64) {
        if let Ok(mut c) = self.containers.lock()
            && let Some(c) = c.get_mut(name)
        {
            c.running = false;
        }
        if let Ok(mut e) = self.exit_codes.lock() {
            e.insert(name.to_string(), code);
        }
    }

    fn running(&self, name: &str) -> bool {
        self.containers
            .lock()
            .map(|c| c.get(name).is_some_and(|c| c.running))
            .unwrap_or(false)
    }

    /// The address a container started now gets.
    fn next_ip(&self) -> String {
        self.next_ip
            .lock()
            .ok()
            .and_then(|ip| ip.clone())
            .unwrap_or_else(|| "172.17.0.2".into())
    }

    fn starts(&self) -> u32 {
        self.starts.lock().map(|s| *s).unwrap_or(0)
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn list_managed(&self) -> Result<Vec<ManagedContainer>, ContainerError> {
        Ok(self
            .containers
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn ensure_image(&self, image: &str) -> Result<(), ContainerError> {
        if self.images.contains(image) {
            Ok(())
        } else {
            Err(ContainerError::ImageMissing {
                image: image.into(),
                detail: "no registry".into(),
            })
        }
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        let json = &spec.labels[crate::containers::LABEL_APPLICATION];
        let application: Application =
            serde_json::from_str(json).map_err(|e| ContainerError::Other(e.to_string()))?;
        let mut c = self
            .containers
            .lock()
            .map_err(|_| ContainerError::Other("poisoned".into()))?;
        if c.contains_key(&spec.name) {
            return Err(ContainerError::Other(format!("{} exists", spec.name)));
        }
        if let Ok(mut binds) = self.binds.lock() {
            binds.insert(spec.name.clone(), spec.binds.clone());
        }
        c.insert(
            spec.name.clone(),
            ManagedContainer {
                name: spec.name.clone(),
                application,
                running: true,
                ip: Some(self.next_ip()),
                ip6: None,
                never_started: false,
                spec_digest: spec.labels.get(crate::containers::LABEL_SPEC).cloned(),
                holder_down: false,
            },
        );
        Ok(())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        self.create_and_start(spec).await?;
        let mut c = self
            .containers
            .lock()
            .map_err(|_| ContainerError::Other("poisoned".into()))?;
        if let Some(c) = c.get_mut(&spec.name) {
            // As Docker: a container that never started has no address.
            c.running = false;
            c.never_started = true;
            c.ip = None;
        }
        Ok(())
    }

    async fn start(&self, name: &str) -> Result<(), ContainerError> {
        if let Ok(mut failing) = self.failing_starts.lock()
            && *failing > 0
        {
            *failing -= 1;
            return Err(ContainerError::StartFailed {
                container: name.into(),
                detail: "failed to start shim: mkdir /run/.../moby/ID: file exists: unknown".into(),
            });
        }
        let ip = self.next_ip();
        if let Ok(mut c) = self.containers.lock()
            && let Some(c) = c.get_mut(name)
        {
            c.running = true;
            c.never_started = false;
            c.ip.get_or_insert(ip);
            // Its network holder, if it joins one, is started first, and joined.
            c.holder_down = false;
        }
        if let Ok(mut left) = self.left_by_holder.lock() {
            left.remove(name);
        }
        if let Ok(mut s) = self.starts.lock() {
            *s += 1;
        }
        Ok(())
    }

    async fn left_by_holder(&self, name: &str) -> Result<bool, ContainerError> {
        Ok(self
            .left_by_holder
            .lock()
            .map(|l| l.contains(name))
            .unwrap_or(false))
    }

    async fn details(&self, name: &str) -> Result<ContainerDetails, ContainerError> {
        Ok(ContainerDetails {
            pid: None,
            running: self.running(name),
            exit_code: self
                .exit_codes
                .lock()
                .ok()
                .and_then(|e| e.get(name).copied())
                .filter(|_| !self.running(name)),
            docker_restarts: false,
            health: None,
        })
    }

    async fn disable_docker_restart(&self, _name: &str) -> Result<(), ContainerError> {
        Ok(())
    }

    async fn listens_on(&self, name: &str, _port: u16) -> Result<bool, ContainerError> {
        Ok(self.running(name))
    }

    async fn stop_and_remove(&self, name: &str) -> Result<(), ContainerError> {
        if let Ok(mut c) = self.containers.lock() {
            c.remove(name);
        }
        Ok(())
    }

    async fn stop(&self, name: &str) -> Result<(), ContainerError> {
        self.exit(name, 0);
        Ok(())
    }
}

struct TestNode {
    agent: Arc<Agent>,
    runtime: Arc<FakeRuntime>,
    volumes: Arc<DirBackend>,
    agent_port: u16,
}

fn node_files(ca: &Path, address: &str) -> TlsFiles {
    TlsFiles {
        ca_cert: ca.join("cluster.crt"),
        cert: ca.join(format!("nodes/{address}.crt")),
        key: ca.join(format!("nodes/{address}.key")),
    }
}

/// A free port on both loopback addresses.
fn free_port() -> u16 {
    for _ in 0..50 {
        let Ok(l) = std::net::TcpListener::bind((A, 0)) else {
            continue;
        };
        let Ok(addr) = l.local_addr() else { continue };
        if std::net::TcpListener::bind((B, addr.port())).is_ok() {
            return addr.port();
        }
    }
    panic!("no free port on loopback");
}

async fn start_node(dir: &Path, ca: &Path, address: &str, port: u16) -> TestNode {
    start_node_routing(dir, ca, address, port, None).await
}

/// [`start_node`] whose route store programs `backend`.
async fn start_node_routing(
    dir: &Path,
    ca: &Path,
    address: &str,
    port: u16,
    backend: Option<Box<dyn flocker_routing::RoutingBackend>>,
) -> TestNode {
    let root = dir.join(address);
    let volumes =
        Arc::new(DirBackend::open(&root.join("volumes"), Arc::new(SystemRunner)).expect("dir"));
    let runtime = Arc::new(FakeRuntime {
        images: BTreeSet::from(["busybox:latest".to_string()]),
        ..FakeRuntime::default()
    });
    let files = node_files(ca, address);
    let routes = RouteStore::open(root.join("routes.json"), backend).expect("routes");
    let agent = Arc::new(
        Agent::new(
            address.to_string(),
            volumes.clone(),
            runtime.clone(),
            AgentClient::new(client_config(&files).expect("client tls"), port),
            routes,
        )
        .with_file_store(crate::files::FileStore::in_directory(root.join("files"))),
    );
    let listener = crate::server::bind(format!("{address}:{port}").parse().expect("addr"))
        .await
        .expect("bind");
    tokio::spawn(crate::server::serve(
        listener,
        server_config(&files).expect("server tls"),
        agent.clone(),
        crate::limits::ServerLimits::default(),
    ));
    TestNode {
        agent,
        runtime,
        volumes,
        agent_port: port,
    }
}

fn app() -> Application {
    Application {
        name: "db".into(),
        image: Image {
            repository: "busybox".into(),
            tag: "latest".into(),
        },
        ports: vec![],
        volumes: Default::default(),
        volume: Some(VolumeSpec {
            mountpoint: "/data".into(),
            maximum_size: None,
        }),
        environment: BTreeMap::new(),
        links: vec![],
        mem_limit: None,
        cpu_shares: None,
        restart_policy: RestartPolicy::Never,
        container: Default::default(),
        depends_on: Vec::new(),
        files: Vec::new(),
        health_check: None,
    }
}

fn desired(on: &str) -> DesiredState {
    let mut d = DesiredState::default();
    d.applications.insert("db".into(), app());
    d.nodes.insert(A.into(), BTreeSet::new());
    d.nodes.insert(B.into(), BTreeSet::new());
    d.nodes.get_mut(on).map(|s| s.insert("db".into()));
    d
}

async fn converge(
    node: &TestNode,
    desired: &DesiredState,
    actions: Vec<Action>,
) -> Vec<ConvergeEvent> {
    let mut rx = node
        .agent
        .converge(ConvergeRequest {
            desired: desired.clone(),
            routes: None,
            actions,
            nodes_version: None,
        })
        .await
        .expect("accepted");
    let mut events = vec![];
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    events
}

fn failed(events: &[ConvergeEvent]) -> Option<String> {
    events.iter().find_map(|e| match e {
        ConvergeEvent::Failed { error, .. } => Some(error.clone()),
        _ => None,
    })
}

async fn setup() -> (tempfile::TempDir, TestNode, TestNode) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    flocker_ctl::ca::init(&ca, "test").expect("ca");
    flocker_ctl::ca::issue_node(&ca, A).expect("a");
    flocker_ctl::ca::issue_node(&ca, B).expect("b");
    let port = free_port();
    let a = start_node(dir.path(), &ca, A, port).await;
    let b = start_node(dir.path(), &ca, B, port).await;
    (dir, a, b)
}

fn record(node: &TestNode) -> Option<(String, u64, Vec<String>)> {
    node.volumes
        .get("db")
        .expect("get")
        .map(|v| (v.owner, v.epoch, v.snapshots))
}

/// Creates the volume `db` on `node` and starts `application` on it; the converge must
/// succeed.
async fn create_and_start(node: &TestNode, desired: &DesiredState, application: Application) {
    let events = converge(
        node,
        desired,
        vec![
            Action::CreateVolume {
                volume: "db".into(),
                maximum_size: None,
            },
            Action::StartApplication { application },
        ],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
}

/// Waits (at most 5 s) until the node's copy of `db` holds one snapshot: a push or receive
/// destroys the older push snapshots in the background once it has answered.
async fn wait_pruned(node: &TestNode) {
    for _ in 0..100 {
        if record(node).is_some_and(|(_, _, snaps)| snaps.len() <= 1) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_reach_the_container_read_only_and_are_kept_nowhere_else() {
    let (dir, a, _b) = setup().await;
    let secret = b"hunter2-do-not-leak".to_vec();
    let mut db = app();
    db.volume = None;
    db.files = vec![flocker_wire::FileMount {
        name: "password".into(),
        kind: flocker_wire::FileKind::Secret,
        target: "/run/secrets/password".into(),
        mode: Some(0o400),
        uid: None,
        gid: None,
        digest: flocker_wire::files::to_hex(blake3::hash(&secret).as_bytes()),
    }];
    let mut d = desired(A);
    d.applications.insert("db".into(), db.clone());
    let with_content = |content: &[u8]| {
        let mut d = d.clone();
        d.files.insert(
            "db".into(),
            BTreeMap::from([(
                "password".to_string(),
                flocker_wire::FileContent(content.to_vec()),
            )]),
        );
        d
    };
    let start = || {
        vec![Action::StartApplication {
            application: db.clone(),
        }]
    };

    // Content that does not match the digest, or none at all, starts nothing.
    let events = converge(&a, &with_content(b"other"), start()).await;
    let error = failed(&events).expect("refused");
    assert!(error.contains("does not match its digest"), "{error}");
    assert!(!error.contains("other"), "{error}");
    let events = converge(&a, &d, start()).await;
    assert!(failed(&events).is_some_and(|e| e.contains("was not sent")));
    assert!(!a.runtime.running("flocker-db"));

    let events = converge(&a, &with_content(&secret), start()).await;
    assert_eq!(failed(&events), None);
    let host = dir.path().join(A).join("files/db/password");
    assert_eq!(std::fs::read(&host).expect("written"), secret);
    let binds = a.runtime.binds.lock().expect("binds")["flocker-db"].clone();
    assert_eq!(
        binds,
        [format!("{}:/run/secrets/password:ro", host.display())]
    );
    // Not in the remembered schedule, not in the container's labels or state.
    let remembered = serde_json::to_string(&a.agent.last_desired()).expect("json");
    let state = serde_json::to_string(&a.agent.state().await.expect("state")).expect("json");
    for text in [remembered, state] {
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            !text.contains(&flocker_wire::files::to_hex(&secret)),
            "{text}"
        );
    }

    let events = converge(
        &a,
        &d,
        vec![Action::StopApplication {
            application: "db".into(),
        }],
    )
    .await;
    assert_eq!(failed(&events), None);
    assert!(!host.exists(), "the secret is removed with its application");
}

/// The container of a move is created during the pre-copy (`PrepareApplication`), never
/// started before the final push made the target the owner, and then only started; one that
/// no longer matches the application is created anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_prepared_during_the_pre_copy_starts_only_once_owned() {
    let (_dir, a, b) = setup().await;
    // Restarted always: the supervisor would start it if it looked at it.
    let app = || Application {
        restart_policy: RestartPolicy::Always,
        ..app()
    };
    let desired = |on: &str| {
        let mut d = desired(on);
        d.applications.insert("db".into(), app());
        d
    };
    let d1 = desired(A);
    create_and_start(&a, &d1, app()).await;
    let d2 = desired(B);
    let push = |last| Action::PushVolume {
        volume: "db".into(),
        to: B.into(),
        last,
    };
    let prepare = Action::PrepareApplication { application: app() };
    assert_eq!(failed(&converge(&a, &d2, vec![push(false)]).await), None);
    let events = converge(&b, &d2, vec![prepare.clone()]).await;
    assert_eq!(failed(&events), None, "{events:?}");
    let prepared = b.agent.state().await.expect("state");
    let c = prepared.container("db").expect("prepared");
    assert!(!c.running, "prepared, not started");
    let starts = b.runtime.starts();

    // The supervisor never starts it (B does not own the volume; Docker says `created`).
    crate::supervisor::pass(&b.agent).await;
    assert_eq!(b.runtime.starts(), starts);
    assert!(!b.runtime.running("flocker-db"));
    // Preparing again changes nothing.
    assert_eq!(failed(&converge(&b, &d2, vec![prepare]).await), None);

    assert_eq!(
        failed(
            &converge(
                &a,
                &d2,
                vec![
                    Action::StopApplication {
                        application: "db".into()
                    },
                    push(true)
                ]
            )
            .await
        ),
        None
    );
    // Owned now, and still only the move's start starts it.
    crate::supervisor::pass(&b.agent).await;
    assert!(!b.runtime.running("flocker-db"));
    let events = converge(
        &b,
        &d2,
        vec![Action::StartApplication { application: app() }],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    // Started, not created again: the one start is the prepared container's.
    assert_eq!(b.runtime.starts(), starts + 1);
    assert!(b.runtime.running("flocker-db"));

    // Back to A, prepared there for an application that then changes: created anew.
    let pre_copy = Action::PushVolume {
        volume: "db".into(),
        to: A.into(),
        last: false,
    };
    assert_eq!(failed(&converge(&b, &d1, vec![pre_copy]).await), None);
    let events = converge(
        &a,
        &d1,
        vec![Action::PrepareApplication { application: app() }],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    let mut changed = app();
    changed.environment.insert("MODE".into(), "new".into());
    let mut d3 = desired(A);
    d3.applications.insert("db".into(), changed.clone());
    let events = converge(
        &b,
        &d3,
        vec![
            Action::StopApplication {
                application: "db".into(),
            },
            Action::PushVolume {
                volume: "db".into(),
                to: A.into(),
                last: true,
            },
        ],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    let a_starts = a.runtime.starts();
    let events = converge(
        &a,
        &d3,
        vec![Action::StartApplication {
            application: changed.clone(),
        }],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    let state = a.agent.state().await.expect("state");
    let c = state.container("db").expect("started");
    assert!(c.running);
    assert_eq!(
        c.application, changed,
        "the container of the new configuration"
    );
    // Created and started in one call, not the prepared one started.
    assert_eq!(a.runtime.starts(), a_starts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_a_directory_volume_between_two_agents_over_mutual_tls() {
    let (_dir, a, b) = setup().await;
    let d1 = desired(A);
    create_and_start(&a, &d1, app()).await;
    let data = a.volumes.mountpoint("db").expect("mp");
    std::fs::write(data.join("f"), "v1").expect("write");

    let d2 = desired(B);
    let push = |last| Action::PushVolume {
        volume: "db".into(),
        to: B.into(),
        last,
    };
    // The final push needs the application stopped: nothing may change after it.
    let events = converge(&a, &d2, vec![push(true)]).await;
    assert!(
        failed(&events).is_some_and(|e| e.contains("still runs here")),
        "{events:?}"
    );
    assert_eq!(record(&b), None);
    // A handoff before B holds the newest snapshot is refused; A stays the owner.
    let events = converge(
        &a,
        &d2,
        vec![Action::StopApplication {
            application: "db".into(),
        }],
    )
    .await;
    assert_eq!(failed(&events), None);
    let events = converge(
        &a,
        &d2,
        vec![Action::Handoff {
            volume: "db".into(),
            to: B.into(),
        }],
    )
    .await;
    assert!(
        failed(&events).is_some_and(|e| e.contains("push it first")),
        "{events:?}"
    );
    assert_eq!(record(&a).map(|r| (r.0, r.1)), Some((A.into(), 1)));

    let progress = |events: &[ConvergeEvent]| {
        events.iter().any(|e| {
            matches!(
                e,
                ConvergeEvent::Progress {
                    bytes_total: Some(_),
                    ..
                }
            )
        })
    };
    let events = converge(&a, &d2, vec![push(false)]).await;
    assert_eq!(failed(&events), None, "{events:?}");
    assert!(progress(&events));
    let (_, _, snaps_a) = record(&a).expect("a");
    assert_eq!(record(&b), Some((A.into(), 1, snaps_a.clone())));

    // B does not own it yet: starting there is refused before anything happens.
    let err = b
        .agent
        .converge(ConvergeRequest {
            desired: d2.clone(),
            routes: None,
            actions: vec![Action::StartApplication { application: app() }],
            nodes_version: None,
        })
        .await
        .expect_err("refused");
    assert_eq!(err.status(), 409, "{err}");

    // The final push carries the handoff: B owns the volume at epoch 2 once it returns.
    let events = converge(&a, &d2, vec![push(true)]).await;
    assert_eq!(failed(&events), None, "{events:?}");
    assert!(progress(&events));
    // Pruned down to the newest common snapshot on both sides, just after the answer.
    wait_pruned(&a).await;
    wait_pruned(&b).await;
    let (_, _, snaps_a) = record(&a).expect("a");
    assert_eq!(snaps_a.len(), 1, "{snaps_a:?}");
    assert_eq!(flocker_wire::snapshots::push_sequence(&snaps_a[0]), Some(2));
    assert_eq!(record(&a), Some((B.into(), 2, snaps_a.clone())));
    assert_eq!(record(&b), Some((B.into(), 2, snaps_a.clone())));

    let handoff = Action::Handoff {
        volume: "db".into(),
        to: B.into(),
    };
    // A separate handoff after it (recovery, `finish-handoff`) only re-tells B.
    let events = converge(&a, &d2, vec![handoff.clone()]).await;
    assert_eq!(failed(&events), None, "{events:?}");
    assert_eq!(record(&a).map(|r| (r.0, r.1)), Some((B.into(), 2)));
    assert_eq!(record(&b).map(|r| (r.0, r.1)), Some((B.into(), 2)));
    // A pushing again after the handoff is a no-op, never a second writer.
    assert_eq!(failed(&converge(&a, &d2, vec![push(true)]).await), None);
    assert_eq!(record(&b).map(|r| (r.0, r.1)), Some((B.into(), 2)));

    let events = converge(
        &b,
        &d2,
        vec![Action::StartApplication { application: app() }],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    let got =
        std::fs::read_to_string(b.volumes.mountpoint("db").expect("mp").join("f")).expect("read");
    assert_eq!(got, "v1");
    assert!(
        b.agent
            .state()
            .await
            .expect("state")
            .container("db")
            .is_some_and(|c| c.running)
    );

    // A's copy is now a replica: starting there is refused, and so is a stale takeover.
    let err = a
        .agent
        .converge(ConvergeRequest {
            desired: d1.clone(),
            routes: None,
            actions: vec![Action::StartApplication { application: app() }],
            nodes_version: None,
        })
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("owned by 127.0.0.2 at epoch 2"),
        "{err}"
    );
    let stale = b
        .agent
        .take_over(
            "db",
            TakeOverRequest {
                epoch: 1,
                from: A.into(),
            },
        )
        .await
        .expect_err("stale");
    assert_eq!(stale.status(), 409);
    assert!(a.runtime.list_managed().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_change_nothing() {
    let (_dir, a, b) = setup().await;
    let d = desired(A);
    let mut no_image = app();
    no_image.image.tag = "nope".into();
    let cases: Vec<(Vec<Action>, u16, &str)> = vec![
        (
            vec![
                Action::CreateVolume {
                    volume: "db".into(),
                    maximum_size: None,
                },
                Action::StartApplication {
                    application: no_image,
                },
            ],
            422,
            "busybox:nope",
        ),
        (
            vec![
                Action::CreateVolume {
                    volume: "db".into(),
                    maximum_size: None,
                },
                Action::PushVolume {
                    volume: "other".into(),
                    to: B.into(),
                    last: false,
                },
            ],
            404,
            "volume \"other\" does not exist",
        ),
        (
            vec![Action::PushVolume {
                volume: "db".into(),
                to: A.into(),
                last: false,
            }],
            400,
            "this node itself",
        ),
        (
            vec![Action::CreateVolume {
                volume: "a/b".into(),
                maximum_size: None,
            }],
            400,
            "invalid volume",
        ),
    ];
    for (actions, status, needle) in cases {
        let err = a
            .agent
            .converge(ConvergeRequest {
                desired: d.clone(),
                routes: None,
                actions,
                nodes_version: None,
            })
            .await
            .expect_err("refused");
        assert_eq!(err.status(), status, "{err}");
        assert!(err.to_string().contains(needle), "{needle:?} not in {err}");
        assert!(a.volumes.list().expect("list").is_empty());
        assert!(a.runtime.list_managed().await.expect("list").is_empty());
    }

    // A push must never land on the owner's own copy.
    assert_eq!(
        failed(
            &converge(
                &a,
                &d,
                vec![Action::CreateVolume {
                    volume: "db".into(),
                    maximum_size: None
                }]
            )
            .await
        ),
        None
    );
    assert_eq!(
        failed(
            &converge(
                &b,
                &d,
                vec![Action::CreateVolume {
                    volume: "db".into(),
                    maximum_size: None
                }]
            )
            .await
        ),
        None
    );
    let events = converge(
        &a,
        &d,
        vec![Action::PushVolume {
            volume: "db".into(),
            to: B.into(),
            last: false,
        }],
    )
    .await;
    let error = failed(&events).expect("refused push");
    assert!(error.contains("sharing no snapshot"), "{error}");
    assert_eq!(record(&b), Some((B.into(), 1, vec![])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushes_are_refused_and_leave_the_copy_as_it_was() {
    use bytes::Bytes;
    use flocker_client::{Body, full};
    use futures_util::stream;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::Method;
    use hyper::body::Frame;

    let (dir, a, b) = setup().await;
    let d = desired(A);
    let create = Action::CreateVolume {
        volume: "db".into(),
        maximum_size: None,
    };
    assert_eq!(failed(&converge(&a, &d, vec![create]).await), None);
    std::fs::write(a.volumes.mountpoint("db").expect("mp").join("f"), "v1").expect("write");
    let push = Action::PushVolume {
        volume: "db".into(),
        to: B.into(),
        last: false,
    };
    assert_eq!(failed(&converge(&a, &d, vec![push]).await), None);
    let before = record(&b);
    // The snapshot that push left on B (its name carries the time it was taken).
    let pushed = before
        .as_ref()
        .and_then(|(_, _, snaps)| snaps.last().cloned())
        .expect("B holds the pushed snapshot");

    let client = AgentClient::new(
        client_config(&node_files(&dir.path().join("ca"), A)).expect("tls"),
        b.agent_port,
    );
    // 32 MiB of stream the receiver should never need to read.
    let big = || -> Body {
        let chunks =
            (0..32).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![0u8; 1 << 20]))));
        BodyExt::boxed(StreamBody::new(stream::iter(chunks)))
    };
    let query = |base: &str| {
        format!(
            "/v1/volumes/db/receive?snapshot=push-0000000009&base={base}&owner={A}&epoch=1&from={A}"
        )
    };
    let (status, body) = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        client.request(B, Method::POST, &query("push-0000000007"), big()),
    )
    .await
    .expect("no hang")
    .expect("answer");
    assert_eq!(status.as_u16(), 409, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("does not hold base snapshot"));

    // Garbage instead of a verified stream: refused, nothing lands.
    let (status, body) = client
        .request(B, Method::POST, &query(&pushed), full(vec![7u8; 100_000]))
        .await
        .expect("answer");
    assert_eq!(status.as_u16(), 400, "{body:?}");
    assert_eq!(record(&b), before);
    let got =
        std::fs::read_to_string(b.volumes.mountpoint("db").expect("mp").join("f")).expect("read");
    assert_eq!(got, "v1");

    // A node cannot speak for another: A's certificate claiming to be B is refused, for
    // pushes and handoffs alike.
    let forged = format!(
        "/v1/volumes/db/receive?snapshot=push-0000000009&base=push-0000000001&owner={B}&epoch=5&from={B}"
    );
    let (status, body) = client
        .request(B, Method::POST, &forged, big())
        .await
        .expect("answer");
    assert_eq!(status.as_u16(), 403, "{body:?}");
    let takeover = serde_json::to_vec(&TakeOverRequest {
        epoch: 5,
        from: B.into(),
    })
    .expect("json");
    let (status, body) = client
        .request(A, Method::POST, &paths::handoff("db"), full(takeover))
        .await
        .expect("answer");
    assert_eq!(status.as_u16(), 403, "{body:?}");
    assert_eq!(record(&a).map(|r| (r.0, r.1)), Some((A.into(), 1)));
    assert_eq!(record(&b), before);

    // Missing query parameters name what is missing.
    let (status, body) = client
        .request(
            B,
            Method::POST,
            "/v1/volumes/db/receive?snapshot=x",
            full(vec![]),
        )
        .await
        .expect("answer");
    assert_eq!(status.as_u16(), 400);
    assert!(String::from_utf8_lossy(&body).contains("owner"), "{body:?}");
}

/// The record beside a directory volume names another volume (a directory swapped in by
/// hand, a restored backup of the wrong thing): the application is neither started by a
/// converge nor restarted by the supervisor, and its state reports the problem; once the
/// record is right again, the supervisor restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_starts_on_a_volume_that_is_not_proven() {
    let (_dir, a, _b) = setup().await;
    let mut d = desired(A);
    if let Some(app) = d.applications.get_mut("db") {
        app.restart_policy = RestartPolicy::Always;
    }
    let app = d.applications["db"].clone();
    let events = converge(
        &a,
        &d,
        vec![
            Action::CreateVolume {
                volume: "db".into(),
                maximum_size: None,
            },
            Action::StartApplication {
                application: app.clone(),
            },
        ],
    )
    .await;
    assert_eq!(failed(&events), None);
    assert!(a.runtime.running("flocker-db"));
    let state = a.agent.state().await.expect("state");
    assert_eq!(state.containers[0].volume_problem, None);

    let sidecar = a
        .volumes
        .mountpoint("db")
        .expect("mp")
        .parent()
        .expect("dir")
        .join("flocker.json");
    let good = std::fs::read_to_string(&sidecar).expect("read");
    assert!(good.contains("\"volume\": \"db\""), "{good}");
    std::fs::write(
        &sidecar,
        good.replace("\"volume\": \"db\"", "\"volume\": \"other\""),
    )
    .expect("write");

    // Running on it: reported, not silently kept.
    let state = a.agent.state().await.expect("state");
    let problem = state.containers[0]
        .volume_problem
        .clone()
        .unwrap_or_default();
    assert!(problem.contains("names volume \"other\""), "{problem}");

    // Crashed: the supervisor does not restart it, however often it looks.
    a.runtime.exit("flocker-db", 137);
    let starts = a.runtime.starts();
    crate::supervisor::pass(&a.agent).await;
    assert!(!a.runtime.running("flocker-db"));
    assert_eq!(a.runtime.starts(), starts);

    // A converge restarting it is refused with the volume, path and finding.
    let events = converge(
        &a,
        &d,
        vec![Action::RestartApplication {
            application: app.clone(),
        }],
    )
    .await;
    let error = failed(&events).unwrap_or_default();
    assert!(
        error.contains("volume \"db\" is not at") && error.contains("names volume \"other\""),
        "{error}"
    );
    assert!(!a.runtime.running("flocker-db"));

    // Repaired: the supervisor restarts it (its backoff has passed by the next pass).
    std::fs::write(&sidecar, &good).expect("write");
    if let Ok(mut r) = a.agent.restarts.lock() {
        r.clear();
    }
    crate::supervisor::pass(&a.agent).await;
    assert!(a.runtime.running("flocker-db"));
    assert_eq!(a.runtime.starts(), starts + 1);
}

/// A stopped container that Docker cannot start any more (a daemon killed during a start
/// leaves its runtime state behind) is created anew by the next start, on the same volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_docker_cannot_start_is_created_anew() {
    let (_dir, a, _b) = setup().await;
    let d = desired(A);
    create_and_start(&a, &d, app()).await;
    a.runtime.exit("flocker-db", 137);
    if let Ok(mut ip) = a.runtime.next_ip.lock() {
        *ip = Some("172.17.0.9".into());
    }
    if let Ok(mut failing) = a.runtime.failing_starts.lock() {
        *failing = 1;
    }
    // A start (not a restart, which always creates anew) of the stopped container.
    let events = converge(
        &a,
        &d,
        vec![Action::StartApplication { application: app() }],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    assert!(a.runtime.running("flocker-db"));
    let listed = a.runtime.list_managed().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].ip.as_deref(),
        Some("172.17.0.9"),
        "created anew, not started as it was"
    );
    assert_eq!(a.runtime.failing_starts.lock().map(|f| *f).ok(), Some(0));
}

/// A running container whose network holder stopped has no network: the supervisor restarts
/// it (and so its holder), even under the policy `never`, and not again within its backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_its_network_holder_left_is_restarted_on_a_checking_pass() {
    let (_dir, a, _b) = setup().await;
    let d = desired(A);
    let app = d.applications["db"].clone();
    create_and_start(&a, &d, app).await;
    if let Ok(mut left) = a.runtime.left_by_holder.lock() {
        left.insert("flocker-db".into());
    }
    let starts = a.runtime.starts();
    // A plain pass does not look (three Docker inspects per container).
    crate::supervisor::pass(&a.agent).await;
    assert_eq!(a.runtime.starts(), starts);
    crate::supervisor::pass_checking_holders(&a.agent).await;
    assert!(a.runtime.running("flocker-db"));
    assert_eq!(a.runtime.starts(), starts + 1, "stopped and started again");
    assert!(!a.runtime.left_by_holder("flocker-db").await.expect("look"));
    // In its holder again: the next checking pass leaves it alone.
    crate::supervisor::pass_checking_holders(&a.agent).await;
    assert_eq!(a.runtime.starts(), starts + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_whose_network_holder_stopped_is_restarted_with_it() {
    let (_dir, a, _b) = setup().await;
    let d = desired(A);
    let app = d.applications["db"].clone();
    assert_eq!(app.restart_policy, RestartPolicy::Never);
    create_and_start(&a, &d, app).await;
    let lose_holder = || {
        if let Ok(mut c) = a.runtime.containers.lock()
            && let Some(c) = c.get_mut("flocker-db")
        {
            c.holder_down = true;
        }
    };
    lose_holder();
    let starts = a.runtime.starts();
    crate::supervisor::pass(&a.agent).await;
    assert!(a.runtime.running("flocker-db"));
    assert_eq!(a.runtime.starts(), starts + 1, "stopped and started again");
    let listed = a.runtime.list_managed().await.expect("list");
    assert!(!listed[0].holder_down, "{listed:?}");
    // Losing it again at once: left as it is until its backoff has passed.
    lose_holder();
    crate::supervisor::pass(&a.agent).await;
    assert_eq!(
        a.runtime.starts(),
        starts + 1,
        "restarted within its backoff"
    );
    assert!(a.runtime.running("flocker-db"));
    if let Ok(mut r) = a.agent.restarts.lock() {
        r.values_mut()
            .for_each(crate::supervisor::RestartMemory::clear_backoff);
    }
    crate::supervisor::pass(&a.agent).await;
    assert_eq!(a.runtime.starts(), starts + 2);
}

/// Restart policies are the agent's: `never` stays down, `on-failure` stops after its count
/// and never restarts a clean exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_follows_the_restart_policy() {
    let (_dir, a, _b) = setup().await;
    let mut d = desired(A);
    if let Some(app) = d.applications.get_mut("db") {
        app.restart_policy = RestartPolicy::OnFailure {
            maximum_retry_count: Some(1),
        };
    }
    let app = d.applications["db"].clone();
    let events = converge(
        &a,
        &d,
        vec![
            Action::CreateVolume {
                volume: "db".into(),
                maximum_size: None,
            },
            Action::StartApplication { application: app },
        ],
    )
    .await;
    assert_eq!(failed(&events), None);
    let reset_backoff = || {
        if let Ok(mut r) = a.agent.restarts.lock() {
            r.values_mut()
                .for_each(crate::supervisor::RestartMemory::clear_backoff);
        }
    };
    a.runtime.exit("flocker-db", 0);
    crate::supervisor::pass(&a.agent).await;
    assert!(!a.runtime.running("flocker-db"), "a clean exit stays down");
    a.runtime.exit("flocker-db", 1);
    crate::supervisor::pass(&a.agent).await;
    assert!(
        a.runtime.running("flocker-db"),
        "the first failure restarts"
    );
    a.runtime.exit("flocker-db", 1);
    reset_backoff();
    crate::supervisor::pass(&a.agent).await;
    assert!(!a.runtime.running("flocker-db"), "on-failure:1 is used up");
}

/// Issue 11, items 2 and 3: a third node's certificate cannot make a replica the owner, a
/// push cannot name another owner than its sender or outrank the replica's record at the same
/// epoch, an epoch at the end of the range is refused without a panic, and a `replace` push
/// that does not verify (garbage, or a real stream cut in half) leaves the replica intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_owner_hands_off_or_pushes_and_an_unverified_replace_destroys_nothing() {
    use flocker_client::full;
    use hyper::Method;
    use std::sync::atomic::AtomicU64;

    const C: &str = "127.0.0.3";
    let (dir, a, b) = setup().await;
    let ca = dir.path().join("ca");
    flocker_ctl::ca::issue_node(&ca, C).expect("c");
    let d = desired(A);
    let create = Action::CreateVolume {
        volume: "db".into(),
        maximum_size: None,
    };
    assert_eq!(failed(&converge(&a, &d, vec![create]).await), None);
    let data = a.volumes.mountpoint("db").expect("mp");
    std::fs::write(data.join("f"), "v1").expect("write");
    let push = Action::PushVolume {
        volume: "db".into(),
        to: B.into(),
        last: false,
    };
    assert_eq!(failed(&converge(&a, &d, vec![push]).await), None);
    let before = record(&b);
    assert_eq!(before.as_ref().map(|r| (r.0.as_str(), r.1)), Some((A, 1)));
    let replica_file =
        || std::fs::read_to_string(b.volumes.mountpoint("db").expect("mp").join("f"));

    let client = |node: &str| {
        AgentClient::new(
            client_config(&node_files(&ca, node)).expect("tls"),
            b.agent_port,
        )
    };
    let (from_a, from_c) = (client(A), client(C));
    let handoff = |from: &str, epoch: u64| {
        full(
            serde_json::to_vec(&TakeOverRequest {
                epoch,
                from: from.into(),
            })
            .expect("json"),
        )
    };

    // A third node tells the replica it owns the volume now: refused, record unchanged.
    let (status, body) = from_c
        .request(B, Method::POST, &paths::handoff("db"), handoff(C, 2))
        .await
        .expect("answer");
    assert_eq!(status.as_u16(), 409, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("only the recorded owner"));
    // The owner itself, but not exactly one epoch up (2^64-1 once overflowed later on).
    for epoch in [u64::MAX, 3, 1] {
        let (status, body) = from_a
            .request(B, Method::POST, &paths::handoff("db"), handoff(A, epoch))
            .await
            .expect("answer");
        assert_eq!(status.as_u16(), 409, "epoch {epoch}: {body:?}");
    }
    assert_eq!(record(&b), before);

    // Pushes naming another owner than the sender, or a rival owner at the replica's epoch.
    let push_query = |owner: &str, from: &str, epoch: u64, extra: &str| {
        format!(
            "/v1/volumes/db/receive?snapshot=push-0000000009&owner={owner}&epoch={epoch}&from={from}{extra}"
        )
    };
    for (who, query) in [
        (&from_c, push_query(B, C, 1, "")),
        (&from_c, push_query(A, C, 1, "&replace=1")),
        (&from_c, push_query(C, C, 1, "&replace=1")),
    ] {
        let (status, body) = who
            .request(B, Method::POST, &query, full(vec![0u8; 4096]))
            .await
            .expect("answer");
        assert_eq!(status.as_u16(), 409, "{query}: {body:?}");
        assert_eq!(record(&b), before, "{query}");
    }

    // The owner's `replace` push that does not verify: garbage, then a real stream cut in
    // half. The replica is swapped only after verification, so it stays as it was.
    let mut wire = Vec::new();
    let source: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut source = flocker_stream::backend::ReaderSource(Some(&source[..]));
    crate::transfer::send(&mut source, &mut wire, Arc::new(AtomicU64::new(0)), None).expect("send");
    for body in [vec![7u8; 100_000], wire[..wire.len() / 2].to_vec()] {
        let (status, answer) = from_a
            .request(
                B,
                Method::POST,
                &push_query(A, A, 1, "&replace=1"),
                full(body),
            )
            .await
            .expect("answer");
        assert_eq!(status.as_u16(), 400, "{answer:?}");
        assert_eq!(record(&b), before);
        assert_eq!(replica_file().expect("replica data"), "v1");
    }
}

/// Issue 11, item 6: the agent checks every value of a converge request again, as if no
/// flockerctl had validated it, and refuses before anything changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_in_a_converge_are_refused_before_anything_changes() {
    use flocker_wire::{Route, RouteTarget};

    let (_dir, a, _b) = setup().await;
    let refused = |d: DesiredState, actions: Vec<Action>| {
        let agent = a.agent.clone();
        async move {
            agent
                .converge(ConvergeRequest {
                    desired: d,
                    routes: None,
                    actions,
                    nodes_version: None,
                })
                .await
                .expect_err("refused")
        }
    };
    let create = Action::CreateVolume {
        volume: "db".into(),
        maximum_size: None,
    };
    let route = |port: u16, target: RouteTarget| Action::SetRoutes {
        routes: vec![Route {
            external_port: port,
            protocol: flocker_wire::Protocol::Tcp,
            application: "db".into(),
            target,
        }],
    };
    let mut bad_mount = desired(A);
    if let Some(app) = bad_mount.applications.get_mut("db") {
        app.volume = Some(VolumeSpec {
            mountpoint: "/data/../../etc".into(),
            maximum_size: None,
        });
        app.environment.insert("X=Y".into(), "z".into());
    }
    let cases = vec![
        (bad_mount, vec![create.clone()], "must not contain `..`"),
        (
            desired(A),
            vec![Action::PushVolume {
                volume: "db".into(),
                to: "203.0.113.9".into(),
                last: false,
            }],
            "not a node of the desired state",
        ),
        (
            desired(A),
            vec![route(
                a.agent_port,
                RouteTarget::Local { internal_port: 80 },
            )],
            "held by a service of this node",
        ),
        (
            desired(A),
            vec![route(
                8080,
                RouteTarget::Node {
                    address: "203.0.113.9".into(),
                },
            )],
            "not another node of the desired state",
        ),
        (
            desired(A),
            vec![route(0, RouteTarget::Local { internal_port: 80 })],
            "routes port 0",
        ),
    ];
    for (d, actions, needle) in cases {
        let err = refused(d, actions).await;
        assert_eq!(err.status(), 400, "{err}");
        assert!(err.to_string().contains(needle), "{needle:?} not in {err}");
        assert!(a.volumes.list().expect("list").is_empty());
        assert!(a.agent.state().await.expect("state").routes.is_empty());
    }
}

/// Issue 13 in process: replication to a standby, a promotion after the owner is lost, and
/// the lost owner fencing itself when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_promoted_and_the_returning_owner_fences_itself() {
    let (_dir, a, b) = setup().await;
    let mut on_a = desired(A);
    on_a.standby.insert(
        "db".into(),
        flocker_wire::Standby {
            nodes: vec![B.into()],
            interval_ms: 1_000,
        },
    );
    create_and_start(&a, &on_a, app()).await;
    let data_a = a.volumes.mountpoint("db").expect("mp");
    std::fs::write(data_a.join("kept"), "before the snapshot").expect("write");

    // Replication: B gets a read-only replica recording A at epoch 1.
    assert!(a.agent.replicate_once("db", B).await.expect("replicate"));
    let (owner, epoch, snaps) = record(&b).expect("replica on B");
    assert_eq!((owner.as_str(), epoch), (A, 1));
    let replicated = snaps.last().cloned().expect("a snapshot");
    assert!(flocker_wire::snapshots::push_time_ms(&replicated).is_some());
    // A second round sends only the delta from that snapshot.
    std::fs::write(data_a.join("second"), "also replicated").expect("write");
    assert!(a.agent.replicate_once("db", B).await.expect("replicate"));
    // Written after the last replication: lost with A.
    std::fs::write(data_a.join("lost"), "after the snapshot").expect("write");

    // A is gone; a person fails over to B. A promotion below B's epoch is refused first.
    let mut on_b = desired(B);
    on_b.standby.clear();
    let refused = b
        .agent
        .converge(ConvergeRequest {
            desired: on_b.clone(),
            routes: None,
            actions: vec![Action::Promote {
                volume: "db".into(),
                epoch: 1,
            }],
            nodes_version: None,
        })
        .await;
    assert!(refused.is_err(), "promotion not above the recorded epoch");
    let events = converge(
        &b,
        &on_b,
        vec![
            Action::Promote {
                volume: "db".into(),
                epoch: 3,
            },
            Action::StartApplication { application: app() },
        ],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    assert_eq!(record(&b).map(|(o, e, _)| (o, e)), Some((B.into(), 3)));
    let data_b = b.volumes.mountpoint("db").expect("mp");
    assert_eq!(
        std::fs::read_to_string(data_b.join("kept")).ok().as_deref(),
        Some("before the snapshot")
    );
    assert_eq!(
        std::fs::read_to_string(data_b.join("second"))
            .ok()
            .as_deref(),
        Some("also replicated")
    );
    assert!(!data_b.join("lost").exists());

    // A returns, still believing it owns db at epoch 1, its application running: fencing
    // stops it and sets the divergent copy aside, keeping the lost write.
    assert!(a.runtime.running(&crate::containers::container_name("db")));
    let fenced = crate::agent::fencing::check(&a.agent).await;
    assert_eq!(fenced, vec!["db".to_string()]);
    assert!(!a.runtime.running(&crate::containers::container_name("db")));
    assert_eq!(record(&a), None, "A no longer lists a copy of db");
    let aside: Vec<_> = std::fs::read_dir(a.volumes.root())
        .expect("root")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("db.fenced-e1-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = a.volumes.root().join(&aside[0]).join("data/lost");
    assert_eq!(
        std::fs::read_to_string(kept).ok().as_deref(),
        Some("after the snapshot")
    );
    // Nothing of A's can be restarted or pushed as owner any more; a second check is a no-op.
    assert!(crate::agent::fencing::check(&a.agent).await.is_empty());
}

/// `flockerctl`'s side over real mutual TLS: the deploy driver asks both agents for their
/// state and converges through `flocker_client::AgentClient` with a user certificate; an
/// agent's refusal arrives as its status and message; an agent whose certificate was revoked
/// is not talked to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flockerctl_deploys_through_the_agent_client_and_checks_revocation() {
    use flocker_client::{ClientError, StatusCode};
    use flocker_ctl::deploy::{self, Credentials, DeployError};
    use flocker_wire::{NodeAction, Phase, Plan};
    use std::time::Duration;

    let (dir, a, _b) = setup().await;
    let ca = dir.path().join("ca");
    flocker_ctl::ca::issue_user(&ca, "admin").expect("user");
    let user = || {
        Credentials::from_ca_dir(&ca, "admin")
            .client(
                a.agent_port,
                Duration::from_secs(10),
                Duration::from_secs(10),
            )
            .expect("client")
    };
    let nodes = [A.to_string(), B.to_string()];
    let d = desired(A);

    let plan = Plan {
        phases: vec![Phase {
            name: "create-volumes".into(),
            actions: vec![NodeAction {
                node: A.into(),
                action: Action::CreateVolume {
                    volume: "db".into(),
                    maximum_size: None,
                },
            }],
        }],
    };
    let summary = deploy::execute(
        &user(),
        &d,
        &flocker_wire::ClusterState::default(),
        &plan,
        flocker_ctl::deploy::ProgressMode::Lines,
        4,
    )
    .await
    .expect("deploy");
    assert_eq!((summary.phases, summary.actions), (1, 1));
    let state = deploy::gather_state(&user(), &nodes, 4)
        .await
        .expect("state");
    assert_eq!(state.volume_owner("db"), Some(A));
    assert!(state.nodes[B].volumes.is_empty());

    // Refused before anything happens: the agent's status and message, read one way.
    let plan = Plan {
        phases: vec![Phase {
            name: "handoff".into(),
            actions: vec![NodeAction {
                node: B.into(),
                action: Action::Handoff {
                    volume: "db".into(),
                    to: A.into(),
                },
            }],
        }],
    };
    let err = deploy::execute(
        &user(),
        &d,
        &flocker_wire::ClusterState::default(),
        &plan,
        flocker_ctl::deploy::ProgressMode::Lines,
        4,
    )
    .await
    .expect_err("B has no copy to hand off");
    match &err {
        DeployError::Client(ClientError::Refused {
            node,
            status,
            message,
        }) => {
            assert_eq!((node.as_str(), *status), (B, StatusCode::NOT_FOUND));
            assert!(message.contains("does not exist"), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    }

    // B's certificate revoked: flockerctl (which reads cluster.crl) refuses to talk to it,
    // and the state query fails naming B rather than leaving B out.
    flocker_ctl::ca::revoke(&ca, flocker_ctl::ca::Role::Node, B).expect("revoke");
    let err = deploy::gather_state(&user(), &nodes, 4)
        .await
        .expect_err("B is revoked");
    assert!(
        matches!(&err, DeployError::Client(ClientError::Connect { node, .. }) if node == B),
        "{err}"
    );
}

/// Issue 19: agents derive their route tables from the route map flockerctl sends once;
/// each reports the map's version and its local routes, the next plan is empty, and a map
/// that does not fit the desired state is refused before anything changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_follow_the_route_map_and_refuse_one_that_does_not_fit() {
    use flocker_ctl::deploy::{self, Credentials};
    use flocker_wire::{PortMap, PortRoute, RouteTarget};
    use std::time::Duration;

    let (dir, a, b) = setup().await;
    let ca = dir.path().join("ca");
    flocker_ctl::ca::issue_user(&ca, "admin").expect("user");
    let user = Credentials::from_ca_dir(&ca, "admin")
        .client(
            a.agent_port,
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .expect("client");
    let service = |name: &str, external: u16| Application {
        name: name.into(),
        ports: vec![PortMap::tcp(80, external)],
        volumes: Default::default(),
        volume: None,
        ..app()
    };
    let mut d = DesiredState::default();
    d.applications.insert("web".into(), service("web", 8080));
    d.applications.insert("api".into(), service("api", 9090));
    d.nodes
        .insert(A.into(), BTreeSet::from(["web".to_string()]));
    d.nodes
        .insert(B.into(), BTreeSet::from(["api".to_string()]));
    let nodes = [A.to_string(), B.to_string()];

    let state = deploy::gather_state(&user, &nodes, 2).await.expect("state");
    let plan = flocker_ctl::planner::plan(&d, &state);
    let summary = deploy::execute(
        &user,
        &d,
        &state,
        &plan,
        flocker_ctl::deploy::ProgressMode::Lines,
        2,
    )
    .await
    .expect("deploy");
    assert!(summary.route_map_bytes > 0);
    let state = deploy::gather_state(&user, &nodes, 2).await.expect("state");
    let map = d.route_map();
    for node in [A, B] {
        let reported = &state.nodes[node];
        assert_eq!(reported.routes_version, Some(map.version()));
        assert_eq!(reported.routes, map.local_routes(node));
    }
    // What each agent programmed is the whole table the old planner would have sent.
    assert_eq!(a.agent.routes.current(), d.routes_for(A));
    assert_eq!(b.agent.routes.current(), d.routes_for(B));
    assert!(flocker_ctl::planner::plan(&d, &state).is_empty());

    // Refused: a version that is not the map's, a port led to a node outside the desired
    // state, and a port said to lead into A for an application A does not run.
    let follow = |map: &RouteMap, version: String| ConvergeRequest {
        desired: d.for_node(A),
        routes: Some(map.clone()),
        actions: vec![Action::FollowRoutes { version }],
        nodes_version: None,
    };
    let mut elsewhere = map.clone();
    elsewhere.ports.insert(
        flocker_wire::routes::PortKey {
            port: 7000,
            protocol: flocker_wire::Protocol::Tcp,
        },
        PortRoute {
            application: "ghost".into(),
            node: "198.18.9.9".into(),
            internal_port: 80,
        },
    );
    let mut stolen = map.clone();
    if let Some(p) = stolen.ports.get_mut(&flocker_wire::routes::PortKey {
        port: 9090,
        protocol: flocker_wire::Protocol::Tcp,
    }) {
        p.node = A.into();
    }
    for (request, expect) in [
        (
            follow(&map, "0".repeat(32)),
            "the route map carried is version",
        ),
        (
            follow(&elsewhere, elsewhere.version()),
            "not a node of the desired state",
        ),
        (
            follow(&stolen, stolen.version()),
            "does not place or map here",
        ),
    ] {
        match a.agent.converge(request).await {
            Err(e) => assert!(e.to_string().contains(expect), "{e}"),
            Ok(_) => panic!("accepted a map that does not fit: {expect}"),
        }
    }
    assert_eq!(a.agent.routes.current(), d.routes_for(A));
    assert!(
        a.agent
            .routes
            .current()
            .iter()
            .any(|r| r.target == RouteTarget::Node { address: B.into() })
    );
}

/// Issue 19: a node that holds the node list is sent its share without it, naming the
/// list's version, and completes it from its own; a request naming another version, or
/// naming the right one while carrying a node of its own, is refused before anything
/// changes, so no address reaches the agent except in a full list it validated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holding_the_node_list_is_sent_its_version_and_refuses_any_other() {
    use flocker_ctl::deploy::{self, Credentials};
    use flocker_wire::PortMap;
    use std::time::Duration;

    let (dir, a, b) = setup().await;
    let ca = dir.path().join("ca");
    flocker_ctl::ca::issue_user(&ca, "admin").expect("user");
    let user = Credentials::from_ca_dir(&ca, "admin")
        .client(
            a.agent_port,
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .expect("client");
    let service = |name: &str, external: u16| Application {
        name: name.into(),
        ports: vec![PortMap::tcp(80, external)],
        volumes: Default::default(),
        volume: None,
        ..app()
    };
    let mut d = DesiredState::default();
    d.applications.insert("web".into(), service("web", 8080));
    d.nodes
        .insert(A.into(), BTreeSet::from(["web".to_string()]));
    d.nodes.insert(B.into(), BTreeSet::new());
    let nodes = [A.to_string(), B.to_string()];
    let deploy = |d: DesiredState| {
        let user = user.clone();
        let nodes = nodes.clone();
        async move {
            let state = deploy::gather_state(&user, &nodes, 2).await.expect("state");
            let plan = flocker_ctl::planner::plan(&d, &state);
            deploy::execute(
                &user,
                &d,
                &state,
                &plan,
                flocker_ctl::deploy::ProgressMode::Lines,
                2,
            )
            .await
            .expect("deploy")
        }
    };

    deploy(d.clone()).await;
    let state = deploy::gather_state(&user, &nodes, 2).await.expect("state");
    for node in [A, B] {
        assert_eq!(state.nodes[node].nodes_version, Some(d.nodes_version()));
    }
    // Moving web to B: both nodes hold the list, so no request carries the other node.
    let mut moved = d.clone();
    moved.nodes.insert(A.into(), BTreeSet::new());
    moved
        .nodes
        .insert(B.into(), BTreeSet::from(["web".to_string()]));
    let second = deploy(moved.clone()).await;
    assert!(second.requests > 0);
    // Each agent completed its share: it still knows its peer (fencing and pushes ask it).
    for agent in [&a.agent, &b.agent] {
        let held = agent.last_desired().expect("held");
        assert_eq!(held.nodes.keys().collect::<Vec<_>>(), vec![A, B]);
    }
    assert_eq!(b.agent.routes.current(), moved.routes_for(B));
    assert_eq!(a.agent.routes.current(), moved.routes_for(A));

    let request = |desired: DesiredState, version: &str, actions: Vec<Action>| ConvergeRequest {
        desired,
        routes: None,
        actions,
        nodes_version: Some(version.to_string()),
    };
    // The share alone under the held version is accepted, and the list stays whole.
    let events = a
        .agent
        .converge(request(
            moved.for_node_alone(A),
            &moved.nodes_version(),
            Vec::new(),
        ))
        .await
        .expect("the held version is accepted");
    drop(events);
    let held = a.agent.last_desired().expect("held");
    assert_eq!(held.nodes.keys().collect::<Vec<_>>(), vec![A, B]);
    let stranger = "198.18.9.9";
    let mut with_stranger = moved.clone();
    with_stranger.nodes.insert(stranger.into(), BTreeSet::new());
    let mut smuggled = moved.for_node_alone(A);
    smuggled.nodes.insert(stranger.into(), BTreeSet::new());
    let create = vec![Action::CreateVolume {
        volume: "db".into(),
        maximum_size: None,
    }];
    for (request, status, expect) in [
        // The list with a stranger in it, under its own (new) version.
        (
            request(
                with_stranger.for_node_alone(A),
                &with_stranger.nodes_version(),
                create.clone(),
            ),
            412,
            "send the node list in full",
        ),
        // A version nobody ever sent.
        (
            request(moved.for_node_alone(A), &"0".repeat(32), create.clone()),
            412,
            "send the node list in full",
        ),
        // The right version, with a stranger beside it.
        (
            request(smuggled, &moved.nodes_version(), create.clone()),
            400,
            "may carry only this node",
        ),
        // The right version, pushing to a stranger: still not a node of the desired state.
        (
            request(
                moved.for_node_alone(A),
                &moved.nodes_version(),
                vec![Action::PushVolume {
                    volume: "db".into(),
                    to: stranger.into(),
                    last: false,
                }],
            ),
            400,
            "not a node of the desired state",
        ),
    ] {
        match a.agent.converge(request).await {
            Err(e) => {
                assert_eq!(e.status(), status, "{e}");
                assert!(e.to_string().contains(expect), "{e}");
            }
            Ok(_) => panic!("accepted: {expect}"),
        }
    }
    let held = a.agent.last_desired().expect("held");
    assert_eq!(held.nodes.keys().collect::<Vec<_>>(), vec![A, B]);
    assert!(a.agent.volumes.list().expect("volumes").is_empty());
}

/// `db` with a further volume `db.logs` at /logs beside its main one.
fn two_volume_app() -> Application {
    let mut app = app();
    app.volumes.insert(
        "db.logs".into(),
        VolumeSpec {
            mountpoint: "/logs".into(),
            maximum_size: None,
        },
    );
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_volume_of_an_application_is_mounted_pushed_and_handed_off() {
    let (_dir, a, b) = setup().await;
    let on = |node: &str| {
        let mut d = desired(node);
        d.applications.insert("db".into(), two_volume_app());
        d
    };
    let create = |volume: &str| Action::CreateVolume {
        volume: volume.into(),
        maximum_size: None,
    };
    let start = Action::StartApplication {
        application: two_volume_app(),
    };
    let events = converge(
        &a,
        &on(A),
        vec![create("db"), create("db.logs"), start.clone()],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    let binds = a.runtime.binds.lock().expect("binds")["flocker-db"].clone();
    let main = a.volumes.mountpoint("db").expect("db");
    let logs = a.volumes.mountpoint("db.logs").expect("db.logs");
    assert_eq!(
        binds,
        [
            format!("{}:/data", main.display()),
            format!("{}:/logs", logs.display())
        ]
    );
    std::fs::write(main.join("f"), "data").expect("write");
    std::fs::write(logs.join("f"), "logs").expect("write");

    // The further volume is the running application's too: no final push while it runs.
    let push = |volume: &str, last| Action::PushVolume {
        volume: volume.into(),
        to: B.into(),
        last,
    };
    let events = converge(&a, &on(B), vec![push("db.logs", true)]).await;
    assert!(
        failed(&events).is_some_and(|e| e.contains("application \"db\" still runs here")),
        "{events:?}"
    );
    let stop = Action::StopApplication {
        application: "db".into(),
    };
    let events = converge(&a, &on(B), vec![stop, push("db", true)]).await;
    assert_eq!(failed(&events), None, "{events:?}");

    // Only one of its volumes handed over: B refuses to start it before anything happens.
    let err = b
        .agent
        .converge(ConvergeRequest {
            desired: on(B),
            routes: None,
            actions: vec![start.clone()],
            nodes_version: None,
        })
        .await
        .expect_err("refused");
    assert_eq!(err.status(), 409, "{err}");
    assert!(err.to_string().contains("db.logs"), "{err}");

    let events = converge(&a, &on(B), vec![push("db.logs", true)]).await;
    assert_eq!(failed(&events), None, "{events:?}");
    let events = converge(&b, &on(B), vec![start]).await;
    assert_eq!(failed(&events), None, "{events:?}");
    for (volume, content) in [("db", "data"), ("db.logs", "logs")] {
        let path = b.volumes.mountpoint(volume).expect("moved");
        assert_eq!(
            std::fs::read_to_string(path.join("f")).expect("read"),
            content,
            "{volume} moved intact"
        );
        let record = b.volumes.get(volume).expect("get").expect("exists");
        assert_eq!((record.owner.as_str(), record.epoch), (B, 2), "{volume}");
    }
    assert_eq!(
        b.runtime.binds.lock().expect("binds")["flocker-db"].len(),
        2
    );
}

/// Keeps every table the agent programs, in place of the kernel.
struct RecordingBackend(Arc<Mutex<Vec<flocker_routing::RouteTable>>>);

impl flocker_routing::RoutingBackend for RecordingBackend {
    fn name(&self) -> &'static str {
        "recording"
    }

    fn apply(
        &mut self,
        table: &flocker_routing::RouteTable,
    ) -> Result<(), flocker_routing::RoutingError> {
        if let Ok(mut tables) = self.0.lock() {
            tables.push(table.clone());
        }
        Ok(())
    }

    fn clear(&mut self) -> Result<(), flocker_routing::RoutingError> {
        self.apply(&flocker_routing::RouteTable::default())
    }
}

/// Regression (issue 17, the fault matrix's `routes:kill-target-dockerd` cell): a container
/// started anew on a node that already follows the route map gets another address, and no
/// routes phase follows (the map did not change). The start itself must re-program the
/// routes, or the node keeps sending the port to the old address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_re_programs_the_routes_into_the_new_container_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    flocker_ctl::ca::init(&ca, "test").expect("ca");
    flocker_ctl::ca::issue_node(&ca, A).expect("a");
    let programmed = Arc::new(Mutex::new(Vec::new()));
    let node = start_node_routing(
        dir.path(),
        &ca,
        A,
        free_port(),
        Some(Box::new(RecordingBackend(programmed.clone()))),
    )
    .await;
    let web = Application {
        name: "web".into(),
        ports: vec![flocker_wire::PortMap::tcp(80, 8080)],
        volume: None,
        ..app()
    };
    let mut d = DesiredState::default();
    d.applications.insert("web".into(), web.clone());
    d.nodes
        .insert(A.into(), BTreeSet::from(["web".to_string()]));
    let map = d.route_map();
    let start = Action::StartApplication { application: web };
    let request = |actions, routes| ConvergeRequest {
        desired: d.for_node(A),
        routes,
        actions,
        nodes_version: None,
    };
    let run = |request: ConvergeRequest| {
        let agent = node.agent.clone();
        async move {
            let mut rx = agent.converge(request).await.expect("accepted");
            let mut events = vec![];
            while let Some(e) = rx.recv().await {
                events.push(e);
            }
            events
        }
    };
    let backend_of_8080 = || {
        let tables = programmed.lock().expect("tables");
        tables.last().and_then(|t| {
            t.entries
                .get(&flocker_routing::RouteKey {
                    protocol: flocker_routing::Protocol::Tcp,
                    port: 8080,
                })
                .map(|e| e.backend().to_string())
        })
    };
    let events = run(request(
        vec![
            start.clone(),
            Action::FollowRoutes {
                version: map.version(),
            },
        ],
        Some(map.clone()),
    ))
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    assert_eq!(backend_of_8080().as_deref(), Some("172.17.0.2:80"));

    // dockerd restarted: the container is gone, and the one created anew gets another
    // address. The deploy plans only the start.
    node.runtime.containers.lock().expect("containers").clear();
    *node.runtime.next_ip.lock().expect("ip") = Some("172.17.0.9".into());
    let events = run(request(vec![start], None)).await;
    assert_eq!(failed(&events), None, "{events:?}");
    assert_eq!(backend_of_8080().as_deref(), Some("172.17.0.9:80"));
}

/// A move's `prepare` of `app` on `node`, then its `hold` (`switch`), each without failure.
async fn prepare_and_hold(
    node: &TestNode,
    desired: &DesiredState,
    app: &Application,
    switch: Action,
) {
    let prepare = Action::PrepareApplication {
        application: app.clone(),
    };
    assert_eq!(failed(&converge(node, desired, vec![prepare]).await), None);
    assert_eq!(failed(&converge(node, desired, vec![switch]).await), None);
}

/// Connects to `to`, sends `PING` and reads the 4-byte reply.
async fn ping(to: (&'static str, u16)) -> std::io::Result<[u8; 4]> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(to).await?;
    s.write_all(b"PING").await?;
    let mut reply = [0u8; 4];
    s.read_exact(&mut reply).await?;
    Ok(reply)
}

/// Issue 16 on the agent: `SwitchRoutes` makes the node the application moves to hold new
/// connections on the port; once the start is ready they reach the container. Hostile
/// switches (a move here that the desired state does not place or map, a move to a node
/// outside it) are refused before anything changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_holds_new_connections_until_the_start_is_ready() {
    use flocker_wire::{Route, RouteTarget};

    use crate::agent::AgentError;

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    flocker_ctl::ca::init(&ca, "test").expect("ca");
    flocker_ctl::ca::issue_node(&ca, B).expect("b");
    let programmed = Arc::new(Mutex::new(Vec::new()));
    let node = start_node_routing(
        dir.path(),
        &ca,
        B,
        free_port(),
        Some(Box::new(RecordingBackend(programmed.clone()))),
    )
    .await;
    // The "container": an echo server on loopback, which the fake runtime hands out as the
    // container's address.
    let internal = crate::hold::tests::echo_server().await;
    *node.runtime.next_ip.lock().expect("ip") = Some("127.0.0.1".into());
    let external = free_port();
    let web = Application {
        name: "web".into(),
        ports: vec![flocker_wire::PortMap::tcp(internal, external)],
        volume: None,
        ..app()
    };
    let mut d = DesiredState::default();
    d.applications.insert("web".into(), web.clone());
    d.nodes.insert(A.into(), BTreeSet::new());
    d.nodes
        .insert(B.into(), BTreeSet::from(["web".to_string()]));
    let moved = |node: &str, ports: Vec<flocker_wire::PortMap>| Action::SwitchRoutes {
        moves: vec![flocker_wire::routes::MovedPorts {
            application: "web".into(),
            node: node.into(),
            ports,
        }],
    };
    let request = |actions| ConvergeRequest {
        desired: d.for_node(B),
        routes: None,
        actions,
        nodes_version: None,
    };

    // Refused: other ports than the desired state maps, a node outside the desired state.
    for action in [
        moved(B, vec![flocker_wire::PortMap::tcp(internal, 4523)]),
        moved("198.18.9.9", web.ports.clone()),
    ] {
        let refused = node.agent.converge(request(vec![action])).await;
        assert!(matches!(refused, Err(AgentError::BadRequest(_))), "refused");
    }
    assert!(node.agent.routes.current().is_empty(), "nothing changed");

    let mut rx = node
        .agent
        .converge(request(vec![moved(B, web.ports.clone())]))
        .await
        .expect("switch accepted");
    while let Some(e) = rx.recv().await {
        assert!(!matches!(e, ConvergeEvent::Failed { .. }), "{e:?}");
    }
    assert_eq!(
        node.agent.routes.current(),
        vec![Route {
            external_port: external,
            protocol: flocker_wire::Protocol::Tcp,
            application: "web".into(),
            target: RouteTarget::Local {
                internal_port: internal
            },
        }]
    );
    let before_start = programmed.lock().expect("tables").last().cloned();
    assert!(
        before_start.is_some_and(|t| t.entries.is_empty()),
        "no container yet: the route is left out of the kernel"
    );
    let client = tokio::spawn(ping(("127.0.0.1", external)));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!client.is_finished(), "held, not refused");
    assert_eq!(node.agent.holds.held().len(), 1);

    let mut rx = node
        .agent
        .converge(request(vec![Action::StartApplication { application: web }]))
        .await
        .expect("start accepted");
    while let Some(e) = rx.recv().await {
        assert!(!matches!(e, ConvergeEvent::Failed { .. }), "{e:?}");
    }
    let reply = tokio::time::timeout(std::time::Duration::from_secs(5), client)
        .await
        .expect("delivered in time")
        .expect("client task")
        .expect("the held connection reached the container");
    assert_eq!(&reply, b"PING");
    assert!(node.agent.holds.held().is_empty());
    let after = programmed.lock().expect("tables").last().cloned();
    assert!(
        after.is_some_and(|t| t.entries.len() == 1),
        "the start programmed the route into the container"
    );
}

/// Issue 16, the handoff folded into the final push: a node holding the connections of an
/// application prepared here starts it as soon as the final push makes it the owner, before
/// any start phase; a held connection reaches it; the start phase then finds it running
/// and starts nothing again. A preparation the desired state no longer matches starts
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_push_starts_the_prepared_and_held_application_at_once() {
    let (_dir, a, b) = setup().await;
    // The "container": an echo server on loopback, the address the fake runtime hands out.
    let internal = crate::hold::tests::echo_server().await;
    *b.runtime.next_ip.lock().expect("ip") = Some("127.0.0.1".into());
    *a.runtime.next_ip.lock().expect("ip") = Some("127.0.0.1".into());
    let external = free_port();
    let app = Application {
        ports: vec![flocker_wire::PortMap::tcp(internal, external)],
        ..app()
    };
    let desired = |on: &str, app: &Application| {
        let mut d = desired(on);
        d.applications.insert("db".into(), app.clone());
        d
    };
    let (on_a, on_b) = (desired(A, &app), desired(B, &app));
    create_and_start(&a, &on_a, app.clone()).await;
    let push = |to: &str, last| Action::PushVolume {
        volume: "db".into(),
        to: to.into(),
        last,
    };
    let switch = |to: &str| Action::SwitchRoutes {
        moves: vec![flocker_wire::routes::MovedPorts {
            application: "db".into(),
            node: to.into(),
            ports: app.ports.clone(),
        }],
    };
    let stop = || Action::StopApplication {
        application: "db".into(),
    };
    assert_eq!(
        failed(&converge(&a, &on_b, vec![push(B, false)]).await),
        None
    );
    prepare_and_hold(&b, &on_b, &app, switch(B)).await;
    let starts = b.runtime.starts();
    let client = tokio::spawn(ping((B, external)));
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(b.agent.holds.held().len(), 1);
    if client.is_finished() {
        panic!("not held: {:?}", client.await);
    }

    assert_eq!(
        failed(&converge(&a, &on_b, vec![stop(), push(B, true)]).await),
        None
    );
    // No start phase: the held connection reaches the container all the same.
    let reply = tokio::time::timeout(std::time::Duration::from_secs(5), client)
        .await
        .expect("delivered without a start phase")
        .expect("client task")
        .expect("the held connection reached the container");
    assert_eq!(&reply, b"PING");
    assert!(b.runtime.running("flocker-db"));
    assert_eq!(b.runtime.starts(), starts + 1, "the prepared container");
    let events = converge(
        &b,
        &on_b,
        vec![Action::StartApplication {
            application: app.clone(),
        }],
    )
    .await;
    assert_eq!(failed(&events), None, "{events:?}");
    assert_eq!(
        b.runtime.starts(),
        starts + 1,
        "found running, not started again"
    );
    // One start in the metrics, though both the start after the push and the phase waited.
    let metrics = b.agent.metrics().render();
    for counted in [
        "flocker_move_phase_duration_seconds_count{phase=\"start\"} 1\n",
        "flocker_ready_wait_duration_seconds_count{result=\"ready\"} 1\n",
    ] {
        assert!(metrics.contains(counted), "{counted} in {metrics}");
    }

    // Back to A, prepared and held there, but the desired state A last received changes
    // the application before the final push: the start phase decides, not the push. (Both
    // nodes share this machine's ports: B's hold listener first closes.)
    tokio::time::sleep(crate::hold::DRAIN_GRACE * 2).await;
    assert_eq!(
        failed(&converge(&b, &on_a, vec![push(A, false)]).await),
        None
    );
    prepare_and_hold(&a, &on_a, &app, switch(A)).await;
    let mut changed = app.clone();
    changed.environment.insert("MODE".into(), "new".into());
    let changed_on_a = desired(A, &changed);
    assert_eq!(failed(&converge(&a, &changed_on_a, vec![]).await), None);
    let a_starts = a.runtime.starts();
    assert_eq!(
        failed(&converge(&b, &changed_on_a, vec![stop(), push(A, true)]).await),
        None
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!a.runtime.running("flocker-db"), "not started by the push");
    assert_eq!(a.runtime.starts(), a_starts);
    assert_eq!(record(&a).map(|(owner, ..)| owner), Some(A.to_string()));
}
