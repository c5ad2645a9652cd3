//! Snapshots and volumes restored from them on the wire, under the node policy, and on the bench's
//! data plane: the data a restored volume shows through the kernel is the snapshot's.

use std::path::Path;
use std::time::Duration;

use cps_provider::{Error, Snapshot, SnapshotState, Tags, VolumeService, VolumeSpec, VolumeState};
use cps_testbed::Delays;

use super::{bench, emulator, node_api, provider, ready, tags};

/// Polls a snapshot until it is no longer pending (bounded).
async fn wait_snapshot(api: &dyn VolumeService, snapshot_id: &str, timeout: Duration) -> Snapshot {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let s = api.snapshot(snapshot_id).await.unwrap();
        if s.state != SnapshotState::Pending {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{snapshot_id} still pending after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn restored(snapshot_id: &str, zone: &str, size_gib: i32, t: &Tags) -> VolumeSpec {
    VolumeSpec {
        snapshot_id: Some(snapshot_id.to_owned()),
        ..VolumeSpec::gp3(zone, size_gib, t)
    }
}

fn api_code(err: &Error) -> Option<&str> {
    match err {
        Error::Api { code, .. } => code.as_deref(),
        _ => None,
    }
}

/// AWS's words, never the SDK's "service error" or the raw XML.
fn said_plainly(err: &Error, words: &str) {
    let text = err.to_string();
    assert!(
        text.contains(words) && !text.contains("service error") && !text.contains("<?xml"),
        "{text}"
    );
}

// Long: one emulator for one sequence, each step relying on the snapshot state the last left.
#[tokio::test]
async fn snapshots_and_restored_volumes_keep_the_rules_of_ebs() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    emu.set_snapshot_delay(Duration::from_millis(800)).unwrap();
    let api = provider(&emu).await;
    let node = tags(&[("cps:cluster", "snap"), ("cps:node", "1")]);
    let source = api
        .create_volume(&VolumeSpec::gp3("us-east-1a", 2, &node), "snap-src")
        .await
        .unwrap();
    assert_eq!(
        source.snapshot_id, None,
        "an empty volume names no snapshot"
    );

    let s = api
        .create_snapshot(&source.id, "node 1", &node)
        .await
        .unwrap();
    assert_eq!(
        (s.state, s.volume_id.as_str(), s.size_gib, s.tags.clone()),
        (SnapshotState::Pending, source.id.as_str(), 2, node.clone()),
        "pending, with its tags from the same request"
    );
    let err = api
        .create_volume(&restored(&s.id, "us-east-1b", 2, &node), "early")
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::IncorrectState { ref resource, .. } if *resource == s.id),
        "{err}"
    );
    said_plainly(&err, "pending state");
    let done = wait_snapshot(&api, &s.id, Duration::from_secs(15)).await;
    assert_eq!(
        (done.state, done.progress_percent),
        (SnapshotState::Completed, Some(100))
    );
    assert!(done.started.is_some());

    let err = api
        .create_volume(&restored(&s.id, "us-east-1b", 1, &node), "small")
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some("InvalidParameterValue"), "{err}");
    said_plainly(&err, "minimum is 2GiB");
    let rate = |snapshot: Option<&str>, r| VolumeSpec {
        snapshot_id: snapshot.map(str::to_owned),
        initialization_rate: Some(r),
        ..VolumeSpec::gp3("us-east-1b", 2, &node)
    };
    let err = api
        .create_volume(&rate(Some(&s.id), 99), "slow")
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some("InvalidParameterValue"), "{err}");
    let err = api
        .create_volume(&rate(None, 200), "alone")
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), Some("InvalidParameterCombination"), "{err}");
    let err = api
        .create_volume(
            &restored("snap-0123456789abcdef0", "us-east-1b", 2, &node),
            "ghost",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    said_plainly(&err, "snap-0123456789abcdef0");

    // Another zone, larger, loaded at 200 MiB/s: it names its snapshot; the token holds.
    let copy = api
        .create_volume(&rate(Some(&s.id), 200), "copy")
        .await
        .unwrap();
    assert_eq!(
        (copy.availability_zone.as_str(), copy.snapshot_id.as_deref()),
        ("us-east-1b", Some(s.id.as_str()))
    );
    let again = api
        .create_volume(&rate(Some(&s.id), 200), "copy")
        .await
        .unwrap();
    assert_eq!(
        again.id, copy.id,
        "the same token and spec: the same volume"
    );
    assert_eq!(
        api.volume(&copy.id).await.unwrap().snapshot_id,
        Some(s.id.clone())
    );

    let failed = api.create_snapshot(&source.id, "", &node).await.unwrap();
    emu.fail_snapshot(&failed.id).unwrap();
    api.create_snapshot(&source.id, "", &tags(&[("cps:cluster", "other")]))
        .await
        .unwrap();
    let mut found: Vec<(String, SnapshotState)> = api
        .snapshots_tagged(&node)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.id, s.state))
        .collect();
    found.sort_by(|x, y| x.0.cmp(&y.0));
    let mut wanted = vec![
        (s.id.clone(), SnapshotState::Completed),
        (failed.id.clone(), SnapshotState::Error),
    ];
    wanted.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        found, wanted,
        "every state, only the account's, only with every tag"
    );
    let err = api.snapshot("snap-0123456789abcdef0").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    said_plainly(&err, "does not exist");
    let calls = api.calls().snapshot();
    assert_eq!(calls.get("CreateSnapshot"), Some(&3));
}

#[tokio::test]
async fn tags_go_by_key_and_an_attached_volume_is_not_deleted() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    let api = provider(&emu).await;
    let instance = cps_testbed::run_instance(&emu.ec2(), "us-east-1a")
        .await
        .unwrap();
    let t = tags(&[
        ("cps:cluster", "retire"),
        ("cps:node", "1"),
        ("keep", "yes"),
    ]);
    let vol = api
        .create_volume(&VolumeSpec::gp3("us-east-1a", 1, &t), "retire")
        .await
        .unwrap()
        .id;
    api.untag_volume(&vol, &["cps:node".into(), "cps:cluster".into()])
        .await
        .unwrap();
    api.tag_volume(&vol, &tags(&[("cps:retired-by", "snap-x")]))
        .await
        .unwrap();
    assert_eq!(
        api.volume(&vol).await.unwrap().tags,
        tags(&[("cps:retired-by", "snap-x"), ("keep", "yes")])
    );
    api.untag_volume(&vol, &[]).await.unwrap();
    assert_eq!(
        api.volume(&vol).await.unwrap().tags.len(),
        2,
        "no keys: nothing removed"
    );
    assert_eq!(api.calls().count("DeleteTags"), 1, "and nothing sent");
    let err = api
        .untag_volume("vol-0123456789abcdef0", &["keep".into()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");

    api.attach_volume(&vol, &instance, "/dev/xvdf")
        .await
        .unwrap();
    let err = api.delete_volume(&vol).await.unwrap_err();
    assert!(
        matches!(err, Error::VolumeInUse { ref volume_id, .. } if *volume_id == vol),
        "{err}"
    );
    said_plainly(&err, &instance);
    emu.ec2()
        .detach_volume()
        .volume_id(&vol)
        .instance_id(&instance)
        .send()
        .await
        .unwrap();
    api.delete_volume(&vol).await.unwrap();
    let gone = api.volume(&vol).await;
    assert!(matches!(gone, Err(Error::NotFound { .. })), "{gone:?}");
    let err = api.delete_volume(&vol).await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
}

/// A policy granting the snapshot and retirement actions on one cluster's resources only.
fn snapshot_policy() -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["ec2:DescribeSnapshots", "ec2:DescribeVolumes"], "Resource": "*"},
            {"Effect": "Allow", "Action": ["ec2:CreateSnapshot", "ec2:DeleteVolume"],
             "Resource": "arn:aws:ec2:*:*:volume/*",
             "Condition": {"StringEquals": {"aws:ResourceTag/cps:cluster": "ours"}}},
            {"Effect": "Allow", "Action": "ec2:CreateSnapshot", "Resource": "arn:aws:ec2:*::snapshot/*",
             "Condition": {"StringEquals": {"aws:RequestTag/cps:cluster": "ours"}}},
            {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "arn:aws:ec2:*::snapshot/*",
             "Condition": {"StringEquals": {"ec2:CreateAction": "CreateSnapshot"}}},
            {"Effect": "Allow", "Action": "ec2:CreateVolume", "Resource": "arn:aws:ec2:*::snapshot/*",
             "Condition": {"StringEquals": {"aws:ResourceTag/cps:cluster": "ours"}}},
            {"Effect": "Allow", "Action": "ec2:CreateVolume", "Resource": "arn:aws:ec2:*:*:volume/*"},
            {"Effect": "Allow", "Action": "ec2:CreateTags", "Resource": "arn:aws:ec2:*:*:volume/*",
             "Condition": {"StringEquals": {"ec2:CreateAction": "CreateVolume"}}},
            {"Effect": "Allow", "Action": "ec2:DeleteTags", "Resource": "arn:aws:ec2:*:*:volume/*",
             "Condition": {"StringEquals": {"aws:ResourceTag/cps:cluster": "ours"},
                           "ForAllValues:StringEquals": {"aws:TagKeys": ["cps:node", "cps:cluster"]}}}
        ]
    })
    .to_string()
}

/// The node policy is evaluated on the ARNs and tags AWS evaluates: the volume and the new
/// snapshot for CreateSnapshot, the snapshot for CreateVolume, the keys for DeleteTags.
#[tokio::test]
async fn snapshot_actions_are_held_to_the_node_policy_like_iam() {
    if !ready() {
        return;
    }
    let bench = bench();
    let admin = bench.volumes_api();
    let ours = tags(&[("cps:cluster", "ours"), ("cps:node", "1")]);
    let theirs = tags(&[("cps:cluster", "theirs"), ("cps:node", "1")]);
    let mine = admin
        .create_volume(&VolumeSpec::gp3("us-east-1a", 1, &ours), "o")
        .await
        .unwrap()
        .id;
    let other = admin
        .create_volume(&VolumeSpec::gp3("us-east-1a", 1, &theirs), "t")
        .await
        .unwrap()
        .id;
    let their_snap = admin.create_snapshot(&other, "", &theirs).await.unwrap().id;
    bench.restrict_key(&snapshot_policy()).unwrap();
    let node = node_api(&bench);

    let snap = node.create_snapshot(&mine, "", &ours).await.unwrap();
    assert_eq!(node.snapshots_tagged(&ours).await.unwrap().len(), 1);
    let copy = node
        .create_volume(&restored(&snap.id, "us-east-1b", 1, &ours), "copy")
        .await
        .unwrap();
    node.untag_volume(&mine, &["cps:node".into(), "cps:cluster".into()])
        .await
        .unwrap();
    assert!(bench.denied_actions().unwrap().is_empty());

    let refused: Vec<(&str, Option<Error>)> = vec![
        (
            "a snapshot of their volume",
            node.create_snapshot(&other, "", &ours).await.err(),
        ),
        (
            "a snapshot tagged as theirs",
            node.create_snapshot(&copy.id, "", &theirs).await.err(),
        ),
        (
            "a volume from their snapshot",
            node.create_volume(&restored(&their_snap, "us-east-1b", 1, &ours), "x")
                .await
                .err(),
        ),
        (
            "untagging their volume",
            node.untag_volume(&other, &["cps:node".into()]).await.err(),
        ),
        (
            "a key the policy does not name",
            node.untag_volume(&copy.id, &["keep".into()]).await.err(),
        ),
        (
            "deleting their volume",
            node.delete_volume(&other).await.err(),
        ),
    ];
    for (what, err) in &refused {
        assert!(
            matches!(err, Some(Error::Unauthorized { .. })),
            "{what}: {err:?}"
        );
    }
    assert_eq!(
        bench.denied_actions().unwrap(),
        [
            "ec2:CreateSnapshot",
            "ec2:CreateSnapshot",
            "ec2:CreateVolume",
            "ec2:DeleteTags",
            "ec2:DeleteTags",
            "ec2:DeleteVolume"
        ]
    );
    node.delete_volume(&copy.id).await.unwrap();
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Waits (bounded) until the stand-in reports an event containing `words`.
fn wait_event(bench: &cps_testbed::Bench, words: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while !bench.udev().events().iter().any(|e| e.contains(words)) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {words:?} after {timeout:?}: {:?} {:?}",
            bench.udev().events(),
            bench.udev().errors()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Attaches `volume_id` to `instance` and mounts its ext4 at `instance`'s home/`name`.
async fn attach_and_mount(
    bench: &cps_testbed::Bench,
    volume_id: &str,
    instance: &cps_testbed::Instance,
    name: &str,
    format: bool,
) -> (std::path::PathBuf, cps_fixtures::MountGuard) {
    bench
        .volumes_api()
        .attach_volume(volume_id, &instance.id, "/dev/xvdf")
        .await
        .unwrap();
    assert!(
        bench
            .udev()
            .wait_backed(volume_id, true, Duration::from_secs(15)),
        "{volume_id} never appeared: {:?}",
        bench.udev().errors()
    );
    let dev = bench.udev().device_of(volume_id).unwrap();
    let dev = dev.to_string_lossy().into_owned();
    if format {
        cps_fixtures::run("mkfs.ext4", &["-q", "-E", "nodiscard", &dev]).unwrap();
    }
    let mount = instance.home.join(name);
    std::fs::create_dir_all(&mount).unwrap();
    let guard = cps_fixtures::MountGuard(mount.clone());
    cps_fixtures::run("mount", &["-t", "ext4", &dev, &mount.to_string_lossy()]).unwrap();
    (mount, guard)
}

/// Data really moves: a file written before the snapshot comes back in another zone, through
/// the kernel, and nothing written after it does.
#[tokio::test]
async fn a_restored_volume_holds_exactly_what_its_source_held_when_the_snapshot_started() {
    if !cps_testbed::ready("snapshots move the bench's data") {
        return;
    }
    const GIB: u64 = 1 << 30;
    let bench = bench();
    bench
        .emulator()
        .set_snapshot_delay(Duration::from_millis(500))
        .unwrap();
    let api = bench.volumes_api();
    let (a, b) = (
        bench.launch("us-east-1a").await.unwrap(),
        bench.launch("us-east-1b").await.unwrap(),
    );
    let t = tags(&[("cps:cluster", "move")]);
    let source = api
        .create_volume(&VolumeSpec::gp3("us-east-1a", 1, &t), "src")
        .await
        .unwrap()
        .id;
    let (src_mount, src_guard) = attach_and_mount(&bench, &source, &a, "src", true).await;
    let before: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
    std::fs::write(src_mount.join("data.bin"), &before).unwrap();
    cps_fixtures::run("sync", &[]).unwrap();

    let snap = api.create_snapshot(&source, "move", &t).await.unwrap();
    // Written once the snapshot started: it must not reach the restored volume.
    std::fs::write(src_mount.join("data.bin"), b"overwritten").unwrap();
    std::fs::write(src_mount.join("later.txt"), b"after the snapshot").unwrap();
    cps_fixtures::run("sync", &[]).unwrap();
    let snap = wait_snapshot(&api, &snap.id, Duration::from_secs(15)).await;
    assert_eq!(snap.state, SnapshotState::Completed);
    let image = bench.dir().join("volumes").join(format!("{}.img", snap.id));
    assert!(
        allocated_bytes(&image) < 256 << 20,
        "the snapshot's image keeps the holes: {} bytes allocated",
        allocated_bytes(&image)
    );

    let copy = api
        .create_volume(&restored(&snap.id, "us-east-1b", 2, &t), "dst")
        .await
        .unwrap()
        .id;
    for _ in 0..100 {
        if api.volume(&copy).await.unwrap().state == VolumeState::Available {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (dst_mount, dst_guard) = attach_and_mount(&bench, &copy, &b, "dst", false).await;
    let device = bench.udev().device_of(&copy).unwrap();
    assert_eq!(
        super::device_bytes(&device),
        2 * GIB,
        "sized to the new volume"
    );
    assert_eq!(std::fs::read(dst_mount.join("data.bin")).unwrap(), before);
    assert!(
        !dst_mount.join("later.txt").exists(),
        "written after the snapshot"
    );
    assert_eq!(
        std::fs::read(src_mount.join("later.txt")).unwrap(),
        b"after the snapshot"
    );

    // The source retired: unmounted, detached, deleted — and its image goes with it.
    drop(src_guard);
    bench
        .ec2()
        .detach_volume()
        .volume_id(&source)
        .instance_id(&a.id)
        .send()
        .await
        .unwrap();
    assert!(
        bench
            .udev()
            .wait_backed(&source, false, Duration::from_secs(15))
    );
    api.delete_volume(&source).await.unwrap();
    wait_event(
        &bench,
        &format!("removed the image of deleted {source}"),
        Duration::from_secs(15),
    );
    assert!(
        !bench
            .dir()
            .join("volumes")
            .join(format!("{source}.img"))
            .exists()
    );
    assert!(image.exists(), "the snapshot outlives its volume");
    drop(dst_guard);
    assert!(
        bench.udev().errors().is_empty(),
        "{:?}",
        bench.udev().errors()
    );
}
