//! The rolling update on the in-memory cloud, on a paused clock: ordering, the leader last,
//! the max-unavailable invariant at every step (over many generated clusters), failures that
//! stop the roll, resuming after an interrupt, nodes failing on their own, throttling.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cps_orchestrate::backoff::mix;
use cps_orchestrate::roll::{
    Action, ClusterChecks, NoChecks, RollClouds, RollEvent, RollOutcome, RollReport, RollSettings,
    Stop, Targets, abandon, observe, plan, run, snapshot,
};
use cps_provider::memory::{
    Boot, DESCRIBE_AUTO_SCALING_GROUPS, DESCRIBE_INSTANCE_REFRESHES, DESCRIBE_LAUNCH_TEMPLATES,
    Fault, LifecycleEvent, MemoryCloud, RESUME_PROCESSES, SUSPEND_PROCESSES,
    TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP, Timing,
};
use cps_provider::{GroupInstance, LaunchSource, LifecycleResult, ScalingGroup, Tags};

const AZ: &str = "us-east-1a";
const TEMPLATE: &str = "lt-0123456789abcdef0";
const HOOK: &str = "cps-launch";

fn group_name(node: usize) -> String {
    format!("kafka-node-{node}")
}

/// `n` single-instance groups tagged as one cluster, launching `$Latest` of one template, each
/// with a launch hook; every node InService on version 1. Then version 2 is published.
fn cluster(n: usize, boot: Duration) -> MemoryCloud {
    let cloud = MemoryCloud::new(Timing {
        latency: Duration::from_millis(50),
        ..Timing::default()
    });
    cloud.with(|w| {
        w.add_template(TEMPLATE, "kafka");
        for node in 1..=n {
            let tags = Tags::from([
                ("cps:cluster".to_string(), "kafka".to_string()),
                ("cps:node-id".to_string(), node.to_string()),
            ]);
            w.add_fleet_group(&group_name(node), &tags, AZ, 1, TEMPLATE, "$Latest");
            w.add_launch_hook(
                &group_name(node),
                HOOK,
                Duration::from_secs(600),
                LifecycleResult::Abandon,
            );
        }
        w.new_template_version(TEMPLATE, false);
        w.on_launch(move |_, _| Boot::Continue(boot));
    });
    cloud
}

fn settings() -> RollSettings {
    let mut s = RollSettings::new(Targets::Cluster {
        tag: "cps:cluster".into(),
        name: "kafka".into(),
    });
    s.timeout = Duration::from_secs(300);
    s
}

fn clouds(cloud: &MemoryCloud) -> RollClouds<'_> {
    RollClouds {
        groups: cloud,
        templates: cloud,
    }
}

/// Collects progress events.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<RollEvent>>>);

impl Events {
    fn push(&self, e: RollEvent) {
        self.0.lock().unwrap().push(e);
    }
    fn terminated(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                RollEvent::Terminating { node, .. } => Some(node.clone()),
                _ => None,
            })
            .collect()
    }
}

async fn roll(
    cloud: &MemoryCloud,
    s: &RollSettings,
    checks: &dyn ClusterChecks,
) -> (RollReport, Events) {
    let events = Events::default();
    let sink = events.clone();
    let stop = Stop::new();
    let report = run(clouds(cloud), checks, s, &stop, &move |e| sink.push(e))
        .await
        .expect("no cloud error");
    (report, events)
}

fn max_unavailable_seen(cloud: &MemoryCloud) -> usize {
    cloud.with(|w| w.samples().iter().map(|s| s.unavailable).max().unwrap_or(0))
}

/// (node, version) after a fresh look.
async fn versions(cloud: &MemoryCloud) -> Vec<(String, String)> {
    let snap = observe(clouds(cloud), &settings()).await.unwrap();
    snap.nodes
        .iter()
        .map(|n| (n.node.clone(), n.current.clone()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn every_outdated_node_is_replaced_one_at_a_time_in_node_order() {
    let cloud = cluster(3, Duration::from_secs(40));
    let before: Vec<Vec<String>> = (1..=3)
        .map(|n| cloud.with(|w| w.group_instances(&group_name(n))))
        .collect();
    let (report, events) = roll(&cloud, &settings(), &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["1", "2", "3"]);
    assert_eq!(report.replaced, ["1", "2", "3"]);
    // $Latest is resolved once, when the targets are fixed; later looks read the groups only.
    assert_eq!(cloud.calls().count(DESCRIBE_LAUNCH_TEMPLATES), 1);
    assert_eq!(max_unavailable_seen(&cloud), 1, "never two out at once");
    for (n, old) in before.iter().enumerate() {
        let now = cloud.with(|w| w.group_instances(&group_name(n + 1)));
        assert_eq!(now.len(), 1);
        assert_ne!(&now, old, "node {} has a new instance", n + 1);
    }
    let now = versions(&cloud).await;
    assert!(now.iter().all(|(_, v)| v == "kafka v2"), "{now:?}");
    assert_eq!(
        cloud
            .calls()
            .count(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP),
        3
    );
    // Each replacement is noticed within a poll interval of its boot: 40 s boots, 1 s polls.
    let replaced: Vec<Duration> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            RollEvent::Replaced { took, .. } => Some(*took),
            _ => None,
        })
        .collect();
    assert_eq!(replaced.len(), 3);
    assert!(
        replaced.iter().all(|t| *t <= Duration::from_millis(41_200)),
        "{replaced:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_up_to_date_cluster_is_left_alone() {
    let cloud = cluster(3, Duration::from_secs(10));
    cloud.with(|w| {
        for n in 1..=3 {
            w.set_group_template(&group_name(n), TEMPLATE, "1");
        }
    });
    let (report, events) = roll(&cloud, &settings(), &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::UpToDate);
    assert!(events.terminated().is_empty());
    assert_eq!(
        cloud
            .calls()
            .count(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn latest_and_default_are_resolved_before_comparing() {
    let cloud = cluster(3, Duration::from_secs(10));
    // Node 1's group launches $Default (still version 1), node 2 launches "2", node 3 "$Latest".
    cloud.with(|w| {
        w.set_group_template(&group_name(1), TEMPLATE, "$Default");
        w.set_group_template(&group_name(2), TEMPLATE, "2");
    });
    let snap = observe(clouds(&cloud), &settings()).await.unwrap();
    let p = plan(&snap, &settings());
    let actions: Vec<(&str, Action)> = p
        .rows
        .iter()
        .map(|r| (r.node.node.as_str(), r.action))
        .collect();
    assert_eq!(
        actions,
        [
            ("1", Action::Keep),
            ("2", Action::Replace),
            ("3", Action::Replace)
        ]
    );
    assert_eq!(p.rows[0].node.target, "kafka v1 ($Default)");
    assert_eq!(p.rows[2].node.target, "kafka v2 ($Latest)");
    assert_eq!(cloud.calls().count(DESCRIBE_LAUNCH_TEMPLATES), 1);
}

struct Leader(&'static str);

#[async_trait]
impl ClusterChecks for Leader {
    async fn leader(&self) -> Result<Option<String>, String> {
        Ok(Some(self.0.into()))
    }
    async fn healthy(&self, _node: &str) -> Result<(), String> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_leader_goes_last() {
    let cloud = cluster(5, Duration::from_secs(20));
    let (report, events) = roll(&cloud, &settings(), &Leader("2")).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["1", "3", "4", "5", "2"]);
}

#[tokio::test(start_paused = true)]
async fn a_replacement_that_never_gets_healthy_stops_the_roll_with_the_rest_untouched() {
    let cloud = cluster(3, Duration::from_secs(20));
    // Node 2's new instances fail their boot (the hook abandons them): the group keeps trying.
    cloud.with(|w| {
        w.on_launch(|group, _| {
            if group == "kafka-node-2" {
                Boot::Abandon(Duration::from_secs(15))
            } else {
                Boot::Continue(Duration::from_secs(20))
            }
        })
    });
    let node3 = cloud.with(|w| w.group_instances(&group_name(3)));
    let mut s = settings();
    s.timeout = Duration::from_secs(120);
    let (report, events) = roll(&cloud, &s, &NoChecks).await;
    match &report.outcome {
        RollOutcome::Stopped { node, reason } => {
            assert_eq!(node.as_deref(), Some("2"));
            assert!(
                reason.contains("not InService and Healthy after 120s"),
                "{reason}"
            );
        }
        other => panic!("expected a stop, got {other:?}"),
    }
    assert_eq!(events.terminated(), ["1", "2"]);
    assert_eq!(report.replaced, ["1"]);
    assert_eq!(report.remaining, ["2", "3"]);
    assert_eq!(
        cloud.with(|w| w.group_instances(&group_name(3))),
        node3,
        "node 3 untouched"
    );
    // Still a majority: nodes 1 and 3 in service.
    let snap = observe(clouds(&cloud), &settings()).await.unwrap();
    assert_eq!(snap.unavailable(), 1);
    assert!(
        report
            .recovery
            .iter()
            .any(|r| r.contains("Re-run the same `cps-roll run`"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_replacement_stuck_in_pending_wait_can_be_abandoned() {
    let cloud = cluster(3, Duration::from_secs(20));
    cloud.with(|w| {
        w.on_launch(|group, _| {
            if group == "kafka-node-1" {
                Boot::Hang
            } else {
                Boot::Continue(Duration::from_secs(20))
            }
        })
    });
    let mut s = settings();
    s.timeout = Duration::from_secs(60);
    let (report, _) = roll(&cloud, &s, &NoChecks).await;
    assert!(matches!(report.outcome, RollOutcome::Stopped { .. }));
    let step = report
        .recovery
        .iter()
        .find(|r| r.contains("cps-roll abandon --asg kafka-node-1 --instance"))
        .expect("the recovery names the abandon command");
    let stuck = cloud.with(|w| w.group_instances(&group_name(1)));
    assert!(step.contains(&stuck[0]));

    // abandon refuses an instance that is not waiting, then ends the waiting one.
    let node2 = cloud.with(|w| w.group_instances(&group_name(2)));
    let err = abandon(
        &cloud,
        &cloud,
        &group_name(2),
        Some(&node2[0]),
        None,
        s.retry,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("InService, not Pending:Wait"),
        "{err}"
    );
    let done = abandon(&cloud, &cloud, &group_name(1), None, None, s.retry)
        .await
        .unwrap();
    assert_eq!(done, (stuck[0].clone(), HOOK.to_string()));
    // The group launched another instance in place of the abandoned one.
    let now = cloud.with(|w| w.group_instances(&group_name(1)));
    assert_eq!(now.len(), 1);
    assert_ne!(now, stuck);
}

#[tokio::test(start_paused = true)]
async fn an_interrupted_roll_settles_the_current_node_and_a_rerun_resumes() {
    let cloud = cluster(3, Duration::from_secs(30));
    let stop = Arc::new(Stop::new());
    let flag = stop.clone();
    let events = Events::default();
    let sink = events.clone();
    let report = run(clouds(&cloud), &NoChecks, &settings(), &stop, &move |e| {
        if matches!(e, RollEvent::Terminating { .. }) {
            // Ctrl-C right after the first termination.
            flag.request();
        }
        sink.push(e)
    })
    .await
    .unwrap();
    assert_eq!(report.outcome, RollOutcome::Interrupted);
    assert_eq!(report.replaced, ["1"], "the node in flight settled first");
    assert_eq!(report.remaining, ["2", "3"]);
    assert!(
        events
            .0
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, RollEvent::Stopping { in_flight } if in_flight == &["1"]))
    );
    assert_eq!(max_unavailable_seen(&cloud), 1);

    let (again, events) = roll(&cloud, &settings(), &NoChecks).await;
    assert_eq!(again.outcome, RollOutcome::Completed);
    assert_eq!(
        events.terminated(),
        ["2", "3"],
        "node 1 is not replaced again"
    );
}

#[tokio::test(start_paused = true)]
async fn a_rerun_waits_for_a_replacement_still_booting() {
    let cloud = cluster(3, Duration::from_secs(30));
    // A previous run terminated node 1 and died: its replacement is still booting.
    let old = cloud.with(|w| w.group_instances(&group_name(1)));
    cps_provider::GroupService::terminate_in_group(&cloud, &old[0])
        .await
        .unwrap();
    let snap = observe(clouds(&cloud), &settings()).await.unwrap();
    let p = plan(&snap, &settings());
    assert_eq!(p.rows[0].action, Action::Wait);
    let (report, events) = roll(&cloud, &settings(), &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["2", "3"]);
    assert_eq!(max_unavailable_seen(&cloud), 1);
}

#[tokio::test(start_paused = true)]
async fn a_node_failing_on_its_own_pauses_the_roll_until_it_is_back() {
    let cloud = cluster(5, Duration::from_secs(30));
    let events = Events::default();
    let sink = events.clone();
    let watcher = cloud.clone();
    let unavailable_at_start = Arc::new(Mutex::new(Vec::new()));
    let seen = unavailable_at_start.clone();
    // While node 1 is being replaced, node 4's instance dies (the group replaces it).
    let victim = cloud.with(|w| w.group_instances(&group_name(4)))[0].clone();
    cloud.before_next(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP, move |w| {
        w.terminate_instance(&victim)
    });
    let stop = Stop::new();
    let report = run(clouds(&cloud), &NoChecks, &settings(), &stop, &move |e| {
        if let RollEvent::Terminating { node, .. } = &e {
            let now = watcher.with(|w| w.samples().last().map(|s| s.unavailable).unwrap_or(0));
            seen.lock().unwrap().push((node.clone(), now));
        }
        sink.push(e)
    })
    .await
    .unwrap();
    assert_eq!(report.outcome, RollOutcome::Completed);
    // Node 4 was replaced by its group (on v2), so the roll drops it from its list.
    assert_eq!(events.terminated(), ["1", "2", "3", "5"]);
    // Every termination started with the cluster whole.
    let starts = unavailable_at_start.lock().unwrap().clone();
    assert!(starts.iter().all(|(_, u)| *u == 0), "{starts:?}");
    // Two were out at once only because node 4 failed while node 1 was in flight.
    assert_eq!(max_unavailable_seen(&cloud), 2);
}

#[tokio::test(start_paused = true)]
async fn throttling_is_ridden_out() {
    let cloud = cluster(3, Duration::from_secs(10));
    cloud.inject(Fault::throttle(DESCRIBE_AUTO_SCALING_GROUPS, 3));
    cloud.inject(Fault::throttle(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP, 2));
    let (report, events) = roll(&cloud, &settings(), &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["1", "2", "3"]);
    // Two throttled attempts, then the third termination request went through.
    assert_eq!(
        cloud
            .calls()
            .count(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP),
        5
    );
}

#[tokio::test(start_paused = true)]
async fn preflight_refuses_what_would_break_quorum_or_starts_from_a_sick_cluster() {
    let two = cluster(2, Duration::from_secs(10));
    let (report, _) = roll(&two, &settings(), &NoChecks).await;
    let RollOutcome::Refused { reasons } = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert!(reasons[0].contains("pass --allow-downtime"), "{reasons:?}");
    let mut s = settings();
    s.allow_downtime = true;
    assert_eq!(
        roll(&two, &s, &NoChecks).await.0.outcome,
        RollOutcome::Completed
    );

    let three = cluster(3, Duration::from_secs(10));
    let mut s = settings();
    s.max_unavailable = 2;
    let (report, _) = roll(&three, &s, &NoChecks).await;
    let RollOutcome::Refused { reasons } = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert!(
        reasons[0].contains("fewer than a majority (2); at most 1"),
        "{reasons:?}"
    );

    // An up-to-date node out of service blocks the start; --wait-healthy waits for it.
    let sick = cluster(3, Duration::from_secs(10));
    let (one, _) = sick.with(|w| {
        w.set_group_template(&group_name(1), TEMPLATE, "1");
        let i = w.group_instances(&group_name(1));
        w.set_healthy(&i[0], false);
        (i, ())
    });
    let (report, _) = roll(&sick, &settings(), &NoChecks).await;
    let RollOutcome::Refused { reasons } = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert!(
        reasons[0].contains("node 1") && reasons[0].contains("--wait-healthy"),
        "{reasons:?}"
    );
    assert_eq!(
        sick.calls().count(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP),
        0
    );
    let healer = sick.clone();
    let id = one[0].clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        healer.with(|w| w.set_healthy(&id, true));
    });
    let mut s = settings();
    s.wait_healthy = true;
    let (report, events) = roll(&sick, &s, &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["2", "3"]);
}

#[tokio::test(start_paused = true)]
async fn only_restricts_and_force_replaces_up_to_date_nodes() {
    let cloud = cluster(3, Duration::from_secs(10));
    let mut s = settings();
    s.only = vec!["3".into()];
    let (report, events) = roll(&cloud, &s, &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["3"]);

    let mut s = settings();
    s.force = true;
    s.only = vec!["3".into()];
    let (_, events) = roll(&cloud, &s, &NoChecks).await;
    assert_eq!(events.terminated(), ["3"], "forced although up to date");

    let mut s = settings();
    s.only = vec!["7".into()];
    let (report, _) = roll(&cloud, &s, &NoChecks).await;
    assert!(matches!(report.outcome, RollOutcome::Refused { .. }));
}

/// One group of 5 brokers (slot mode) on version 1 of a template whose version 2 is published.
fn brokers(latency: Duration, boot: Duration) -> MemoryCloud {
    let cloud = MemoryCloud::new(Timing {
        latency,
        ..Timing::default()
    });
    cloud.with(|w| {
        w.add_template(TEMPLATE, "brokers");
        let tags = Tags::from([("cps:cluster".to_string(), "kafka".to_string())]);
        w.add_fleet_group("kafka-brokers", &tags, AZ, 5, TEMPLATE, "$Latest");
        w.add_launch_hook(
            "kafka-brokers",
            HOOK,
            Duration::from_secs(600),
            LifecycleResult::Abandon,
        );
        w.new_template_version(TEMPLATE, true);
        w.on_launch(move |_, _| Boot::Continue(boot));
    });
    cloud
}

#[tokio::test(start_paused = true)]
async fn a_multi_instance_group_is_rolled_instance_by_instance() {
    let cloud = brokers(Duration::ZERO, Duration::from_secs(25));
    let mut s = settings();
    s.max_unavailable = 2;
    let (report, events) = roll(&cloud, &s, &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated().len(), 5);
    assert_eq!(max_unavailable_seen(&cloud), 2);
    assert!(
        versions(&cloud)
            .await
            .iter()
            .all(|(_, v)| v == "brokers v2")
    );
}

struct FlakyHealth(Mutex<u32>);

#[async_trait]
impl ClusterChecks for FlakyHealth {
    async fn leader(&self) -> Result<Option<String>, String> {
        Ok(None)
    }
    async fn healthy(&self, _node: &str) -> Result<(), String> {
        let mut left = self.0.lock().unwrap();
        if *left == 0 {
            return Ok(());
        }
        *left -= 1;
        Err("under-replicated partitions: 3".into())
    }
}

#[tokio::test(start_paused = true)]
async fn the_health_command_gates_each_next_node() {
    let cloud = cluster(3, Duration::from_secs(10));
    let checks = FlakyHealth(Mutex::new(4));
    let (report, _) = roll(&cloud, &settings(), &checks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(*checks.0.lock().unwrap(), 0);

    let cloud = cluster(3, Duration::from_secs(10));
    let checks = FlakyHealth(Mutex::new(u32::MAX));
    let mut s = settings();
    s.timeout = Duration::from_secs(30);
    let (report, events) = roll(&cloud, &s, &checks).await;
    let RollOutcome::Stopped { node, reason } = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert_eq!(node.as_deref(), Some("1"));
    assert!(reason.contains("under-replicated"), "{reason}");
    assert_eq!(events.terminated(), ["1"]);
}

#[tokio::test(start_paused = true)]
async fn planning_500_groups_takes_a_handful_of_requests() {
    let cloud = MemoryCloud::new(Timing::default());
    cloud.with(|w| {
        w.add_template(TEMPLATE, "big");
        for n in 1..=500 {
            let tags = Tags::from([
                ("cps:cluster".to_string(), "big".to_string()),
                ("cps:node-id".to_string(), n.to_string()),
            ]);
            w.add_fleet_group(&format!("big-{n:03}"), &tags, AZ, 1, TEMPLATE, "$Latest");
        }
        w.new_template_version(TEMPLATE, false);
    });
    let s = RollSettings::new(Targets::Cluster {
        tag: "cps:cluster".into(),
        name: "big".into(),
    });
    let snap = observe(clouds(&cloud), &s).await.unwrap();
    let p = plan(&snap, &s);
    assert_eq!(p.rows.len(), 500);
    assert_eq!(p.queue().len(), 500);
    assert_eq!(p.queue()[9].node, "10", "numeric node order");
    assert_eq!(cloud.calls().count(DESCRIBE_AUTO_SCALING_GROUPS), 5);
    assert_eq!(cloud.calls().count(DESCRIBE_LAUNCH_TEMPLATES), 1);
    // Instance refreshes have no batch request: one per group.
    assert_eq!(cloud.calls().count(DESCRIBE_INSTANCE_REFRESHES), 500);

    // By name: 5 batches of 100 names.
    cloud.calls().reset();
    let names: Vec<String> = (1..=500).map(|n| format!("big-{n:03}")).collect();
    let s = RollSettings::new(Targets::Groups(names));
    observe(clouds(&cloud), &s).await.unwrap();
    assert_eq!(cloud.calls().count(DESCRIBE_AUTO_SCALING_GROUPS), 5);
}

/// A state one node of a generated cluster is in when the roll starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Odd {
    None,
    /// In Standby, its group's capacity lowered: out of service, and no group brings it back.
    Standby,
    /// In Standby, its group launched a replacement.
    StandbyReplaced,
    /// Its group's desired capacity is 0.
    NoCapacity,
    /// Detached from its group, the capacity lowered.
    Detached,
    /// Every group has a terminating hook holding old instances in Terminating:Wait.
    TerminatingHooks,
}

const ODD: [Odd; 6] = [
    Odd::None,
    Odd::Standby,
    Odd::StandbyReplaced,
    Odd::NoCapacity,
    Odd::Detached,
    Odd::TerminatingHooks,
];

/// Puts the last node of an `n`-node cluster in `odd`; returns how many nodes that leaves out
/// of service for good, and the instance in Standby (never to be terminated), if any.
fn make_odd(cloud: &MemoryCloud, n: usize, odd: Odd, hold: Duration) -> (usize, Option<String>) {
    let group = group_name(n);
    let last = cloud.with(|w| w.group_instances(&group))[0].clone();
    cloud.with(|w| match odd {
        Odd::None => (0, None),
        Odd::Standby => {
            w.enter_standby(&last, true);
            (1, Some(last))
        }
        Odd::StandbyReplaced => {
            w.enter_standby(&last, false);
            (0, Some(last))
        }
        Odd::NoCapacity => {
            w.set_desired(&group, 0);
            (1, None)
        }
        Odd::Detached => {
            w.detach_instance(&last, true);
            (1, None)
        }
        Odd::TerminatingHooks => {
            for k in 1..=n {
                w.add_terminate_hook(&group_name(k), "drain", hold);
            }
            (0, None)
        }
    })
}

/// Many generated clusters: sizes 3–7, every allowed max-unavailable, boot times and failing
/// boots drawn from a seeded generator, and one node in Standby (with and without a
/// replacement), at desired capacity 0, detached, or terminating hooks holding old instances.
/// In every one, the roll never has more than max-unavailable nodes out of service — counting
/// the nodes no group brings back — never terminates an instance in Standby, refuses when
/// those nodes use up the budget, and otherwise ends replaced or stopped, never half-done
/// silently.
#[tokio::test(start_paused = true)]
async fn max_unavailable_holds_at_every_step_across_generated_clusters() {
    for case in 0..120u64 {
        let r = |k: u64| mix(case.wrapping_mul(0x1000).wrapping_add(k));
        let n = 3 + (r(1) % 5) as usize;
        let allowed = n - (n / 2 + 1);
        let max = 1 + (r(2) % allowed as u64) as usize;
        let odd = ODD[(r(6) % ODD.len() as u64) as usize];
        // The odd node is the last one; a failing group is another.
        let failing = 1 + (r(4) % (n as u64 - 1)) as usize;
        let fail_group = (r(3) % 4 == 0).then(|| group_name(failing));
        let cloud = cluster(n, Duration::from_secs(5));
        let seed = Arc::new(Mutex::new(r(5)));
        cloud.with(|w| {
            w.on_launch(move |group, _| {
                let mut s = seed.lock().unwrap();
                *s = mix(*s);
                if fail_group.as_deref() == Some(group) {
                    Boot::Abandon(Duration::from_secs(3 + *s % 20))
                } else {
                    Boot::Continue(Duration::from_secs(3 + *s % 60))
                }
            })
        });
        let (held, standby) = make_odd(&cloud, n, odd, Duration::from_secs(3 + r(7) % 20));
        let mut s = settings();
        s.max_unavailable = max;
        s.timeout = Duration::from_secs(180);
        let (report, events) = roll(&cloud, &s, &NoChecks).await;
        let what = format!("case {case}: n={n} max={max} {odd:?}");
        let seen = max_unavailable_seen(&cloud);
        assert!(
            seen <= max.max(held),
            "{what}: {seen} out of service at once"
        );
        if let Some(id) = &standby {
            let still = cloud.with(|w| w.lifecycle_state(id));
            assert_eq!(
                still.as_deref(),
                Some("Standby"),
                "{what}: never terminated"
            );
        }
        check_outcome(
            &what,
            &report,
            &events,
            n - held - usize::from(standby.is_some() && held == 0),
            held >= max,
        );
    }
}

fn check_outcome(what: &str, report: &RollReport, events: &Events, replaced: usize, refused: bool) {
    match &report.outcome {
        RollOutcome::Refused { reasons } => {
            assert!(refused, "{what}: {reasons:?}");
            assert!(events.terminated().is_empty(), "{what}");
            assert!(
                reasons.iter().any(|r| r.contains("left alone")),
                "{what}: {reasons:?}"
            );
        }
        RollOutcome::Completed => {
            assert!(!refused, "{what}");
            assert_eq!(events.terminated().len(), replaced, "{what}");
            assert!(report.remaining.is_empty());
        }
        RollOutcome::Stopped { node, .. } => {
            assert!(!refused, "{what}");
            let failing = report
                .last
                .nodes
                .iter()
                .find(|v| Some(&v.node) == node.as_ref())
                .map(|v| v.group.clone());
            assert!(failing.is_some(), "{what}: a stop names its node");
            assert!(!report.remaining.is_empty(), "{what}");
            assert!(!report.recovery.is_empty(), "{what}");
        }
        other => panic!("{what}: {other:?}"),
    }
}

fn instance(id: &str, state: &str, version: &str) -> GroupInstance {
    GroupInstance {
        instance_id: id.into(),
        availability_zone: AZ.into(),
        lifecycle_state: state.into(),
        health_status: "Healthy".into(),
        launch: Some(LaunchSource::Template {
            id: TEMPLATE.into(),
            name: "kafka".into(),
            version: version.into(),
        }),
        instance_type: None,
    }
}

/// AWS lists a terminated instance as Terminating beside its Pending replacement for a while:
/// that is still one node, named by its tag, and the old instance is no target any more.
#[test]
fn an_instance_on_its_way_out_is_not_a_node() {
    let group = ScalingGroup {
        name: "kafka-node-2".into(),
        tags: Tags::from([("cps:node-id".to_string(), "2".to_string())]),
        desired_capacity: 1,
        instances: vec![
            instance("i-old", "Terminating:Wait", "1"),
            instance("i-new", "Pending:Wait", "2"),
        ],
        launch: Some(LaunchSource::Template {
            id: TEMPLATE.into(),
            name: "kafka".into(),
            version: "2".into(),
        }),
        overrides: Vec::new(),
        suspended_processes: Vec::new(),
    };
    let snap = snapshot(
        std::slice::from_ref(&group),
        &Default::default(),
        "cps:node-id",
    );
    assert_eq!(snap.nodes.len(), 1);
    assert_eq!(snap.nodes[0].node, "2");
    assert_eq!(snap.nodes[0].instance_id.as_deref(), Some("i-new"));
    assert_eq!(snap.unavailable(), 1);
    let p = plan(&snap, &settings());
    assert_eq!(p.rows[0].action, Action::Wait);

    // An instance reporting a symbolic version is not known to be current.
    let mut odd = group.clone();
    odd.instances = vec![instance("i-x", "InService", "$Latest")];
    let snap = snapshot(&[odd], &Default::default(), "cps:node-id");
    assert!(snap.nodes[0].outdated);
}

/// In a multi-instance group an instance failing on its own while another is replaced counts:
/// with max-unavailable 2, a third is not started until one is back.
#[tokio::test(start_paused = true)]
async fn a_failure_inside_a_multi_instance_group_counts_against_the_budget() {
    let cloud = brokers(Duration::from_millis(50), Duration::from_secs(30));
    let members = cloud.with(|w| w.group_instances("kafka-brokers"));
    // Right before the first termination, the last broker turns unhealthy for 45 s.
    let victim = members[4].clone();
    let healer = cloud.clone();
    let v = victim.clone();
    cloud.before_next(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP, move |w| {
        w.set_healthy(&victim, false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(45)).await;
            healer.with(|w| w.set_healthy(&v, true));
        });
    });
    let mut s = settings();
    s.max_unavailable = 2;
    s.only = members[..4].to_vec();
    let (report, events) = roll(&cloud, &s, &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated().len(), 4);
    assert_eq!(max_unavailable_seen(&cloud), 2, "never three out");
}

/// A library caller's absurd timeout means "a very long time", never an overflow panic.
#[tokio::test(start_paused = true)]
async fn an_absurd_timeout_does_not_overflow() {
    let cloud = cluster(3, Duration::from_secs(10));
    let mut s = settings();
    s.timeout = Duration::MAX;
    s.poll_interval = Duration::from_secs(1);
    let (report, events) = roll(&cloud, &s, &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["1", "2", "3"]);
}

/// A mixed-instances override naming its own template is the target of the instances of its
/// type (or, type unknown, of the instances launched from it); the group's template is the
/// target of the rest.
#[test]
fn an_override_with_its_own_template_is_what_its_instances_compare_with() {
    let template = |id: &str, version: &str| LaunchSource::Template {
        id: id.into(),
        name: String::new(),
        version: version.into(),
    };
    let on = |id: &str, ty: Option<&str>, lt: &str| GroupInstance {
        instance_type: ty.map(str::to_owned),
        launch: Some(template(lt, "3")),
        ..instance(id, "InService", "3")
    };
    let group = ScalingGroup {
        name: "brokers".into(),
        tags: Tags::new(),
        desired_capacity: 4,
        instances: vec![
            on("i-arm", Some("m7g.large"), "lt-arm"),
            on("i-arm-untyped", None, "lt-arm"),
            on("i-x86", Some("m6i.large"), TEMPLATE),
            on("i-moved", Some("m7g.large"), TEMPLATE),
        ],
        launch: Some(template(TEMPLATE, "3")),
        overrides: vec![cps_provider::LaunchOverride {
            instance_type: Some("m7g.large".into()),
            launch: template("lt-arm", "3"),
        }],
        suspended_processes: Vec::new(),
    };
    let snap = snapshot(&[group], &Default::default(), "cps:node-id");
    let outdated: Vec<(&str, bool)> = snap
        .nodes
        .iter()
        .map(|n| (n.node.as_str(), n.outdated))
        .collect();
    assert_eq!(
        outdated,
        [
            ("i-arm", false),
            ("i-arm-untyped", false),
            // An m7g.large launched from the group's template: its type launches from the
            // override's template now.
            ("i-moved", true),
            ("i-x86", false),
        ]
    );
}

/// A node in Standby is out of service and its group does not count it: the roll leaves it
/// alone and counts it against the budget. With --max-unavailable 1 nothing else may go out;
/// with 2 the others are replaced, never more than 2 of 5 out.
#[tokio::test(start_paused = true)]
async fn a_node_in_standby_is_left_alone_and_uses_the_budget() {
    let cloud = cluster(5, Duration::from_secs(20));
    let standby = cloud.with(|w| w.group_instances(&group_name(5)))[0].clone();
    cloud.with(|w| w.enter_standby(&standby, true));
    let snap = observe(clouds(&cloud), &settings()).await.unwrap();
    assert_eq!((snap.size(), snap.unavailable(), snap.held()), (5, 1, 1));
    let p = plan(&snap, &settings());
    assert_eq!(p.rows[4].action, Action::LeftAlone);
    assert!(p.rows[4].reason.as_deref().unwrap().contains("in Standby"));
    assert_eq!(p.order, ["1", "2", "3", "4"]);
    let (report, events) = roll(&cloud, &settings(), &NoChecks).await;
    let RollOutcome::Refused { reasons } = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert!(
        reasons[0].contains("node 5") && reasons[0].contains("in Standby"),
        "{reasons:?}"
    );
    assert!(events.terminated().is_empty());

    let mut s = settings();
    s.max_unavailable = 2;
    let (report, events) = roll(&cloud, &s, &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["1", "2", "3", "4"]);
    assert_eq!(max_unavailable_seen(&cloud), 2);
    assert_eq!(
        cloud.with(|w| w.lifecycle_state(&standby)).as_deref(),
        Some("Standby")
    );
    assert!(
        report.left_alone[0].starts_with("node 5"),
        "{:?}",
        report.left_alone
    );
}

/// A group at desired capacity 0 (scaled down, or its instance detached) is a node out of
/// service: counted in the cluster's size and against the budget, never "0 of 4".
#[tokio::test(start_paused = true)]
async fn a_group_at_desired_zero_is_a_node_out_of_service() {
    for detach in [false, true] {
        let cloud = cluster(4, Duration::from_secs(20));
        let last = cloud.with(|w| w.group_instances(&group_name(4)))[0].clone();
        cloud.with(|w| {
            if detach {
                w.detach_instance(&last, true);
            } else {
                w.set_desired(&group_name(4), 0);
            }
        });
        let snap = observe(clouds(&cloud), &settings()).await.unwrap();
        assert_eq!((snap.size(), snap.unavailable()), (4, 1), "detach {detach}");
        let p = plan(&snap, &settings());
        assert_eq!(p.rows[3].action, Action::LeftAlone);
        assert!(
            p.rows[3]
                .reason
                .as_deref()
                .unwrap()
                .contains("desired capacity is 0")
        );
        // Replacing any other node would leave 2 of 4: refused.
        let (report, events) = roll(&cloud, &settings(), &NoChecks).await;
        assert!(matches!(report.outcome, RollOutcome::Refused { .. }));
        assert!(events.terminated().is_empty());
    }
}

/// A node entering Standby while the roll runs drops out of the queue: never terminated, and
/// counted as out of service from then on.
#[tokio::test(start_paused = true)]
async fn a_node_entering_standby_mid_roll_is_left_alone() {
    let cloud = cluster(5, Duration::from_secs(20));
    let victim = cloud.with(|w| w.group_instances(&group_name(4)))[0].clone();
    let v = victim.clone();
    cloud.before_next(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP, move |w| {
        w.enter_standby(&v, true)
    });
    let mut s = settings();
    s.max_unavailable = 2;
    let (report, events) = roll(&cloud, &s, &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["1", "2", "3", "5"]);
    assert_eq!(max_unavailable_seen(&cloud), 2);
    assert_eq!(
        cloud.with(|w| w.lifecycle_state(&victim)).as_deref(),
        Some("Standby")
    );
}

/// With a terminating hook the group's Launch is suspended from before the termination until
/// the old instance has left, so every replacement launches after its old instance is gone;
/// Launch is resumed every time, also when the termination fails or the hold outlasts the
/// timeout.
#[tokio::test(start_paused = true)]
async fn a_terminating_hook_holds_launch_until_the_old_instance_leaves() {
    let cloud = cluster(3, Duration::from_secs(10));
    let launched: Arc<Mutex<Vec<(String, tokio::time::Instant)>>> = Arc::default();
    let log = launched.clone();
    cloud.with(|w| {
        for n in 1..=3 {
            w.add_terminate_hook(&group_name(n), "drain", Duration::from_secs(30));
        }
        w.on_launch(move |group, _| {
            log.lock()
                .unwrap()
                .push((group.to_owned(), tokio::time::Instant::now()));
            Boot::Continue(Duration::from_secs(10))
        });
    });
    let old: Vec<String> = (1..=3)
        .map(|n| cloud.with(|w| w.group_instances(&group_name(n)))[0].clone())
        .collect();
    let (report, events) = roll(&cloud, &settings(), &NoChecks).await;
    assert_eq!(report.outcome, RollOutcome::Completed);
    assert_eq!(events.terminated(), ["1", "2", "3"]);
    assert_eq!(cloud.calls().count(SUSPEND_PROCESSES), 3);
    assert_eq!(cloud.calls().count(RESUME_PROCESSES), 3);
    let left: Vec<tokio::time::Instant> = cloud.with(|w| {
        w.lifecycle_log()
            .iter()
            .filter_map(|e| match e {
                LifecycleEvent::TimedOut {
                    instance_id, at, ..
                } if old.contains(instance_id) => Some(*at),
                _ => None,
            })
            .collect()
    });
    let launched = launched.lock().unwrap().clone();
    assert_eq!((left.len(), launched.len()), (3, 3));
    for ((group, at), gone) in launched.iter().zip(&left) {
        assert!(at >= gone, "{group}: launched before the old instance left");
    }
    assert!(
        observe(clouds(&cloud), &settings())
            .await
            .unwrap()
            .groups
            .iter()
            .all(|g| g.suspended_processes.is_empty())
    );

    // The termination fails: Launch is resumed before the error is returned.
    let cloud = cluster(3, Duration::from_secs(10));
    cloud.with(|w| w.add_terminate_hook(&group_name(1), "drain", Duration::from_secs(30)));
    cloud.inject(Fault::fail(
        TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP,
        cps_provider::Error::Unauthorized {
            operation: "TerminateInstanceInAutoScalingGroup",
            message: "not allowed".into(),
        },
    ));
    let stop = Stop::new();
    let err = run(clouds(&cloud), &NoChecks, &settings(), &stop, &|_| {}).await;
    assert!(err.is_err());
    assert_eq!(cloud.calls().count(RESUME_PROCESSES), 1);

    // The hook holds the old instance longer than the timeout: the roll stops, saying so, and
    // resumes Launch so the group recovers.
    let cloud = cluster(3, Duration::from_secs(10));
    cloud.with(|w| w.add_terminate_hook(&group_name(1), "drain", Duration::from_secs(3600)));
    let mut s = settings();
    s.timeout = Duration::from_secs(60);
    let (report, _) = roll(&cloud, &s, &NoChecks).await;
    let RollOutcome::Stopped { reason, .. } = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert!(
        reason.contains("terminating lifecycle hook drain still holds"),
        "{reason}"
    );
    assert_eq!(cloud.calls().count(RESUME_PROCESSES), 1);
}

/// Suspended processes a replacement needs and instance refreshes in progress refuse the roll
/// before any change; a process it does not need does not.
#[tokio::test(start_paused = true)]
async fn suspended_processes_and_refreshes_refuse_the_start() {
    let cloud = cluster(3, Duration::from_secs(10));
    cloud.with(|w| w.set_suspended(&group_name(2), "AZRebalance", true));
    let snap = observe(clouds(&cloud), &settings()).await.unwrap();
    assert!(plan(&snap, &settings()).refusals.is_empty());
    cloud.with(|w| w.set_suspended(&group_name(2), "Launch", true));
    let id = cloud.with(|w| w.add_instance_refresh(&group_name(3), "InProgress"));
    cloud.with(|w| w.add_instance_refresh(&group_name(1), "Successful"));
    let (report, events) = roll(&cloud, &settings(), &NoChecks).await;
    let RollOutcome::Refused { reasons } = &report.outcome else {
        panic!("{:?}", report.outcome)
    };
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("kafka-node-2 has Launch suspended"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains(&format!(
        "instance refresh {id} is InProgress on kafka-node-3"
    )));
    assert!(events.terminated().is_empty());
}

/// An interrupt while the first look is being retried (throttled) ends the run at once:
/// nothing changed, a handful of requests, not the whole retry budget.
#[tokio::test(start_paused = true)]
async fn an_interrupt_ends_the_retries_of_the_first_look() {
    let cloud = cluster(3, Duration::from_secs(10));
    cloud.inject(Fault::throttle(DESCRIBE_AUTO_SCALING_GROUPS, 10_000));
    let stop = Arc::new(Stop::new());
    let later = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        later.request();
    });
    let report = run(clouds(&cloud), &NoChecks, &settings(), &stop, &|_| {})
        .await
        .expect("an interrupt is no error");
    assert_eq!(report.outcome, RollOutcome::Interrupted);
    assert!(report.recovery[0].contains("Nothing was changed"));
    let looks = cloud.calls().count(DESCRIBE_AUTO_SCALING_GROUPS);
    assert!((2..10).contains(&looks), "{looks} requests");
    assert_eq!(
        cloud
            .calls()
            .count(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP),
        0
    );
}

/// An interrupt while waiting for an unhealthy node (--wait-healthy, nothing in flight) ends
/// the wait before the next look.
#[tokio::test(start_paused = true)]
async fn an_interrupt_ends_the_wait_for_health() {
    let cloud = cluster(3, Duration::from_secs(10));
    cloud.with(|w| {
        w.set_group_template(&group_name(1), TEMPLATE, "1");
        let i = w.group_instances(&group_name(1));
        w.set_healthy(&i[0], false);
    });
    let stop = Arc::new(Stop::new());
    let later = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        later.request();
    });
    let mut s = settings();
    s.wait_healthy = true;
    s.poll_interval = Duration::from_secs(60);
    let report = run(clouds(&cloud), &NoChecks, &s, &stop, &|_| {})
        .await
        .unwrap();
    assert_eq!(report.outcome, RollOutcome::Interrupted);
    // The first look, one more after a minute's poll would be 2: the interrupt came first.
    assert_eq!(cloud.calls().count(DESCRIBE_AUTO_SCALING_GROUPS), 1);
}
