//! Network holders against a real `dockerd` (in its own network namespace): the application
//! container joins its holder and reports the holder's address; one whose holder stopped is
//! reported as such and comes back with a stop and a start, and so does one whose holder was
//! restarted without it; a start that finds the
//! holder gone creates it anew; a stop removes both; a container that only has a holder's
//! name is never removed.
//!
//! Needs root, `dockerd` and `busybox-static` (installed by `cargo xtask deps`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, ensure};

use flocker_dataplane::containers::{
    ContainerError, ContainerRuntime, DockerRuntime, container_spec,
};
use flocker_e2e::docker::Dockerd;
use flocker_e2e::images::BUSYBOX_IMAGE;
use flocker_e2e::netns::Netns;
use flocker_wire::{
    Application, ContainerSettings, DesiredState, Image, PortMap, Protocol, RestartPolicy,
};

const NODE: &str = "198.18.31.1";

fn app(name: &str) -> Application {
    let (repository, tag) = BUSYBOX_IMAGE
        .split_once(':')
        .unwrap_or((BUSYBOX_IMAGE, "latest"));
    Application {
        name: name.into(),
        image: Image {
            repository: repository.into(),
            tag: tag.into(),
        },
        ports: vec![PortMap {
            internal: 80,
            external: 8080,
            protocol: Protocol::Tcp,
        }],
        volumes: Default::default(),
        volume: None,
        environment: BTreeMap::new(),
        links: vec![],
        mem_limit: None,
        cpu_shares: None,
        restart_policy: RestartPolicy::Never,
        container: ContainerSettings {
            command: Some(vec![
                "/bin/busybox".into(),
                "httpd".into(),
                "-f".into(),
                "-p".into(),
                "80".into(),
            ]),
            hostname: Some(format!("{name}-host")),
            ..ContainerSettings::default()
        },
        depends_on: Vec::new(),
        files: Vec::new(),
        health_check: None,
    }
}

fn desired(app: &Application) -> DesiredState {
    let mut d = DesiredState::default();
    d.nodes
        .insert(NODE.into(), BTreeSet::from([app.name.clone()]));
    d.applications.insert(app.name.clone(), app.clone());
    d
}

fn inspect(docker: &Dockerd, format: &str, name: &str) -> Result<String> {
    Ok(docker
        .docker(&["inspect", "-f", format, name])?
        .trim()
        .to_string())
}

fn names(docker: &Dockerd) -> Result<Vec<String>> {
    let mut names: Vec<String> = docker
        .docker(&["ps", "-a", "--format", "{{.Names}}"])?
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    Ok(names)
}

/// Waits (at most 10 s) until exactly `expected` containers exist.
fn wait_for_names(docker: &Dockerd, expected: &[&str]) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = names(docker)?;
        if now == expected {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "containers {now:?}, expected {expected:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
#[ignore = "privileged: needs root, dockerd and network namespaces; `cargo xtask ci` runs it"]
fn an_application_joins_its_holder_which_lives_and_dies_with_it() -> Result<()> {
    if !flocker_dataplane::netns_holder::supported() {
        eprintln!("no network holder program for this architecture: nothing to test");
        return Ok(());
    }
    let ns = Netns::create("holder")?;
    let docker = Dockerd::start(&ns, "holder", "198.19.231.1/24")?;
    docker.ensure_images()?;
    let rt = tokio::runtime::Runtime::new()?;
    let runtime = rt.block_on(DockerRuntime::connect(docker.socket(), NODE, true))?;

    // Created and started: it joins the holder, which carries the network settings.
    let web = app("web");
    let spec = container_spec(&web, &[], &desired(&web), None, NODE)?;
    rt.block_on(runtime.create_and_start(&spec))?;
    // Docker records the holder's ID, not its name.
    let holder_id = inspect(&docker, "{{.Id}}", "flocker-web.netns")?;
    assert_eq!(
        inspect(&docker, "{{.HostConfig.NetworkMode}}", "flocker-web")?,
        format!("container:{holder_id}")
    );
    let holder_ip = inspect(
        &docker,
        "{{.NetworkSettings.IPAddress}}",
        "flocker-web.netns",
    )?;
    ensure!(holder_ip.starts_with("198.19.231."), "{holder_ip}");
    let listed = rt.block_on(runtime.list_managed())?;
    ensure!(
        listed.len() == 1,
        "the holder is not an application: {listed:?}"
    );
    assert_eq!(listed[0].ip.as_deref(), Some(holder_ip.as_str()));
    assert!(listed[0].running);
    let hostname = docker.docker(&["exec", "flocker-web", "/bin/busybox", "hostname"])?;
    assert_eq!(hostname.trim(), "web-host");
    // The application listens in the holder's namespace.
    let served = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        rt.block_on(runtime.listens_on("flocker-web", 80))
            .unwrap_or(false)
    });
    ensure!(
        served,
        "httpd never listened on port 80 in the holder's namespace"
    );

    // After a node restart both are stopped: a start starts the holder first.
    docker.docker(&["stop", "flocker-web"])?;
    docker.docker(&["stop", "flocker-web.netns"])?;
    let listed = rt.block_on(runtime.list_managed())?;
    assert_eq!(listed[0].ip, None, "no address while it is stopped");
    rt.block_on(runtime.start("flocker-web"))?;
    assert_eq!(
        inspect(&docker, "{{.State.Running}}", "flocker-web")?,
        "true"
    );
    assert_eq!(
        inspect(&docker, "{{.State.Running}}", "flocker-web.netns")?,
        "true"
    );
    let listed = rt.block_on(runtime.list_managed())?;
    ensure!(listed[0].ip.is_some(), "{listed:?}");

    // Only the holder stopped (by hand, or its process died): the application still runs
    // but has no network; the listing says so, and a stop and start bring both back.
    assert!(!listed[0].holder_down, "{listed:?}");
    docker.docker(&["stop", "flocker-web.netns"])?;
    let listed = rt.block_on(runtime.list_managed())?;
    ensure!(
        listed[0].running && listed[0].holder_down && listed[0].ip.is_none(),
        "{listed:?}"
    );
    rt.block_on(runtime.stop("flocker-web"))?;
    rt.block_on(runtime.start("flocker-web"))?;
    let listed = rt.block_on(runtime.list_managed())?;
    ensure!(
        listed[0].running && !listed[0].holder_down && listed[0].ip.is_some(),
        "{listed:?}"
    );
    let served = (0..50).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        rt.block_on(runtime.listens_on("flocker-web", 80))
            .unwrap_or(false)
    });
    ensure!(served, "httpd never listened again after the restart");

    // The holder was started again by hand: it has a new namespace, and the application is
    // left in the old one, with no network; a stop and start bring it back into the holder's.
    ensure!(!rt.block_on(runtime.left_by_holder("flocker-web"))?);
    docker.docker(&["restart", "-t", "0", "flocker-web.netns"])?;
    ensure!(
        rt.block_on(runtime.left_by_holder("flocker-web"))?,
        "a restarted holder leaves the application outside its namespace"
    );
    rt.block_on(runtime.stop("flocker-web"))?;
    rt.block_on(runtime.start("flocker-web"))?;
    ensure!(!rt.block_on(runtime.left_by_holder("flocker-web"))?);

    // The holder was removed: the container cannot start (it is tied to the holder's ID)
    // and the error says so, for the agent to create it anew.
    docker.docker(&["stop", "flocker-web"])?;
    docker.docker(&["rm", "-f", "flocker-web.netns"])?;
    let gone = rt
        .block_on(runtime.start("flocker-web"))
        .err()
        .context("started without its holder")?;
    ensure!(matches!(gone, ContainerError::HolderGone { .. }), "{gone}");
    rt.block_on(runtime.stop_and_remove("flocker-web"))?;
    rt.block_on(runtime.create_and_start(&spec))?;
    assert_eq!(
        inspect(&docker, "{{.State.Running}}", "flocker-web")?,
        "true"
    );

    // A stop removes both (the holder in the background: it is not waited for).
    rt.block_on(runtime.stop_and_remove("flocker-web"))?;
    wait_for_names(&docker, &[])?;

    // A holder whose container is gone (an agent that died between the two removals) is
    // found and removed; a young one is left alone (its container may be being created).
    let web = app("web");
    let spec = container_spec(&web, &[], &desired(&web), None, NODE)?;
    rt.block_on(runtime.create(&spec))?;
    docker.docker(&["rm", "-f", "flocker-web"])?;
    assert_eq!(rt.block_on(runtime.remove_orphan_holders())?, 0);
    assert_eq!(names(&docker)?, vec!["flocker-web.netns".to_string()]);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let aged = rt
        .block_on(DockerRuntime::connect(docker.socket(), NODE, true))?
        .with_orphan_age(std::time::Duration::from_secs(1));
    assert_eq!(rt.block_on(aged.remove_orphan_holders())?, 1);
    assert_eq!(names(&docker)?, Vec::<String>::new());

    // A container that only has a holder's name is not ours: creating the application
    // fails, naming it, and that container stays.
    docker.docker(&[
        "create",
        "--name",
        "flocker-db.netns",
        BUSYBOX_IMAGE,
        "/bin/busybox",
        "true",
    ])?;
    let db = app("db");
    let spec = container_spec(&db, &[], &desired(&db), None, NODE)?;
    let refused = rt
        .block_on(runtime.create_and_start(&spec))
        .err()
        .context("created beside a foreign container named like its holder")?;
    ensure!(
        refused.to_string().contains("flocker-db.netns"),
        "{refused}"
    );
    assert_eq!(names(&docker)?, vec!["flocker-db.netns".to_string()]);
    Ok(())
}
