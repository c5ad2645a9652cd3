//! cps-aws against the AWS emulator, over the real wire protocol: find, create, attach,
//! describe, pagination, modify in place, snapshots and restored volumes, error classification,
//! secrets, and IMDSv2 identity.

use std::time::Duration;

use cps_aws::{AwsSettings, Ec2Api, fetch_identity};
use cps_fixtures::{Need, require};
use cps_provider::{
    AttachmentState, Error, InstanceIdentity, ModificationState, Tags, VolumeChange, VolumeService,
    VolumeSpec, VolumeState,
};
use cps_testbed::{Delays, Emulator, FakeImds, REGION, run_instance};

#[path = "emulator/guests.rs"]
mod guests;
#[path = "emulator/snapshots.rs"]
mod snapshots;

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
        // Long enough that the "still creating" and "attaching" looks cannot miss them on a
        // loaded machine; the waits after them are polls, not sleeps.
        create: Duration::from_secs(8),
        attach: Duration::from_secs(4),
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while api.volume(&created.id).await.unwrap().state != VolumeState::Available {
        assert!(tokio::time::Instant::now() < deadline, "never available");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = api.volume(&created.id).await.unwrap();
        if v.attachment_to(&instance).unwrap().state != AttachmentState::Attaching {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "still attaching");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
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

/// A guest's metadata carries an instance profile: the SDK's own IMDS credentials provider
/// (what signs cps-attach's requests in the VM tier, where no key is set) reads its role's
/// credentials through IMDSv2. The host tier's metadata has none.
#[tokio::test]
async fn a_guests_metadata_gives_the_sdk_instance_profile_credentials() {
    use aws_credential_types::provider::ProvideCredentials;
    let identity = InstanceIdentity {
        instance_id: "i-0123456789abcdef1".into(),
        region: REGION.into(),
        availability_zone: "us-east-1a".into(),
    };
    let credentials = |endpoint: String| async move {
        let client = aws_config::imds::Client::builder()
            .endpoint(endpoint.as_str())
            .unwrap()
            .build();
        aws_config::imds::credentials::ImdsCredentialsProvider::builder()
            .imds_client(client)
            .build()
            .provide_credentials()
            .await
    };
    let guest =
        FakeImds::start_with(identity.clone(), None, Some("02:00:00:00:00:01".into())).unwrap();
    let got = credentials(guest.endpoint().to_owned()).await.unwrap();
    assert_eq!(got.access_key_id(), "testing");
    assert_eq!(
        got.session_token(),
        Some("cps-bench-session-i-0123456789abcdef1")
    );
    let left = got
        .expiry()
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(left > Duration::from_secs(5 * 3600), "{left:?}");
    assert_eq!(
        guest
            .stats()
            .rejected
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    let host = FakeImds::start(identity).unwrap();
    assert!(credentials(host.endpoint().to_owned()).await.is_err());
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

/// Polls the volume's latest modification until `done` holds (bounded), returning every state
/// seen on the way, in order, without repeats.
async fn wait_modification(
    api: &Ec2Api,
    volume_id: &str,
    done: impl Fn(ModificationState) -> bool,
    timeout: Duration,
) -> Vec<ModificationState> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen: Vec<ModificationState> = Vec::new();
    loop {
        let m = api.latest_modification(volume_id).await.unwrap().unwrap();
        if seen.last() != Some(&m.state) {
            seen.push(m.state);
        }
        if done(m.state) {
            return seen;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{volume_id}: still {seen:?} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn grow_to(size_gib: i32) -> VolumeChange {
    VolumeChange {
        size_gib: Some(size_gib),
        ..VolumeChange::default()
    }
}

#[tokio::test]
async fn volumes_are_modified_in_place_with_the_states_and_refusals_of_aws() {
    if !ready() {
        return;
    }
    let (emu, _dir) = emulator(Delays::default());
    // Long delays stepped through with advance_modifications: no clock to race.
    emu.set_modification_delays(Duration::from_secs(600), Duration::from_secs(600))
        .unwrap();
    let api = provider(&emu).await;
    let t = tags(&[("cluster", "grow")]);
    let vol = api
        .create_volume(&spec("us-east-1a", &t), "grow-1")
        .await
        .unwrap()
        .id;
    let before = api.volume(&vol).await.unwrap();
    assert_eq!((before.iops, before.throughput), (Some(4000), Some(200)));
    assert_eq!(
        api.latest_modification(&vol).await.unwrap(),
        None,
        "never modified: AWS's InvalidVolumeModification.NotFound is no error"
    );

    let change = VolumeChange {
        size_gib: Some(3),
        throughput: Some(300),
        ..VolumeChange::default()
    };
    let m = api.modify_volume(&vol, &change).await.unwrap();
    assert_eq!(m.state, ModificationState::Modifying);
    assert_eq!(
        (m.volume_id.as_str(), m.original_size_gib, m.target_size_gib),
        (vol.as_str(), 2, 3)
    );
    assert_eq!(
        (
            m.target_volume_type.as_str(),
            m.target_iops,
            m.target_throughput
        ),
        ("gp3", Some(4000), Some(300)),
        "every target, also those left as they were"
    );
    assert!(
        m.started
            .is_some_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(60))
    );
    let now = api.volume(&vol).await.unwrap();
    assert_eq!(
        (now.size_gib, now.throughput),
        (3, Some(300)),
        "DescribeVolumes shows the target at once"
    );

    let err = api.modify_volume(&vol, &grow_to(4)).await.unwrap_err();
    assert!(
        matches!(err, Error::ModificationInProgress { ref volume_id, .. } if *volume_id == vol),
        "{err}"
    );
    assert!(
        err.to_string().contains("IncorrectModificationState"),
        "{err}"
    );
    use ModificationState::*;
    let mut seen = vec![api.latest_modification(&vol).await.unwrap().unwrap().state];
    for _ in 0..2 {
        emu.advance_modifications(&vol, Duration::from_secs(600))
            .unwrap();
        seen.push(api.latest_modification(&vol).await.unwrap().unwrap().state);
        if seen.last() == Some(&Optimizing) {
            let err = api.modify_volume(&vol, &grow_to(4)).await.unwrap_err();
            assert!(
                matches!(err, Error::ModificationInProgress { .. }),
                "optimizing is still under way: {err}"
            );
        }
    }
    assert_eq!(seen, [Modifying, Optimizing, Completed]);

    let err = api.modify_volume(&vol, &grow_to(4)).await.unwrap_err();
    assert!(
        matches!(err, Error::ModificationCooldown { ref volume_id, .. } if *volume_id == vol),
        "{err}"
    );
    assert!(
        err.to_string().contains("VolumeModificationRateExceeded") && !err.is_retryable(),
        "{err}"
    );

    // Six hours later (aged): shrinking is refused with AWS's reason, growing is not.
    emu.age_modifications(&vol, Duration::from_secs(6 * 3600))
        .unwrap();
    let err = api.modify_volume(&vol, &grow_to(1)).await.unwrap_err();
    assert!(
        matches!(err, Error::Api { ref code, .. } if code.as_deref() == Some("InvalidParameterValue")),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("smaller") && !text.contains("service error") && !text.contains("<?xml"),
        "{text}"
    );
    let m = api.modify_volume(&vol, &grow_to(4)).await.unwrap();
    assert_eq!((m.original_size_gib, m.target_size_gib), (3, 4));
    let latest = api.latest_modification(&vol).await.unwrap().unwrap();
    assert_eq!(latest.target_size_gib, 4, "the newest modification");

    // A modification that fails leaves the volume as it was, and holds nothing back.
    emu.fail_modification(&vol).unwrap();
    let failed = api.latest_modification(&vol).await.unwrap().unwrap();
    assert_eq!(failed.state, ModificationState::Failed);
    assert!(failed.status_message.is_some());
    assert_eq!(api.volume(&vol).await.unwrap().size_gib, 3);

    let err = api
        .latest_modification("vol-00000000000000000")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let err = api
        .modify_volume("vol-00000000000000000", &grow_to(4))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err}");
    let calls = api.calls().snapshot();
    assert_eq!(
        calls.get("ModifyVolume"),
        Some(&7),
        "each refusal was one call"
    );
}

/// The kernel's size of a block device (seeking to its end asks the driver).
fn device_bytes(device: &std::path::Path) -> u64 {
    use std::io::{Seek, SeekFrom};
    std::fs::File::open(device)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .unwrap_or_else(|e| panic!("{}: {e}", device.display()))
}

/// Waits (bounded) until `device` has `bytes`.
async fn wait_device_bytes(device: &std::path::Path, bytes: u64, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while device_bytes(device) != bytes {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} still has {} bytes after {timeout:?}, not {bytes}",
            device.display(),
            device_bytes(device)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_bench_device_grows_when_the_modification_takes_effect_and_keeps_its_data() {
    if !cps_testbed::ready("the bench's device stand-in grows a modified volume") {
        return;
    }
    const GIB: u64 = 1 << 30;
    let bench = bench();
    bench
        .emulator()
        .set_modification_delays(Duration::from_secs(600), Duration::from_secs(600))
        .unwrap();
    let api = bench.volumes_api();
    let instance = bench.launch("us-east-1a").await.unwrap();
    let vol = api
        .create_volume(
            &VolumeSpec::gp3("us-east-1a", 1, &tags(&[("cluster", "grow")])),
            "grow",
        )
        .await
        .unwrap()
        .id;
    api.attach_volume(&vol, &instance.id, "/dev/xvdf")
        .await
        .unwrap();
    assert!(
        bench
            .udev()
            .wait_backed(&vol, true, Duration::from_secs(15)),
        "{vol} never appeared: {:?}",
        bench.udev().errors()
    );
    let device = bench.udev().device_of(&vol).unwrap();
    assert_eq!(device_bytes(&device), GIB);

    // Data on a filesystem, mounted as cps-attach leaves it.
    let mount = instance.home.join("data");
    std::fs::create_dir_all(&mount).unwrap();
    let _unmount = cps_fixtures::MountGuard(mount.clone());
    let dev = device.to_string_lossy().into_owned();
    cps_fixtures::run("mkfs.xfs", &["-q", "-K", &dev]).unwrap();
    cps_fixtures::run("mount", &["-t", "xfs", &dev, &mount.to_string_lossy()]).unwrap();
    let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(mount.join("data.bin"), &data).unwrap();
    cps_fixtures::run("sync", &[]).unwrap();

    let m = api.modify_volume(&vol, &grow_to(2)).await.unwrap();
    assert_eq!(m.state, ModificationState::Modifying);
    // The stand-in is given time to grow it too early; the modification stays `modifying` for
    // ten minutes, so this cannot race the delay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        device_bytes(&device),
        GIB,
        "while modifying, the device keeps its size"
    );
    bench
        .emulator()
        .advance_modifications(&vol, Duration::from_secs(600))
        .unwrap();
    wait_modification(
        &api,
        &vol,
        |s| s == ModificationState::Optimizing,
        Duration::from_secs(15),
    )
    .await;
    wait_device_bytes(&device, 2 * GIB, Duration::from_secs(10)).await;
    // The kernel sees the larger device first (losetup -c); the stand-in's sysfs follows, and
    // its "grew" event says it has.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !bench.udev().events().iter().any(|e| e.contains("grew")) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            bench.udev().events()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let name = device.file_name().unwrap();
    let sys_size = instance.sys_root.join("block").join(name).join("size");
    assert_eq!(
        std::fs::read_to_string(&sys_size).unwrap().trim(),
        (2 * GIB / 512).to_string(),
        "the stand-in's sysfs size follows"
    );

    // The filesystem grows online onto the larger device; the data is untouched.
    cps_fixtures::run("xfs_growfs", &[&mount.to_string_lossy()]).unwrap();
    let df = cps_fixtures::run("df", &["-B1", "--output=size", &mount.to_string_lossy()]).unwrap();
    let fs_bytes: u64 = df.lines().last().unwrap().trim().parse().unwrap();
    assert!(fs_bytes > GIB + GIB / 2, "xfs has {fs_bytes} bytes");
    assert_eq!(std::fs::read(mount.join("data.bin")).unwrap(), data);
    assert!(
        bench.udev().errors().is_empty(),
        "{:?}",
        bench.udev().errors()
    );
}

/// cps-aws signing as the node, whose key the emulator holds to the node policy.
fn node_api(bench: &cps_testbed::Bench) -> Ec2Api {
    use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(bench.endpoint())
        .credentials_provider(Credentials::new(
            cps_testbed::NODE_KEY,
            "testing",
            None,
            None,
            "node",
        ))
        .build();
    Ec2Api::from_client(aws_sdk_ec2::Client::from_conf(config))
}

/// The module's node policy lets a node grow its cluster's volumes and no other: the bench's
/// boot (bins/attach/tests/e2e/iam.rs) does not change a volume, so this is where those two
/// actions are proven granted, scoped and needed.
#[tokio::test]
async fn the_module_policy_lets_a_node_grow_only_its_clusters_volumes() {
    if !ready() {
        return;
    }
    let bench = bench();
    let api = bench.volumes_api();
    let own = tags(&[("cps:cluster", "iam-e2e")]);
    let ours = api
        .create_volume(&VolumeSpec::gp3("us-east-1a", 1, &own), "ours")
        .await
        .unwrap()
        .id;
    let theirs = api
        .create_volume(
            &VolumeSpec::gp3("us-east-1a", 1, &tags(&[("cps:cluster", "other")])),
            "theirs",
        )
        .await
        .unwrap()
        .id;
    let path = cps_testbed::emulator::repo_root().join("terraform/tests/node-policy.json");
    let policy: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    bench.restrict_key(&policy.to_string()).unwrap();
    let node = node_api(&bench);

    assert_eq!(node.latest_modification(&ours).await.unwrap(), None);
    node.modify_volume(&ours, &grow_to(2)).await.unwrap();
    let m = node.latest_modification(&ours).await.unwrap().unwrap();
    assert_eq!(m.target_size_gib, 2);
    let err = node.modify_volume(&theirs, &grow_to(2)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unauthorized {
                operation: "ModifyVolume",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(bench.denied_actions().unwrap(), ["ec2:ModifyVolume"]);

    // Each of the two is needed: without it, the node's request is refused.
    for action in ["ec2:ModifyVolume", "ec2:DescribeVolumesModifications"] {
        let mut reduced = policy.clone();
        for s in reduced["Statement"].as_array_mut().unwrap() {
            s["Action"]
                .as_array_mut()
                .unwrap()
                .retain(|a| a.as_str() != Some(action));
        }
        bench.restrict_key(&reduced.to_string()).unwrap();
        let refused = match action {
            "ec2:ModifyVolume" => node.modify_volume(&ours, &grow_to(3)).await.err(),
            _ => node.latest_modification(&ours).await.err(),
        };
        assert!(
            matches!(refused, Some(Error::Unauthorized { .. })),
            "without {action}: {refused:?}"
        );
        assert_eq!(bench.denied_actions().unwrap(), [action]);
    }
}

#[path = "emulator/locks.rs"]
mod locks;
