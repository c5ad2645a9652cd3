//! Clusters on Auto Scaling groups with the real binary: node ids with fixed-IP interfaces,
//! node files, hooks and launch lifecycle hooks; replacing a node; a failing node; slots.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cps_fixtures::MountGuard;
use cps_testbed::{Bench, BenchOptions, Delays, Instance};

use crate::{Run, TIER, run, tags, write_config};

const HOOK: &str = "cps-launch";

fn node_config(home: &Path, extra: &str) -> String {
    format!(
        r#"block-provider:
  aws-ebs:
    ebs-tags: {{cluster: e2e}}
    size: 1
file-system:
  type: xfs
mount:
  target: {home}/data
identity:
  mode: node-id
  release-timeout: 1m
network-interface:
  device-index: 1
  timeout: 30s
files:
  - path: {home}/etc/node.properties
    content: "node.id=${{CPS_NODE_ID}}\nlisten=${{CPS_ENI_IP}}\n"
    mode: '0640'
hooks:
  configure: [sh, -c, 'echo "configured as $CPS_NODE_ID" >> "$CPS_MOUNT_PATH/boots.log"']
  health: [sh, -c, 'grep -q "as $CPS_NODE_ID" "$CPS_MOUNT_PATH/boots.log"']
  health-interval: 1s
  health-timeout: 20s
lifecycle:
  hook: {HOOK}
timeouts:
  device: 30s
{extra}"#,
        home = home.display()
    )
}

/// Boots an instance the group launched: gives it a machine, writes its config, runs cps-attach.
async fn boot_member(
    bench: &Bench,
    instance_id: &str,
    config: impl Fn(&Instance) -> String,
) -> (Arc<Instance>, Run) {
    let instance = bench.adopt(instance_id).await.unwrap();
    let path = write_config(&instance, &config(&instance));
    let out = run(bench, &instance, &path, &[]);
    (instance, out)
}

fn env_file(instance: &Instance) -> BTreeMap<String, String> {
    std::fs::read_to_string(instance.home.join("run/node.env"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Three nodes boot into Pending:Wait, each gets its own volume and fixed-IP interface, writes
/// its files, runs its hooks and goes InService. Then node 2 is replaced while its old server
/// still holds the volume and interface: the new server waits, and gets node 2's data and IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_boots_and_node_2_is_replaced_with_its_data_and_ip() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Arc::new(
        Bench::start(BenchOptions {
            delays: Delays {
                attach: Duration::from_millis(300),
                create: Duration::from_millis(300),
                detach: Duration::from_millis(500),
                shutdown: Duration::from_secs(2),
            },
            ..BenchOptions::default()
        })
        .unwrap(),
    );
    let mut ips = BTreeMap::new();
    for k in 1..=3u8 {
        let node = tags(&[("cluster", "e2e"), ("cps:node-id", &k.to_string())]);
        let (_, ip) = bench
            .create_interface("us-east-1a", 10 + k, &node)
            .await
            .unwrap();
        ips.insert(k.to_string(), ip);
        bench
            .create_group(
                &format!("node-{k}"),
                "us-east-1a",
                1,
                &node,
                HOOK,
                Duration::from_secs(120),
            )
            .await
            .unwrap();
    }
    let mut first = BTreeMap::new();
    for k in 1..=3 {
        let waiting = bench
            .wait_pending(&format!("node-{k}"), 1, Duration::from_secs(10))
            .await
            .unwrap();
        first.insert(k.to_string(), waiting[0].clone());
    }
    let mut guards = Vec::new();
    // All three boot at once.
    let runs: Vec<(String, Arc<Instance>, Run)> = {
        let handles: Vec<_> = first
            .iter()
            .map(|(k, id)| {
                let (bench, k, id) = (bench.clone(), k.clone(), id.clone());
                tokio::spawn(async move {
                    let (i, out) = boot_member(&bench, &id, |i| node_config(&i.home, "")).await;
                    (k, i, out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.push(h.await.unwrap());
        }
        all
    };
    let mut volumes = BTreeMap::new();
    for (k, instance, out) in &runs {
        guards.push(MountGuard(instance.home.join("data")));
        assert_eq!(out.code, 0, "node {k}:\n{}", out.stderr);
        let ready = out.ready();
        assert_eq!(ready["node_id"], k.as_str());
        assert_eq!(ready["ip"], ips[k].as_str(), "node {k} has its fixed IP");
        assert_eq!(ready["lifecycle"], "Completed(Continue)");
        assert_eq!(ready["configured"], "Some(true)");
        volumes.insert(k.clone(), ready["volume_id"].as_str().unwrap().to_owned());
        let env = env_file(instance);
        assert_eq!(env["CPS_NODE_ID"], *k);
        assert_eq!(env["CPS_ENI_IP"], ips[k]);
        assert_eq!(env["CPS_ENI_INTERFACE"], "eth1");
        let props = std::fs::read_to_string(instance.home.join("etc/node.properties")).unwrap();
        assert_eq!(props, format!("node.id={k}\nlisten={}\n", ips[k]));
        let members = bench.members(&format!("node-{k}")).await.unwrap();
        assert_eq!(members[0].lifecycle_state, "InService", "node {k}");
    }
    let distinct: std::collections::BTreeSet<_> = volumes.values().collect();
    assert_eq!(distinct.len(), 3, "each node its own volume");
    assert_eq!(
        bench
            .volumes_tagged(&tags(&[("cluster", "e2e")]))
            .await
            .len(),
        3
    );

    // Node 2's data, then its replacement.
    let (_, old2, _) = runs.iter().find(|(k, _, _)| k == "2").unwrap();
    std::fs::write(old2.home.join("data/precious"), "node 2's data").unwrap();
    bench.terminate_in_group(&old2.id).await.unwrap();
    let replacement = bench
        .wait_pending("node-2", 1, Duration::from_secs(10))
        .await
        .unwrap()
        .into_iter()
        .find(|id| *id != old2.id)
        .expect("the group launched a replacement");
    let (new2, out) = boot_member(&bench, &replacement, |i| node_config(&i.home, "")).await;
    guards.push(MountGuard(new2.home.join("data")));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.said("the volume is held by another instance; waiting for it to be released"),
        "{}",
        out.stderr
    );
    let ready = out.ready();
    assert_eq!(ready["volume_id"], volumes["2"].as_str(), "node 2's volume");
    assert_eq!(ready["formatted"], false);
    assert_eq!(ready["ip"], ips["2"].as_str(), "node 2's IP");
    assert_eq!(
        std::fs::read_to_string(new2.home.join("data/precious")).unwrap(),
        "node 2's data"
    );
    let log = std::fs::read_to_string(new2.home.join("data/boots.log")).unwrap();
    assert_eq!(
        log.lines().count(),
        2,
        "configure ran on each server of node 2: {log}"
    );
    let members = bench.members("node-2").await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(
        (
            members[0].instance_id.as_str(),
            members[0].lifecycle_state.as_str()
        ),
        (replacement.as_str(), "InService")
    );
    assert_eq!(
        bench
            .volumes_tagged(&tags(&[("cluster", "e2e")]))
            .await
            .len(),
        3,
        "no new volume"
    );
    assert!(
        bench.udev().errors().is_empty(),
        "{:?}",
        bench.udev().errors()
    );
}

/// A node whose health never passes abandons its lifecycle action: the group terminates it and
/// launches another right away, instead of after the hook's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_hook_abandons_and_the_group_launches_another() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    let node = tags(&[("cluster", "e2e"), ("cps:node-id", "9")]);
    bench
        .create_interface("us-east-1a", 30, &node)
        .await
        .unwrap();
    bench
        .create_group(
            "node-9",
            "us-east-1a",
            1,
            &node,
            HOOK,
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let first = bench
        .wait_pending("node-9", 1, Duration::from_secs(10))
        .await
        .unwrap()[0]
        .clone();
    let (instance, out) = boot_member(&bench, &first, |i| {
        node_config(&i.home, "")
            .replace(
                "health: [sh, -c, 'grep -q \"as $CPS_NODE_ID\" \"$CPS_MOUNT_PATH/boots.log\"']",
                "health: [sh, -c, 'echo not yet >&2; exit 1']",
            )
            .replace("health-timeout: 20s", "health-timeout: 3s")
    })
    .await;
    let _guard = MountGuard(instance.home.join("data"));
    assert_eq!(out.code, 8, "hook failure exit code:\n{}", out.stderr);
    assert!(out.stderr.contains("hook health failed"), "{}", out.stderr);
    assert!(
        out.stderr.contains("not yet"),
        "the hook's output is in the log: {}",
        out.stderr
    );
    assert!(
        out.said("abandoning the lifecycle action"),
        "{}",
        out.stderr
    );
    let members = bench.members("node-9").await.unwrap();
    assert!(
        members.iter().all(|m| m.instance_id != first),
        "the failed instance left the group"
    );
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(
        members[0].lifecycle_state, "Pending:Wait",
        "a new instance is on its way"
    );
}

/// Five instances boot at once against three slots: three distinct slots, no extra volumes, the
/// other two fail cleanly (exit 9) and abandon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_instances_against_three_slots() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Arc::new(
        Bench::start(BenchOptions {
            delays: Delays {
                attach: Duration::from_millis(200),
                create: Duration::from_millis(200),
                ..Delays::default()
            },
            ..BenchOptions::default()
        })
        .unwrap(),
    );
    let cluster = tags(&[("cluster", "e2e-slots")]);
    bench
        .create_group(
            "brokers",
            "us-east-1a",
            5,
            &cluster,
            HOOK,
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    let launched = bench
        .wait_pending("brokers", 5, Duration::from_secs(10))
        .await
        .unwrap();
    let config = |i: &Instance| {
        format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: e2e-slots}}\n    size: 1\nmount:\n  target: {}/data\nidentity:\n  mode: slot\n  max-slots: 3\nlifecycle:\n  hook: {HOOK}\n",
            i.home.display()
        )
    };
    let handles: Vec<_> = launched
        .iter()
        .map(|id| {
            let (bench, id) = (bench.clone(), id.clone());
            tokio::spawn(async move { boot_member(&bench, &id, config).await })
        })
        .collect();
    let mut slots = Vec::new();
    let mut failed = Vec::new();
    let mut guards = Vec::new();
    for h in handles {
        let (instance, out) = h.await.unwrap();
        guards.push(MountGuard(instance.home.join("data")));
        match out.code {
            0 => slots.push(out.ready()["node_id"].as_str().unwrap().to_owned()),
            9 => {
                assert!(
                    out.stderr.contains("no free slot: all 3 slots"),
                    "{}",
                    out.stderr
                );
                failed.push(instance.id.clone());
            }
            other => panic!("exit {other}:\n{}", out.stderr),
        }
    }
    slots.sort();
    assert_eq!(slots, ["1", "2", "3"]);
    assert_eq!(failed.len(), 2);
    assert_eq!(
        bench.volumes_tagged(&cluster).await.len(),
        3,
        "one volume per slot"
    );
    let members = bench.members("brokers").await.unwrap();
    assert!(
        members.iter().all(|m| !failed.contains(&m.instance_id)),
        "the two abandoned instances left"
    );
    assert_eq!(
        members
            .iter()
            .filter(|m| m.lifecycle_state == "InService")
            .count(),
        3
    );
    assert_eq!(
        members
            .iter()
            .filter(|m| m.lifecycle_state == "Pending:Wait")
            .count(),
        2,
        "replacements launched"
    );
}

/// cps-roll replaces every node of a cluster booted by cps-attach, one at a time; each
/// replacement boots with the real cps-attach and gets its node's volume (data intact, not
/// reformatted) and its fixed IP back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cps_roll_replaces_every_node_and_each_keeps_its_data_and_ip() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    // Built alongside this binary by `cargo test --workspace`.
    let roll_bin = Path::new(crate::BIN).with_file_name("cps-roll");
    assert!(
        roll_bin.is_file(),
        "{} is missing: build it first (cargo build -p cps-roll)",
        roll_bin.display()
    );
    let bench = Arc::new(
        Bench::start(BenchOptions {
            delays: Delays {
                attach: Duration::from_millis(200),
                create: Duration::from_millis(200),
                detach: Duration::from_millis(300),
                shutdown: Duration::from_secs(1),
            },
            ..BenchOptions::default()
        })
        .unwrap(),
    );
    let mut ips = BTreeMap::new();
    let mut templates = Vec::new();
    for k in 1..=3u8 {
        let node = tags(&[("cluster", "rolled"), ("cps:node-id", &k.to_string())]);
        let (_, ip) = bench
            .create_interface("us-east-1a", 20 + k, &node)
            .await
            .unwrap();
        ips.insert(k.to_string(), ip);
        templates.push(
            bench
                .create_group(
                    &format!("rolled-{k}"),
                    "us-east-1a",
                    1,
                    &node,
                    HOOK,
                    Duration::from_secs(120),
                )
                .await
                .unwrap(),
        );
    }
    let config = |i: &Instance| {
        node_config(&i.home, "").replace("ebs-tags: {cluster: e2e}", "ebs-tags: {cluster: rolled}")
    };
    let mut guards = Vec::new();
    let mut booted = std::collections::BTreeSet::new();
    let mut volumes = BTreeMap::new();
    for k in 1..=3 {
        let group = format!("rolled-{k}");
        let id = bench
            .wait_pending(&group, 1, Duration::from_secs(10))
            .await
            .unwrap()[0]
            .clone();
        let (instance, out) = boot_member(&bench, &id, config).await;
        guards.push(MountGuard(instance.home.join("data")));
        assert_eq!(out.code, 0, "node {k}:\n{}", out.stderr);
        volumes.insert(
            k.to_string(),
            out.ready()["volume_id"].as_str().unwrap().to_owned(),
        );
        std::fs::write(
            instance.home.join("data/precious"),
            format!("node {k}'s data"),
        )
        .unwrap();
        booted.insert(id);
    }
    for t in &templates {
        bench.new_template_version(t).await.unwrap();
    }

    let mut cmd = bench.roll_command(&roll_bin);
    cmd.args([
        "run",
        "--cluster",
        "rolled",
        "--cluster-tag",
        "cluster",
        "--poll-interval",
        "200ms",
        "--timeout",
        "90s",
    ]);
    let mut roll = tokio::process::Command::from(cmd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Play each replacement's boot with cps-attach, as its user data would.
    let mut replaced = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while replaced.len() < 3 && std::time::Instant::now() < deadline {
        for k in 1..=3 {
            let group = format!("rolled-{k}");
            for m in bench.members(&group).await.unwrap() {
                if m.lifecycle_state != "Pending:Wait" || booted.contains(&m.instance_id) {
                    continue;
                }
                booted.insert(m.instance_id.clone());
                let (instance, out) = boot_member(&bench, &m.instance_id, config).await;
                guards.push(MountGuard(instance.home.join("data")));
                replaced.push((k.to_string(), instance, out));
            }
        }
        if roll.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(120), roll.wait_with_output())
        .await
        .expect("cps-roll finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("done: 3 node(s) replaced (1, 2, 3)"),
        "{stdout}"
    );
    let order: Vec<&str> = replaced.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(order, ["1", "2", "3"], "one node at a time, in order");
    for (k, instance, run) in &replaced {
        assert_eq!(run.code, 0, "node {k}:\n{}", run.stderr);
        let ready = run.ready();
        assert_eq!(ready["volume_id"], volumes[k].as_str(), "node {k}'s volume");
        assert_eq!(ready["formatted"], false);
        assert_eq!(ready["ip"], ips[k].as_str(), "node {k}'s IP");
        assert_eq!(
            std::fs::read_to_string(instance.home.join("data/precious")).unwrap(),
            format!("node {k}'s data")
        );
        let members = bench.members(&format!("rolled-{k}")).await.unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].instance_id, instance.id);
        assert_eq!(members[0].launch_template_version.as_deref(), Some("2"));
    }
    assert_eq!(
        bench
            .volumes_tagged(&tags(&[("cluster", "rolled")]))
            .await
            .len(),
        3,
        "no new volume"
    );
}
