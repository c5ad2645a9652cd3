//! Growing a running node's volume with the real binary: the emulator plays ModifyVolume with
//! AWS's states, the device stand-in grows the loop device when the modification is
//! optimizing, and the real kernel tools grow the filesystem while it is mounted.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use cps_fixtures::{MountGuard, Need, require};
use cps_testbed::{Bench, BenchOptions, Instance};
use serde_json::Value;

use crate::{BIN, Run, TIER, run, tags, write_config};

/// `cps-attach grow` with the bench's environment.
fn grow(bench: &Bench, instance: &Instance, config: &Path) -> Run {
    let mut cmd = bench.attach_command(Path::new(BIN), instance, config);
    cmd.arg("grow").env("CPS_LOG_FORMAT", "json");
    let Output { status, stderr, .. } = cmd.output().expect("run cps-attach grow");
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    Run {
        code: status.code().unwrap_or(-1),
        log: stderr
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        stderr,
    }
}

/// The fields of grow's report line.
fn done(run: &Run) -> &Value {
    run.log
        .iter()
        .find(|l| l["message"] == "grow done")
        .unwrap_or_else(|| panic!("no 'grow done' line (exit {}):\n{}", run.code, run.stderr))
}

fn config_text(name: &str, gib: u32, fstype: &str, mount: &Path) -> String {
    format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: grow, node: {name}}}\n    size: {gib}\nfile-system:\n  type: {fstype}\nmount:\n  target: {}\n",
        mount.display()
    )
}

/// The size of the filesystem mounted at `path`, in bytes (statvfs: blocks × fragment size).
fn filesystem_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%b %S"])
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
    it.next().unwrap() * it.next().unwrap()
}

struct Node {
    instance: std::sync::Arc<Instance>,
    mount: PathBuf,
    _guard: MountGuard,
}

/// A node booted at 1 GiB with a file on its volume.
async fn node(bench: &Bench, name: &str, fstype: &str) -> Node {
    let instance = bench.launch("us-east-1a").await.unwrap();
    let mount = instance.home.join("data");
    let config = write_config(&instance, &config_text(name, 1, fstype, &mount));
    let first = run(bench, &instance, &config, &[]);
    assert_eq!(first.code, 0, "{name}: first boot:\n{}", first.stderr);
    std::fs::write(mount.join("kept"), b"the node's data").unwrap();
    Node {
        instance,
        _guard: MountGuard(mount.clone()),
        mount,
    }
}

/// 1 → 2 GiB on a running xfs node: one ModifyVolume, the filesystem grown online once the
/// device has grown, the data kept; a second `grow` changes nothing and sends no modification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_grown_from_1_to_2_gib_keeps_its_data_and_sees_2_gib() {
    if !cps_testbed::ready(TIER) || !require(TIER, &[Need::Tool("xfs_growfs", "xfsprogs")]) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    // Long enough that cps-attach must wait for `optimizing` before the device grows.
    bench
        .emulator()
        .set_modification_delays(Duration::from_secs(2), Duration::from_secs(600))
        .unwrap();
    let n = node(&bench, "xfs", "xfs").await;
    let before = filesystem_bytes(&n.mount);
    assert!(before < 1 << 30, "{before}");

    let config = write_config(&n.instance, &config_text("xfs", 2, "xfs", &n.mount));
    let grown = grow(&bench, &n.instance, &config);
    assert_eq!(grown.code, 0, "{}", grown.stderr);
    let report = done(&grown);
    assert_eq!(report["modified"], true, "{report}");
    assert_eq!(report["size_gib"], 2, "{report}");
    assert_eq!(report["filesystem_grown"], true, "{report}");
    let after = filesystem_bytes(&n.mount);
    assert!(
        after > (1 << 30) + (900 << 20) && after <= 2 << 30,
        "the filesystem sees 2 GiB: {before} → {after}"
    );
    assert_eq!(
        std::fs::read(n.mount.join("kept")).unwrap(),
        b"the node's data"
    );
    let volumes = bench.volumes_tagged(&tags(&[("cluster", "grow")])).await;
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0].size_gib, 2);

    let again = grow(&bench, &n.instance, &config);
    assert_eq!(again.code, 0, "{}", again.stderr);
    let report = done(&again);
    assert_eq!(report["modified"], false, "{report}");
    assert_eq!(report["filesystem_grown"], false, "{report}");
    assert_eq!(report["calls"], "DescribeVolumes=1", "{report}");
    assert_eq!(filesystem_bytes(&n.mount), after);
}

/// Terraform (or an operator) enlarged the volume: the plain re-run finds it at the configured
/// size and grows the btrfs filesystem with no ModifyVolume of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_enlarged_outside_cps_is_grown_by_the_next_run() {
    if !cps_testbed::ready(TIER) || !require(TIER, &[Need::Tool("btrfs", "btrfs-progs")]) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    let n = node(&bench, "btrfs", "btrfs").await;
    let volumes = bench.volumes_tagged(&tags(&[("cluster", "grow")])).await;
    bench
        .ec2()
        .modify_volume()
        .volume_id(&volumes[0].id)
        .size(2)
        .send()
        .await
        .unwrap();
    let config = write_config(&n.instance, &config_text("btrfs", 2, "btrfs", &n.mount));
    let rerun = run(&bench, &n.instance, &config, &[]);
    assert_eq!(rerun.code, 0, "{}", rerun.stderr);
    let ready = rerun.ready();
    assert_eq!(ready["filesystem_grown"], true, "{ready}");
    assert_eq!(ready["modified"], false, "{ready}");
    assert!(
        !ready["calls"].as_str().unwrap().contains("ModifyVolume"),
        "{ready}"
    );
    assert!(filesystem_bytes(&n.mount) > 1 << 30);
    assert_eq!(
        std::fs::read(n.mount.join("kept")).unwrap(),
        b"the node's data"
    );
}

/// ext4 grows online only with CAP_SYS_RESOURCE. Where the kernel refuses, the volume is still
/// modified, the node keeps running at its old size, and the warning says how to grow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ext4_grows_online_or_says_how_to_grow_it_by_hand() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    let n = node(&bench, "ext4", "ext4").await;
    let before = filesystem_bytes(&n.mount);
    let config = write_config(&n.instance, &config_text("ext4", 2, "ext4", &n.mount));
    let grown = grow(&bench, &n.instance, &config);
    assert_eq!(grown.code, 0, "{}", grown.stderr);
    let report = done(&grown);
    assert_eq!(report["modified"], true, "{report}");
    if report["filesystem_grown"] == true {
        assert!(filesystem_bytes(&n.mount) > before + (900 << 20));
    } else {
        println!(
            "LIMIT ext4 online grow: the kernel refused here (no CAP_SYS_RESOURCE); the refusal is tested, not the growth"
        );
        let deferred = report["deferred"].as_str().unwrap();
        assert!(
            deferred.contains("cannot grow its ext4 filesystem"),
            "{deferred}"
        );
        assert!(deferred.contains("resize2fs"), "says how: {deferred}");
        assert_eq!(filesystem_bytes(&n.mount), before);
    }
    assert_eq!(
        std::fs::read(n.mount.join("kept")).unwrap(),
        b"the node's data"
    );
}

/// `grow` on an instance with nothing attached changes nothing and says to boot first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_needs_a_running_node() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    let instance = bench.launch("us-east-1a").await.unwrap();
    let mount = instance.home.join("data");
    let config = write_config(&instance, &config_text("none", 1, "xfs", &mount));
    let out = grow(&bench, &instance, &config);
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(
        out.stderr.contains("works on a running node"),
        "{}",
        out.stderr
    );
    assert!(
        bench
            .volumes_tagged(&tags(&[("cluster", "grow")]))
            .await
            .is_empty(),
        "nothing was created"
    );
}
