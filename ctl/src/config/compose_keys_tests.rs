//! Tests of the compose keys Flocker honours beyond image, ports, volume and environment:
//! container settings in both dialects, `depends_on`, interpolation, `env_file`, `deploy`,
//! `networks` and `name`.

use std::collections::BTreeMap;
use std::path::Path;

use flocker_wire::container::{Logging, Ulimit};
use flocker_wire::{ContainerSettings, RestartPolicy};

use super::*;

const APP: &str = "application.yml";

fn env(vars: &[(&str, &str)]) -> ComposeEnv {
    ComposeEnv {
        vars: vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        base_dir: PathBuf::new(),
    }
}

fn parse_in(text: &str, env: &ComposeEnv) -> (ApplicationConfig, Vec<String>) {
    let (config, diagnostics) = parse_application_config_in(text, Path::new(APP), env);
    let rendered = diagnostics
        .iter()
        .map(|d| {
            let full = d.to_string();
            full.strip_prefix(&format!("{APP}:"))
                .unwrap_or(&full)
                .to_owned()
        })
        .collect();
    (config, rendered)
}

fn ok(text: &str) -> BTreeMap<String, flocker_wire::Application> {
    let (config, errors) = parse_in(text, &env(&[]));
    assert!(errors.is_empty(), "{errors:#?}");
    config.applications
}

fn errors(text: &str) -> Vec<String> {
    parse_in(text, &env(&[])).1
}

const EVERY_SETTING: &str = r#"
    command: redis-server --save "60 1" --appendonly yes
    entrypoint: [docker-entrypoint.sh]
    user: 999
    working_dir: /data
    hostname: cache-1
    container_name: my-cache
    labels: {com.example.team: storage}
    stop_signal: SIGQUIT
    stop_grace_period: 1m30s
    cap_add: [NET_ADMIN]
    cap_drop: [ALL]
    init: true
    tty: true
    stdin_open: true
    expose: ["9121", 9122/tcp, "9200-9201"]
    cpus: 1.5
    tmpfs: [/run, "/tmp:size=64m"]
    extra_hosts: ["db.local:198.18.0.5"]
    dns: 198.18.0.53
    ulimits: {nofile: {soft: 1024, hard: 4096}, nproc: 512}
    shm_size: 64M
    sysctls: [net.core.somaxconn=1024]
    security_opt: [no-new-privileges:true]
    read_only: true
    logging: {driver: json-file, options: {max-size: 10m}}
"#;

fn every_setting_expected() -> ContainerSettings {
    ContainerSettings {
        container_name: Some("my-cache".into()),
        command: Some(
            ["redis-server", "--save", "60 1", "--appendonly", "yes"]
                .map(String::from)
                .to_vec(),
        ),
        entrypoint: Some(vec!["docker-entrypoint.sh".into()]),
        user: Some("999".into()),
        working_dir: Some("/data".into()),
        hostname: Some("cache-1".into()),
        labels: BTreeMap::from([("com.example.team".into(), "storage".into())]),
        stop_signal: Some("SIGQUIT".into()),
        stop_grace_ms: Some(90_000),
        cap_add: vec!["NET_ADMIN".into()],
        cap_drop: vec!["ALL".into()],
        init: Some(true),
        tty: true,
        stdin_open: true,
        expose: vec![9121, 9122, 9200, 9201],
        nano_cpus: Some(1_500_000_000),
        tmpfs: BTreeMap::from([
            ("/run".into(), String::new()),
            ("/tmp".into(), "size=64m".into()),
        ]),
        extra_hosts: vec!["db.local:198.18.0.5".into()],
        dns: vec!["198.18.0.53".into()],
        ulimits: BTreeMap::from([
            (
                "nofile".into(),
                Ulimit {
                    soft: 1024,
                    hard: 4096,
                },
            ),
            (
                "nproc".into(),
                Ulimit {
                    soft: 512,
                    hard: 512,
                },
            ),
        ]),
        shm_size: Some(64 << 20),
        sysctls: BTreeMap::from([("net.core.somaxconn".into(), "1024".into())]),
        security_opt: vec!["no-new-privileges:true".into()],
        read_only: true,
        logging: Some(Logging {
            driver: "json-file".into(),
            options: BTreeMap::from([("max-size".into(), "10m".into())]),
        }),
        ..ContainerSettings::default()
    }
}

#[test]
fn every_container_setting_reads_the_same_in_both_dialects() {
    let compose = ok(&format!(
        "services:\n  cache:\n    image: redis{EVERY_SETTING}"
    ));
    assert_eq!(compose["cache"].container, every_setting_expected());
    let native = ok(&format!(
        "version: 1\napplications:\n  cache:\n    image: redis{EVERY_SETTING}"
    ));
    assert_eq!(native["cache"].container, every_setting_expected());
}

#[test]
fn resource_and_resolver_settings() {
    let parsed = ok(
        "services:\n  db:\n    image: x\n    domainname: example.com\n    dns_search: [svc.example.com]\n    dns_opt: [ndots:2]\n    mem_reservation: 256m\n    memswap_limit: -1\n    group_add: [audio]\n    oom_score_adj: -500\n    deploy: {resources: {limits: {pids: 100}}}\n",
    );
    let c = &parsed["db"].container;
    assert_eq!(c.domainname.as_deref(), Some("example.com"));
    assert_eq!(c.dns_search, ["svc.example.com"]);
    assert_eq!(c.dns_opt, ["ndots:2"]);
    assert_eq!(c.mem_reservation, Some(256 << 20));
    assert_eq!(c.memswap_limit, Some(-1));
    assert_eq!(c.group_add, ["audio"]);
    assert_eq!(c.oom_score_adj, Some(-500));
    assert_eq!(c.pids_limit, Some(100));
    let found =
        errors("services:\n  db:\n    image: x\n    oom_score_adj: 5000\n    pids_limit: 0\n");
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].starts_with("4:20: db/oom_score_adj: between -1000 and 1000"),
        "{}",
        found[0]
    );
    assert!(
        found[1].starts_with("5:17: db/pids_limit: a positive number"),
        "{}",
        found[1]
    );
}

#[test]
fn bad_settings_are_reported_at_their_value() {
    let found = errors(
        "services:\n  web:\n    image: x\n    command: \"a 'b\"\n    cpus: 0\n    stop_grace_period: 10\n    labels: {flocker.node: x}\n    ulimits: {nofile: {soft: 9, hard: 1}}\n    expose: ['9000-8000']\n    hostname: -bad\n    tty: yes-please\n",
    );
    let expected = [
        "4:14: web/command: \"a 'b\": a single quote is not closed",
        "5:11: web/cpus: expected a positive number of CPUs",
        "6:24: web/stop_grace_period: \"10\" has no unit",
        "7:13: web/labels: \"flocker.node\": labels starting with \"flocker.\" are Flocker's own bookkeeping",
        "8:14: web/ulimits: nofile: soft limit 9 above hard limit 1",
        "9:14: web/expose[0]: \"9000-8000\": a range must go up",
        "10:15: web/hostname: \"-bad\" is not a valid hostname",
        "11:10: web/tty: expected true or false",
    ];
    assert_eq!(found.len(), expected.len(), "{found:#?}");
    for (found, expected) in found.iter().zip(expected) {
        assert!(
            found.starts_with(expected),
            "{found:?} should start with {expected:?}"
        );
    }
}

#[test]
fn command_lines_split_like_a_shell() {
    use super::settings::split_command_line;
    let split = |s: &str| split_command_line(s).expect(s);
    assert_eq!(split("a  b\tc"), ["a", "b", "c"]);
    assert_eq!(
        split(r#"sh -c 'echo "$HOME"'"#),
        ["sh", "-c", "echo \"$HOME\""]
    );
    assert_eq!(split(r#"say "a \"b\" \\ c""#), ["say", "a \"b\" \\ c"]);
    assert_eq!(split(r"one\ word ''"), ["one word", ""]);
    assert!(split_command_line("'open").is_err());
    assert!(split_command_line("trailing\\").is_err());
}

#[test]
fn compose_durations() {
    use super::fields::parse_duration_ms;
    assert_eq!(parse_duration_ms("1m30s"), Ok(90_000));
    assert_eq!(parse_duration_ms("1.5s"), Ok(1_500));
    assert_eq!(parse_duration_ms("500ms"), Ok(500));
    assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
    assert_eq!(parse_duration_ms("10us"), Ok(1));
    assert!(parse_duration_ms("10").is_err());
    assert!(parse_duration_ms("10d").is_err());
}

#[test]
fn depends_on_short_and_long_forms() {
    let parsed = ok(
        "services:\n  web:\n    image: x\n    depends_on: [api]\n  api:\n    image: x\n    depends_on:\n      db: {condition: service_healthy, restart: true}\n      cache:\n  db:\n    image: x\n  cache:\n    image: x\n",
    );
    assert_eq!(parsed["web"].depends_on, ["api"]);
    assert_eq!(parsed["api"].depends_on, ["db", "cache"]);
    let found = errors(
        "services:\n  web:\n    image: x\n    depends_on:\n      ghost: {}\n      web:\n      db: {condition: service_completed_successfully}\n  db:\n    image: x\n",
    );
    assert_eq!(found.len(), 3, "{found:#?}");
    assert_eq!(
        found[0],
        "5:7: web/depends_on/ghost: depends on `ghost`, which is not defined in this file"
    );
    assert_eq!(
        found[1],
        "6:7: web/depends_on/web: an application cannot depend on itself"
    );
    assert!(found[2].starts_with(
        "7:23: web/depends_on/db/condition: `service_completed_successfully` cannot be honoured"
    ));
}

#[test]
fn a_dependency_cycle_is_refused_naming_it() {
    let found = errors(
        "services:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: x\n    depends_on: [c]\n  c:\n    image: x\n    depends_on: [a]\n",
    );
    assert_eq!(
        found,
        [
            "4:18: a/depends_on[0]: depends_on forms a cycle, so no application in it could start first: a -> b -> c -> a"
        ]
    );
}

#[test]
fn interpolation_uses_the_environment_and_reports_at_the_use() {
    let vars = env(&[("TAG", "7.2"), ("PORT", "16379")]);
    let (config, found) = parse_in(
        "name: shop\nservices:\n  cache:\n    image: redis:${TAG}\n    ports: [\"${PORT}:6379\"]\n    environment:\n      MODE: ${MODE:-standalone}\n      COST: $$5\n    x-note: $not-interpolated\n",
        &vars,
    );
    assert!(found.is_empty(), "{found:#?}");
    let cache = &config.applications["cache"];
    assert_eq!(cache.image.tag, "7.2");
    assert_eq!(cache.ports[0].external, 16379);
    assert_eq!(cache.environment["MODE"], "standalone");
    assert_eq!(cache.environment["COST"], "$5");
    assert_eq!(cache.container.labels["com.docker.compose.project"], "shop");
    assert_eq!(
        cache.container.labels["com.docker.compose.service"],
        "cache"
    );

    let (_, found) = parse_in(
        "services:\n  cache:\n    image: redis:${TAG}\n    environment:\n      PASSWORD: ${PASSWORD:?set the cache password}\n",
        &env(&[]),
    );
    assert_eq!(
        found,
        [
            "3:12: cache/image: the variable TAG is not set: set it in flockerctl's environment or in .env beside the compose file, or give a default such as `${TAG:-value}`",
            "5:17: cache/environment/PASSWORD: the variable PASSWORD is required: set the cache password",
        ]
    );
}

#[test]
fn env_files_and_dot_env_are_read_beside_the_compose_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(".env"), "TAG=7.4\n").expect("write");
    std::fs::write(
        dir.path().join("common.env"),
        "# shared\nMODE=cluster\nLEVEL=debug\n",
    )
    .expect("write");
    let file = dir.path().join("compose.yml");
    let text = "services:\n  cache:\n    image: redis:${TAG}\n    env_file: [common.env, {path: missing.env, required: false}]\n    environment: [LEVEL=info]\n";
    let (config, diagnostics) = parse_application_config(text, &file);
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    let cache = &config.applications["cache"];
    assert_eq!(cache.image.tag, "7.4");
    assert_eq!(cache.environment["MODE"], "cluster");
    assert_eq!(
        cache.environment["LEVEL"], "info",
        "environment wins over env_file"
    );

    let (_, diagnostics) = parse_application_config(
        "services:\n  cache:\n    image: redis\n    env_file: nowhere.env\n",
        &file,
    );
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    assert_eq!((diagnostics[0].line, diagnostics[0].column), (4, 15));
    assert!(diagnostics[0].message.contains("cannot read the env file"));
}

#[test]
fn deploy_limits_replicas_and_restart() {
    let parsed = ok(
        "services:\n  db:\n    image: x\n    restart: unless-stopped\n    deploy:\n      replicas: 1\n      resources:\n        limits: {memory: 512M, cpus: '0.5'}\n",
    );
    assert_eq!(parsed["db"].mem_limit, Some(512 << 20));
    assert_eq!(parsed["db"].container.nano_cpus, Some(500_000_000));
    assert_eq!(parsed["db"].restart_policy, RestartPolicy::UnlessStopped);
    let found = errors(
        "services:\n  db:\n    image: x\n    mem_limit: 1G\n    deploy:\n      replicas: 3\n      placement: {constraints: []}\n      resources:\n        limits: {memory: 512M}\n        reservations: {devices: []}\n",
    );
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(found[0].starts_with("6:17: db/deploy/replicas: an application runs as one container"));
    assert!(found[1].starts_with("7:7: db/deploy/placement: `placement` cannot be honoured"));
    assert!(
        found[2].starts_with("9:17: db/deploy/resources/limits: the memory limit is given twice")
    );
    assert!(
        found[3]
            .starts_with("10:9: db/deploy/resources/reservations: reservations cannot be honoured")
    );
}

#[test]
fn networks_that_only_group_are_accepted() {
    ok(
        "services:\n  web:\n    image: x\n    networks: [front, default]\n  db:\n    image: x\n    networks:\n      back:\nnetworks:\n  front: {driver: bridge}\n  back:\n",
    );
    let found = errors(
        "services:\n  web:\n    image: x\n    networks:\n      front: {ipv4_address: 172.20.0.5, aliases: [www]}\n      nowhere:\nnetworks:\n  front:\n    driver: overlay\n",
    );
    assert_eq!(found.len(), 4, "{found:#?}");
    assert!(found[0].starts_with(
        "5:15: web/networks/front/ipv4_address: `ipv4_address` cannot be honoured: a fixed address"
    ));
    assert!(found[1].starts_with("5:41: web/networks/front/aliases: `aliases` cannot be honoured"));
    assert_eq!(
        found[2],
        "6:7: web/networks/nowhere: the network `nowhere` is not declared under the top-level `networks:`"
    );
    assert!(
        found[3]
            .starts_with("9:5: networks/front/driver: the driver \"overlay\" cannot be honoured")
    );
}

#[test]
fn a_dependency_left_unplaced_is_reported_in_the_deployment() {
    let result = load_texts(
        "version: 1\nnodes:\n  198.18.0.1: [web]\n",
        Path::new("deployment.yml"),
        "services:\n  web:\n    image: x\n    depends_on: [db]\n  db:\n    image: x\n",
        Path::new(APP),
        &SystemResolver,
    );
    match result {
        Err(ConfigError::Invalid(ds)) => {
            assert_eq!(ds.len(), 1, "{ds:#?}");
            assert_eq!(
                ds[0].to_string(),
                "deployment.yml:3:16: web: `web` depends on `db`, which this deployment places on no node; place it too"
            );
        }
        other => panic!("expected the unplaced dependency refused, got {other:?}"),
    }
}

#[test]
fn secrets_and_configs_are_read_and_only_their_digest_is_in_the_application() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("db_password.txt"), "hunter2\n").expect("write");
    let env = ComposeEnv {
        vars: BTreeMap::from([("API_TOKEN".to_owned(), "t0ken".to_owned())]),
        base_dir: dir.path().to_path_buf(),
    };
    let text = "services:\n  db:\n    image: x\n    secrets:\n      - db_password\n      - source: token\n        target: api_token\n        uid: '999'\n        mode: 0440\n    configs:\n      - source: motd\n        target: /etc/motd\nsecrets:\n  db_password:\n    file: ./db_password.txt\n  token:\n    environment: API_TOKEN\nconfigs:\n  motd:\n    content: hello\n";
    let (config, diagnostics) = parse_application_config_in(text, Path::new(APP), &env);
    assert!(diagnostics.is_empty(), "{diagnostics:#?}");
    let db = &config.applications["db"];
    let mounts: Vec<(&str, &str, Option<u32>, Option<u32>)> = db
        .files
        .iter()
        .map(|m| (m.name.as_str(), m.target.as_str(), m.mode, m.uid))
        .collect();
    assert_eq!(
        mounts,
        [
            ("db_password", "/run/secrets/db_password", None, None),
            ("token", "/run/secrets/api_token", Some(0o440), Some(999)),
            ("motd", "/etc/motd", None, None),
        ]
    );
    let contents = &config.files["db"];
    assert_eq!(contents["db_password"].0, b"hunter2\n");
    assert_eq!(contents["token"].0, b"t0ken");
    assert_eq!(contents["motd"].0, b"hello");
    let json = serde_json::to_string(db).expect("json");
    assert!(
        !json.contains("hunter2") && !json.contains(&flocker_wire::files::to_hex(b"hunter2")),
        "{json}"
    );
    assert_eq!(
        db.files[0].digest,
        flocker_wire::files::to_hex(blake3::hash(b"hunter2\n").as_bytes())
    );
}

#[test]
fn secrets_that_no_node_could_read_are_refused() {
    let found = errors(
        "services:\n  db:\n    image: x\n    secrets: [nowhere, ext]\nsecrets:\n  ext:\n    external: true\n  missing:\n    file: ./does-not-exist\n",
    );
    assert_eq!(found.len(), 3, "{found:#?}");
    assert_eq!(
        found[0],
        "4:15: db/secrets[0]: `nowhere` is not declared under the top-level `secrets:`"
    );
    assert!(found[1].starts_with(
        "7:5: secrets/ext/external: an external secret lives in a swarm or on one host"
    ));
    assert!(
        found[2].starts_with("9:11: secrets/missing/file: cannot read ./does-not-exist"),
        "{}",
        found[2]
    );
}
