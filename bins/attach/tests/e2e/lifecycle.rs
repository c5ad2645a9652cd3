//! The lifecycle hook and signals with the real binary: a membership lookup that is empty early
//! in a boot, an instance still `Pending` before its hook holds it, and SIGTERM / Ctrl-C while
//! cps-attach waits.

use std::path::Path;
use std::time::{Duration, Instant};

use cps_fixtures::MountGuard;
use cps_testbed::{Bench, BenchOptions};

use crate::{TIER, run, tags, write_config};

const HOOK: &str = "cps-launch";

fn config(home: &Path, cluster: &str, extra: &str) -> String {
    format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: {cluster}}}\n    size: 1\nmount:\n  target: {home}/data\nidentity:\n  mode: node-id\n  node-id: '1'\n{extra}",
        home = home.display()
    )
}

/// Early in a boot, DescribeAutoScalingInstances may not show the instance yet. With a
/// lifecycle hook configured, cps-attach looks again until it does, then beats and completes;
/// an instance that never shows up in a group is an error, not a silent success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_membership_lookup_is_retried_then_fails() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    bench
        .set_lifecycle_delays(Duration::ZERO, Duration::from_secs(4))
        .unwrap();
    let node = tags(&[("cluster", "late"), ("cps:node-id", "1")]);
    bench
        .create_group(
            "late-1",
            "us-east-1a",
            1,
            &node,
            HOOK,
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    let id = bench
        .wait_pending("late-1", 1, Duration::from_secs(10))
        .await
        .unwrap()[0]
        .clone();
    let instance = bench.adopt(&id).await.unwrap();
    let _guard = MountGuard(instance.home.join("data"));
    let lifecycle = format!("lifecycle:\n  hook: {HOOK}\n");
    let path = write_config(&instance, &config(&instance.home, "late", &lifecycle));
    let out = run(&bench, &instance, &path, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.ready()["lifecycle"],
        "Completed(Continue)",
        "{}",
        out.stderr
    );
    let members = bench.members("late-1").await.unwrap();
    assert_eq!(members[0].lifecycle_state, "InService");

    // Not in any group at all: bounded by the command timeout, then exit 6.
    let loner = bench.launch("us-east-1a").await.unwrap();
    let _guard = MountGuard(loner.home.join("data"));
    let path = write_config(&loner, &config(&loner.home, "loner", &lifecycle));
    let out = run(&bench, &loner, &path, &[("CPS_COMMAND_TIMEOUT", "3s")]);
    assert_eq!(out.code, 6, "timeout exit code:\n{}", out.stderr);
    assert!(
        out.stderr.contains("Auto Scaling group"),
        "says what it waited for:\n{}",
        out.stderr
    );
    assert!(
        bench
            .volumes_tagged(&tags(&[("cluster", "loner")]))
            .await
            .is_empty(),
        "nothing was claimed"
    );
}

/// The instance is still `Pending` when cps-attach sends its first heartbeat ("no active
/// lifecycle action"); its launch hook holds it a moment later. Heartbeats go on, so the hook
/// (6 s) does not expire during a 12 s boot, and the boot ends with CONTINUE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_go_on_while_the_instance_is_still_pending() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    bench
        .set_lifecycle_delays(Duration::from_secs(2), Duration::ZERO)
        .unwrap();
    let node = tags(&[("cluster", "pending"), ("cps:node-id", "1")]);
    bench
        .create_group(
            "pending-1",
            "us-east-1a",
            1,
            &node,
            HOOK,
            Duration::from_secs(6),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let members = bench.members("pending-1").await.unwrap();
        if let Some(m) = members.first() {
            assert_eq!(m.lifecycle_state, "Pending", "not yet held by the hook");
            break m.instance_id.clone();
        }
        assert!(Instant::now() < deadline, "the group launched nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let instance = bench.adopt(&id).await.unwrap();
    let _guard = MountGuard(instance.home.join("data"));
    let extra = format!("hooks:\n  configure: [sleep, '12']\nlifecycle:\n  hook: {HOOK}\n");
    let path = write_config(&instance, &config(&instance.home, "pending", &extra));
    let out = run(&bench, &instance, &path, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.ready()["lifecycle"],
        "Completed(Continue)",
        "{}",
        out.stderr
    );
    let members = bench.members("pending-1").await.unwrap();
    assert_eq!(
        members
            .iter()
            .map(|m| (m.instance_id.as_str(), m.lifecycle_state.as_str()))
            .collect::<Vec<_>>(),
        [(id.as_str(), "InService")],
        "the hook never expired"
    );
}
