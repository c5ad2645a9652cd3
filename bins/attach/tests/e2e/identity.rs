//! Identity with the real binary: a slot's replacement while the old server still holds the
//! slot's volume, node ids read from tags, and a node whose volume an operator deleted.

use std::sync::Arc;
use std::time::Duration;

use cps_fixtures::MountGuard;
use cps_testbed::{Bench, BenchOptions, Delays, Instance};

use crate::{TIER, run, tags, write_config};

const HOOK: &str = "cps-launch";

/// Boots an instance the group launched with `config`.
async fn boot(
    bench: &Bench,
    instance_id: &str,
    config: impl Fn(&Instance) -> String,
) -> (Arc<Instance>, crate::Run) {
    let instance = bench.adopt(instance_id).await.unwrap();
    let path = write_config(&instance, &config(&instance));
    let out = run(bench, &instance, &path, &[]);
    (instance, out)
}

/// Three brokers in slot mode with headroom (max-slots 5). Broker 3's server is replaced and
/// still shuts down with slot 3's volume attached when its replacement boots: the replacement
/// waits for slot 3 and comes back as broker 3 with its data, instead of creating slot 4.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_replacement_waits_for_its_slot_instead_of_creating_a_new_one() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Arc::new(
        Bench::start(BenchOptions {
            delays: Delays {
                attach: Duration::from_millis(200),
                create: Duration::from_millis(200),
                detach: Duration::from_millis(500),
                shutdown: Duration::from_secs(3),
            },
            ..BenchOptions::default()
        })
        .unwrap(),
    );
    let cluster = tags(&[("cluster", "headroom")]);
    bench
        .create_group(
            "brokers",
            "us-east-1a",
            3,
            &cluster,
            HOOK,
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    let config = |i: &Instance| {
        format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: headroom}}\n    size: 1\nfile-system:\n  type: xfs\nmount:\n  target: {}/data\nidentity:\n  mode: slot\n  max-slots: 5\nlifecycle:\n  hook: {HOOK}\ntimeouts:\n  device: 30s\n",
            i.home.display()
        )
    };
    let first = bench
        .wait_pending("brokers", 3, Duration::from_secs(10))
        .await
        .unwrap();
    let mut guards = Vec::new();
    let mut by_slot = std::collections::BTreeMap::new();
    for id in &first {
        let (instance, out) = boot(&bench, id, config).await;
        guards.push(MountGuard(instance.home.join("data")));
        assert_eq!(out.code, 0, "{}", out.stderr);
        let ready = out.ready();
        by_slot.insert(
            ready["node_id"].as_str().unwrap().to_owned(),
            (instance, ready["volume_id"].as_str().unwrap().to_owned()),
        );
    }
    assert_eq!(by_slot.keys().collect::<Vec<_>>(), ["1", "2", "3"]);
    let (old3, volume3) = by_slot["3"].clone();
    std::fs::write(old3.home.join("data/broker-3"), "broker 3's log").unwrap();

    bench.terminate_in_group(&old3.id).await.unwrap();
    let replacement = bench
        .wait_pending("brokers", 1, Duration::from_secs(10))
        .await
        .unwrap()
        .into_iter()
        .find(|id| !first.contains(id))
        .expect("the group launched a replacement");
    let held = bench.volumes_tagged(&cluster).await;
    let held = held.iter().find(|v| v.id == volume3).unwrap();
    assert_eq!(
        held.attachments.first().map(|a| a.instance_id.as_str()),
        Some(old3.id.as_str()),
        "slot 3 is still attached to the old server when its replacement boots"
    );
    let (new3, out) = boot(&bench, &replacement, config).await;
    guards.push(MountGuard(new3.home.join("data")));
    assert_eq!(out.code, 0, "{}", out.stderr);
    let ready = out.ready();
    assert_eq!(ready["node_id"], "3", "broker 3 came back:\n{}", out.stderr);
    assert_eq!(ready["volume_id"], volume3.as_str());
    assert_eq!(ready["formatted"], false);
    assert_eq!(
        std::fs::read_to_string(new3.home.join("data/broker-3")).unwrap(),
        "broker 3's log"
    );
    assert_eq!(
        bench.volumes_tagged(&cluster).await.len(),
        3,
        "no slot 4 was created"
    );
}

fn tagged_node_config(home: &std::path::Path) -> String {
    format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: tagged}}\n    size: 1\nmount:\n  target: {home}/data\nidentity:\n  mode: node-id\nfiles:\n  - path: {home}/etc/node.properties\n    content: \"node.id=${{CPS_NODE_ID}}\\n\"\nlifecycle:\n  hook: {HOOK}\n",
        home = home.display()
    )
}

/// A node id read from the group's tag is checked like a configured one: a blank value (every
/// such group would share one identity) and one carrying a newline (it would reach the node's
/// files as an extra line) are refused with exit 9, before any volume is claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_tag_that_is_blank_or_carries_a_newline_is_refused() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    for (group, value, shown) in [
        ("blank-node", "  ", r#""  ""#),
        ("injected-node", "7\nrole=admin", r#""7\nrole=admin""#),
    ] {
        let node = tags(&[("cluster", "tagged"), ("cps:node-id", value)]);
        bench
            .create_group(
                group,
                "us-east-1a",
                1,
                &node,
                HOOK,
                Duration::from_secs(300),
            )
            .await
            .unwrap();
        let id = bench
            .wait_pending(group, 1, Duration::from_secs(10))
            .await
            .unwrap()[0]
            .clone();
        let (instance, out) = boot(&bench, &id, |i| tagged_node_config(&i.home)).await;
        let _guard = MountGuard(instance.home.join("data"));
        assert_eq!(out.code, 9, "{group}: identity exit code:\n{}", out.stderr);
        assert!(
            out.said("the cps:node-id tag of") && out.said(shown),
            "{group}: names the tag and shows the value:\n{}",
            out.stderr
        );
        assert!(
            !instance.home.join("etc/node.properties").exists(),
            "{group}: no node file was written"
        );
    }
    assert!(
        bench
            .volumes_tagged(&tags(&[("cluster", "tagged")]))
            .await
            .is_empty(),
        "no volume was created for an invalid id"
    );
}

/// An operator deleted node 5's volume. AWS answers the node's creation token with the deleted
/// volume for hours; the next boot must move on to a fresh token and create the node's volume
/// again instead of waiting for a volume that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_volume_is_created_again_under_a_new_token() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    let node = tags(&[("cluster", "deleted"), ("cps:node-id", "5")]);
    let config = |i: &Instance| {
        format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: deleted}}\n    size: 1\nmount:\n  target: {}/data\nidentity:\n  mode: node-id\n  node-id: '5'\ntimeouts:\n  create: 20s\n",
            i.home.display()
        )
    };
    let a = bench.launch("us-east-1a").await.unwrap();
    let first = run(&bench, &a, &write_config(&a, &config(&a)), &[]);
    let guard = MountGuard(a.home.join("data"));
    assert_eq!(first.code, 0, "{}", first.stderr);
    let deleted = first.ready()["volume_id"].as_str().unwrap().to_owned();
    drop(guard);
    bench.terminate(&a).await.unwrap();
    assert!(bench.wait_devices_gone(&[&deleted]));
    bench
        .ec2()
        .delete_volume()
        .volume_id(&deleted)
        .send()
        .await
        .unwrap();
    assert!(bench.volumes_tagged(&node).await.is_empty());

    let b = bench.launch("us-east-1a").await.unwrap();
    let _guard = MountGuard(b.home.join("data"));
    let second = run(&bench, &b, &write_config(&b, &config(&b)), &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let ready = second.ready();
    assert_eq!(ready["origin"], "Created");
    assert_ne!(ready["volume_id"], deleted.as_str(), "a new volume");
    assert!(
        second.said("moving on to the next token"),
        "{}",
        second.stderr
    );
    let volumes = bench.volumes_tagged(&node).await;
    assert_eq!(volumes.len(), 1, "exactly one volume for node 5");
}
