//! The lifecycle hook and signals with the real binary: a membership lookup that is empty early
//! in a boot, an instance still `Pending` before its hook holds it, and SIGTERM / Ctrl-C while
//! cps-attach waits.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cps_fixtures::MountGuard;
use cps_provider::{VolumeService, VolumeSpec};
use cps_testbed::{Bench, BenchOptions, Instance};

use crate::{BIN, TIER, run, tags, write_config};

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
/// lifecycle action"); its launch hook holds it 4 s after launch. Heartbeats go on, so the hook
/// (6 s) does not expire during a 12 s boot, and the boot ends with CONTINUE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_go_on_while_the_instance_is_still_pending() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    bench
        .set_lifecycle_delays(Duration::from_secs(4), Duration::ZERO)
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
    assert!(
        out.said("waiting for this instance yet; heartbeats go on"),
        "the boot began while the instance was Pending:\n{}",
        out.stderr
    );
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

/// Starts cps-attach on `instance` in the background, its JSON log going to a file.
fn spawn(
    bench: &Bench,
    instance: &Instance,
    config: &Path,
) -> (std::process::Child, std::path::PathBuf) {
    let log = instance.home.join("attach.log");
    let mut cmd = bench.attach_command(Path::new(BIN), instance, config);
    cmd.env("CPS_LOG_FORMAT", "json")
        .stderr(std::fs::File::create(&log).unwrap());
    (cmd.spawn().unwrap(), log)
}

/// Waits (bounded) until the log at `path` contains `text`.
fn wait_for_log(path: &Path, text: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(text) || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (bounded) for a child to exit; kills it when it does not.
fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Sends `sig` (`TERM`, `INT`) to a child this test started and has not reaped.
fn signal(child: &std::process::Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .args(["-s", sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -s {sig}");
}

/// SIGTERM (systemd stopping the unit) and Ctrl-C while cps-attach waits for a holder to let
/// go of the node's volume: the wait ends at once, the lifecycle action is abandoned (the
/// configured on-failure), and cps-attach exits 10. Nothing is detached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_ends_a_wait_promptly_and_abandons() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Arc::new(Bench::start(BenchOptions::default()).unwrap());
    let node = tags(&[("cluster", "stopped"), ("cps:node-id", "1")]);
    // Node 1's volume is held by a running server: the booting one waits (up to 5 minutes).
    let holder = bench.launch("us-east-1a").await.unwrap();
    let api = bench.volumes_api();
    let volume = api
        .create_volume(&VolumeSpec::gp3("us-east-1a", 1, &node), "held")
        .await
        .unwrap();
    api.attach_volume(&volume.id, &holder.id, "/dev/xvdc")
        .await
        .unwrap();
    bench
        .create_group(
            "stopped-1",
            "us-east-1a",
            1,
            &node,
            HOOK,
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    let id = bench
        .wait_pending("stopped-1", 1, Duration::from_secs(10))
        .await
        .unwrap()[0]
        .clone();
    let booting = bench.adopt(&id).await.unwrap();
    let extra = format!("  release-timeout: 5m\nlifecycle:\n  hook: {HOOK}\n");
    let in_group = write_config(&booting, &config(&booting.home, "stopped", &extra));
    // Ctrl-C on a plain instance (no lifecycle hook) waiting for the same volume.
    let plain = bench.launch("us-east-1a").await.unwrap();
    let alone = write_config(
        &plain,
        &config(&plain.home, "stopped", "  release-timeout: 5m\n"),
    );
    for (instance, path, sig) in [(&booting, &in_group, "TERM"), (&plain, &alone, "INT")] {
        let (mut child, log) = spawn(&bench, instance, path);
        let seen = wait_for_log(
            &log,
            "waiting for it to be released",
            Duration::from_secs(30),
        );
        assert!(
            seen.contains("waiting for it to be released"),
            "SIG{sig}: {seen}"
        );
        let sent = Instant::now();
        signal(&child, sig);
        let status = wait_exit(&mut child, Duration::from_secs(20));
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let status = status
            .unwrap_or_else(|| panic!("SIG{sig}: still running 20 s after the signal:\n{log}"));
        assert_eq!(
            status.code(),
            Some(10),
            "SIG{sig}: interrupted exit code:\n{log}"
        );
        assert!(
            sent.elapsed() < Duration::from_secs(15),
            "SIG{sig}: promptly"
        );
        assert!(log.contains("interrupted"), "SIG{sig}: {log}");
    }
    let log = std::fs::read_to_string(booting.home.join("attach.log")).unwrap();
    assert!(log.contains("abandoning the lifecycle action"), "{log}");
    let members = bench.members("stopped-1").await.unwrap();
    assert!(
        members.iter().all(|m| m.instance_id != id),
        "the interrupted instance was abandoned: {members:?}"
    );
    let volumes = bench.volumes_tagged(&node).await;
    assert_eq!(volumes.len(), 1);
    assert_eq!(
        volumes[0].attachments[0].instance_id, holder.id,
        "still the holder's: nothing was detached"
    );
}
