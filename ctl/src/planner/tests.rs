//! Planner tests: one readable check per case, then properties over random clusters.

use std::collections::{BTreeMap, BTreeSet};

use flocker_wire::{
    Application, ClusterState, ContainerState, DesiredState, Image, NodeState, PortMap,
    RestartPolicy, VolumeSpec,
};
use proptest::prelude::*;

use super::simulate::{
    apply_plan, apply_plan_checking, check_invariants, check_volumes, fence, matches, realize,
};
use super::{FailoverError, plan, plan_around};
use crate::render::{RouteView, plan_text};

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
            protocol: flocker_wire::Protocol::Tcp,
        }],
        volume: volume.then(|| VolumeSpec {
            mountpoint: "/data".into(),
            maximum_size: None,
        }),
        volumes: BTreeMap::new(),
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
        standby: BTreeMap::new(),
        files: BTreeMap::new(),
    }
}

/// Plans, checks the plan reaches the desired state safely, and compares its text.
fn check(desired: &DesiredState, current: &ClusterState, expect: &str) {
    let plan = plan(desired, current);
    assert_eq!(plan_text(&plan, &RouteView::new(desired, true)), expect);
    let mut state = current.clone();
    apply_plan(&plan, desired, &mut state).expect("plan keeps the invariants");
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
fn dependencies_start_in_waves_and_running_ones_are_not_waited_for() {
    let mut web = app("web", 80, false);
    web.depends_on = vec!["api".into()];
    let mut api = app("api", 81, false);
    api.depends_on = vec!["db".into(), "cache".into()];
    let apps = [web, api, app("db", 82, false), app("cache", 83, false)];
    let d = desired(&apps, &[(N1, &["web", "db"]), (N2, &["api", "cache"])]);
    let names = |plan: &flocker_wire::Plan| -> Vec<String> {
        plan.phases.iter().map(|p| p.name.clone()).collect()
    };
    let first = plan(&d, &ClusterState::default());
    assert_eq!(names(&first), ["start", "start-2", "start-3", "routes"]);
    let started_in = |plan: &flocker_wire::Plan, phase: &str| -> Vec<String> {
        plan.phases
            .iter()
            .filter(|p| p.name == phase)
            .flat_map(|p| p.actions.iter())
            .filter_map(|a| match &a.action {
                flocker_wire::Action::StartApplication { application } => {
                    Some(application.name.clone())
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(started_in(&first, "start"), ["db", "cache"]);
    assert_eq!(started_in(&first, "start-2"), ["api"]);
    assert_eq!(started_in(&first, "start-3"), ["web"]);

    // With db and cache already running, api starts at once and web after it.
    let mut state = ClusterState::default();
    apply_plan(&first, &d, &mut state).expect("plan keeps the invariants");
    for node in state.nodes.values_mut() {
        node.containers
            .retain(|c| c.application.name == "db" || c.application.name == "cache");
    }
    let second = plan(&d, &state);
    assert_eq!(started_in(&second, "start"), ["api"]);
    assert_eq!(started_in(&second, "start-2"), ["web"]);
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
        "phase 1/8: pre-copy
  198.18.0.11     push volume redis to 198.18.0.12 (pre-copy, while running)
phase 2/8: prepare
  198.18.0.12     create redis (redis:latest) without starting it, for the move's start
phase 3/8: hold
  198.18.0.12     before the stop: route redis (6379) here, holding new connections until it is ready
phase 4/8: switch-routes
  198.18.0.11     before the stop: route redis (6379) to 198.18.0.12
  198.18.0.12     before the stop: route redis (6379) here, holding new connections until it is ready
phase 5/8: stop
  198.18.0.11     stop redis
phase 6/8: final-push
  198.18.0.11     push volume redis to 198.18.0.12 (final, after stop, handing it over)
phase 7/8: start
  198.18.0.12     start redis (redis:latest)
phase 8/8: routes
  198.18.0.11     set routes 6379 -> redis (on 198.18.0.12)
  198.18.0.12     set routes 6379 -> redis (local :80)
",
    );
}

/// `app` with a further volume `NAME.logs` beside its main one.
fn app_with_two_volumes(name: &str, external: u16) -> Application {
    let mut a = app(name, external, true);
    a.volumes.insert(
        flocker_wire::further_volume_name(name, "logs"),
        VolumeSpec {
            mountpoint: "/logs".into(),
            maximum_size: None,
        },
    );
    a
}

#[test]
fn every_volume_of_an_application_moves_in_the_same_phases() {
    let before = desired(
        &[app_with_two_volumes("db", 5432)],
        &[(N1, &["db"]), (N2, &[])],
    );
    let after = desired(
        &[app_with_two_volumes("db", 5432)],
        &[(N1, &[]), (N2, &["db"])],
    );
    check(
        &after,
        &realize(&before),
        "phase 1/8: pre-copy
  198.18.0.11     push volume db to 198.18.0.12 (pre-copy, while running)
  198.18.0.11     push volume db.logs to 198.18.0.12 (pre-copy, while running)
phase 2/8: prepare
  198.18.0.12     create db (db:latest) without starting it, for the move's start
phase 3/8: hold
  198.18.0.12     before the stop: route db (5432) here, holding new connections until it is ready
phase 4/8: switch-routes
  198.18.0.11     before the stop: route db (5432) to 198.18.0.12
  198.18.0.12     before the stop: route db (5432) here, holding new connections until it is ready
phase 5/8: stop
  198.18.0.11     stop db
phase 6/8: final-push
  198.18.0.11     push volume db to 198.18.0.12 (final, after stop, handing it over)
  198.18.0.11     push volume db.logs to 198.18.0.12 (final, after stop, handing it over)
phase 7/8: start
  198.18.0.12     start db (db:latest)
phase 8/8: routes
  198.18.0.11     set routes 5432 -> db (on 198.18.0.12)
  198.18.0.12     set routes 5432 -> db (local :80)
",
    );
}

#[test]
fn a_new_application_gets_every_volume_created() {
    let after = desired(&[app_with_two_volumes("db", 5432)], &[(N1, &["db"])]);
    let p = plan(&after, &ClusterState::default());
    let created: Vec<&str> = p
        .phases
        .iter()
        .flat_map(|phase| &phase.actions)
        .filter_map(|a| match &a.action {
            flocker_wire::Action::CreateVolume { volume, .. } => Some(volume.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(created, ["db", "db.logs"]);
    let mut state = ClusterState::default();
    apply_plan(&p, &after, &mut state).expect("plan keeps the invariants");
    matches(&after, &state).expect("plan reaches the desired state");
}

#[test]
fn moved_without_volume_starts_before_the_old_one_retires() {
    let before = desired(&[app("web", 8080, false)], &[(N1, &["web"]), (N2, &[])]);
    let after = desired(&[app("web", 8080, false)], &[(N1, &[]), (N2, &["web"])]);
    check(
        &after,
        &realize(&before),
        "phase 1/3: start
  198.18.0.12     start web (web:latest)
phase 2/3: routes
  198.18.0.11     set routes 8080 -> web (on 198.18.0.12)
  198.18.0.12     set routes 8080 -> web (local :80)
phase 3/3: retire
  198.18.0.11     stop web
",
    );
}

#[test]
fn an_unhealthy_container_is_restarted_before_routes_lead_to_it() {
    // A move whose start failed: web runs unhealthy on N2, its old copy still on N1.
    let after = desired(&[app("web", 8080, false)], &[(N1, &[]), (N2, &["web"])]);
    let mut state = realize(&desired(
        &[app("web", 8080, false)],
        &[(N1, &["web"]), (N2, &[])],
    ));
    let mut failed = realize(&after);
    let mut unhealthy = failed.nodes.remove(N2).expect("n2");
    unhealthy.containers[0].health = Some(flocker_wire::Health::Unhealthy);
    state.nodes.insert(N2.to_string(), unhealthy);
    let p = plan(&after, &state);
    let text = plan_text(&p, &RouteView::new(&after, true));
    assert!(
        text.starts_with("phase 1/3: start\n  198.18.0.12     restart web"),
        "{text}"
    );
    assert!(
        text.contains("phase 3/3: retire\n  198.18.0.11     stop web"),
        "{text}"
    );
}

#[test]
fn a_start_that_fails_leaves_the_old_stateless_copy_serving() {
    let before = desired(&[app("web", 8080, false)], &[(N1, &["web"]), (N2, &[])]);
    let after = desired(&[app("web", 8080, false)], &[(N1, &[]), (N2, &["web"])]);
    let p = plan(&after, &realize(&before));
    // The deploy stops at the first failed phase: everything before `start` is all that runs.
    let before_start: Vec<&str> = p
        .phases
        .iter()
        .take_while(|phase| !phase.name.starts_with("start"))
        .map(|phase| phase.name.as_str())
        .collect();
    assert!(
        before_start.is_empty(),
        "nothing happens before the start: {before_start:?}"
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
        "phase 1/8: pre-copy
  198.18.0.11     push volume a to 198.18.0.12 (pre-copy, while running)
  198.18.0.12     push volume b to 198.18.0.11 (pre-copy, while running)
phase 2/8: prepare
  198.18.0.11     create b (b:latest) without starting it, for the move's start
  198.18.0.12     create a (a:latest) without starting it, for the move's start
phase 3/8: hold
  198.18.0.11     before the stop: route b (7002) here, holding new connections until it is ready
  198.18.0.12     before the stop: route a (7001) here, holding new connections until it is ready
phase 4/8: switch-routes
  198.18.0.11     before the stop: route a (7001) to 198.18.0.12; route b (7002) here, holding new connections until it is ready
  198.18.0.12     before the stop: route a (7001) here, holding new connections until it is ready; route b (7002) to 198.18.0.11
phase 5/8: stop
  198.18.0.11     stop a
  198.18.0.12     stop b
phase 6/8: final-push
  198.18.0.11     push volume a to 198.18.0.12 (final, after stop, handing it over)
  198.18.0.12     push volume b to 198.18.0.11 (final, after stop, handing it over)
phase 7/8: start
  198.18.0.11     start b (b:latest)
  198.18.0.12     start a (a:latest)
phase 8/8: routes
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

/// The final push reached N2 and made it the owner at epoch 2, but its answer never came
/// back (a partition): N1 still records itself owner at epoch 1. Found by the fault matrix
/// (`final-push:partition`): nothing made N1 record the handoff, so two copies claimed the
/// volume and a later move back to N1 was refused.
fn pushed_handoff_without_answer(epoch_gap: u64) -> (DesiredState, ClusterState) {
    let before = desired(&[app("redis", 6379, true)], &[(N1, &["redis"]), (N2, &[])]);
    let after = desired(&[app("redis", 6379, true)], &[(N1, &[]), (N2, &["redis"])]);
    // Routes still lead to N1, as before the move.
    let mut current = realize(&before);
    let n1 = current.nodes.get_mut(N1).expect("n1");
    n1.containers.clear();
    n1.volumes[0].epoch = 1;
    n1.volumes[0].snapshots = vec!["push-1".into()];
    let mut copy = n1.volumes[0].clone();
    copy.owner = N2.into();
    copy.epoch = 1 + epoch_gap;
    let n2 = current.nodes.get_mut(N2).expect("n2");
    n2.volumes.push(copy);
    n2.containers.push(ContainerState {
        application: app("redis", 6379, true),
        running: true,
        ip: None,
        volume_problem: None,
        health: None,
        health_output: None,
    });
    (after, current)
}

#[test]
fn a_pushed_handoff_whose_answer_was_lost_is_recorded_by_the_source() {
    let (after, current) = pushed_handoff_without_answer(1);
    check(
        &after,
        &current,
        "phase 1/2: finish-handoff
  198.18.0.11     hand volume redis over to 198.18.0.12
phase 2/2: routes
  198.18.0.11     set routes 6379 -> redis (on 198.18.0.12)
  198.18.0.12     set routes 6379 -> redis (local :80)
",
    );
}

#[test]
fn a_copy_left_by_a_failover_is_not_handed_off_but_fenced() {
    // A failover promotes two epochs up: the old owner's copy may hold writes the new owner
    // lacks, so only fencing (which sets it aside) may touch it.
    let (after, current) = pushed_handoff_without_answer(2);
    // Two copies claim the volume until N1's agent fences its own, so only the plan is
    // checked here, not a simulation of it.
    let plan = plan(&after, &current);
    assert_eq!(
        plan_text(&plan, &RouteView::new(&after, true)),
        "phase 1/1: routes
  198.18.0.11     set routes 6379 -> redis (on 198.18.0.12)
  198.18.0.12     set routes 6379 -> redis (local :80)
"
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
        health: None,
        health_output: None,
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
            // a and c keep data, c in two volumes.
            let mut a = match i {
                2 => app_with_two_volumes(names[i], 7000 + i as u16),
                _ => app(names[i], 7000 + i as u16, i % 2 == 0),
            };
            if variant {
                a.image.tag = "v2".into();
            }
            d.applications.insert(a.name.clone(), a);
            if let Some(node) = NODES.get(place)
                && let Some(apps) = d.nodes.get_mut(*node)
            {
                apps.insert(names[i].to_string());
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
        apply_plan(&p, &after, &mut state).map_err(TestCaseError::fail)?;
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
            apply_plan(&p, d, &mut state).map_err(TestCaseError::fail)?;
            matches(d, &state).map_err(TestCaseError::fail)?;
        }
    }
}

// ---- failover ----

/// A cluster where `redis` (with a volume) runs on N1 with a replica on N2 holding
/// `push-0000000007-1000`, and `web` (no volume) runs on N3.
fn replicated() -> (DesiredState, ClusterState) {
    let d = desired(
        &[app("redis", 6379, true), app("web", 80, false)],
        &[(N1, &["redis"]), (N2, &[]), (N3, &["web"])],
    );
    let mut state = realize(&d);
    let snapshots = vec!["push-0000000007-1000".to_string()];
    for n in state.nodes.values_mut() {
        for v in &mut n.volumes {
            v.snapshots = snapshots.clone();
        }
    }
    let mut replica = state.nodes[N1].volumes[0].clone();
    replica.snapshots = snapshots;
    state
        .nodes
        .entry(N2.into())
        .or_default()
        .volumes
        .push(replica);
    (d, state)
}

fn without(state: &ClusterState, dead: &str) -> ClusterState {
    let mut s = state.clone();
    s.nodes.remove(dead);
    s
}

#[test]
fn a_dead_unrelated_node_leaves_the_rest_to_plan() {
    let (mut d, state) = replicated();
    d.nodes.get_mut(N3).expect("n3").remove("web");
    d.nodes.get_mut(N1).expect("n1").insert("web".into());
    let dead: BTreeSet<String> = [N2.to_string()].into();
    let planned = plan_around(&d, &without(&state, N2), &dead, false).expect("plan");
    assert!(planned.blocked.is_empty(), "{:?}", planned.blocked);
    assert_eq!(planned.stale_routes, vec![N2.to_string()]);
    assert!(
        planned
            .plan
            .phases
            .iter()
            .all(|p| p.actions.iter().all(|a| a.node != N2))
    );
    let mut after = without(&state, N2);
    apply_plan(&planned.plan, &planned.effective, &mut after).expect("safe");
    assert!(after.nodes[N1].container("web").is_some());
}

/// A move onto a node that does not answer is blocked and the application stays where it
/// runs; one that runs nowhere (its container stopped) is left alone as unknown.
#[test]
fn a_move_onto_a_dead_node_keeps_the_application_where_it_runs() {
    let (mut d, state) = replicated();
    d.nodes.get_mut(N3).expect("n3").remove("web");
    d.nodes.get_mut(N2).expect("n2").insert("web".into());
    let dead: BTreeSet<String> = [N2.to_string()].into();
    let live = without(&state, N2);
    let planned = plan_around(&d, &live, &dead, false).expect("plan");
    assert_eq!(planned.blocked.len(), 1, "{:?}", planned.blocked);
    assert_eq!(planned.blocked[0].application, "web");
    assert!(planned.effective.nodes[N3].contains("web"));
    assert!(planned.unknown.is_empty());
    assert!(
        planned
            .plan
            .phases
            .iter()
            .all(|p| p.actions.is_empty() || p.actions.iter().all(|a| a.node != N3))
    );

    let mut stopped = live.clone();
    for c in &mut stopped.nodes.get_mut(N3).expect("n3").containers {
        c.running = false;
    }
    let planned = plan_around(&d, &stopped, &dead, false).expect("plan");
    assert!(planned.blocked.is_empty(), "{:?}", planned.blocked);
    assert_eq!(planned.unknown, vec!["web".to_string()]);
}

#[test]
fn moving_off_a_dead_owner_needs_failover_and_then_promotes_two_epochs_up() {
    let (mut d, state) = replicated();
    d.nodes.get_mut(N1).expect("n1").remove("redis");
    d.nodes.get_mut(N2).expect("n2").insert("redis".into());
    let dead: BTreeSet<String> = [N1.to_string()].into();
    let reachable = without(&state, N1);

    let refused = plan_around(&d, &reachable, &dead, false).expect("plan");
    assert_eq!(refused.blocked.len(), 1);
    assert!(
        refused.blocked[0].reason.contains("--failover"),
        "{:?}",
        refused.blocked
    );
    assert!(refused.plan.phases.iter().all(|p| {
        p.actions.iter().all(|a| !matches!(
        &a.action,
        flocker_wire::Action::StartApplication { application } if application.name == "redis"
    ))
    }));

    let planned = plan_around(&d, &reachable, &dead, true).expect("plan");
    assert_eq!(planned.promotions.len(), 1);
    let p = &planned.promotions[0];
    assert_eq!((p.node.as_str(), p.epoch), (N2, 3));
    assert_eq!(p.snapshot_time_ms, Some(1000));
    let text = plan_text(&planned.plan, &RouteView::new(&planned.effective, false));
    assert!(text.starts_with("phase 1/"), "{text}");
    assert!(text.contains("failover\n  198.18.0.12     promote this node's replica of volume redis to owner at epoch 3"), "{text}");
    let mut after = reachable.clone();
    apply_plan(&planned.plan, &planned.effective, &mut after).expect("safe");
    assert!(
        after.nodes[N2]
            .container("redis")
            .is_some_and(|c| c.running)
    );
    assert_eq!(after.volume_owner("redis"), Some(N2));
}

#[test]
fn failover_without_a_replica_refuses_everything() {
    let (mut d, mut state) = replicated();
    state.nodes.get_mut(N2).expect("n2").volumes.clear();
    d.nodes.get_mut(N1).expect("n1").remove("redis");
    d.nodes.get_mut(N3).expect("n3").insert("redis".into());
    let dead: BTreeSet<String> = [N1.to_string()].into();
    assert_eq!(
        plan_around(&d, &without(&state, N1), &dead, true),
        Err(FailoverError::NoReplica {
            application: "redis".into(),
            owner: N1.into()
        })
    );
}

#[test]
fn failover_to_a_node_without_the_replica_promotes_then_moves() {
    let (mut d, state) = replicated();
    d.nodes.get_mut(N1).expect("n1").remove("redis");
    d.nodes.get_mut(N3).expect("n3").insert("redis".into());
    let dead: BTreeSet<String> = [N1.to_string()].into();
    let planned = plan_around(&d, &without(&state, N1), &dead, true).expect("plan");
    let names: Vec<&str> = planned
        .plan
        .phases
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "failover",
            "hold",
            "switch-routes",
            "final-push",
            "start",
            "routes"
        ]
    );
    let mut after = without(&state, N1);
    apply_plan(&planned.plan, &planned.effective, &mut after).expect("safe");
    assert_eq!(after.volume_owner("redis"), Some(N3));
}

#[test]
fn the_returning_owner_is_fenced_and_one_owner_remains() {
    let (mut d, state) = replicated();
    d.nodes.get_mut(N1).expect("n1").remove("redis");
    d.nodes.get_mut(N2).expect("n2").insert("redis".into());
    let dead: BTreeSet<String> = [N1.to_string()].into();
    let planned = plan_around(&d, &without(&state, N1), &dead, true).expect("plan");
    let mut after = without(&state, N1);
    apply_plan(&planned.plan, &planned.effective, &mut after).expect("safe");
    // N1 comes back as it was: still thinking it owns redis, with redis running.
    after.nodes.insert(N1.into(), state.nodes[N1].clone());
    fence(&mut after);
    check_invariants(&after).expect("one owner after fencing");
    assert!(after.nodes[N1].container("redis").is_none());
    let p = plan(&d, &after);
    apply_plan(&p, &d, &mut after).expect("safe");
    matches(&d, &after).expect("the next deploy converges");
}

proptest! {
    /// Any deployment with any one node dead and failover asked for: the plan keeps the
    /// invariants on the reachable nodes, promotes only to outrank every copy, never loses a
    /// copy, and after the dead node returns and fences itself there is one owner per volume.
    #[test]
    fn failover_and_fencing_keep_one_owner(
        before in arb_desired(),
        after in arb_desired(),
        dead in 0..3usize,
        replica_on in 0..3usize,
    ) {
        let mut state = realize(&before);
        // Every volume has one push snapshot and, where possible, a replica.
        let volumes: Vec<(String, String)> = state.nodes.iter()
            .flat_map(|(a, n)| n.volumes.iter().map(move |v| (a.clone(), v.name.clone())))
            .collect();
        for (owner, name) in &volumes {
            let mut copy = state.nodes[owner].volume(name).cloned().expect("copy");
            copy.snapshots = vec!["push-1".into()];
            if let Some(v) = state.nodes.get_mut(owner).and_then(|n| n.volumes.iter_mut().find(|v| &v.name == name)) {
                v.snapshots = copy.snapshots.clone();
            }
            let to = NODES[replica_on];
            if to != owner {
                state.nodes.entry(to.to_string()).or_default().volumes.push(copy);
            }
        }
        let epochs_before: BTreeMap<String, u64> = volumes.iter()
            .filter_map(|(_, n)| state.volume_record(n).map(|(_, r)| (n.clone(), r.epoch)))
            .collect();
        let dead = NODES[dead].to_string();
        let unreachable: BTreeSet<String> = [dead.clone()].into();
        let mut live = without(&state, &dead);
        let planned = match plan_around(&after, &live, &unreachable, true) {
            Ok(p) => p,
            Err(FailoverError::NoReplica { application, .. }) => {
                prop_assert!(live.nodes.values().all(|n| n.volume(&application).is_none()));
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(e.to_string())),
        };
        prop_assert!(planned.plan.phases.iter().all(|p| p.actions.iter().all(|a| a.node != dead)));
        apply_plan(&planned.plan, &planned.effective, &mut live).map_err(TestCaseError::fail)?;
        live.nodes.insert(dead.clone(), state.nodes.get(&dead).cloned().unwrap_or_default());
        fence(&mut live);
        // Stateless applications may run twice until the next deploy; volumes never.
        check_volumes(&live).map_err(TestCaseError::fail)?;
        for (name, epoch) in &epochs_before {
            let now = live.volume_record(name).map(|(_, r)| r.epoch);
            prop_assert!(now.is_some_and(|e| e >= *epoch), "{name}: epoch {epoch} -> {now:?}");
        }
        // The next deploy, with every node back, converges safely.
        let p = plan(&after, &live);
        apply_plan_checking(&p, &after, &mut live, check_volumes).map_err(TestCaseError::fail)?;
        matches(&after, &live).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn a_new_standby_alone_reaches_the_owner_and_then_nothing_is_left() {
    let before = desired(&[app("redis", 6379, true)], &[(N1, &["redis"]), (N2, &[])]);
    let mut after = before.clone();
    after.standby.insert(
        "redis".into(),
        flocker_wire::Standby {
            nodes: vec![N2.into()],
            interval_ms: 1_000,
        },
    );
    check(
        &after,
        &realize(&before),
        "phase 1/1: standby
  198.18.0.11     replicate redis to 198.18.0.12 every 1000 ms
",
    );
    // Moving the application moves its schedule with it.
    let mut moved = after.clone();
    moved.standby.clear();
    moved.nodes.get_mut(N1).expect("n1").remove("redis");
    moved.nodes.get_mut(N2).expect("n2").insert("redis".into());
    let mut state = realize(&after);
    let p = plan(&moved, &state);
    assert!(
        plan_text(&p, &RouteView::new(&moved, false))
            .contains("198.18.0.11     replicate nothing (no standby)"),
        "{}",
        plan_text(&p, &RouteView::new(&moved, false))
    );
    apply_plan(&p, &moved, &mut state).expect("safe");
    matches(&moved, &state).expect("converged");
}

/// An application whose only port is exposed publishes nothing, yet every node must learn
/// its service address: the route map carries services, so nodes that report no version
/// are told to follow it even when their (empty) port tables already match.
#[test]
fn services_alone_send_the_route_map_to_every_node() {
    let mut cache = app("cache", 6379, false);
    cache.ports.clear();
    cache.container.expose = vec![6379];
    let want = desired(&[cache], &[(N1, &["cache"]), (N2, &[])]);
    let plan = plan(&want, &ClusterState::default());
    let following: BTreeSet<&str> = plan
        .phases
        .iter()
        .flat_map(|p| &p.actions)
        .filter(|a| matches!(a.action, flocker_wire::Action::FollowRoutes { .. }))
        .map(|a| a.node.as_str())
        .collect();
    assert_eq!(following, [N1, N2].into_iter().collect());
    assert!(!want.route_map().services.is_empty());
}

#[test]
fn only_a_move_with_volumes_switches_routes_before_the_stop() {
    let stateless = app("web", 8080, false);
    let stateful = app("db", 6379, true);
    let before = desired(
        &[stateless.clone(), stateful.clone()],
        &[(N1, &["web", "db"]), (N2, &[]), (N3, &[])],
    );
    let web_moves = desired(
        &[stateless.clone(), stateful.clone()],
        &[(N1, &["db"]), (N2, &["web"]), (N3, &[])],
    );
    let plan_web = plan(&web_moves, &realize(&before));
    assert!(
        plan_web.phases.iter().all(|p| p.name != "switch-routes"),
        "make before break: the old copy serves until the routes phase"
    );
    let db_moves = desired(
        &[stateless, stateful],
        &[(N1, &["web"]), (N2, &["db"]), (N3, &[])],
    );
    let plan_db = plan(&db_moves, &realize(&before));
    let names: Vec<&str> = plan_db.phases.iter().map(|p| p.name.as_str()).collect();
    let hold = names.iter().position(|n| *n == "hold");
    let switch = names.iter().position(|n| *n == "switch-routes");
    let stop = names.iter().position(|n| *n == "stop");
    assert!(
        hold.is_some() && hold < switch && switch < stop,
        "the target holds, then every node switches, before the stop: {names:?}"
    );
    let holding: Vec<&str> = plan_db
        .phases
        .iter()
        .filter(|p| p.name == "hold")
        .flat_map(|p| p.actions.iter().map(|a| a.node.as_str()))
        .collect();
    assert_eq!(holding, [N2], "only the node db moves to holds first");
    // Every node switches, and every node then follows the map again.
    for phase in ["switch-routes", "routes"] {
        let nodes: Vec<&str> = plan_db
            .phases
            .iter()
            .filter(|p| p.name == phase)
            .flat_map(|p| p.actions.iter().map(|a| a.node.as_str()))
            .collect();
        assert_eq!(nodes, [N1, N2, N3], "{phase}");
    }
    let moved = plan_db
        .phases
        .iter()
        .flat_map(|p| &p.actions)
        .find_map(|a| match &a.action {
            flocker_wire::Action::SwitchRoutes { moves } => Some(moves.clone()),
            _ => None,
        })
        .expect("a switch");
    assert_eq!(moved.len(), 1);
    assert_eq!(
        (moved[0].application.as_str(), moved[0].node.as_str()),
        ("db", N2)
    );
    let mut state = realize(&before);
    apply_plan(&plan_db, &db_moves, &mut state).expect("safe");
    matches(&db_moves, &state).expect("reaches the desired state");
    assert!(plan(&db_moves, &state).is_empty());
}
