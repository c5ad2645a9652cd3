//! The fake host's snapshots: a volume restored from a snapshot starts with what its source held
//! when the snapshot was created, not what the source holds later.

mod common;

use std::time::Duration;

use common::{Content, Disks, FakeHost};
use cps_blockdev::Filesystem;
use cps_provider::memory::MemoryCloud;
use cps_provider::{Tags, VolumeService, VolumeSpec};

fn fs(uuid: &str) -> Filesystem {
    Filesystem {
        fstype: "xfs".into(),
        uuid: Some(uuid.into()),
        label: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_restored_volume_starts_with_its_snapshots_content_and_sizes() {
    let cloud = MemoryCloud::default();
    let disks = Disks::default();
    let source = cloud.with(|w| {
        w.set_snapshot_delay(Duration::from_secs(10));
        w.add_instance("i-a", "az-a");
        w.add_instance("i-b", "az-b");
        w.add_volume("az-a", 10, &Tags::new())
    });
    let host_a = FakeHost::new(&cloud, "i-a", &disks);
    let host_b = FakeHost::new(&cloud, "i-b", &disks);
    disks
        .lock()
        .unwrap()
        .insert(source.clone(), Content::Data(fs("before")));
    let snap = cloud
        .create_snapshot(&source, "", &Tags::new())
        .await
        .unwrap();
    let empty = cloud.with(|w| w.add_volume("az-a", 1, &Tags::new()));
    let blank_snap = cloud
        .create_snapshot(&empty, "", &Tags::new())
        .await
        .unwrap();

    // The source changes after the snapshot started: device enlarged, another filesystem.
    host_a.set_device_bytes(&source, 20 << 30);
    disks
        .lock()
        .unwrap()
        .insert(source.clone(), Content::Data(fs("after")));
    assert_eq!(disks.captured(&snap.id), Some(Content::Data(fs("before"))));

    tokio::time::advance(Duration::from_secs(10)).await;
    let spec = VolumeSpec {
        snapshot_id: Some(snap.id.clone()),
        ..VolumeSpec::gp3("az-b", 30, &Tags::new())
    };
    let restored = cloud.create_volume(&spec, "restore").await.unwrap();
    assert_eq!(host_b.content(&restored.id), Content::Data(fs("before")));
    let sizes = host_b.disk_sizes(&restored.id);
    assert_eq!(
        (sizes.device_bytes, sizes.filesystem_bytes),
        (30 << 30, 10 << 30),
        "the new volume's device, the snapshot's filesystem"
    );
    assert_eq!(host_a.content(&source), Content::Data(fs("after")));

    let blank = VolumeSpec {
        snapshot_id: Some(blank_snap.id.clone()),
        ..VolumeSpec::gp3("az-b", 1, &Tags::new())
    };
    let restored_blank = cloud.create_volume(&blank, "blank").await.unwrap();
    assert_eq!(host_b.content(&restored_blank.id), Content::Blank);
}
