//! cps-aws against the AWS emulator, over the real wire protocol: find, create, attach,
//! describe, pagination, error classification, secrets, and IMDSv2 identity.

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
    // AWS's code and sentence, and the causes — not the SDK's Debug dump of the raw response.
    for refusal in [
        &err,
        &api.attach_volume(&v1, &i2, "/dev/xvdc").await.unwrap_err(),
    ] {
        let text = refusal.to_string();
        assert!(text.len() < 400, "{} bytes: {text}", text.len());
        for dump in [
            "headers",
            "<?xml",
            "HttpResponse",
            "ServiceError {",
            "Unhandled",
        ] {
            assert!(!text.contains(dump), "{dump:?} in {text}");
        }
    }
    assert!(
        err.to_string().contains("InvalidVolume.NotFound"),
        "the code is kept: {err}"
    );

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
    let text = err.to_string();
    assert!(
        text.contains("Connection refused") && !text.contains("DispatchFailure {"),
        "the chain of causes, no dump: {text}"
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

fn bench() -> cps_testbed::Bench {
    cps_testbed::Bench::start(cps_testbed::BenchOptions::default()).unwrap()
}

async fn aws_for(bench: &cps_testbed::Bench) -> (Ec2Api, cps_aws::AutoScalingApi) {
    let mut settings = AwsSettings::new(REGION);
    settings.endpoint_url = Some(bench.endpoint().to_owned());
    // SAFETY: as in `provider`: the same static values for every test.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    }
    let sdk = settings.load().await;
    (Ec2Api::new(&sdk), cps_aws::AutoScalingApi::new(&sdk))
}

#[tokio::test]
async fn network_interfaces_are_found_attached_and_refused_like_aws() {
    use cps_provider::InterfaceService;
    if !ready() {
        return;
    }
    let bench = bench();
    let (ec2, _) = aws_for(&bench).await;
    let node = tags(&[("cluster", "eni"), ("cps:node-id", "1")]);
    let (eni, ip) = bench
        .create_interface("us-east-1a", 21, &node)
        .await
        .unwrap();
    let (far, _) = bench
        .create_interface("us-east-1b", 22, &tags(&[("cluster", "eni")]))
        .await
        .unwrap();
    let found = ec2.interfaces_tagged(&node).await.unwrap();
    assert_eq!(found.len(), 1);
    let e = &found[0];
    assert_eq!(
        (
            e.id.as_str(),
            e.private_ip.as_deref(),
            e.availability_zone.as_str()
        ),
        (eni.as_str(), Some(ip.as_str()), "us-east-1a")
    );
    assert!(e.mac.contains(':') && e.mac == e.mac.to_lowercase());
    assert!(e.attachment.is_none());

    let a = run_instance(bench.ec2(), "us-east-1a").await.unwrap();
    let b = run_instance(bench.ec2(), "us-east-1a").await.unwrap();
    let attachment = ec2.attach_interface(&eni, &a, 1).await.unwrap();
    assert!(attachment.starts_with("eni-attach-"));
    let e = ec2.interface(&eni).await.unwrap();
    let att = e.attachment.unwrap();
    assert_eq!(
        (att.instance_id.as_str(), att.device_index, att.state),
        (a.as_str(), 1, AttachmentState::Attached)
    );

    let err = ec2.attach_interface(&eni, &b, 1).await.unwrap_err();
    assert!(matches!(err, Error::InterfaceInUse { .. }), "{err}");
    let err = ec2.attach_interface(&far, &a, 2).await.unwrap_err();
    assert!(matches!(err, Error::ZoneMismatch { .. }), "{err}");
    let (other, _) = bench
        .create_interface("us-east-1a", 23, &tags(&[("cluster", "eni")]))
        .await
        .unwrap();
    let err = ec2.attach_interface(&other, &a, 1).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::DeviceIndexInUse {
                device_index: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = ec2.interface("eni-00000000000000000").await.unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");

    // A terminated instance lets go of its secondary interface.
    bench
        .ec2()
        .terminate_instances()
        .instance_ids(&a)
        .send()
        .await
        .unwrap();
    assert!(ec2.interface(&eni).await.unwrap().attachment.is_none());
    let states = ec2
        .instance_states(&[a.clone(), b.clone(), "i-00000000000000000".into()])
        .await
        .unwrap();
    assert_eq!(states[&a], cps_provider::InstanceState::Terminated);
    assert_eq!(states[&b], cps_provider::InstanceState::Running);
    assert_eq!(
        states["i-00000000000000000"],
        cps_provider::InstanceState::Terminated,
        "unknown counts as gone"
    );
}

#[tokio::test]
async fn lifecycle_hooks_hold_complete_and_report_no_active_action() {
    use cps_provider::{LifecycleResult, LifecycleService};
    if !ready() {
        return;
    }
    let bench = bench();
    let (ec2, asg) = aws_for(&bench).await;
    let group_tags = tags(&[("cluster", "lc"), ("cps:node-id", "5")]);
    bench
        .create_group(
            "lc-5",
            "us-east-1a",
            1,
            &group_tags,
            "launch",
            Duration::from_secs(120),
        )
        .await
        .unwrap();
    let id = bench
        .wait_pending("lc-5", 1, Duration::from_secs(10))
        .await
        .unwrap()[0]
        .clone();

    let member = asg.membership(&id).await.unwrap().unwrap();
    assert_eq!(
        (member.group.as_str(), member.lifecycle_state.as_str()),
        ("lc-5", "Pending:Wait")
    );
    assert!(
        asg.membership("i-00000000000000000")
            .await
            .unwrap()
            .is_none()
    );
    let group = asg.group("lc-5").await.unwrap().unwrap();
    assert_eq!(group.tags.get("cps:node-id").map(String::as_str), Some("5"));
    assert_eq!(group.booting(), 1);
    assert!(asg.group("no-such-group").await.unwrap().is_none());
    let hook = asg.lifecycle_hook("lc-5", "launch").await.unwrap().unwrap();
    assert_eq!(
        (hook.heartbeat_timeout, hook.default_result.as_str()),
        (Duration::from_secs(120), "ABANDON")
    );
    assert!(hook.transition.ends_with("EC2_INSTANCE_LAUNCHING"));
    assert!(asg.lifecycle_hook("lc-5", "other").await.unwrap().is_none());

    // The group's tags reach the instance.
    let instance_tags = ec2.instance_tags(&id).await.unwrap();
    assert_eq!(
        instance_tags.get("cps:node-id").map(String::as_str),
        Some("5")
    );
    assert_eq!(
        instance_tags
            .get("aws:autoscaling:groupName")
            .map(String::as_str),
        Some("lc-5")
    );

    asg.heartbeat("lc-5", "launch", &id).await.unwrap();
    asg.complete("lc-5", "launch", &id, LifecycleResult::Continue)
        .await
        .unwrap();
    assert_eq!(
        asg.membership(&id).await.unwrap().unwrap().lifecycle_state,
        "InService"
    );
    let err = asg
        .complete("lc-5", "launch", &id, LifecycleResult::Continue)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NoActiveLifecycleAction { .. }),
        "{err}"
    );
    let err = asg.heartbeat("lc-5", "launch", &id).await.unwrap_err();
    assert!(
        matches!(err, Error::NoActiveLifecycleAction { .. }),
        "{err}"
    );
    assert_eq!(asg.calls().count("CompleteLifecycleAction"), 2);
}

#[tokio::test]
async fn secrets_are_read_from_both_stores_and_missing_ones_are_not_found() {
    use cps_provider::{SecretRef, SecretService};
    if !ready() {
        return;
    }
    let bench = bench();
    bench.put_parameter("/wire/jaas", "pw=1").unwrap();
    bench.create_secret("wire/tls", "key\n").unwrap();
    let mut settings = AwsSettings::new(REGION);
    settings.endpoint_url = Some(bench.endpoint().to_owned());
    // SAFETY: as in `provider`: the same static values for every test.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    }
    let api = cps_aws::SecretsApi::new(&settings.load().await);
    let read = |r: SecretRef| {
        let api = api.clone();
        async move { api.secret(&r).await }
    };
    assert_eq!(
        read(SecretRef::Parameter("/wire/jaas".into()))
            .await
            .unwrap()
            .into_bytes(),
        b"pw=1"
    );
    let arn = format!("arn:aws:ssm:{REGION}:123456789012:parameter/wire/jaas");
    assert_eq!(
        read(SecretRef::Parameter(arn)).await.unwrap().into_bytes(),
        b"pw=1",
        "by ARN too"
    );
    assert_eq!(
        read(SecretRef::Secret("wire/tls".into()))
            .await
            .unwrap()
            .into_bytes(),
        b"key\n"
    );
    for (missing, name) in [
        (
            SecretRef::Parameter("/wire/missing".into()),
            "/wire/missing",
        ),
        (SecretRef::Secret("wire/missing".into()), "wire/missing"),
    ] {
        match read(missing.clone()).await.unwrap_err() {
            Error::NotFound { resource, .. } => assert_eq!(resource, name),
            other => panic!("{missing}: {other}"),
        }
    }
    assert_eq!(api.calls().count("GetParameter"), 3);
    assert_eq!(api.calls().count("GetSecretValue"), 2);
}
