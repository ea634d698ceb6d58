//! Runs the built `flockerctl` binary on real files: exit codes, locations in messages, and
//! plans in both output forms.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn flockerctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flockerctl"))
        .args(args)
        .current_dir(workspace())
        .output()
        .expect("run flockerctl")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write file");
    path.display().to_string()
}

const APPS: &str = "\
version: 1
applications:
  redis:
    image: redis-flocker
    ports:
      - internal: 6379
        external: 6379
    volume:
      mountpoint: /data
";

const DEPLOY: &str = "\
version: 1
nodes:
  198.18.0.11: [redis]
  198.18.0.12: []
";

#[test]
fn valid_files_exit_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = write(dir.path(), "deployment.yml", DEPLOY);
    let a = write(dir.path(), "application.yml", APPS);
    let out = flockerctl(&["validate", &d, &a]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("1 application(s) on 2 node(s)"));
}

#[test]
fn a_string_port_is_reported_with_its_line_and_exit_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = write(dir.path(), "deployment.yml", DEPLOY);
    let a = write(
        dir.path(),
        "application.yml",
        &APPS.replace("external: 6379", "external: \"6379\""),
    );
    let out = flockerctl(&["validate", &d, &a]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("{a}:7:")),
        "location of the external port in {stderr}"
    );
    assert!(stderr.contains("redis/ports[0]/external"), "{stderr}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = write(
        dir.path(),
        "deployment.yml",
        "version: 1\nnodes:\n  198.18.0.11: [redis, ghost]\n",
    );
    let a = write(
        dir.path(),
        "application.yml",
        &APPS
            .replace("external: 6379", "external: 70000")
            .replace("/data", "data"),
    );
    let out = flockerctl(&["validate", &d, &a]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let located: Vec<&str> = stderr.lines().filter(|l| l.contains(".yml:")).collect();
    assert!(located.len() >= 3, "three problems expected in {stderr}");
    assert!(stderr.contains("ghost"), "{stderr}");
}

#[test]
fn a_missing_file_is_a_usage_error() {
    let out = flockerctl(&[
        "validate",
        "/nonexistent/deployment.yml",
        "/nonexistent/app.yml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/"));
}

#[test]
fn files_in_the_wrong_order_are_named_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = write(dir.path(), "deployment.yml", DEPLOY);
    let a = write(dir.path(), "application.yml", APPS);
    let out = flockerctl(&["validate", &a, &d]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).to_lowercase().contains("order"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn no_arguments_is_a_usage_error_not_a_panic() {
    let out = flockerctl(&["validate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!text(&out.stderr).contains("panicked"));
}

#[test]
fn plan_on_an_empty_cluster_creates_starts_and_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = write(dir.path(), "deployment.yml", DEPLOY);
    let a = write(dir.path(), "application.yml", APPS);
    let out = flockerctl(&["plan", &d, &a]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("create volume redis"), "{stdout}");
    assert!(
        stdout.contains("start redis (redis-flocker:latest)"),
        "{stdout}"
    );
    // Routes as one summary line per node by default...
    assert!(stdout.contains("(1 local, 0 forwarded)"), "{stdout}");
    assert!(stdout.contains("(0 local, 1 forwarded)"), "{stdout}");
    assert!(!stdout.contains("6379 -> redis"), "{stdout}");
    // ...and each node's whole table on request, in text and JSON.
    let out = flockerctl(&["plan", &d, &a, "--route-tables"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("6379 -> redis (on 198.18.0.11)"),
        "{stdout}"
    );
    let out = flockerctl(&["plan", &d, &a, "--route-tables", "--output", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json plan");
    assert_eq!(
        plan["route_tables"]["198.18.0.12"][0]["target"],
        serde_json::json!({ "kind": "node", "address": "198.18.0.11" })
    );
}

#[test]
fn plan_json_from_a_state_file_moves_the_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moved = write(
        dir.path(),
        "deployment.yml",
        "version: 1\nnodes:\n  198.18.0.11: []\n  198.18.0.12: [redis]\n",
    );
    let a = write(dir.path(), "application.yml", APPS);
    let d = write(dir.path(), "before.yml", DEPLOY);
    // The state before the move is what a cluster matching `before.yml` reports: take the
    // start action's application from the plan for an empty cluster.
    let first = flockerctl(&["plan", &d, &a, "--output", "json"]);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&first.stdout).expect("json plan");
    let app = plan["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .flat_map(|p| p["actions"].as_array().cloned().unwrap_or_default())
        .find(|a| a["action"] == "start-application")
        .expect("a start action")["application"]
        .clone();
    let state = serde_json::json!({ "nodes": {
        "198.18.0.11": {
            "address": "198.18.0.11",
            "containers": [{ "application": app, "running": true }],
            "volumes": [{ "name": "redis", "owner": "198.18.0.11", "epoch": 1, "snapshots": [] }],
            "routes": [{ "external_port": 6379, "application": "redis",
                         "target": { "kind": "local", "internal_port": 6379 } }]
        },
        "198.18.0.12": { "address": "198.18.0.12", "routes": [
            { "external_port": 6379, "application": "redis",
              "target": { "kind": "node", "address": "198.18.0.11" } }] }
    }});
    let s = write(dir.path(), "state.json", &state.to_string());
    let out = flockerctl(&["plan", &moved, &a, "--state", &s, "--output", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json plan");
    let names: Vec<&str> = plan["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "pre-copy",
            "prepare",
            "hold",
            "switch-routes",
            "stop",
            "final-push",
            "start",
            "routes"
        ]
    );
}

#[test]
fn a_broken_state_file_is_a_usage_error_with_its_location() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = write(dir.path(), "deployment.yml", DEPLOY);
    let a = write(dir.path(), "application.yml", APPS);
    let s = write(dir.path(), "state.json", "{\"nodes\": [1, 2]}");
    let out = flockerctl(&["plan", &d, &a, "--state", &s]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(&format!("{s}:1:")));
}
