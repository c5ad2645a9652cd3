//! The real cps-attach binary on the bench: the AWS emulator over the wire, a fake IMDS per
//! instance, and loop devices that appear when EC2 says a volume is attached.
//!
//! This module: one node's volume (pool mode, the original tool's behaviour). `cluster`: node
//! identities, interfaces, hooks and lifecycle hooks on Auto Scaling groups. `identity`: slot
//! replacements, node ids from tags, deleted volumes. `lifecycle`: membership and heartbeat
//! edge cases, signals. `files`: node files in a directory the service owns, and from the
//! secret stores. `format`: the agent killed inside mkfs. `iam`: the module's policy, exactly.
//! `messages`: permanent AWS failures, log colour.

mod cluster;
mod files;
mod format;
mod grow;
mod iam;
mod identity;
mod life;
mod lifecycle;
mod messages;

use std::path::{Path, PathBuf};
use std::process::Output;

use cps_fixtures::{MountGuard, is_mountpoint};
use cps_provider::{Tags, VolumeService};
use cps_testbed::{Bench, BenchOptions, Delays, Instance};
use serde_json::Value;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_cps-attach");
pub(crate) const TIER: &str = "end to end (emulator + loop devices)";

/// The complete example from the original tool's README, byte for byte.
const SEED_EXAMPLE: &str = "\
# optional; the block device to mount EBS volumes to.  Defaults to /dev/xvdc.
block-device: /dev/xvdc

# required; the block device \"provider\"
block-provider:
  # aws-ebs is currently the only supported provider
  aws-ebs:
    # required; one or more tags to attach to the EBS volume.  When searching
    # for existing volumes to re-attach to, they must have all of these tags.
    # These tags will be automatically added to any EBS volume that we create
    # when we can't find an existing volume.
    ebs-tags:
      environment: Production
      role: PostgreSQL
    # optional; EBS volume type, \"gp2\" | \"io1\" | \"st1\" | \"sc1\".  gp2 default.
    type: gp2
    # required; size (GB) to create new volumes.
    size: 200

# optional; configuration about file system creation
file-system:
  # optional; command-line arguments to mkfs subprocess.  Defaults to creating
  # ext4 filesystem with no reserved superuser blocks (-m 0).
  mkfs:
    - -t
    - ext4
    - -m
    - 0

# optional; configuration about mounting filesystem
mount:
  # optional; mount point.  Defaults to /mnt
  target: /mnt
";

pub(crate) struct Run {
    pub(crate) code: i32,
    /// The JSON log lines.
    pub(crate) log: Vec<Value>,
    pub(crate) stderr: String,
}

impl Run {
    /// The fields of the final "volume ready" line.
    pub(crate) fn ready(&self) -> &Value {
        self.log
            .iter()
            .find(|l| l["message"] == "volume ready")
            .unwrap_or_else(|| {
                panic!(
                    "no 'volume ready' line (exit {}):\n{}",
                    self.code, self.stderr
                )
            })
    }

    pub(crate) fn said(&self, text: &str) -> bool {
        self.log
            .iter()
            .any(|l| l["message"].as_str().is_some_and(|m| m.contains(text)))
    }
}

pub(crate) fn run(
    bench: &Bench,
    instance: &Instance,
    config: &Path,
    extra_env: &[(&str, &str)],
) -> Run {
    let mut cmd = bench.attach_command(Path::new(BIN), instance, config);
    cmd.env("CPS_LOG_FORMAT", "json");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let Output { status, stderr, .. } = cmd.output().expect("run cps-attach");
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    let log = stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Run {
        code: status.code().unwrap_or(-1),
        log,
        stderr,
    }
}

/// A bench with one instance in us-east-1a, or `None` when the tier skips here.
pub(crate) async fn bench_with_instance() -> Option<(Bench, std::sync::Arc<Instance>)> {
    if !cps_testbed::ready(TIER) {
        return None;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    let instance = bench.launch("us-east-1a").await.unwrap();
    Some((bench, instance))
}

pub(crate) fn write_config(instance: &Instance, text: &str) -> PathBuf {
    let path = instance.home.join("attach.yml");
    std::fs::write(&path, text).unwrap();
    path
}

pub(crate) fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The replacement story: A creates and formats; A is terminated and B boots while the volume is
/// still detaching; B waits, gets the same data back, re-runs as a no-op; a matching volume in
/// another zone is never touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacement_keeps_the_data_and_reruns_are_no_ops() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions {
        delays: Delays {
            attach: std::time::Duration::from_millis(400),
            create: std::time::Duration::from_millis(300),
            detach: std::time::Duration::from_secs(2),
            shutdown: std::time::Duration::from_secs(6),
        },
        ..BenchOptions::default()
    })
    .unwrap();
    let node_tags = tags(&[("cluster", "e2e"), ("node", "1")]);
    let mount = bench.dir().join("data");
    let _guard = MountGuard(mount.clone());
    let config_text = format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: e2e, node: '1'}}\n    size: 1\nfile-system:\n  type: xfs\n  label: e2e\nmount:\n  target: {}\n  options: [noatime]\n  mode: '0750'\n  persist: fstab\n  fstab: {}\ntimeouts:\n  device: 30s\n",
        mount.display(),
        bench.dir().join("fstab").display()
    );

    // A matching volume in another zone, which must be skipped.
    let far = bench
        .volumes_api()
        .create_volume(
            &cps_provider::VolumeSpec::gp3("us-east-1b", 1, &node_tags),
            "far-away",
        )
        .await
        .unwrap();

    let a = bench.launch("us-east-1a").await.unwrap();
    let first = run(&bench, &a, &write_config(&a, &config_text), &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let ready = first.ready();
    let volume_id = ready["volume_id"].as_str().unwrap().to_owned();
    assert_ne!(volume_id, far.id);
    assert_eq!(ready["origin"], "Created");
    assert_eq!(ready["formatted"], true);
    assert_eq!(ready["fstype"], "xfs");
    assert!(first.said("skipping matching volumes in other availability zones"));
    assert!(is_mountpoint(&mount));
    std::fs::write(mount.join("precious.txt"), "written by A").unwrap();
    let fstab = std::fs::read_to_string(bench.dir().join("fstab")).unwrap();
    assert!(
        fstab.contains(&format!(
            "UUID={} {} xfs noatime,nofail 0 0",
            ready["uuid"].as_str().unwrap(),
            mount.display()
        )),
        "{fstab}"
    );

    // A is terminated; as on EC2 it first shows shutting-down with the volume still attached,
    // then the volume detaches. B boots inside that window.
    bench.terminate(&a).await.unwrap();
    let held = bench.volumes_tagged(&node_tags).await;
    let held = held.iter().find(|v| v.id == volume_id).unwrap();
    assert_eq!(held.attachments[0].instance_id, a.id, "still attached to A");
    let states = bench
        .volumes_api()
        .instance_states(std::slice::from_ref(&a.id))
        .await
        .unwrap();
    assert_eq!(states[&a.id], cps_provider::InstanceState::ShuttingDown);

    let b = bench.launch("us-east-1a").await.unwrap();
    let config_b = write_config(&b, &config_text);
    let second = run(&bench, &b, &config_b, &[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second.said("the volume is held by another instance; waiting for it to be released"),
        "B waited for A to let go:\n{}",
        second.stderr
    );
    let ready = second.ready();
    assert_eq!(ready["volume_id"], volume_id.as_str(), "B got A's volume");
    assert_eq!(ready["origin"], "Claimed");
    assert_eq!(ready["formatted"], false, "never reformatted");
    assert_eq!(
        std::fs::read_to_string(mount.join("precious.txt")).unwrap(),
        "written by A"
    );
    // Reattach: listings while A shuts down and the volume detaches (up to 8 s), one
    // AttachVolume, polls during the 400 ms attach; the schedule (100 ms, growing by half, at
    // most 3 s apart) keeps it to a dozen or so, not dozens.
    let calls = ready["calls"].as_str().unwrap();
    assert!(
        calls.contains("AttachVolume=1") && !calls.contains("CreateVolume"),
        "{calls}"
    );
    let describes: u64 = calls
        .split(',')
        .find_map(|c| c.strip_prefix("DescribeVolumes="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((3..=20).contains(&describes), "{calls}");

    let third = run(&bench, &b, &config_b, &[]);
    assert_eq!(third.code, 0, "{}", third.stderr);
    assert_eq!(third.ready()["origin"], "Reused");
    assert_eq!(third.ready()["already_mounted"], true);
    assert_eq!(third.ready()["api_calls"], 1, "a re-run only lists");
    let volumes = bench.volumes_tagged(&node_tags).await;
    assert_eq!(
        volumes.len(),
        2,
        "the far volume and the node's: no second volume in us-east-1a"
    );
    let far_now = volumes.iter().find(|v| v.id == far.id).unwrap();
    assert!(
        far_now.attachments.is_empty(),
        "the far volume was never attached"
    );
    assert!(
        bench.udev().errors().is_empty(),
        "{:?}",
        bench.udev().errors()
    );
}

/// The original tool's README example, unchanged on disk; only the mount point is moved off the
/// machine's real /mnt by the environment override.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_example_config_works_unchanged() {
    let Some((bench, a)) = bench_with_instance().await else {
        return;
    };
    let config = write_config(&a, SEED_EXAMPLE);
    let mount = bench.dir().join("mnt");
    let _guard = MountGuard(mount.clone());
    let out = run(
        &bench,
        &a,
        &config,
        &[("CPS_MOUNT_TARGET", mount.to_str().unwrap())],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ready()["fstype"], "ext4");
    let volumes = bench
        .volumes_tagged(&tags(&[
            ("environment", "Production"),
            ("role", "PostgreSQL"),
        ]))
        .await;
    assert_eq!(volumes.len(), 1);
    assert_eq!(
        (volumes[0].size_gib, volumes[0].volume_type.as_str()),
        (200, "gp2")
    );
    assert!(volumes[0].encrypted, "encrypted by default");
    let device = bench.udev().device_of(&volumes[0].id).unwrap();
    let tune = cps_fixtures::run("tune2fs", &["-l", device.to_str().unwrap()]).unwrap();
    assert!(
        tune.lines()
            .any(|l| l.starts_with("Reserved block count:") && l.ends_with(" 0")),
        "-m 0 applied"
    );
}

/// A volume holding a partition table is refused with exit code 5 and left byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_volume_is_refused_and_untouched() {
    let Some((bench, a)) = bench_with_instance().await else {
        return;
    };
    let t = tags(&[("cluster", "refuse")]);
    let vol = bench
        .volumes_api()
        .create_volume(
            &cps_provider::VolumeSpec::gp3("us-east-1a", 1, &t),
            "pre-made",
        )
        .await
        .unwrap();
    // What a previous owner left on it: a GPT (the image is the volume's data).
    let image = bench.dir().join("volumes").join(format!("{}.img", vol.id));
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    cps_fixtures::run(
        "sgdisk",
        &["-o", "-n", "1:2048:+64M", image.to_str().unwrap()],
    )
    .unwrap();
    let before = cps_fixtures::fingerprint(&image).unwrap();

    let config = write_config(
        &a,
        &format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: refuse}}\n    size: 1\nmount:\n  target: {}\n",
            bench.dir().join("never").display()
        ),
    );
    let out = run(&bench, &a, &config, &[]);
    assert_eq!(
        out.code, 5,
        "refused-unsafe-device exit code:\n{}",
        out.stderr
    );
    assert!(out.stderr.contains("gpt partition table"), "{}", out.stderr);
    assert!(
        out.stderr.contains(&vol.id),
        "names the volume: {}",
        out.stderr
    );
    assert_eq!(
        cps_fixtures::fingerprint(&image).unwrap(),
        before,
        "not one byte changed"
    );
    assert!(!is_mountpoint(&bench.dir().join("never")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_appears_is_a_timeout() {
    let Some((bench, a)) = bench_with_instance().await else {
        return;
    };
    let config = write_config(
        &a,
        "block-provider:\n  aws-ebs:\n    ebs-tags: {cluster: lost}\n    size: 1\ntimeouts:\n  device: 2s\n",
    );
    let empty = bench.dir().join("empty-dev");
    std::fs::create_dir_all(&empty).unwrap();
    let out = run(
        &bench,
        &a,
        &config,
        &[("CPS_DEVICE_ROOT", empty.to_str().unwrap())],
    );
    assert_eq!(out.code, 6, "timeout exit code:\n{}", out.stderr);
    assert!(
        out.stderr
            .contains("timed out after 2s waiting for the kernel device"),
        "{}",
        out.stderr
    );
}

#[test]
fn validate_checks_without_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yml");
    std::fs::write(&good, SEED_EXAMPLE).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["validate", "-c"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("valid") && text.contains("gp2 200 GiB"),
        "{text}"
    );

    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "block-provider:\n  aws-ebs:\n    ebs-tags: {a: b}\n    size: 1\nmount:\n  taget: /data\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["validate", "-c"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("{}:6:3: unknown field `taget`", bad.display())),
        "{err}"
    );

    let out = std::process::Command::new(BIN)
        .args(["validate", "-c", "/nonexistent/attach.yml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
}

/// The root disk carries the configured tags (a launch template's tag specification for
/// volumes tags every volume of the instance, the root one included): it is attached here, but
/// it is not a place for the node's data — it dies with the instance. Refused, untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_volume_carrying_the_tags_is_refused() {
    let Some((bench, a)) = bench_with_instance().await else {
        return;
    };
    let all = bench.volumes_tagged(&Tags::new()).await;
    let root = all
        .iter()
        .find(|v| v.attachment_to(&a.id).is_some())
        .expect("the emulator gives each instance a root volume");
    bench
        .volumes_api()
        .tag_volume(&root.id, &tags(&[("cluster", "rooted")]))
        .await
        .unwrap();
    let target = bench.dir().join("never");
    let config = write_config(
        &a,
        &format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: rooted}}\n    size: 1\nmount:\n  target: {}\ntimeouts:\n  device: 5s\n",
            target.display()
        ),
    );
    let out = run(&bench, &a, &config, &[]);
    assert_eq!(out.code, 5, "refused:\n{}", out.stderr);
    assert!(
        out.stderr.contains(&root.id) && out.stderr.contains("root"),
        "names the volume and what it is:\n{}",
        out.stderr
    );
    assert!(!is_mountpoint(&target));
    let after = bench.volumes_tagged(&tags(&[("cluster", "rooted")])).await;
    assert_eq!(after.len(), 1, "no volume created");
}

/// In a pool whose every matching volume is held by a running server, the agent must create.
/// Who holds them is one DescribeInstances per look, not one per held volume (20 agents booting
/// against 10 held volumes made 200 requests, 40 against 20 made 800).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_volumes_cost_one_instance_lookup_per_look() {
    let Some((bench, a)) = bench_with_instance().await else {
        return;
    };
    let t = tags(&[("cluster", "held")]);
    let holders = cps_testbed::run_instances(bench.ec2(), "us-east-1a", 10)
        .await
        .unwrap();
    let api = bench.volumes_api();
    for (i, holder) in holders.iter().enumerate() {
        let v = api
            .create_volume(
                &cps_provider::VolumeSpec::gp3("us-east-1a", 1, &t),
                &format!("held-{i}"),
            )
            .await
            .unwrap();
        api.attach_volume(&v.id, holder, "/dev/xvdc").await.unwrap();
    }
    let mount = bench.dir().join("held");
    let _guard = MountGuard(mount.clone());
    let config = write_config(
        &a,
        &format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: held}}\n    size: 1\nmount:\n  target: {}\n",
            mount.display()
        ),
    );
    let out = run(&bench, &a, &config, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ready()["origin"], "Created");
    let calls = out.ready()["calls"].as_str().unwrap();
    assert!(
        calls.split(',').any(|c| c == "DescribeInstances=1"),
        "one look, one DescribeInstances for the 10 held volumes: {calls}"
    );
}

/// `cps-attach validate` on a file holding `bytes`: (exit code, stdout, stderr, the file's path).
fn validate_bytes(bytes: &[u8]) -> (Option<i32>, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("attach.yml");
    std::fs::write(&path, bytes).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["validate", "-c"])
        .arg(&path)
        .env_remove("CPS_LOG_FORMAT")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

#[test]
fn validate_says_the_settings_in_words() {
    let (code, stdout, stderr, _) = validate_bytes(
        b"block-provider:\n  aws-ebs:\n    ebs-tags: {cluster: kafka}\n    size: 100\n    iops: 6000\n\
          file-system:\n  type: xfs\n  label: kafka\n  options: [-K]\nmount:\n  target: /var/lib/kafka\n  \
          options: [noatime]\n  mode: '0750'\ntimeouts:\n  attach: 90\nidentity:\n  node-id: '2'\n\
          lifecycle:\n  hook: kafka-launch\n",
    );
    assert_eq!(code, Some(0), "{stderr}");
    for words in [
        "volume: gp3 100 GiB, 6000 iops, encrypted with the AWS-managed key",
        "filesystem: xfs, made with `mkfs.xfs -L kafka -K DEVICE` (and cps's no-discard and UUID options unless these set them) on an empty device only",
        "mount: /var/lib/kafka with noatime; mode 0750",
        "timeouts: create 5m, attach 1m30s, device 2m, modify 5m",
        "identity: node-id 2 (cps:node-id=2 on volume and interface)",
        "lifecycle hook: kafka-launch of the instance's group (on failure: abandon)",
        "relocation: never (a volume in another zone is refused or skipped, never moved)",
    ] {
        assert!(stdout.contains(words), "{words:?} in:\n{stdout}");
    }
    // No program internals: Debug output has braces, brackets, quotes and variant names.
    for debug in ["{", "[", "\"", "Typed", "Some(", "Abandon", "Xfs"] {
        assert!(!stdout.contains(debug), "{debug:?} in:\n{stdout}");
    }
}

#[test]
fn validate_refuses_bad_input_at_its_position_in_a_few_lines() {
    let ebs = "block-provider:\n  aws-ebs:\n    ebs-tags: {role: db}\n    size: 10\n";
    let huge = "x".repeat(5 << 20);
    let bomb = format!(
        "{ebs}mount:\n  options: [&big {}, {}]\n",
        "y".repeat(1 << 20),
        vec!["*big"; 70].join(", ")
    );
    let mut not_utf8 = ebs.as_bytes().to_vec();
    not_utf8.extend_from_slice(b"mount:\n  target: /d\xe9j\xe0\n");
    let utf16: Vec<u8> = [0xff, 0xfe]
        .into_iter()
        .chain(ebs.encode_utf16().flat_map(u16::to_le_bytes))
        .collect();
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            format!("{ebs}timeouts:\n  attach: 1ms\n").into(),
            "6:11",
            "between 1s and 24h",
        ),
        (
            format!("{ebs}timeouts:\n  attach: 1h1h\n").into(),
            "6:11",
            "largest first",
        ),
        (
            ebs.replace("size: 10", "size: \"200\"").into(),
            "4:11",
            "write 200 without quotes",
        ),
        (
            ebs.replace("size: 10", "size: 0x10").into(),
            "4:11",
            "write 16",
        ),
        (
            format!("{ebs}mount:\n  target: /a/..\n").into(),
            "6:11",
            "must not contain . or ..",
        ),
        (
            format!("{ebs}lifecycle:\n  hook: \"h\\0\"\n").into(),
            "6:9",
            "control character U+0000",
        ),
        (
            format!("{ebs}file-system:\n  type: xfs\n  options: [-qf]\n").into(),
            "7:13",
            "forces",
        ),
        (
            format!("{ebs}file-system:\n  mkfs: [-t, xfs, -llogdev=/dev/sdb]\n").into(),
            "6:19",
            "another device",
        ),
        (
            format!("{ebs}file-system:\n  mkfs: [-m, '0', -t]\n").into(),
            "6:19",
            "needs a value",
        ),
        (
            format!("{ebs}mount:\n  options: ['noatime,#x']\n").into(),
            "6:12",
            "comment in fstab",
        ),
        (
            format!("{ebs}mount:\n  target: /{huge}\n").into(),
            "6:11",
            "Linux allows 4095",
        ),
        (format!("{ebs}{huge}: 1\n").into(), "5:1", "key"),
        (bomb.into(), "6:", "the YAML document is too large"),
        (
            not_utf8,
            "6:13",
            "byte 0xe9 at offset 84 is not valid UTF-8",
        ),
        (utf16, "1:1", "UTF-16"),
    ];
    for (bytes, at, words) in cases {
        let (code, stdout, stderr, path) = validate_bytes(&bytes);
        let shown = &stderr[..stderr.len().min(400)];
        assert_eq!(code, Some(3), "{at} {words}: {shown}");
        assert!(stdout.is_empty(), "{stdout}");
        assert!(
            stderr.starts_with(&format!("{path}:{at}")),
            "expected {at}: {shown}"
        );
        assert!(stderr.contains(words), "expected {words:?}: {shown}");
        assert!(
            stderr.len() < 1500,
            "{at} {words}: {} bytes on stderr",
            stderr.len()
        );
    }
}
