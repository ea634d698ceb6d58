//! Planner tests: one readable check per case, then properties over random clusters.

use std::collections::{BTreeMap, BTreeSet};

use flocker_wire::{
    Application, ClusterState, ContainerState, DesiredState, Image, NodeState, PortMap,
    RestartPolicy, VolumeSpec,
};
use proptest::prelude::*;

use super::plan;
use super::simulate::{apply_plan, check_invariants, matches, realize};
use crate::render::plan_text;

const N1: &str = "198.18.0.11";
const N2: &str = "198.18.0.12";
const N3: &str = "198.18.0.13";

fn app(name: &str, external: u16, volume: bool) -> Application {
    Application {
        name: name.into(),
        image: Image {
            repository: name.into(),
            tag: "latest".into(),
        },
        ports: vec![PortMap {
            internal: 80,
            external,
        }],
        volume: volume.then(|| VolumeSpec {
            mountpoint: "/data".into(),
            maximum_size: None,
        }),
        environment: BTreeMap::new(),
        links: vec![],
        mem_limit: None,
        cpu_shares: None,
        restart_policy: RestartPolicy::Never,
    }
}

fn desired(apps: &[Application], placement: &[(&str, &[&str])]) -> DesiredState {
    DesiredState {
        applications: apps.iter().map(|a| (a.name.clone(), a.clone())).collect(),
        nodes: placement
            .iter()
            .map(|(node, names)| {
                let set: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
                (node.to_string(), set)
            })
            .collect(),
    }
}

/// Plans, checks the plan reaches the desired state safely, and compares its text.
fn check(desired: &DesiredState, current: &ClusterState, expect: &str) {
    let plan = plan(desired, current);
    assert_eq!(plan_text(&plan), expect);
    let mut state = current.clone();
    apply_plan(&plan, &mut state).expect("plan keeps the invariants");
    matches(desired, &state).expect("plan reaches the desired state");
    assert!(
        super::plan(desired, &state).is_empty(),
        "second plan is empty"
    );
}

#[test]
fn new_application_with_volume_on_an_empty_cluster() {
    let d = desired(&[app("redis", 6379, true)], &[(N1, &["redis"]), (N2, &[])]);
    check(
        &d,
        &ClusterState::default(),
        "phase 1/3: create-volumes
  198.18.0.11     create volume redis
phase 2/3: start
  198.18.0.11     start redis (redis:latest)
phase 3/3: routes
  198.18.0.11     set routes 6379 -> redis (local :80)
  198.18.0.12     set routes 6379 -> redis (on 198.18.0.11)
",
    );
}

#[test]
fn matching_cluster_plans_nothing() {
    let d = desired(&[app("redis", 6379, true)], &[(N1, &["redis"]), (N2, &[])]);
    check(
        &d,
        &realize(&d),
        "nothing to do: the cluster matches the configuration\n",
    );
}

#[test]
fn moved_with_volume_follows_the_migration_protocol() {
    let before = desired(&[app("redis", 6379, true)], &[(N1, &["redis"]), (N2, &[])]);
    let after = desired(&[app("redis", 6379, true)], &[(N1, &[]), (N2, &["redis"])]);
    check(
        &after,
        &realize(&before),
        "phase 1/6: pre-copy
  198.18.0.11     push volume redis to 198.18.0.12 (pre-copy, while running)
phase 2/6: stop
  198.18.0.11     stop redis
phase 3/6: final-push
  198.18.0.11     push volume redis to 198.18.0.12 (final, after stop)
phase 4/6: handoff
  198.18.0.11     hand volume redis over to 198.18.0.12
phase 5/6: start
  198.18.0.12     start redis (redis:latest)
phase 6/6: routes
  198.18.0.11     set routes 6379 -> redis (on 198.18.0.12)
  198.18.0.12     set routes 6379 -> redis (local :80)
",
    );
}

#[test]
fn moved_without_volume_is_stop_then_start() {
    let before = desired(&[app("web", 8080, false)], &[(N1, &["web"]), (N2, &[])]);
    let after = desired(&[app("web", 8080, false)], &[(N1, &[]), (N2, &["web"])]);
    check(
        &after,
        &realize(&before),
        "phase 1/3: stop
  198.18.0.11     stop web
phase 2/3: start
  198.18.0.12     start web (web:latest)
phase 3/3: routes
  198.18.0.11     set routes 8080 -> web (on 198.18.0.12)
  198.18.0.12     set routes 8080 -> web (local :80)
",
    );
}

#[test]
fn removed_application_stops_and_loses_its_routes_but_keeps_its_volume() {
    let before = desired(&[app("redis", 6379, true)], &[(N1, &["redis"]), (N2, &[])]);
    let after = desired(&[], &[(N1, &[]), (N2, &[])]);
    let current = realize(&before);
    check(
        &after,
        &current,
        "phase 1/2: stop
  198.18.0.11     stop redis
phase 2/2: routes
  198.18.0.11     remove all routes
  198.18.0.12     remove all routes
",
    );
}

#[test]
fn changed_configuration_restarts_in_place() {
    let before = desired(&[app("web", 8080, false)], &[(N1, &["web"])]);
    let mut changed = app("web", 8080, false);
    changed.image.tag = "2".into();
    changed.environment.insert("MODE".into(), "fast".into());
    let after = desired(&[changed], &[(N1, &["web"])]);
    check(
        &after,
        &realize(&before),
        "phase 1/1: start
  198.18.0.11     restart web in place with new configuration (web:2)
",
    );
}

#[test]
fn changed_ports_restart_and_reroute() {
    let before = desired(&[app("web", 8080, false)], &[(N1, &["web"]), (N2, &[])]);
    let after = desired(&[app("web", 9090, false)], &[(N1, &["web"]), (N2, &[])]);
    check(
        &after,
        &realize(&before),
        "phase 1/2: start
  198.18.0.11     restart web in place with new configuration (web:latest)
phase 2/2: routes
  198.18.0.11     set routes 9090 -> web (local :80)
  198.18.0.12     set routes 9090 -> web (on 198.18.0.11)
",
    );
}

#[test]
fn two_applications_swap_nodes() {
    let apps = [app("a", 7001, true), app("b", 7002, true)];
    let before = desired(&apps, &[(N1, &["a"]), (N2, &["b"])]);
    let after = desired(&apps, &[(N1, &["b"]), (N2, &["a"])]);
    check(
        &after,
        &realize(&before),
        "phase 1/6: pre-copy
  198.18.0.11     push volume a to 198.18.0.12 (pre-copy, while running)
  198.18.0.12     push volume b to 198.18.0.11 (pre-copy, while running)
phase 2/6: stop
  198.18.0.11     stop a
  198.18.0.12     stop b
phase 3/6: final-push
  198.18.0.11     push volume a to 198.18.0.12 (final, after stop)
  198.18.0.12     push volume b to 198.18.0.11 (final, after stop)
phase 4/6: handoff
  198.18.0.11     hand volume a over to 198.18.0.12
  198.18.0.12     hand volume b over to 198.18.0.11
phase 5/6: start
  198.18.0.11     start b (b:latest)
  198.18.0.12     start a (a:latest)
phase 6/6: routes
  198.18.0.11     set routes 7001 -> a (on 198.18.0.12), 7002 -> b (local :80)
  198.18.0.12     set routes 7001 -> a (local :80), 7002 -> b (on 198.18.0.11)
",
    );
}

#[test]
fn node_listing_nothing_gets_forwarding_routes_only() {
    let d = desired(&[app("web", 8080, false)], &[(N1, &["web"]), (N3, &[])]);
    let mut current = realize(&desired(&[app("web", 8080, false)], &[(N1, &["web"])]));
    current.nodes.insert(
        N3.into(),
        NodeState {
            address: N3.into(),
            ..NodeState::default()
        },
    );
    check(
        &d,
        &current,
        "phase 1/1: routes
  198.18.0.13     set routes 8080 -> web (on 198.18.0.11)
",
    );
}

#[test]
fn interrupted_handoff_is_finished_before_start() {
    let before = desired(&[app("redis", 6379, true)], &[(N1, &["redis"]), (N2, &[])]);
    let after = desired(&[app("redis", 6379, true)], &[(N1, &[]), (N2, &["redis"])]);
    // The source stopped, pushed, and recorded "handed to N2 at epoch 2", then crashed
    // before N2 recorded it.
    let mut current = realize(&before);
    let n1 = current.nodes.get_mut(N1).expect("n1");
    n1.containers.clear();
    n1.volumes[0].owner = N2.into();
    n1.volumes[0].epoch = 2;
    n1.volumes[0].snapshots = vec!["push-1".into()];
    let mut copy = n1.volumes[0].clone();
    copy.owner = N1.into();
    copy.epoch = 1;
    current.nodes.get_mut(N2).expect("n2").volumes.push(copy);
    check(
        &after,
        &current,
        "phase 1/3: handoff
  198.18.0.11     hand volume redis over to 198.18.0.12
phase 2/3: start
  198.18.0.12     start redis (redis:latest)
phase 3/3: routes
  198.18.0.11     set routes 6379 -> redis (on 198.18.0.12)
  198.18.0.12     set routes 6379 -> redis (local :80)
",
    );
}

#[test]
fn unknown_managed_container_is_stopped_and_stopped_app_restarted() {
    let d = desired(&[app("web", 8080, false)], &[(N1, &["web"])]);
    let mut current = realize(&d);
    let n1 = current.nodes.get_mut(N1).expect("n1");
    n1.containers[0].running = false;
    n1.containers.push(ContainerState {
        application: app("old", 9000, false),
        running: true,
        ip: None,
        volume_problem: None,
    });
    check(
        &d,
        &current,
        "phase 1/2: stop
  198.18.0.11     stop old
phase 2/2: start
  198.18.0.11     restart web in place with new configuration (web:latest)
",
    );
}

// ---- properties ----

const NODES: [&str; 3] = [N1, N2, N3];

/// Four applications with fixed ports; each desired state picks a node (or none) for each,
/// and one of two image tags.
fn arb_desired() -> impl Strategy<Value = DesiredState> {
    let names = ["a", "b", "c", "d"];
    proptest::collection::vec((0..4usize, any::<bool>()), 4).prop_map(move |choices| {
        let mut d = DesiredState::default();
        for node in NODES {
            d.nodes.insert(node.to_string(), BTreeSet::new());
        }
        for (i, (place, variant)) in choices.into_iter().enumerate() {
            let mut a = app(names[i], 7000 + i as u16, i % 2 == 0);
            if variant {
                a.image.tag = "v2".into();
            }
            d.applications.insert(a.name.clone(), a);
            if let Some(node) = NODES.get(place) {
                if let Some(apps) = d.nodes.get_mut(*node) {
                    apps.insert(names[i].to_string());
                }
            }
        }
        d
    })
}

proptest! {
    #[test]
    fn plans_reach_the_desired_state_safely(before in arb_desired(), after in arb_desired()) {
        let mut state = realize(&before);
        check_invariants(&state).map_err(TestCaseError::fail)?;
        let p = plan(&after, &state);
        apply_plan(&p, &mut state).map_err(TestCaseError::fail)?;
        matches(&after, &state).map_err(TestCaseError::fail)?;
        prop_assert!(plan(&after, &state).is_empty());
    }

    #[test]
    fn a_matching_cluster_plans_nothing(d in arb_desired()) {
        prop_assert!(plan(&d, &realize(&d)).is_empty());
    }

    #[test]
    fn a_chain_of_deployments_stays_safe(steps in proptest::collection::vec(arb_desired(), 1..5)) {
        let mut state = ClusterState::default();
        for d in &steps {
            let p = plan(d, &state);
            apply_plan(&p, &mut state).map_err(TestCaseError::fail)?;
            matches(d, &state).map_err(TestCaseError::fail)?;
        }
    }
}
