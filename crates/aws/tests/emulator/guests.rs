//! The emulator's holds for instances the VM tier plays as real guests: a detach stays
//! `detaching`, and a termination `shutting-down` with the volumes still attached, until the
//! bench says the guest has let go; no timer ends a hold, and forgetting the guest ends them all.

use std::time::Duration;

use cps_provider::{AttachmentState, VolumeService, VolumeSpec, VolumeState};
use cps_testbed::{Delays, Emulator, run_instance};

use super::{emulator, provider, ready, tags};

fn guests(emu: &Emulator, path: &str, body: serde_json::Value) -> std::io::Result<String> {
    emu.control("POST", path, &body.to_string())
}

async fn attachment(api: &dyn VolumeService, volume_id: &str) -> Option<AttachmentState> {
    let v = api.volume(volume_id).await.unwrap();
    v.attachments.first().map(|a| a.state.clone())
}

async fn instance_state(emu: &Emulator, instance_id: &str) -> String {
    let reply = emu
        .ec2()
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .unwrap();
    let i = &reply.reservations()[0].instances()[0];
    i.state()
        .and_then(|s| s.name())
        .unwrap()
        .as_str()
        .to_owned()
}

/// DetachVolume (cps itself never detaches, so the provider has no call for it).
async fn detach(emu: &Emulator, volume_id: &str, instance_id: &str) -> String {
    let reply = emu
        .ec2()
        .detach_volume()
        .volume_id(volume_id)
        .instance_id(instance_id)
        .send()
        .await
        .unwrap();
    reply.state().unwrap().as_str().to_owned()
}

/// Waits (bounded) for an attachment to reach AWS's `attached`.
async fn attached(api: &dyn VolumeService, volume_id: &str, instance: &str, device: &str) {
    api.attach_volume(volume_id, instance, device)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while attachment(api, volume_id).await != Some(AttachmentState::Attached) {
        assert!(tokio::time::Instant::now() < deadline, "never attached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Long: one emulator for one sequence — a detach held and released, a termination held and
// released, holds ended by forgetting the guest, and an instance that is no guest.
#[tokio::test]
async fn a_guests_detach_and_termination_wait_for_the_bench() {
    if !ready() {
        return;
    }
    // A detach delay the non-guest's detach keeps to, so the held one is not just slow.
    let (emu, _dir) = emulator(Delays {
        detach: Duration::from_millis(300),
        ..Delays::default()
    });
    let api = provider(&emu).await;
    let zone = "us-east-1a";
    let guest = run_instance(&emu.ec2(), zone).await.unwrap();
    let plain = run_instance(&emu.ec2(), zone).await.unwrap();
    let volume = |n: &str| VolumeSpec::gp3(zone, 1, &tags(&[("n", n)]));
    let (a, b, c, d) = (
        api.create_volume(&volume("a"), "a").await.unwrap().id,
        api.create_volume(&volume("b"), "b").await.unwrap().id,
        api.create_volume(&volume("c"), "c").await.unwrap().id,
        api.create_volume(&volume("d"), "d").await.unwrap().id,
    );
    guests(
        &emu,
        "/cps/guests",
        serde_json::json!({"instance_id": guest}),
    )
    .unwrap();
    // Nothing is held yet: a release is refused, so a bench's mistake shows.
    let err = guests(
        &emu,
        "/cps/guests/release",
        serde_json::json!({"volume_id": a}),
    );
    assert!(err.unwrap_err().to_string().contains("404"));

    // A detach from the guest: `detaching` for well past the detach delay, until released.
    attached(&api, &a, &guest, "/dev/sdf").await;
    assert_eq!(detach(&emu, &a, &guest).await, "detaching");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(attachment(&api, &a).await, Some(AttachmentState::Detaching));
    assert_eq!(api.volume(&a).await.unwrap().state, VolumeState::InUse);
    guests(
        &emu,
        "/cps/guests/release",
        serde_json::json!({"volume_id": a}),
    )
    .unwrap();
    assert_eq!(attachment(&api, &a).await, None);
    assert_eq!(api.volume(&a).await.unwrap().state, VolumeState::Available);

    // The same for an instance that is no guest ends on the detach delay alone.
    attached(&api, &d, &plain, "/dev/sdf").await;
    detach(&emu, &d, &plain).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while attachment(&api, &d).await.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "never detached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A termination: `shutting-down` with the volume still attached, until released.
    attached(&api, &b, &guest, "/dev/sdg").await;
    attached(&api, &c, &guest, "/dev/sdh").await;
    emu.ec2()
        .terminate_instances()
        .instance_ids(&guest)
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(instance_state(&emu, &guest).await, "shutting-down");
    for v in [&b, &c] {
        assert_eq!(attachment(&api, v).await, Some(AttachmentState::Attached));
    }
    // ... and a detach asked meanwhile is held too.
    assert_eq!(detach(&emu, &c, &guest).await, "detaching");
    assert_eq!(attachment(&api, &c).await, Some(AttachmentState::Detaching));

    // Forgetting the guest (it is off) ends both holds: detached, terminated.
    guests(
        &emu,
        "/cps/guests",
        serde_json::json!({"instance_id": guest, "guest": false}),
    )
    .unwrap();
    assert_eq!(instance_state(&emu, &guest).await, "terminated");
    assert_eq!(attachment(&api, &c).await, None);
    // The termination detaches the rest as any termination does (here over the detach delay).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while attachment(&api, &b).await.is_some() {
        assert!(tokio::time::Instant::now() < deadline, "never detached");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for v in [&b, &c] {
        assert_eq!(api.volume(v).await.unwrap().state, VolumeState::Available);
    }
    let err = guests(
        &emu,
        "/cps/guests/release",
        serde_json::json!({"instance_id": guest}),
    );
    assert!(
        err.unwrap_err().to_string().contains("404"),
        "nothing held any more"
    );
}
