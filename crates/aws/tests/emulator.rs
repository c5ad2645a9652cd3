//! cps-aws against the AWS emulator, over the real wire protocol: find, create, attach,
//! describe, pagination, error classification, and IMDSv2 identity.

use std::time::Duration;

use cps_aws::{AwsSettings, Ec2Api, fetch_identity};
use cps_fixtures::{Need, require};
use cps_provider::{
    AttachmentState, Error, InstanceIdentity, Tags, VolumeService, VolumeSpec, VolumeState,
};
use cps_testbed::{Delays, Emulator, FakeImds, REGION, run_instance};

fn ready() -> bool {
    require(
        "cps-aws against the emulator",
        &[Need::Path(
            &cps_testbed::emulator::python(),
            "the emulator venv; run ci/setup",
        )],
    )
}

fn emulator(delays: Delays) -> (Emulator, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(delays, dir.path().join("emulator.log")).unwrap();
    (emu, dir)
}

/// The provider as cps-attach builds it: SDK config with region, endpoint, timeouts, retries.
async fn provider(emu: &Emulator) -> Ec2Api {
    // Credentials come from the environment in the binary; here, from the variables too.
    // SAFETY: set before any thread reads them; every test sets the same values.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    }
    let mut settings = AwsSettings::new(REGION);
    settings.endpoint_url = Some(emu.endpoint().to_owned());
    Ec2Api::new(&settings.load().await)
}

fn spec(zone: &str, tags: &Tags) -> VolumeSpec {
    VolumeSpec {
        iops: Some(4000),
        throughput: Some(200),
        ..VolumeSpec::gp3(zone, 2, tags)
    }
}

fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn create_find_attach_describe() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays {
        create: Duration::from_secs(2),
        attach: Duration::from_millis(300),
        ..Delays::default()
    });
    let api = provider(&emu).await;
    let t = tags(&[("cluster", "kafka"), ("node", "1")]);
    let instance = run_instance(&emu.ec2(), "us-east-1a").await.unwrap();

    let created = api
        .create_volume(&spec("us-east-1a", &t), "token-1")
        .await
        .unwrap();
    assert!(created.id.starts_with("vol-"));
    assert_eq!(created.state, VolumeState::Creating);
    assert_eq!(created.tags, t, "tags are applied in the same call");
    assert_eq!(
        (
            created.size_gib,
            created.volume_type.as_str(),
            created.encrypted
        ),
        (2, "gp3", true)
    );

    // Only volumes with every tag match.
    api.create_volume(
        &spec("us-east-1a", &tags(&[("cluster", "kafka"), ("node", "2")])),
        "token-2",
    )
    .await
    .unwrap();
    let found = api.volumes_tagged(&t).await.unwrap();
    assert_eq!(
        found.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        [created.id.as_str()]
    );

    // Still creating: AttachVolume refuses, as AWS does.
    let err = api
        .attach_volume(&created.id, &instance, "/dev/xvdc")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::IncorrectState { .. }), "{err}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        api.volume(&created.id).await.unwrap().state,
        VolumeState::Available
    );

    let state = api
        .attach_volume(&created.id, &instance, "/dev/xvdc")
        .await
        .unwrap();
    assert_eq!(state, AttachmentState::Attaching);
    let v = api.volume(&created.id).await.unwrap();
    assert_eq!(
        v.attachment_to(&instance).unwrap().state,
        AttachmentState::Attaching
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let v = api.volume(&created.id).await.unwrap();
    let a = v.attachment_to(&instance).unwrap();
    assert_eq!(
        (a.state.clone(), a.device.as_str()),
        (AttachmentState::Attached, "/dev/xvdc")
    );
    assert_eq!(v.state, VolumeState::InUse);

    let calls = api.calls().snapshot();
    assert_eq!(calls.get("CreateVolume"), Some(&2));
    assert_eq!(calls.get("AttachVolume"), Some(&2));
}

#[tokio::test]
async fn the_client_token_makes_create_idempotent() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    let api = provider(&emu).await;
    let t = tags(&[("cluster", "idem")]);
    let a = api
        .create_volume(&spec("us-east-1a", &t), "same-token")
        .await
        .unwrap();
    let b = api
        .create_volume(&spec("us-east-1a", &t), "same-token")
        .await
        .unwrap();
    assert_eq!(a.id, b.id);
    assert_eq!(api.volumes_tagged(&t).await.unwrap().len(), 1);
    let mut bigger = spec("us-east-1a", &t);
    bigger.size_gib = 3;
    let err = api.create_volume(&bigger, "same-token").await.unwrap_err();
    assert!(
        matches!(err, Error::IdempotencyMismatch { ref token, .. } if token == "same-token"),
        "{err}"
    );
}

#[tokio::test]
async fn listing_follows_every_page() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    let api = provider(&emu).await.with_page_size(5);
    let t = tags(&[("pool", "big")]);
    for i in 0..23 {
        api.create_volume(&spec("us-east-1a", &t), &format!("pool-{i}"))
            .await
            .unwrap();
    }
    api.create_volume(&spec("us-east-1a", &tags(&[("pool", "other")])), "other")
        .await
        .unwrap();
    api.calls().reset();
    let found = api.volumes_tagged(&t).await.unwrap();
    assert_eq!(found.len(), 23);
    let mut ids: Vec<_> = found.iter().map(|v| v.id.clone()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 23, "no volume twice");
    assert_eq!(
        api.calls().count("DescribeVolumes"),
        5,
        "23 volumes in pages of 5"
    );
}

#[tokio::test]
async fn aws_refusals_are_classified() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    let api = provider(&emu).await;
    let ec2 = emu.ec2();
    let (i1, i2) = (
        run_instance(&ec2, "us-east-1a").await.unwrap(),
        run_instance(&ec2, "us-east-1a").await.unwrap(),
    );
    let t = tags(&[("cluster", "errors")]);
    let v1 = api
        .create_volume(&spec("us-east-1a", &t), "e1")
        .await
        .unwrap()
        .id;
    let v2 = api
        .create_volume(&spec("us-east-1a", &t), "e2")
        .await
        .unwrap()
        .id;
    let far = api
        .create_volume(&spec("us-east-1b", &t), "e3")
        .await
        .unwrap()
        .id;

    api.attach_volume(&v1, &i1, "/dev/xvdc").await.unwrap();
    let err = api.attach_volume(&v1, &i2, "/dev/xvdc").await.unwrap_err();
    assert!(
        matches!(err, Error::VolumeInUse { ref volume_id, .. } if *volume_id == v1),
        "{err}"
    );
    assert!(
        err.to_string().contains("VolumeInUse"),
        "the AWS code is in the message: {err}"
    );

    let err = api.attach_volume(&far, &i2, "/dev/xvdc").await.unwrap_err();
    assert!(matches!(err, Error::ZoneMismatch { .. }), "{err}");

    let err = api.attach_volume(&v2, &i1, "/dev/xvdc").await.unwrap_err();
    assert!(
        matches!(err, Error::DeviceNameInUse { ref device, .. } if device == "/dev/xvdc"),
        "{err}"
    );

    let err = api.volume("vol-00000000000000000").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    assert!(!err.is_retryable());

    // Nothing listening: a transient failure, retryable, with the cause in the message.
    let mut settings = AwsSettings::new(REGION);
    settings.endpoint_url = Some("http://127.0.0.1:9".into());
    settings.max_attempts = 1;
    settings.attempt_timeout = Duration::from_secs(2);
    let dead = Ec2Api::new(&settings.load().await);
    let err = dead.volumes_tagged(&t).await.unwrap_err();
    assert!(
        matches!(err, Error::Transient { .. }) && err.is_retryable(),
        "{err}"
    );
    assert!(
        !err.to_string().contains("service error") || err.to_string().len() > 40,
        "{err}"
    );
}

#[tokio::test]
async fn identity_comes_from_imdsv2() {
    if !ready() {
        return;
    }
    let imds = FakeImds::start(InstanceIdentity {
        instance_id: "i-0123456789abcdef0".into(),
        region: "eu-west-1".into(),
        availability_zone: "eu-west-1b".into(),
    })
    .unwrap();
    let id = fetch_identity(Some(imds.endpoint())).await.unwrap();
    assert_eq!(id.instance_id, "i-0123456789abcdef0");
    assert_eq!(
        (id.region.as_str(), id.availability_zone.as_str()),
        ("eu-west-1", "eu-west-1b")
    );
    assert!(
        imds.stats()
            .tokens_issued
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1,
        "a session token was used"
    );
    assert_eq!(
        imds.stats()
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    let err = fetch_identity(Some("http://127.0.0.1:9"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("127.0.0.1:9"),
        "names the endpoint: {err}"
    );
}
