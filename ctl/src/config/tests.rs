//! Tests of the config parsers against every error class of the issue, the dialect
//! equivalence, the bundled examples, and arbitrary input.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use flocker_wire::{Application, Image, Link, PortMap, Protocol, RestartPolicy, VolumeSpec};

use super::*;

/// Resolves IP literals and `*.cluster.test`; nothing else, so no test touches DNS.
struct FakeResolver;

impl NodeResolver for FakeResolver {
    fn resolves(&self, address: &str) -> bool {
        address.parse::<std::net::IpAddr>().is_ok() || address.ends_with(".cluster.test")
    }
}

const APP: &str = "application.yml";
const DEP: &str = "deployment.yml";

/// Every diagnostic of an application text, rendered as `LINE:COLUMN: path: message`.
fn app_errors(text: &str) -> Vec<String> {
    let (_, diagnostics) = parse_application_config(text, Path::new(APP));
    diagnostics.iter().map(render).collect()
}

fn dep_errors(text: &str) -> Vec<String> {
    let (_, diagnostics) = parse_deployment_config(text, Path::new(DEP));
    diagnostics.iter().map(render).collect()
}

fn render(d: &Diagnostic) -> String {
    let full = d.to_string();
    let prefix = format!("{}:", d.file.display());
    full.strip_prefix(&prefix).unwrap_or(&full).to_owned()
}

fn both_errors(deployment: &str, application: &str) -> Vec<String> {
    match load_texts(
        deployment,
        Path::new(DEP),
        application,
        Path::new(APP),
        &FakeResolver,
    ) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid(ds)) => ds.iter().map(|d| d.to_string()).collect(),
        Err(e) => vec![e.to_string()],
    }
}

fn apps(text: &str) -> BTreeMap<String, Application> {
    parse_application(text, Path::new(APP)).unwrap_or_else(|ds| {
        panic!(
            "{}",
            ds.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

// ---- the native form ----

#[test]
fn native_form_parses_every_key() {
    let parsed = apps(
        "version: 1
applications:
  db:
    image: registry.local:5000/team/db:7.2
    ports:
      - internal: 5432
        external: 15432
    volume:
      mountpoint: /var/lib/db
      maximum_size: \"1.5G\"
    environment:
      USER: admin
      PORT: 5432
    links:
      - local_port: 6379
        remote_port: 16379
        alias: cache
    mem_limit: 512M
    cpu_shares: 512
    restart_policy:
      name: on-failure
      maximum_retry_count: 5
  plain:
    image: busybox
",
    );
    let db = &parsed["db"];
    assert_eq!(
        db,
        &Application {
            name: "db".into(),
            image: Image {
                repository: "registry.local:5000/team/db".into(),
                tag: "7.2".into()
            },
            ports: vec![PortMap {
                internal: 5432,
                external: 15432,
                protocol: Protocol::Tcp,
            }],
            volumes: Default::default(),
            volume: Some(VolumeSpec {
                mountpoint: "/var/lib/db".into(),
                maximum_size: Some(1536 << 20)
            }),
            environment: [
                ("PORT".to_owned(), "5432".to_owned()),
                ("USER".to_owned(), "admin".to_owned())
            ]
            .into_iter()
            .collect(),
            links: vec![Link {
                local_port: 6379,
                remote_port: 16379,
                alias: "cache".into(),
                protocol: Protocol::Tcp,
            }],
            mem_limit: Some(512 << 20),
            cpu_shares: Some(512),
            restart_policy: RestartPolicy::OnFailure {
                maximum_retry_count: Some(5)
            },
            container: Default::default(),
            depends_on: Vec::new(),
            files: Vec::new(),
            health_check: None,
        }
    );
    let plain = &parsed["plain"];
    assert_eq!(plain.image.tag, "latest");
    assert_eq!(plain.restart_policy, RestartPolicy::Never);
    assert!(plain.ports.is_empty() && plain.volume.is_none() && plain.links.is_empty());
}

#[test]
fn port_given_as_a_string() {
    assert_eq!(
        app_errors(
            "version: 1
applications:
  redis:
    image: redis
    ports:
      - internal: 6379
        external: \"80\"
"
        ),
        vec!["7:19: redis/ports[0]/external: expected an integer port, found the string \"80\""]
    );
}

#[test]
fn ports_outside_the_valid_range() {
    assert_eq!(
        app_errors(
            "version: 1
applications:
  redis:
    image: redis
    ports:
      - {internal: 0, external: 65536}
      - {internal: -5, external: 99999999999999999999999999999999999999999999}
"
        ),
        vec![
            "6:20: redis/ports[0]/internal: port 0 is outside 1..65535",
            "6:33: redis/ports[0]/external: port 65536 is outside 1..65535",
            "7:20: redis/ports[1]/internal: port -5 is outside 1..65535",
            "7:34: redis/ports[1]/external: port 99999999999999999999999999999999999999999999 is outside 1..65535",
        ]
    );
}

#[test]
fn port_mapping_missing_a_field() {
    assert_eq!(
        app_errors(
            "version: 1\napplications:\n  a:\n    image: x\n    ports:\n      - internal: 80\n"
        ),
        vec!["6:9: a/ports[0]: missing key `external`"]
    );
}

#[test]
fn relative_non_ascii_and_dotdot_mount_points() {
    let template = |mp: &str| {
        format!(
            "version: 1\napplications:\n  redis:\n    image: redis\n    volume:\n      mountpoint: {mp}\n"
        )
    };
    assert_eq!(
        app_errors(&template("data")),
        vec![
            "6:19: redis/volume/mountpoint: the mount point \"data\" must be an absolute path (start with `/`)"
        ]
    );
    assert_eq!(
        app_errors(&template("/dönnées")),
        vec!["6:19: redis/volume/mountpoint: the mount point \"/dönnées\" must be ASCII"]
    );
    assert_eq!(
        app_errors(&template("/data/../etc")),
        vec![
            "6:19: redis/volume/mountpoint: the mount point \"/data/../etc\" must not contain `..`"
        ]
    );
    assert_eq!(
        app_errors(&template("/")),
        vec!["6:19: redis/volume/mountpoint: the mount point cannot be `/` itself"]
    );
    assert_eq!(
        app_errors("version: 1\napplications:\n  redis:\n    image: redis\n    volume: {}\n"),
        vec!["5:13: redis/volume: missing key `mountpoint`"]
    );
}

#[test]
fn unknown_keys_list_the_allowed_ones() {
    assert_eq!(
        app_errors("version: 1\napplications:\n  redis:\n    image: redis\n    port: 6379\n"),
        vec!["5:5: redis/port: unknown key; did you mean `ports`?"]
    );
    assert_eq!(
        app_errors("version: 1\napplications: {}\nextra: 1\n"),
        vec!["3:1: extra: unknown key; allowed keys are: version, applications"]
    );
    assert_eq!(
        app_errors(
            "version: 1\napplications:\n  a:\n    image: x\n    volume:\n      mountpoint: /d\n      size: 1G\n"
        ),
        vec!["7:7: a/volume/size: unknown key; allowed keys are: mountpoint, maximum_size"]
    );
}

#[test]
fn missing_image() {
    assert_eq!(
        app_errors("version: 1\napplications:\n  redis:\n    volume:\n      mountpoint: /data\n"),
        vec!["3:3: redis: missing key `image`"]
    );
}

#[test]
fn invalid_image_references() {
    let template = |image: &str| format!("version: 1\napplications:\n  a:\n    image: {image}\n");
    assert_eq!(
        app_errors(&template("Redis")),
        vec![
            "4:12: a/image: invalid image reference \"Redis\": repository names must be lowercase"
        ]
    );
    assert_eq!(
        app_errors(&template("'re dis'")),
        vec!["4:12: a/image: invalid image reference \"re dis\": it contains whitespace"]
    );
    assert_eq!(
        app_errors(&template("''")),
        vec!["4:12: a/image: the image reference is empty"]
    );
    assert_eq!(
        app_errors(&template("7")),
        vec!["4:12: a/image: expected an image reference such as \"redis:7\", found the integer 7"]
    );
}

#[test]
fn maximum_size_negative_zero_or_not_a_size() {
    let template = |size: &str| {
        format!(
            "version: 1\napplications:\n  a:\n    image: x\n    volume:\n      mountpoint: /d\n      maximum_size: {size}\n"
        )
    };
    assert_eq!(
        app_errors(&template("\"-1G\"")),
        vec!["7:21: a/volume/maximum_size: the size must be positive, found \"-1G\""]
    );
    assert_eq!(
        app_errors(&template("-5")),
        vec!["7:21: a/volume/maximum_size: the size must be positive, found \"-5\""]
    );
    assert_eq!(
        app_errors(&template("0")),
        vec!["7:21: a/volume/maximum_size: the size must be more than zero, found \"0\""]
    );
    assert_eq!(
        app_errors(&template("big")),
        vec![
            "7:21: a/volume/maximum_size: expected a size such as \"500M\" or \"1.5G\" (units K, M, G, T, binary), \
             found \"big\""
        ]
    );
    assert_eq!(
        app_errors(&template("1.5")),
        vec![
            "7:21: a/volume/maximum_size: expected a size in bytes or a string such as \"500M\" or \"1.5G\", found \
             the number 1.5"
        ]
    );
}

#[test]
fn environment_rules() {
    assert_eq!(
        app_errors(
            "version: 1\napplications:\n  a:\n    image: x\n    environment:\n      A: true\n      B:\n      C: [1]\n"
        ),
        vec![
            "6:10: a/environment/A: expected a string, found the boolean true; quote it (\"true\") to pass it as text",
            "7:8: a/environment/B: the variable has no value; values are never taken from the shell running \
             flockerctl, give one (\"\" for empty)",
            "8:10: a/environment/C: expected a string, found a list",
        ]
    );
}

#[test]
fn links_need_all_three_fields_and_a_valid_alias() {
    assert_eq!(
        app_errors(
            "version: 1\napplications:\n  a:\n    image: x\n    links:\n      - {local_port: 1, alias: '9x'}\n"
        ),
        vec![
            "6:9: a/links[0]: missing key `remote_port`",
            "6:32: a/links[0]/alias: \"9x\" cannot be a link alias: it prefixes environment variable names, so use \
             letters, digits, `_` and `-`, starting with a letter, at most 63 characters",
        ]
    );
}

#[test]
fn restart_policy_rules() {
    let template = |policy: &str| {
        format!("version: 1\napplications:\n  a:\n    image: x\n    restart_policy: {policy}\n")
    };
    assert_eq!(
        app_errors(&template("{name: always, maximum_retry_count: 3}")),
        vec![
            "5:36: a/restart_policy/maximum_retry_count: `maximum_retry_count` is only allowed with `name: \
             on-failure`, not `always`"
        ]
    );
    assert_eq!(
        app_errors(&template("{name: sometimes}")),
        vec![
            "5:28: a/restart_policy/name: unknown restart policy \"sometimes\"; expected never, always or on-failure"
        ]
    );
    assert_eq!(
        app_errors(&template("{name: on-failure, maximum_retry_count: 0}")),
        vec!["5:61: a/restart_policy/maximum_retry_count: expected a positive integer, found 0"]
    );
    assert_eq!(
        apps(&template("{name: on-failure}"))["a"].restart_policy,
        RestartPolicy::OnFailure {
            maximum_retry_count: None
        }
    );
}

#[test]
fn mem_limit_and_cpu_shares() {
    let parsed = apps(
        "version: 1\napplications:\n  a:\n    image: x\n    mem_limit: 1048576\n    cpu_shares: 2\n",
    );
    assert_eq!(parsed["a"].mem_limit, Some(1 << 20));
    assert_eq!(parsed["a"].cpu_shares, Some(2));
    assert_eq!(
        app_errors("version: 1\napplications:\n  a:\n    image: x\n    cpu_shares: \"2\"\n"),
        vec!["5:17: a/cpu_shares: expected a positive integer, found the string \"2\""]
    );
}

#[test]
fn version_must_be_one() {
    assert_eq!(
        app_errors("version: 2\napplications: {}\n"),
        vec!["1:10: version: expected the integer 1, found the integer 2"]
    );
    assert_eq!(
        app_errors("applications: {}\n"),
        vec!["1:1: missing key `version`"]
    );
    assert_eq!(
        app_errors("version: 1\n"),
        vec!["1:1: missing key `applications`"]
    );
}

#[test]
fn names_that_cannot_be_containers_or_datasets() {
    let long = "a".repeat(64);
    for name in ["My App", "-lead", "UPPER", long.as_str(), "a/b"] {
        let errors = app_errors(&format!(
            "version: 1\napplications:\n  '{name}':\n    image: x\n"
        ));
        assert_eq!(errors.len(), 1, "{name}: {errors:?}");
        assert!(
            errors[0].starts_with(&format!(
                "3:3: {name}: {name:?} cannot be an application name"
            )),
            "{errors:?}"
        );
    }
    assert!(
        app_errors(&format!(
            "version: 1\napplications:\n  {}:\n    image: x\n",
            "a".repeat(63)
        ))
        .is_empty()
    );
}

#[test]
fn external_port_claimed_twice() {
    assert_eq!(
        app_errors(
            "version: 1
applications:
  a:
    image: x
    ports: [{internal: 80, external: 8080}]
  b:
    image: y
    ports: [{internal: 81, external: 8080}]
"
        ),
        vec![
            "8:38: b/ports[0]/external: external port 8080 is already claimed by `a` (line 5); each external port \
             is routed cluster-wide to one application"
        ]
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let errors = app_errors(
        "version: 1
applications:
  a:
    image: Bad
    ports: [{internal: \"1\", external: 2}]
  b:
    volume: {mountpoint: rel}
",
    );
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(errors[0].starts_with("4:12: a/image:"));
    assert!(errors[1].starts_with("5:24: a/ports[0]/internal:"));
    assert!(errors[2].starts_with("6:3: b: missing key `image`"));
    assert!(errors[3].starts_with("7:26: b/volume/mountpoint:"));
}

// ---- YAML-level problems ----

#[test]
fn invalid_yaml_gives_the_parser_location() {
    let errors = app_errors("version: 1\napplications:\n  a:\n    image: [x\n  b: 1\n");
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains(": invalid YAML: "), "{errors:?}");
    let line: usize = errors[0]
        .split(':')
        .next()
        .and_then(|l| l.parse().ok())
        .expect("a line number");
    assert!((4..=6).contains(&line), "{errors:?}");
}

#[test]
fn tabs_and_bad_indentation_are_yaml_errors() {
    let errors = app_errors("version: 1\napplications:\n\ta: 1\n");
    assert_eq!(errors.len(), 1);
    assert!(errors[0].starts_with("3:"), "{errors:?}");
}

#[test]
fn duplicate_keys_are_rejected_with_their_location() {
    assert_eq!(
        app_errors("version: 1\napplications:\n  a:\n    image: x\n  a:\n    image: y\n"),
        vec!["5:3: duplicate key \"a\" (first given at line 3)"]
    );
}

#[test]
fn empty_and_non_mapping_files() {
    assert_eq!(
        app_errors(""),
        vec![
            "1:1: the file is empty; expected `version: 1` and `applications:`, or a docker-compose file"
        ]
    );
    assert_eq!(app_errors("# only a comment\n").len(), 1);
    assert_eq!(
        dep_errors("- a\n- b\n"),
        vec!["1:1: expected a mapping with `version: 1` and `nodes:`, found a list"]
    );
}

#[test]
fn non_utf8_is_reported_where_it_starts() {
    let d = decode(b"version: 1\nab\xff\n", Path::new(APP)).expect_err("not utf-8");
    assert_eq!((d.line, d.column), (2, 3));
    assert_eq!(d.message, "the file is not UTF-8 text");
}

// ---- the compose forms ----

const NATIVE_EQUIVALENT: &str = "version: 1
applications:
  redis:
    image: redis-flocker:latest
    ports:
      - internal: 6379
        external: 6379
      - internal: 26379
        external: 26379
    volume:
      mountpoint: /data
    mem_limit: 256M
    cpu_shares: 100
    restart_policy:
      name: on-failure
      maximum_retry_count: 3
  web:
    image: busybox-flocker
    ports:
      - internal: 80
        external: 8080
    links:
      - {local_port: 6379, remote_port: 6379, alias: db}
      - {local_port: 26379, remote_port: 26379, alias: db}
    environment:
      A: '1'
      B: two
";

const MODERN_EQUIVALENT: &str = "version: \"3\"
services:
  redis:
    image: redis-flocker:latest
    ports: [\"6379:6379\", \"26379:26379/tcp\"]
    volumes: [\"redis-data:/data\"]
    mem_limit: 256m
    cpu_shares: 100
    restart: on-failure:3
  web:
    image: busybox-flocker
    ports:
      - target: 80
        published: \"8080\"
    links: [\"redis:db\"]
    environment: [\"A=1\", \"B=two\"]
volumes:
  redis-data:
";

const FIG_EQUIVALENT: &str = "redis:
  image: redis-flocker:latest
  ports: [\"6379:6379\", \"26379:26379\"]
  volumes: [\"/srv/redis:/data\"]
  mem_limit: 268435456
  cpu_shares: 100
  restart: on-failure:3
web:
  image: busybox-flocker
  ports: [\"8080:80\"]
  links: [\"redis:db\"]
  environment:
    A: 1
    B: two
";

#[test]
fn native_modern_and_fig_forms_yield_identical_applications() {
    let native = apps(NATIVE_EQUIVALENT);
    assert_eq!(apps(MODERN_EQUIVALENT), native);
    assert_eq!(apps(FIG_EQUIVALENT), native);
    assert_eq!(
        parse_application_config(MODERN_EQUIVALENT, Path::new(APP))
            .0
            .dialect,
        Dialect::Compose
    );
    assert_eq!(
        parse_application_config(FIG_EQUIVALENT, Path::new(APP))
            .0
            .dialect,
        Dialect::Fig
    );
}

#[test]
fn fig_services_may_be_named_like_sections() {
    let (config, diagnostics) = parse_application_config(
        "nodes:\n  image: x\nservices:\n  image: y\nversion:\n  image: z\n",
        Path::new(APP),
    );
    assert!(diagnostics.is_empty(), "{diagnostics:?}");
    assert_eq!(config.dialect, Dialect::Fig);
    assert_eq!(config.applications.len(), 3);
}

#[test]
fn udp_ports_in_compose_short_and_long_form() {
    let parsed = apps(
        "services:
  dns:
    image: x
    ports:
      - \"53:5353/udp\"
      - \"53:5353\"
      - {target: 9125, published: 8125, protocol: udp}
      - {target: 80, published: 8080, protocol: tcp}
",
    );
    assert_eq!(
        parsed["dns"].ports,
        vec![
            PortMap {
                internal: 5353,
                external: 53,
                protocol: Protocol::Udp,
            },
            PortMap::tcp(5353, 53),
            PortMap {
                internal: 9125,
                external: 8125,
                protocol: Protocol::Udp,
            },
            PortMap::tcp(80, 8080),
        ]
    );
    assert_eq!(
        app_errors(
            "services:\n  a:\n    image: x\n    ports:\n      - {target: 1, published: 2, protocol: sctp}\n"
        ),
        vec!["5:45: a/ports[0]/protocol: expected `tcp` or `udp`, found the string \"sctp\""]
    );
}

#[test]
fn udp_ports_in_the_native_format() {
    let parsed = apps(
        "version: 1
applications:
  dns:
    image: x
    ports:
      - {internal: 5353, external: 53, protocol: udp}
      - {internal: 5353, external: 53}
  app:
    image: y
    links: [{local_port: 53, remote_port: 53, alias: dns, protocol: udp}]
",
    );
    assert_eq!(
        parsed["dns"].ports,
        vec![
            PortMap {
                internal: 5353,
                external: 53,
                protocol: Protocol::Udp,
            },
            PortMap::tcp(5353, 53),
        ]
    );
    assert_eq!(parsed["app"].links[0].protocol, Protocol::Udp);
    assert_eq!(
        app_errors(
            "version: 1\napplications:\n  a:\n    image: x\n    ports: [{internal: 1, external: 2, protocol: UDP}]\n"
        ),
        vec!["5:50: a/ports[0]/protocol: expected `tcp` or `udp`, found the string \"UDP\""]
    );
}

#[test]
fn an_external_port_is_claimed_once_per_protocol() {
    assert_eq!(
        app_errors(
            "services:
  a:
    image: x
    ports: [\"53:53/udp\", \"53:53\"]
  b:
    image: y
    ports: [\"53:53/udp\"]
"
        ),
        vec![
            "7:13: b/ports[0]: external port 53/udp is already claimed by `a` (line 4); each external port \
             is routed cluster-wide to one application"
        ]
    );
}

#[test]
fn compose_links_to_udp_ports_carry_the_protocol() {
    let parsed = apps(
        "services:\n  dns:\n    image: x\n    ports: ['53:5353/udp', '8053:80']\n  app:\n    image: y\n    links: ['dns:ns']\n",
    );
    assert_eq!(
        parsed["app"].links,
        vec![
            Link {
                local_port: 5353,
                remote_port: 53,
                alias: "ns".into(),
                protocol: Protocol::Udp,
            },
            Link {
                local_port: 80,
                remote_port: 8053,
                alias: "ns".into(),
                protocol: Protocol::Tcp,
            },
        ]
    );
}

#[test]
fn compose_link_without_alias_uses_the_service_name() {
    let parsed = apps(
        "services:\n  db:\n    image: x\n    ports: ['5432:15432']\n  app:\n    image: y\n    links: [db]\n",
    );
    assert_eq!(
        parsed["app"].links,
        vec![Link {
            local_port: 15432,
            remote_port: 5432,
            alias: "db".into(),
            protocol: Protocol::Tcp,
        }]
    );
}

#[test]
fn compose_keys_that_cannot_be_honoured_are_refused_by_name() {
    // `build` with `image` beside it is accepted (every node pulls the image); alone it is
    // refused.
    assert_eq!(
        app_errors("web:\n  build: .\n"),
        vec![
            "1:1: web: missing key `image` (images are not built by Flocker)",
            "2:3: web/build: `build` cannot be honoured: images are not built by Flocker; build and push the \
             image beforehand and name it with `image` (beside `build`, `image` is what every node pulls)",
        ]
    );
    let errors = app_errors(
        "web:\n  image: x\n  build: .\n  privileged: true\n  cpuset: '0-1'\n  frobnicate: 1\n  imgae: y\n",
    );
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(!errors.iter().any(|e| e.contains("build")), "{errors:#?}");
    assert!(errors[0].starts_with(
        "4:3: web/privileged: `privileged` cannot be honoured: a privileged container"
    ));
    assert!(errors[1].contains("CPU numbers differ from node to node"));
    assert!(
        errors[2].starts_with("6:3: web/frobnicate: unknown key; allowed keys are: image, ports,")
    );
    assert!(errors[2].contains("stop_grace_period"));
    assert_eq!(
        errors[3],
        "7:3: web/imgae: unknown key; did you mean `image`?"
    );
    assert_eq!(
        app_errors("services:\n  web:\n    image: x\nnetworks:\n  front: {external: true}\n"),
        vec![
            "5:11: networks/front/external: an external network exists on the host that made it, not on the node \
             an application moves to"
        ]
    );
}

#[test]
fn compose_port_forms() {
    let errors = app_errors(
        "web:\n  image: x\n  ports:\n    - \"80\"\n    - \"127.0.0.1:80:80\"\n    - \"53:53/sctp\"\n    - \"1-3:1-3\"\n    - \"0:80\"\n    - 8080\n",
    );
    assert_eq!(
        errors,
        vec![
            "4:7: web/ports[0]: \"80\" publishes the port on a random host port, which cannot be routed across the \
             cluster; give the external port too, e.g. \"80:80\"",
            "5:7: web/ports[1]: \"127.0.0.1:80:80\": binding to a host address cannot be honoured; write \
             \"EXTERNAL:INTERNAL\"",
            "6:7: web/ports[2]: \"53:53/sctp\": only tcp and udp ports are routed",
            "7:7: web/ports[3]: \"1-3:1-3\": port ranges are not supported, list each port",
            "8:7: web/ports[4]: \"0:80\": port 0 is outside 1..65535",
            "9:7: web/ports[5]: \"8080\" publishes the port on a random host port, which cannot be routed across \
             the cluster; give the external port too, e.g. \"8080:8080\"",
        ]
    );
}

#[test]
fn compose_volumes_environment_and_restart() {
    assert_eq!(
        app_errors("web:\n  image: x\n  volumes: ['/h:/c:ro']\n"),
        vec![
            "3:13: web/volumes[0]: \"/h\" cannot be honoured: other nodes may not have this host path and its \
             content does not move with the application; if every node has it, list it under `x-flocker-node-local` (it is \
             then mounted read-only from each node)"
        ]
    );
    assert_eq!(
        app_errors("web:\n  image: x\n  volumes: [data]\n"),
        vec![
            "3:13: web/volumes[0]: the mount point \"data\" must be an absolute path (start with `/`)"
        ]
    );
    assert_eq!(
        app_errors("web:\n  image: x\n  environment: [A=1, B, A=2]\n"),
        vec![
            "3:22: web/environment[1]: \"B\" has no value and flockerctl's environment does not set it; write \
             \"B=VALUE\" or set it where flockerctl runs",
            "3:25: web/environment[2]: the variable `A` is set twice",
        ]
    );
    assert_eq!(
        apps("web:\n  image: x\n  restart: unless-stopped\n")["web"].restart_policy,
        RestartPolicy::UnlessStopped
    );
    assert_eq!(
        app_errors("web:\n  image: x\n  restart: false\n"),
        vec![
            "3:12: web/restart: expected no, always, unless-stopped or on-failure[:N], found the boolean false; \
             write \"no\""
        ]
    );
    assert_eq!(
        apps("web:\n  image: x\n  restart: no\n")["web"].restart_policy,
        RestartPolicy::Never
    );
}

#[test]
fn compose_services_keep_several_volumes_each_named_by_key() {
    let app = &apps(
        "services:\n  cloud:\n    image: x\n    volumes:\n      - html:/var/www/html\n      - ./config:/var/www/html/config\n      - /var/log/app\n      - type: volume\n        source: db\n        target: /db\n      - type: tmpfs\n        target: /cache\n        tmpfs: {size: 1m}\nvolumes:\n  html:\n  db:\n",
    )["cloud"];
    assert_eq!(app.volume, None);
    let volumes: Vec<(&str, &str)> = app
        .volumes()
        .map(|(name, spec)| (name, spec.mountpoint.as_str()))
        .collect();
    assert_eq!(
        volumes,
        [
            ("cloud.db", "/db"),
            ("cloud.html", "/var/www/html"),
            ("cloud.var-log-app", "/var/log/app"),
            ("cloud.var-www-html-config", "/var/www/html/config"),
        ]
    );
    assert_eq!(app.container.tmpfs["/cache"], "size=1048576");
    // One volume stays the main volume, named as the application.
    let single = &apps("web:\n  image: x\n  volumes: ['data:/data']\n")["web"];
    assert_eq!(
        single.volumes().map(|(n, _)| n).collect::<Vec<_>>(),
        ["web"]
    );
}

#[test]
fn compose_read_only_host_paths_need_the_node_local_promise() {
    let app = &apps(
        "web:\n  image: x\n  x-flocker-node-local: [/etc/ssl/certs]\n  volumes:\n    - /etc/ssl/certs:/certs:ro\n    - type: bind\n      source: /etc/ssl/certs\n      target: /more-certs\n      read_only: true\n",
    )["web"];
    assert!(app.volume.is_none() && app.volumes.is_empty());
    assert_eq!(
        app.container.node_local_binds,
        BTreeMap::from([("/etc/ssl/certs".to_string(), "/more-certs".to_string())])
    );
    assert_eq!(
        app_errors(
            "web:\n  image: x\n  volumes:\n    - ./nginx.conf:/etc/nginx/nginx.conf:ro\n    - /var/run/docker.sock:/var/run/docker.sock\n    - a:/a\n    - b:/a\n    - c:/c:ro\n    - fenced-x:/f\n"
        ),
        vec![
            "4:7: web/volumes[0]: \"./nginx.conf\" cannot be honoured: it is a path on the machine running \
             flockerctl, which the nodes do not have; ship a file with `configs:`, or name an absolute path that every node has and list it \
             under `x-flocker-node-local`",
            "5:7: web/volumes[1]: \"/var/run/docker.sock\" cannot be honoured: the Docker socket gives the container control of its \
             node, and with it of every volume there; Flocker could no longer promise one writer per volume",
            "7:7: web/volumes[3]: \"/a\" is mounted twice",
            "8:7: web/volumes[4]: a read-only volume cannot be honoured: \"/c\" would stay empty; volumes are \
             read-write",
            "9:7: web/volumes[5]: \"fenced-x\" cannot name a volume: `fenced-` is how Flocker names copies it sets \
             aside",
        ]
    );
}

#[test]
fn compose_links_to_unknown_or_portless_services() {
    assert_eq!(
        app_errors(
            "services:\n  web:\n    image: x\n    links: [db]\n  cache:\n    image: y\n    links: [web]\n"
        ),
        vec![
            "4:13: web/links[0]: links to `db`, which is not a service in this file",
            "7:13: cache/links[0]: links to `web`, which publishes no ports, so there is nothing to link to",
        ]
    );
}

#[test]
fn compose_top_level_volumes_only_as_plain_declarations() {
    let base = "services:\n  db:\n    image: x\n    volumes: ['data:/var/lib/db']\n";
    assert_eq!(
        apps(&format!("{base}volumes:\n  data:\n"))["db"].volume,
        Some(VolumeSpec {
            mountpoint: "/var/lib/db".into(),
            maximum_size: None
        })
    );
    assert!(app_errors(&format!("{base}volumes:\n  data:\n    driver: local\n")).is_empty());
    assert_eq!(
        app_errors(&format!("{base}volumes:\n  data:\n    driver: nfs\n")),
        vec![
            "7:5: volumes/data: volume options cannot be honoured: Flocker chooses the volume's storage; declare \
             the volume with no settings"
        ]
    );
}

#[test]
fn compose_missing_image_and_version() {
    assert_eq!(
        app_errors("services:\n  web:\n    ports: ['80:80']\n"),
        vec!["2:3: web: missing key `image` (images are not built by Flocker)"]
    );
    assert_eq!(
        app_errors("version: '1'\nservices: {}\n"),
        vec![
            "1:10: version: unsupported compose file version, expected \"2\" or \"3\" (or a 2.x/3.x), found the string \"1\""
        ]
    );
    assert_eq!(
        app_errors("version: '3'\n"),
        vec!["1:1: missing key `services`"]
    );
}

#[test]
fn compose_anchors_and_merge_keys() {
    let parsed = apps(
        "x-base: &base\n  image: x\n  restart: always\nservices:\n  a:\n    <<: *base\n    ports: ['1:1']\n  b:\n    <<: *base\n    image: y\n",
    );
    assert_eq!(parsed["a"].image.repository, "x");
    assert_eq!(parsed["a"].restart_policy, RestartPolicy::Always);
    assert_eq!(parsed["b"].image.repository, "y");
}

// ---- the deployment and the cross-file checks ----

#[test]
fn deployment_parses_with_empty_nodes() {
    let deployment = parse_deployment(
        "version: 1\nnodes:\n  198.18.0.11: [a, b]\n  node-2.cluster.test: []\n  '::1':\n",
        Path::new(DEP),
    )
    .expect("valid");
    assert_eq!(
        deployment.nodes["198.18.0.11"],
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );
    assert!(deployment.nodes["node-2.cluster.test"].is_empty());
    assert!(deployment.nodes["::1"].is_empty());
}

#[test]
fn deployment_problems() {
    assert_eq!(
        dep_errors(
            "version: 1\nnodes:\n  198.18.0.11: [a]\n  198.18.0.12: [b, a]\n  node_3: [c, c]\n  n4: a\n"
        ),
        vec![
            "4:20: nodes/198.18.0.12[1]: `a` is already placed on node 198.18.0.11 (line 3); an application runs on \
             exactly one node",
            "5:3: nodes/node_3: \"node_3\" is neither an IP address nor a hostname",
            "5:15: nodes/node_3[1]: `c` is listed twice on this node (line 5)",
            "6:7: nodes/n4: expected a list of application names (`[]` for none), found the string \"a\"",
        ]
    );
    assert_eq!(dep_errors("version: 1\n"), vec!["1:1: missing key `nodes`"]);
    assert_eq!(
        dep_errors("version: 1\nnodes: {}\napps: 1\n"),
        vec!["3:1: apps: unknown key; allowed keys are: version, nodes, standby"]
    );
}

#[test]
fn ipv6_node_addresses_are_spelled_one_way() {
    let deployment = parse_deployment(
        "version: 1\nnodes:\n  '2001:db8::11': [a]\n  'fd00::12': []\n",
        Path::new(DEP),
    )
    .expect("valid");
    assert_eq!(
        deployment.nodes["2001:db8::11"],
        BTreeSet::from(["a".to_owned()])
    );
    assert_eq!(
        dep_errors(
            "version: 1\nnodes:\n  '2001:DB8::11': [a]\n  '[fd00::12]': []\n  '::ffff:198.18.0.1': []\n"
        ),
        vec![
            "3:3: nodes/2001:DB8::11: \"2001:DB8::11\" is not written canonically; write it as 2001:db8::11 \
             (node names are compared as text, in certificates too)",
            "4:3: nodes/[fd00::12]: \"[fd00::12]\" is an IPv6 address in brackets; write it without them, as fd00::12",
            "5:3: nodes/::ffff:198.18.0.1: \"::ffff:198.18.0.1\" is an IPv4-mapped IPv6 address; name the node by \
             its IPv4 address 198.18.0.1",
        ]
    );
}

const VALID_APPS: &str = "version: 1\napplications:\n  a:\n    image: x\n    ports: [{internal: 1, external: 1}]\n  b:\n    image: y\n";

#[test]
fn application_not_defined_and_unresolvable_node() {
    assert_eq!(
        both_errors(
            "version: 1\nnodes:\n  198.18.0.11: [a, ghost]\n  nowhere.example: [b]\n",
            VALID_APPS
        ),
        vec![
            "deployment.yml:3:20: nodes/198.18.0.11[1]: application `ghost` is not defined in application.yml",
            "deployment.yml:4:3: nodes/nowhere.example: the node address \"nowhere.example\" does not resolve: it is \
             not an IP address and the system resolver (/etc/hosts, DNS) does not know it",
        ]
    );
}

#[test]
fn errors_of_both_files_are_reported_together_deployment_first() {
    let errors = both_errors(
        "version: 1\nnodes:\n  198.18.0.11: [a, a]\n",
        "version: 1\napplications:\n  a:\n    image: X\n",
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("deployment.yml:3:20: "));
    assert!(errors[1].starts_with("application.yml:4:12: a/image: "));
}

#[test]
fn a_broken_application_is_not_also_reported_undefined() {
    let errors = both_errors(
        "version: 1\nnodes:\n  198.18.0.11: [a]\n",
        "version: 1\napplications:\n  a:\n    port: 1\n",
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors.iter().all(|e| e.starts_with("application.yml:")),
        "{errors:?}"
    );
}

#[test]
fn files_in_the_wrong_order() {
    let deployment = "version: 1\nnodes:\n  198.18.0.11: [a]\n";
    let errors = both_errors(VALID_APPS, deployment);
    assert_eq!(
        errors,
        vec![
            "deployment.yml:2:1: this is an application config (it has `applications:`), given where the deployment \
             config is expected; were the files passed in the wrong order? the deployment config comes first: \
             `flockerctl validate DEPLOYMENT APPLICATION`",
            "application.yml:2:1: this is a deployment config (it has `nodes:`), given where the application config \
             is expected; were the files passed in the wrong order? the deployment config comes first: `flockerctl \
             validate DEPLOYMENT APPLICATION`",
        ]
    );
    // A compose file in the deployment slot is recognised too.
    let errors = both_errors("web:\n  image: x\n", VALID_APPS);
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("application config in docker-compose form"),
        "{errors:?}"
    );
}

#[test]
fn desired_state_holds_placed_applications_and_every_node() {
    let state = load_texts(
        "version: 1\nnodes:\n  198.18.0.11: [a]\n  198.18.0.12: []\n",
        Path::new(DEP),
        VALID_APPS,
        Path::new(APP),
        &FakeResolver,
    )
    .expect("valid");
    assert_eq!(state.applications.keys().collect::<Vec<_>>(), vec!["a"]);
    assert_eq!(state.nodes.len(), 2);
    assert_eq!(state.node_of("a"), Some("198.18.0.11"));
}

#[test]
fn missing_file_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let present = dir.path().join("deployment.yml");
    std::fs::write(&present, "version: 1\nnodes: {}\n").expect("write");
    match load_files(&present, &dir.path().join("absent.yml")) {
        Err(ConfigError::Usage(message)) => {
            assert!(
                message.starts_with("cannot read the application config "),
                "{message}"
            );
            assert!(message.contains("absent.yml"), "{message}");
        }
        other => panic!("expected a usage error, got {other:?}"),
    }
}

#[test]
fn system_resolver_accepts_literals_and_etc_hosts_names() {
    assert!(SystemResolver.resolves("198.18.0.11"));
    assert!(SystemResolver.resolves("::1"));
    // `localhost` is in /etc/hosts on every Debian system: no DNS traffic.
    assert!(SystemResolver.resolves("localhost"));
}

// ---- the bundled examples ----

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `# validate: DEPLOYMENT APPLICATION` header of a broken example, with `THIS` standing
/// for the file itself.
fn header(file: &Path) -> (String, PathBuf, PathBuf) {
    let text = std::fs::read_to_string(file).expect("readable example");
    let mut lines = text.lines();
    let error = lines
        .next()
        .and_then(|l| l.strip_prefix("# error: "))
        .unwrap_or_else(|| panic!("{}: first line must be `# error: ...`", file.display()))
        .to_owned();
    let validate = lines
        .next()
        .and_then(|l| l.strip_prefix("# validate: "))
        .unwrap_or_else(|| panic!("{}: second line must be `# validate: ...`", file.display()));
    let resolve = |word: &str| {
        if word == "THIS" {
            file.to_path_buf()
        } else {
            repo_root().join(word)
        }
    };
    let words: Vec<&str> = validate.split_whitespace().collect();
    assert_eq!(words.len(), 2, "{}", file.display());
    (error, resolve(words[0]), resolve(words[1]))
}

#[test]
fn valid_examples_parse() {
    let root = repo_root();
    let app = root.join("examples/redis/application.yml");
    for deployment in ["deployment.yml", "deployment-moved.yml"] {
        let state = load_files_with(
            &root.join("examples/redis").join(deployment),
            &app,
            &FakeResolver,
        )
        .unwrap_or_else(|e| panic!("{deployment}: {e:?}"));
        assert_eq!(state.nodes.len(), 3);
        assert_eq!(state.applications.len(), 2);
    }
    let native =
        parse_application(&std::fs::read_to_string(&app).expect("read"), &app).expect("native");
    for compose in [
        "examples/compose/docker-compose.yml",
        "examples/compose/fig.yml",
    ] {
        let path = root.join(compose);
        let parsed = parse_application(&std::fs::read_to_string(&path).expect("read"), &path)
            .unwrap_or_else(|e| panic!("{compose}: {e:?}"));
        assert_eq!(parsed, native, "{compose} differs from the native example");
    }
}

#[test]
fn broken_examples_yield_the_error_their_header_names() {
    let dir = repo_root().join("examples/broken");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/broken")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "expected one broken example per error class"
    );
    let mut mismatches = Vec::new();
    for file in files {
        let (expected, deployment, application) = header(&file);
        let errors = match load_files_with(&deployment, &application, &FakeResolver) {
            Err(ConfigError::Invalid(ds)) => ds,
            other => panic!("{}: expected invalid, got {other:?}", file.display()),
        };
        let rendered: Vec<String> = errors
            .iter()
            .map(|d| {
                if d.file == file {
                    render(d)
                } else {
                    d.to_string()
                }
            })
            .map(|line| line.replace(&format!("{}/", repo_root().display()), ""))
            .collect();
        if rendered != vec![expected.clone()] {
            mismatches.push(format!(
                "{}:\n  expected: {expected}\n  got:      {rendered:?}",
                file.display()
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn compose_examples_meet_their_headers() {
    let dir = repo_root().join("examples/compose");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("examples/compose")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "expected a collection of compose files");
    // The files' variables unset, so their defaults apply whatever the test's environment.
    let env = ComposeEnv {
        vars: BTreeMap::new(),
        base_dir: dir.clone(),
    };
    let mut mismatches = Vec::new();
    let mut valid = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read");
        let expect = text.lines().next().unwrap_or("").to_owned();
        let (_, diagnostics) = parse_application_config_in(&text, file, &env);
        match (
            expect.strip_prefix("# expect: refused: "),
            diagnostics.first(),
        ) {
            (None, None) if expect == "# expect: valid" => valid += 1,
            (Some(reason), Some(first))
                if first.message.contains(reason)
                    && first.message.contains("cannot be honoured")
                    || first.message.contains(reason) && reason.contains("only tcp") => {}
            _ => mismatches.push(format!(
                "{}: header {expect:?}, diagnostics {:#?}",
                file.display(),
                diagnostics
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            )),
        }
    }
    println!(
        "compose examples: {valid} of {} validate ({}%)",
        files.len(),
        valid * 100 / files.len()
    );
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

// ---- arbitrary input ----

mod no_panic {
    use proptest::prelude::*;

    use super::*;

    fn feed(text: &str) {
        let _ = parse_application_config(text, Path::new(APP));
        let _ = parse_deployment_config(text, Path::new(DEP));
        let _ = load_texts(text, Path::new(DEP), text, Path::new(APP), &FakeResolver);
    }

    /// Fragments of valid configs, so the generator reaches the validators and not only the
    /// YAML scanner.
    const FRAGMENTS: &[&str] = &[
        "version: 1\n",
        "applications:\n",
        "nodes:\n",
        "services:\n",
        "  a:\n",
        "    image: x\n",
        "    ports:\n",
        "      - internal: 80\n",
        "        external: \"80\"\n",
        "    volume:\n",
        "      mountpoint: /d\n",
        "      maximum_size: 1.5G\n",
        "    links: [db]\n",
        "    environment: [A=1]\n",
        "  198.18.0.1: [a]\n",
        "    restart: on-failure:x\n",
        "&a ",
        "*a\n",
        "<<: *a\n",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ": ",
        "'",
        "\"",
        "\t",
        "#",
        "!!str ",
        "---\n",
        "\n",
        "  ",
        "é",
        "\u{0}",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_strings_never_panic(text in ".{0,300}") {
            feed(&text);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(text) = decode(&bytes, Path::new(APP)) {
                feed(text);
            }
        }

        #[test]
        fn config_shaped_input_never_panics(parts in proptest::collection::vec(proptest::sample::select(FRAGMENTS), 0..40)) {
            feed(&parts.concat());
        }
    }
}

// ---- standby replicas ----

const STANDBY_APPS: &str = "version: 1
applications:
  redis:
    image: redis
    volume:
      mountpoint: /data
  web:
    image: nginx
";

#[test]
fn standby_replicas_parse_into_the_desired_state() {
    let desired = load_texts(
        "version: 1
nodes:
  198.18.0.11: [redis]
  198.18.0.12: []
  198.18.0.13: []
standby:
  redis: {nodes: [198.18.0.12, 198.18.0.13], every: 2s}
",
        Path::new(DEP),
        STANDBY_APPS,
        Path::new(APP),
        &FakeResolver,
    )
    .expect("valid");
    let standby = &desired.standby["redis"];
    assert_eq!(standby.nodes, vec!["198.18.0.12", "198.18.0.13"]);
    assert_eq!(standby.interval_ms, 2_000);
}

#[test]
fn every_defaults_to_ten_seconds_and_takes_units() {
    for (every, ms) in [
        ("", 10_000),
        (", every: 1500ms", 1_500),
        (", every: 2m", 120_000),
        (", every: 1h", 3_600_000),
    ] {
        let text = format!(
            "version: 1\nnodes:\n  198.18.0.11: [redis]\n  198.18.0.12: []\nstandby:\n  redis: {{nodes: [198.18.0.12]{every}}}\n"
        );
        let (deployment, diagnostics) = parse_deployment_config(&text, Path::new(DEP));
        assert!(diagnostics.is_empty(), "{every}: {diagnostics:?}");
        assert_eq!(deployment.standby[0].interval_ms, ms, "{every}");
    }
}

#[test]
fn standby_mistakes_are_located() {
    let errors = dep_errors(
        "version: 1
nodes:
  198.18.0.11: [redis]
  198.18.0.12: []
standby:
  redis: {nodes: [198.18.0.11, 198.18.0.99, 198.18.0.12, 198.18.0.12], every: 500ms}
  ghost: {nodes: [198.18.0.12]}
  web: {nodes: [198.18.0.12], every: soon, when: now}
",
    );
    assert_eq!(
        errors,
        vec![
            "6:19: standby/redis/nodes[0]: 198.18.0.11 runs `redis` itself: a standby must be another node",
            "6:32: standby/redis/nodes[1]: 198.18.0.99 is not a node of this deployment (add it under `nodes:`)",
            "6:58: standby/redis/nodes[3]: 198.18.0.12 is listed twice",
            "6:79: standby/redis/every: the replication interval must be between 1s and 24h",
            "7:3: standby/ghost: `ghost` is not placed on any node under `nodes:`, so it has no volume to replicate",
            "8:3: standby/web: `web` is not placed on any node under `nodes:`, so it has no volume to replicate",
            "8:38: standby/web/every: \"soon\" is not a duration such as \"10s\" or \"1m30s\"",
            "8:44: standby/web/when: unknown key; allowed keys are: nodes, every",
        ],
    );
}

#[test]
fn a_standby_needs_an_application_with_a_volume() {
    let errors = both_errors(
        "version: 1
nodes:
  198.18.0.11: [redis, web]
  198.18.0.12: []
standby:
  web: {nodes: [198.18.0.12], every: 5s}
",
        STANDBY_APPS,
    );
    assert_eq!(
        errors,
        vec![
            "deployment.yml:6:3: standby/web: `web` has no volume: there is nothing to replicate (give it a volume, or remove this entry)"
        ]
    );
}

#[test]
fn compose_healthcheck_resolves_to_docker_form() {
    let parsed = apps(concat!(
        "services:\n  db:\n    image: redis\n    healthcheck:\n",
        "      test: [\"CMD\", \"redis-cli\", \"ping\"]\n      interval: 2s\n",
        "      timeout: 500ms\n      retries: 5\n      start_period: 1m30s\n",
        "  web:\n    image: x\n    healthcheck:\n      test: wget -q -O- localhost\n",
        "  off:\n    image: x\n    healthcheck:\n      disable: true\n",
    ));
    assert_eq!(
        parsed["db"].health_check,
        Some(flocker_wire::HealthCheck {
            test: vec!["CMD".into(), "redis-cli".into(), "ping".into()],
            interval_ms: 2_000,
            timeout_ms: 500,
            retries: 5,
            start_period_ms: 90_000,
            answer: None,
        })
    );
    let web = parsed["web"].health_check.clone().expect("web check");
    assert_eq!(web.test, vec!["CMD-SHELL", "wget -q -O- localhost"]);
    assert_eq!((web.interval_ms, web.retries), (30_000, 3));
    assert!(
        parsed["off"]
            .health_check
            .as_ref()
            .is_some_and(|c| c.is_disabled())
    );
}

#[test]
fn native_health_check_takes_the_compose_keys() {
    let parsed = apps(concat!(
        "version: 1\napplications:\n  db:\n    image: redis\n    health_check:\n",
        "      test: [\"CMD-SHELL\", \"redis-cli ping\"]\n      interval: 1s\n      retries: 2\n",
    ));
    let check = parsed["db"].health_check.clone().expect("check");
    assert_eq!(check.test, vec!["CMD-SHELL", "redis-cli ping"]);
    assert_eq!((check.interval_ms, check.retries), (1_000, 2));
}

#[test]
fn health_check_mistakes_are_located() {
    assert_eq!(
        app_errors(concat!(
            "version: 1\napplications:\n  db:\n    image: redis\n    health_check:\n",
            "      test: [\"RUN\", \"x\"]\n      interval: 10\n      retries: 0\n      every: 1s\n",
        )),
        vec![
            "6:13: db/health_check/test: a list must start with CMD (program and arguments), CMD-SHELL (one \
             shell command) or NONE",
            "7:17: db/health_check/interval: \"10\" has no unit: write for example `10s` (ms, s, m and h are \
             understood)",
            "8:16: db/health_check/retries: expected an integer from 1 to 100, found the integer 0",
            "9:7: db/health_check/every: unknown key; allowed keys are: test, interval, timeout, retries, \
             start_period, disable, send, expect, port",
        ]
    );
    assert_eq!(
        app_errors("services:\n  db:\n    image: redis\n    healthcheck:\n      interval: 1s\n"),
        vec![
            "5:7: db/healthcheck: missing key `test` (a command such as \"redis-cli ping\"), `expect` (an \
             answer the agent reads), or `disable: true`"
        ]
    );
}

#[test]
fn an_answer_check_reads_send_expect_port_and_timeout() {
    let parsed = apps(concat!(
        "version: 1\napplications:\n  db:\n    image: redis\n",
        "    ports: [{internal: 6379, external: 6379}]\n    health_check:\n",
        "      send: \"PING\\r\\n\"\n      expect: \"+PONG\"\n",
        "  mail:\n    image: x\n    health_check:\n      expect: \"220 \"\n      port: 25\n      timeout: 250ms\n",
    ));
    assert_eq!(
        parsed["db"].health_check,
        Some(flocker_wire::HealthCheck::with_answer(
            flocker_wire::AnswerCheck {
                send: "PING\r\n".into(),
                expect: "+PONG".into(),
                port: None,
            }
        ))
    );
    let mail = parsed["mail"].health_check.clone().expect("mail check");
    let answer = mail.answer.expect("an answer check");
    assert_eq!((answer.send.as_str(), answer.expect.as_str()), ("", "220 "));
    assert_eq!((answer.port, mail.timeout_ms), (Some(25), 250));
}

#[test]
fn answer_check_mistakes_are_located() {
    assert_eq!(
        app_errors(concat!(
            "version: 1\napplications:\n  db:\n    image: redis\n    health_check:\n",
            "      test: [\"CMD\", \"true\"]\n      send: [1]\n      expect: \"\"\n",
            "      port: 70000\n      interval: 1s\n      timeout: 2m\n",
        )),
        vec![
            "6:7: db/health_check/test: `test` belongs to a `test` command; an answer check (`expect`) is \
             made by the agent, every few milliseconds while the application starts",
            "7:13: db/health_check/send: expected a string, found a list",
            "8:15: db/health_check/expect: must not be empty",
            "9:13: db/health_check/port: expected a port from 1 to 65535 inside the container, found the \
             integer 70000",
            "10:7: db/health_check/interval: `interval` belongs to a `test` command; an answer check \
             (`expect`) is made by the agent, every few milliseconds while the application starts",
            "11:16: db/health_check/timeout: must be from 1ms to 10s",
        ]
    );
    assert_eq!(
        app_errors("services:\n  db:\n    image: redis\n    healthcheck:\n      send: x\n"),
        vec![
            "5:7: db/healthcheck: missing key `expect`: what the application's reply starts with once it \
             is ready, such as \"+PONG\"",
            "5:7: db/healthcheck: an answer check needs `port` here: the application has no TCP port to \
             check",
        ]
    );
    // A long `send` without `expect` is one problem with `send`, not one with `expect`.
    let long = "x".repeat(flocker_wire::checks::MAX_ANSWER_BYTES + 1);
    assert_eq!(
        app_errors(&format!(
            "services:\n  db:\n    image: redis\n    ports: [\"6379:6379\"]\n    healthcheck:\n      send: {long}\n"
        )),
        vec![
            "6:7: db/healthcheck: missing key `expect`: what the application's reply starts with once it \
             is ready, such as \"+PONG\"",
            "6:13: db/healthcheck/send: longer than the 1024 bytes accepted",
        ]
    );
    // With a published TCP port, or a port of its own, the check has its port.
    assert!(
        app_errors(concat!(
            "services:\n  db:\n    image: redis\n    ports: [\"6379:6379\"]\n",
            "    healthcheck:\n      expect: \"+PONG\"\n",
            "  mail:\n    image: x\n    healthcheck:\n      expect: \"220\"\n      port: 25\n",
        ))
        .is_empty()
    );
}

/// Services by name from a compose file: every placed service gets a service address and
/// its service ports (published ones by their internal number, `expose` ones too) with a
/// relay port on its node; a link alias names the linked service's address too.
#[test]
fn compose_services_get_addresses_relays_and_alias_names() {
    let compose = "\
services:
  cache:
    image: redis:7
    expose: [\"6379\"]
  web:
    image: nginx:1
    ports: [\"8080:80\"]
    links: [\"cache:redis\"]
";
    let deployment = "version: 1\nnodes:\n  198.18.0.1: [web]\n  198.18.0.2: [cache]\n";
    let desired = load_texts(
        deployment,
        Path::new(DEP),
        compose,
        Path::new(APP),
        &FakeResolver,
    );
    // `links` needs a published port on the target; an exposed-only target is refused with
    // its location, as before: link aliases come from published ports.
    let Err(ConfigError::Invalid(problems)) = desired else {
        panic!("a link to a service that publishes nothing is refused");
    };
    assert!(
        problems
            .iter()
            .any(|d| d.to_string().contains("publishes no ports")),
        "{problems:?}"
    );
    let compose = compose.replace(
        "expose: [\"6379\"]",
        "ports: [\"16379:6379\"]\n    expose: [\"9121\"]",
    );
    let desired = load_texts(
        deployment,
        Path::new(DEP),
        &compose,
        Path::new(APP),
        &FakeResolver,
    )
    .expect("valid");
    let map = desired.route_map();
    let cache = &map.services["cache"];
    assert_eq!(cache.node, "198.18.0.2");
    assert_eq!(
        cache.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
        vec![6379, 9121]
    );
    assert!(cache.ports.iter().all(|p| p.relay.is_some()));
    assert!(flocker_wire::services::in_service_range(cache.address));
    // From web's node, cache's service ports lead to cache's node at their relay ports.
    let from_web = map.service_routes_for("198.18.0.1");
    let to_cache: Vec<_> = from_web
        .iter()
        .filter(|r| r.application == "cache")
        .collect();
    assert_eq!(to_cache.len(), 2);
    assert!(to_cache.iter().all(|r| matches!(
        &r.target,
        flocker_wire::RouteTarget::Node { address } if address == "198.18.0.2"
    )));
    // web's containers resolve `cache` and its link alias `redis` to cache's address.
    let routes = map.routes_for("198.18.0.1");
    let addresses = map
        .services
        .iter()
        .map(|(name, s)| (name.clone(), s.address))
        .collect();
    let entries = flocker_wire::services::hosts_entries(
        &desired.applications["web"],
        &addresses,
        |protocol, port| {
            routes
                .iter()
                .find(|r| r.external_port == port && r.protocol == protocol)
                .map(|r| r.application.clone())
        },
    );
    let line = entries
        .iter()
        .find(|e| e.address == cache.address)
        .expect("cache named");
    assert_eq!(line.names, vec!["cache".to_string(), "redis".to_string()]);
}
