//! The Terraform module's node policy on the bench: the emulator evaluates every request signed
//! with the node's key against that policy (actions, resource ARNs, tag conditions). A node's
//! first boot and its replacement succeed with exactly the policy, and each fails when any one
//! of its actions is taken away — so the policy is complete and holds nothing unused.

use std::sync::Arc;
use std::time::Duration;

use cps_fixtures::MountGuard;
use cps_provider::VolumeService;
use cps_testbed::{Bench, BenchOptions, Delays, NODE_KEY, emulator::repo_root};
use serde_json::Value;

use crate::{TIER, run, tags, write_config};

const HOOK: &str = "iam-launch";

/// Granted for relocation but needed only when another agent holds the node's lock (the
/// holder is read after a refused take), which one boot at a time never meets: proven granted
/// here, and its scoping on the emulator in crates/aws/tests/emulator/locks.rs.
const CONTENDED: [&str; 1] = ["dynamodb:GetItem"];

/// The lock table the module creates for app "iam-e2e" (terraform/tests/render).
const LOCK_TABLE: &str = "iam-e2e-cps-relocation";

/// The third boot's configuration: node 1 in another zone, moving its volume there (the
/// module's relocation with delete-source); no interface (it stays in its zone) and no hook
/// (a plain instance).
fn moving_config(home: &std::path::Path) -> String {
    format!(
        r#"block-device: /dev/sdf
block-provider:
  aws-ebs:
    ebs-tags: {{"cps:cluster": iam-e2e}}
    size: 2
file-system:
  type: xfs
mount:
  target: {home}/data
identity:
  mode: node-id
  node-id: "1"
  release-timeout: 30s
relocation:
  mode: snapshot
  lock-table: {LOCK_TABLE}
  delete-source: true
timeouts:
  device: 30s
command-timeout: 30s
"#,
        home = home.display()
    )
}

/// The policy the module renders for app_name "iam-e2e" (ci/terraform/run keeps it equal).
fn module_policy() -> Value {
    let path = repo_root().join("terraform/tests/node-policy.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn actions(policy: &Value) -> Vec<String> {
    let mut all: Vec<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["Action"].as_array().unwrap().clone())
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    all.sort();
    all.dedup();
    all
}

fn without(policy: &Value, action: &str) -> Value {
    let mut p = policy.clone();
    for s in p["Statement"].as_array_mut().unwrap() {
        s["Action"]
            .as_array_mut()
            .unwrap()
            .retain(|a| a.as_str() != Some(action));
    }
    p["Statement"]
        .as_array_mut()
        .unwrap()
        .retain(|s| !s["Action"].as_array().unwrap().is_empty());
    p
}

/// The configuration the module writes for node 1 (node id in the file, interface, two files
/// read from the secret stores, hook), with a health check longer than the hook's heartbeat
/// timeout: without heartbeats it expires. A denial fails at once whatever the command timeout;
/// 30 s only bounds waits on an emulator slowed by the benches running beside it (with 5 s, the
/// group lookup at the start of a boot could time out under load and hide which action failed). The replacement's is one GiB larger: it grows the
/// volume in place (ModifyVolume, DescribeVolumesModifications).
fn config(home: &std::path::Path, size_gib: u32) -> String {
    format!(
        r#"block-device: /dev/sdf
block-provider:
  aws-ebs:
    ebs-tags: {{"cps:cluster": iam-e2e}}
    size: {size_gib}
file-system:
  type: xfs
mount:
  target: {home}/data
identity:
  mode: node-id
  node-id: "1"
  release-timeout: 30s
network-interface:
  device-index: 1
  timeout: 30s
files:
  - path: {home}/etc/jaas.conf
    content-from: ssm:/iam-e2e/jaas
  - path: {home}/etc/tls.key
    content-from: secretsmanager:iam-e2e/tls-key
hooks:
  health: [sh, -c, 'sleep 7']
lifecycle:
  hook: {HOOK}
timeouts:
  device: 30s
command-timeout: 30s
"#,
        home = home.display()
    )
}

/// A first boot, then a replacement while the first server is still shutting down (growing
/// the volume), then the node in another zone (moving the volume there). Returns the exit
/// codes, the last error line of the first failing boot, and the actions the emulator denied.
async fn scenario(policy: &Value) -> (Vec<i32>, String, Vec<String>) {
    let bench = Arc::new(
        Bench::start(BenchOptions {
            delays: Delays {
                // The replacement boots while the old server still holds the volume, even
                // on a loaded machine (so DescribeInstances is needed, and proven needed).
                shutdown: Duration::from_secs(4),
                ..Delays::default()
            },
            ..BenchOptions::default()
        })
        .unwrap(),
    );
    // The files' contents, stored with the bench's own (unrestricted) key — before the group
    // exists: the emulator's first parameter and secret take a while, and the hook's clock
    // starts with the group's instance.
    bench.put_parameter("/iam-e2e/jaas", "jaas").unwrap();
    bench.create_secret("iam-e2e/tls-key", "key").unwrap();
    let node = tags(&[("cps:cluster", "iam-e2e"), ("cps:node-id", "1")]);
    bench
        .create_interface("us-east-1a", 31, &node)
        .await
        .unwrap();
    bench
        .create_group(
            "iam-1",
            "us-east-1a",
            1,
            &node,
            HOOK,
            // Heartbeats every 2 s; without them the action expires during health. Long
            // enough that on a loaded machine (three benches at a time, each starting its
            // emulator's parameter store) the boot gets going before it expires.
            Duration::from_secs(6),
        )
        .await
        .unwrap();
    bench.create_lock_table(LOCK_TABLE).unwrap();
    bench.restrict_key(&policy.to_string()).unwrap();
    let mut codes = Vec::new();
    let mut error = String::new();
    let mut guards = Vec::new();
    let mut previous: Option<String> = None;
    for size_gib in [1, 2] {
        if let Some(old) = &previous {
            bench.terminate_in_group(old).await.unwrap();
        }
        let pending = bench
            .wait_pending("iam-1", 1, Duration::from_secs(10))
            .await
            .unwrap();
        let id = pending
            .into_iter()
            .find(|i| Some(i) != previous.as_ref())
            .expect("a new instance");
        let instance = bench.adopt(&id).await.unwrap();
        guards.push(MountGuard(instance.home.join("data")));
        let path = write_config(&instance, &config(&instance.home, size_gib));
        let out = run(&bench, &instance, &path, &[("AWS_ACCESS_KEY_ID", NODE_KEY)]);
        codes.push(out.code);
        if out.code != 0 {
            error = out
                .log
                .iter()
                .rev()
                .find(|l| l["level"] == "ERROR")
                .map(|l| l["message"].to_string())
                .unwrap_or_else(|| out.stderr.lines().last().unwrap_or("").to_owned());
            break;
        }
        previous = Some(id);
    }
    if codes == [0, 0] {
        let (code, last) = moved_boot(&bench, previous.as_deref().unwrap(), &mut guards).await;
        codes.push(code);
        error = last;
    }
    (codes, error, bench.denied_actions().unwrap())
}

/// The group's instance leaves, and node 1 boots on a plain instance in us-east-1b.
async fn moved_boot(bench: &Bench, old: &str, guards: &mut Vec<MountGuard>) -> (i32, String) {
    let volumes = bench
        .volumes_tagged(&tags(&[("cps:cluster", "iam-e2e"), ("cps:node-id", "1")]))
        .await;
    bench.terminate_in_group(old).await.unwrap();
    let ids: Vec<&str> = volumes.iter().map(|v| v.id.as_str()).collect();
    assert!(bench.wait_devices_gone(&ids), "the old instance let go");
    let instance = bench.launch("us-east-1b").await.unwrap();
    // As the group's instances are: the cluster tag (CreateTags takes any resource id).
    bench
        .volumes_api()
        .tag_volume(&instance.id, &tags(&[("cps:cluster", "iam-e2e")]))
        .await
        .unwrap();
    guards.push(MountGuard(instance.home.join("data")));
    let path = write_config(&instance, &moving_config(&instance.home));
    let out = run(bench, &instance, &path, &[("AWS_ACCESS_KEY_ID", NODE_KEY)]);
    let last = out
        .log
        .iter()
        .rev()
        .find(|l| l["level"] == "ERROR")
        .map(|l| l["message"].to_string())
        .unwrap_or_default();
    (out.code, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_module_policy_is_exactly_what_a_boot_needs() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let policy = module_policy();
    let (codes, error, denied) = scenario(&policy).await;
    assert_eq!(codes, [0, 0, 0], "with the module's policy: {error}");
    assert!(
        denied.is_empty(),
        "the module's policy was short of {denied:?}"
    );

    let all = actions(&policy);
    for action in CONTENDED {
        assert!(all.iter().any(|a| a == action), "{action} is not granted");
    }
    let exercised: Vec<String> = all
        .into_iter()
        .filter(|a| !CONTENDED.contains(&a.as_str()))
        .collect();
    // Three benches at a time: each scenario has its own emulator and devices.
    let mut results = Vec::new();
    for chunk in exercised.chunks(3) {
        let runs: Vec<_> = chunk
            .iter()
            .map(|action| {
                let (action, reduced) = (action.clone(), without(&policy, action));
                tokio::spawn(async move { (action, scenario(&reduced).await) })
            })
            .collect();
        for r in runs {
            results.push(r.await.unwrap());
        }
    }
    // A scenario that failed without the emulator refusing anything failed for the machine's
    // load (seen: a group lookup unanswered for 30 s with three benches at once), not for the
    // action: it runs once more, alone, and that run is what counts.
    for (action, outcome) in results.iter_mut() {
        let (codes, _, denied) = &*outcome;
        if codes.iter().any(|c| *c != 0) && denied.is_empty() {
            eprintln!("without {action}: failed with nothing denied; running it again alone");
            *outcome = scenario(&without(&policy, action)).await;
        }
    }
    let mut unneeded = Vec::new();
    for (action, (codes, error, denied)) in results {
        if codes.iter().all(|c| *c == 0) {
            unneeded.push(action);
        } else {
            // What the boot then says depends on where it was (a missing heartbeat shows as an
            // expired action, or the group terminating the instance mid-boot); that the
            // emulator refused this very action is what proves it was needed.
            assert!(
                denied.contains(&action),
                "without {action} the boot failed ({error}), but the emulator denied {denied:?}"
            );
        }
    }
    assert!(
        unneeded.is_empty(),
        "granted but never needed: {unneeded:?}"
    );
}
