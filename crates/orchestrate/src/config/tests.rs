use super::*;

/// The complete example of the original tool's README, as its users have it.
pub(crate) const SEED_EXAMPLE: &str = "\
# optional; the block device to mount EBS volumes to.  Defaults to /dev/xvdc.
block-device: /dev/xvdc

# required; the block device \"provider\"
block-provider:
  aws-ebs:
    ebs-tags:
      environment: Production
      role: PostgreSQL
    type: gp2
    size: 200

file-system:
  mkfs:
    - -t
    - ext4
    - -m
    - 0

mount:
  target: /mnt
";

fn parse(text: &str) -> Result<AttachConfig, ConfigError> {
    AttachConfig::parse("attach.yml", text, &Overrides::default())
}

fn err(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

const MINIMAL: &str = "block-provider:\n  aws-ebs:\n    ebs-tags: {role: kafka}\n    size: 10\n";

#[test]
fn the_seed_example_is_accepted_verbatim() {
    let c = parse(SEED_EXAMPLE).unwrap();
    assert_eq!(c.block_device, "/dev/xvdc");
    assert_eq!(c.tags.get("role").map(String::as_str), Some("PostgreSQL"));
    assert_eq!(c.volume.volume_type, "gp2");
    assert_eq!(c.volume.size_gib, 200);
    assert!(c.volume.encrypted, "encryption is on unless turned off");
    assert_eq!(c.mkfs, MkfsSpec::default());
    assert_eq!(c.mount.target, PathBuf::from("/mnt"));
    assert_eq!(c.mount.fstab, None);
}

#[test]
fn defaults_fill_everything_optional() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.block_device, "/dev/xvdc");
    assert_eq!(c.volume.volume_type, "gp3");
    assert_eq!(c.mkfs.fstype(), "ext4");
    assert_eq!(c.timeouts, Timeouts::default());
    assert_eq!(c.device_root, PathBuf::from("/dev"));
    assert_eq!(c.sysfs_root, PathBuf::from("/sys"));
}

#[test]
fn the_extended_format_reads_every_key() {
    let c = parse(
        "block-device: /dev/sdf
block-provider:
  aws-ebs:
    ebs-tags: {cluster: kafka, node: '2'}
    type: gp3
    size: 100
    iops: 6000
    throughput: 250
    encrypted: true
    kms-key-id: alias/cps
file-system:
  type: xfs
  label: kafka-data
  options: [-K]
mount:
  target: /var/lib/kafka
  options: noatime,nodiratime
  owner: kafka
  group: '1000'
  mode: 0750
  persist: fstab
timeouts:
  create: 2m
  attach: 90
  device: 1m30s
device-root: /tmp/bench/dev
sysfs-root: /tmp/bench/sys
",
    )
    .unwrap();
    assert_eq!(c.block_device, "/dev/sdf");
    assert_eq!(c.volume.iops, Some(6000));
    assert_eq!(c.volume.throughput, Some(250));
    assert_eq!(c.volume.kms_key_id.as_deref(), Some("alias/cps"));
    assert_eq!(
        c.mkfs,
        MkfsSpec::Typed {
            fstype: FsType::Xfs,
            label: Some("kafka-data".into()),
            options: vec!["-K".into()]
        }
    );
    assert_eq!(c.mount.options, ["noatime", "nodiratime"]);
    assert_eq!(c.mount.ownership.mode, Some(0o750));
    assert_eq!(c.mount.ownership.group.as_deref(), Some("1000"));
    assert_eq!(c.mount.fstab, Some(PathBuf::from("/etc/fstab")));
    assert_eq!(c.timeouts.create, Duration::from_secs(120));
    assert_eq!(c.timeouts.attach, Duration::from_secs(90));
    assert_eq!(c.timeouts.device, Duration::from_secs(90));
    assert_eq!(c.device_root, PathBuf::from("/tmp/bench/dev"));
}

#[test]
fn unknown_keys_name_file_line_and_column() {
    let e = err("block-provider:\n  aws-ebs:\n    ebs-tags: {a: b}\n    size: 1\n    sise: 2\n");
    assert!(e.starts_with("attach.yml:5:5: unknown field `sise`"), "{e}");
    assert!(e.contains("5 |     sise: 2"), "the line is shown: {e}");
}

#[test]
fn wrong_types_name_file_line_and_column() {
    let e = err("block-provider:\n  aws-ebs:\n    ebs-tags: {a: b}\n    size: big\n");
    assert!(e.starts_with("attach.yml:4:11:"), "{e}");
    let e = err("mount:\n  target: [a]\n");
    assert!(e.starts_with("attach.yml:2:11:"), "{e}");
}

#[test]
fn semantic_errors_point_at_the_value() {
    let e = err("block-provider:\n  aws-ebs:\n    ebs-tags: {a: b}\n    type: gp9\n    size: 1\n");
    assert!(
        e.starts_with("attach.yml:4:11: unknown volume type \"gp9\""),
        "{e}"
    );
    let e = err(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {a: b}\n    type: gp2\n    size: 1\n    iops: 3000\n",
    );
    assert!(
        e.starts_with("attach.yml:6:11: iops can only be set for gp3"),
        "{e}"
    );
    let e = err("block-provider:\n  aws-ebs:\n    ebs-tags: {a: b}\n    type: st1\n    size: 10\n");
    assert!(e.contains("outside what st1 allows"), "{e}");
    let e = err(&format!("{MINIMAL}mount:\n  mode: '999'\n"));
    assert!(e.starts_with("attach.yml:6:9: mode \"999\""), "{e}");
    let e = err(&format!("{MINIMAL}timeouts:\n  attach: soon\n"));
    assert!(e.starts_with("attach.yml:6:11:"), "{e}");
    let e = err(&format!("{MINIMAL}file-system:\n  type: zfs\n"));
    assert!(e.contains("unknown filesystem type \"zfs\""), "{e}");
    let e = err(&format!(
        "{MINIMAL}file-system:\n  type: xfs\n  label: much-too-long-label\n"
    ));
    assert!(e.contains("xfs label must be 1 to 12 bytes"), "{e}");
    let e = err(&format!(
        "{MINIMAL}file-system:\n  mkfs: [-t, ext4]\n  type: ext4\n"
    ));
    assert!(e.contains("alternatives"), "{e}");
    let e = err(&format!("{MINIMAL}file-system:\n  mkfs: [-t, xfs, -f]\n"));
    assert!(e.contains("forces overwriting"), "{e}");
    let e = err(&format!("{MINIMAL}mount:\n  target: relative/dir\n"));
    assert!(e.contains("absolute path"), "{e}");
    let e = err(&format!("{MINIMAL}mount:\n  persist: always\n"));
    assert!(e.contains("not one of fstab, none"), "{e}");
}

#[test]
fn block_device_must_be_a_data_volume_name() {
    for good in [
        "/dev/xvdc",
        "/dev/sdf",
        "/dev/xvdz",
        "/dev/xvdba",
        "/dev/sdb",
    ] {
        let text = format!("block-device: {good}\n{MINIMAL}");
        assert_eq!(parse(&text).unwrap().block_device, good);
    }
    for bad in [
        "/dev/sda",
        "/dev/xvda",
        "/dev/nvme1n1",
        "xvdc",
        "/dev/xvdda",
        "/dev/sdf1",
        "/dev/xvdc/../sda",
    ] {
        let e = err(&format!("block-device: {bad}\n{MINIMAL}"));
        assert!(e.starts_with("attach.yml:1:15: block-device"), "{bad}: {e}");
    }
}

#[test]
fn missing_required_keys_say_what_they_are_for() {
    let e = err("block-provider:\n  aws-ebs:\n    size: 10\n");
    assert!(
        e.starts_with("attach.yml:3:5: block-provider.aws-ebs.ebs-tags is required"),
        "{e}"
    );
    let e = err("block-provider:\n  aws-ebs:\n    ebs-tags: {a: b}\n");
    assert!(e.contains("size is required"), "{e}");
    let e = err("");
    assert!(e.contains("ebs-tags is required"), "{e}");
    let e = err("block-provider:\n  aws-ebs:\n    ebs-tags: {}\n    size: 1\n");
    assert!(e.contains("at least one tag"), "{e}");
    let e = err("block-provider:\n  aws-ebs:\n    ebs-tags: {'aws:x': b}\n    size: 1\n");
    assert!(e.contains("reserved aws: prefix"), "{e}");
}

#[test]
fn duplicate_keys_are_errors() {
    let e = err("block-provider:\n  aws-ebs:\n    ebs-tags: {a: b, a: c}\n    size: 1\n");
    assert!(e.starts_with("attach.yml:3:"), "{e}");
    assert!(e.contains("duplicate"), "{e}");
}

#[test]
fn overrides_win_and_their_errors_name_the_flag() {
    let o = Overrides {
        tags: vec![("cluster".into(), "zk".into())],
        size: Some(20),
        mount_target: Some("/data".into()),
        fs_type: Some("btrfs".into()),
        ..Overrides::default()
    };
    let c = AttachConfig::parse("attach.yml", SEED_EXAMPLE, &o).unwrap();
    assert_eq!(c.tags, Tags::from([("cluster".into(), "zk".into())]));
    assert_eq!(c.volume.size_gib, 20);
    assert_eq!(c.mount.target, PathBuf::from("/data"));
    assert_eq!(
        c.mkfs.fstype(),
        "btrfs",
        "a typed override replaces the file's raw mkfs"
    );

    let bad = Overrides {
        size: Some(0),
        ..Overrides::default()
    };
    let e = AttachConfig::parse("attach.yml", SEED_EXAMPLE, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--size (CPS_SIZE): size 0 GiB"), "{e}");
}

#[test]
fn mkfs_flags_replace_the_file_system_section() {
    let raw = Overrides {
        mkfs_args: Some(vec!["-t".into(), "xfs".into()]),
        ..Overrides::default()
    };
    let typed_file = format!("{MINIMAL}file-system:\n  type: btrfs\n  label: x\n");
    let c = AttachConfig::parse("attach.yml", &typed_file, &raw).unwrap();
    assert_eq!(
        c.mkfs,
        MkfsSpec::Raw {
            args: vec!["-t".into(), "xfs".into()]
        }
    );

    let opts = Overrides {
        fs_options: Some(vec!["-K".into()]),
        ..Overrides::default()
    };
    let c = AttachConfig::parse("attach.yml", &typed_file, &opts).unwrap();
    assert!(matches!(c.mkfs, MkfsSpec::Typed { ref options, .. } if options == &["-K"]));

    let both = Overrides {
        mkfs_args: Some(vec!["-t".into(), "xfs".into()]),
        fs_type: Some("xfs".into()),
        ..Overrides::default()
    };
    let e = AttachConfig::parse("attach.yml", MINIMAL, &both)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("--mkfs-arg (CPS_MKFS_ARGS): raw mkfs arguments"),
        "{e}"
    );

    let forced = Overrides {
        fs_type: Some("xfs".into()),
        fs_options: Some(vec!["-f".into()]),
        ..Overrides::default()
    };
    let e = AttachConfig::parse("attach.yml", MINIMAL, &forced)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("--fs-option (CPS_FS_OPTIONS): mkfs option -f forces"),
        "{e}"
    );
}

#[test]
fn no_file_works_from_overrides_alone() {
    let o = Overrides {
        tags: vec![("role".into(), "db".into())],
        size: Some(5),
        ..Overrides::default()
    };
    let missing = Path::new("/nonexistent/cps/attach.yml");
    let c = AttachConfig::load(missing, false, &o).unwrap();
    assert_eq!(c.volume.size_gib, 5);
    let e = AttachConfig::load(missing, true, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("/nonexistent/cps/attach.yml: cannot read"),
        "{e}"
    );
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
    assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(parse_duration("1500ms"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
    assert_eq!(parse_duration(""), None);
    assert_eq!(parse_duration("m"), None);
    assert_eq!(parse_duration("5 minutes"), None);
}

#[test]
fn the_node_sections_read_every_key() {
    let c = parse(&format!(
        "{MINIMAL}identity:
  mode: node-id
  node-id-tag: kafka:broker
  id-tag: kafka:broker
  release-timeout: 5m
network-interface:
  device-index: 2
  tags: {{role: broker}}
  timeout: 90s
files:
  - path: /etc/kafka/server.properties
    content: \"broker.id=${{CPS_NODE_ID}}\\n\"
    mode: '0640'
    owner: kafka
    group: kafka
  - path: /etc/kafka/ca.pem
    content-base64: aGVsbG8=
hooks:
  configure: [/usr/local/bin/configure-node, --join]
  health: [sh, -c, 'kafka-broker-api-versions --bootstrap-server localhost:9092']
  timeout: 2m
  health-timeout: 20m
  health-interval: 15s
lifecycle:
  hook: kafka-launch
  on-failure: leave
  heartbeat-interval: 1m
env-file: /run/kafka/node.env
run-dir: /run/kafka
command-timeout: 30m
"
    ))
    .unwrap();
    let n = &c.node;
    assert_eq!(
        n.identity,
        Identity::NodeId {
            id: None,
            source_tag: "kafka:broker".into(),
            id_tag: "kafka:broker".into()
        }
    );
    assert_eq!(n.release_timeout, Duration::from_secs(300));
    let i = n.interface.as_ref().unwrap();
    assert_eq!((i.device_index, i.timeout), (2, Duration::from_secs(90)));
    assert_eq!(i.extra_tags.get("role").map(String::as_str), Some("broker"));
    assert_eq!(n.files.len(), 2);
    assert_eq!(n.files[0].mode, 0o640);
    assert!(n.files[0].template);
    assert_eq!(n.files[0].ownership.owner.as_deref(), Some("kafka"));
    assert_eq!(
        (
            n.files[1].content.as_slice(),
            n.files[1].template,
            n.files[1].mode
        ),
        (&b"hello"[..], false, 0o644)
    );
    assert_eq!(
        n.hooks.configure.as_deref().unwrap(),
        ["/usr/local/bin/configure-node", "--join"]
    );
    assert_eq!(n.hooks.health_interval, Duration::from_secs(15));
    let l = n.lifecycle.as_ref().unwrap();
    assert_eq!(
        (l.hook.as_str(), l.on_failure, l.heartbeat_interval),
        (
            "kafka-launch",
            OnFailure::Leave,
            Some(Duration::from_secs(60))
        )
    );
    assert_eq!(n.env_file, PathBuf::from("/run/kafka/node.env"));
    assert_eq!(n.command_timeout, Duration::from_secs(1800));
}

#[test]
fn node_defaults_keep_the_original_behaviour() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.node.identity, Identity::Pool);
    assert!(c.node.interface.is_none() && c.node.lifecycle.is_none() && c.node.files.is_empty());
    assert_eq!(c.node.env_file, PathBuf::from("/run/cps/node.env"));
    let slot = parse(&format!(
        "{MINIMAL}identity:\n  mode: slot\n  max-slots: 3\n"
    ))
    .unwrap();
    assert_eq!(
        slot.node.identity,
        Identity::Slot {
            max: 3,
            id_tag: "cps:slot".into()
        }
    );
    let o = Overrides {
        node_id: Some("4".into()),
        lifecycle_hook: Some("h".into()),
        ..Overrides::default()
    };
    let c = AttachConfig::parse("attach.yml", MINIMAL, &o).unwrap();
    assert!(
        matches!(c.node.identity, Identity::NodeId { id: Some(ref id), .. } if id == "4"),
        "--node-id implies node-id mode"
    );
    assert_eq!(c.node.lifecycle.unwrap().hook, "h");
}

#[test]
fn node_section_errors_point_at_the_value() {
    let cases: &[(&str, &str)] = &[
        (
            "identity:\n  mode: leader\n",
            "6:9: identity mode \"leader\" is not one of pool, node-id, slot",
        ),
        (
            "identity:\n  mode: slot\n",
            "6:3: identity mode slot needs max-slots",
        ),
        (
            "identity:\n  mode: slot\n  max-slots: 0\n",
            "7:14: identity.max-slots must be between 1 and 10000",
        ),
        (
            "identity:\n  max-slots: 3\n",
            "identity.max-slots needs identity.mode node-id or slot",
        ),
        (
            "network-interface:\n  device-index: 1\n",
            "network-interface needs an id, or identity mode node-id or slot",
        ),
        (
            "identity:\n  mode: node-id\nnetwork-interface:\n  device-index: 0\n",
            "network-interface.device-index must be between 1 and 31",
        ),
        (
            "files:\n  - path: etc/x\n    content: a\n",
            "6:11: file path \"etc/x\" must be an absolute file path",
        ),
        (
            "files:\n  - path: /etc/x\n",
            "a file needs content, content-base64 or content-from",
        ),
        (
            "files:\n  - path: /etc/x\n    content: a\n    content-base64: YQ==\n",
            "8:21: give one of content, content-base64, content-from, not both content and content-base64",
        ),
        (
            "files:\n  - path: /etc/x\n    content-base64: '%%%'\n",
            "content-base64 is not valid base64",
        ),
        (
            "files:\n  - path: /etc/x\n    content: a\n  - path: /etc/x\n    content: b\n",
            "/etc/x is listed twice",
        ),
        (
            "files:\n  - path: /etc/x\n    content: a\n    mode: rw\n",
            "mode \"rw\" is not an octal permission",
        ),
        ("hooks:\n  health: []\n", "hooks.health must be a command"),
        (
            "files:\n  - path: /etc/x\n    content: 'id=${CPS_NODE_ID}'\n",
            "the placeholder ${CPS_NODE_ID} has no value in this configuration",
        ),
        (
            "identity:\n  mode: node-id\nfiles:\n  - path: /etc/x\n    content: 'ip=${CPS_ENI_IP}'\n",
            "the placeholder ${CPS_ENI_IP} has no value",
        ),
        (
            "identity:\n  mode: node-id\nfiles:\n  - path: /etc/x\n    content: 'x=${CPS_NODEID}'\n",
            "the placeholder ${CPS_NODEID} has no value",
        ),
        (
            "lifecycle:\n  on-failure: abandon\n",
            "lifecycle needs hook",
        ),
        (
            "lifecycle:\n  hook: h\n  on-failure: retry\n",
            "on-failure \"retry\" is not one of abandon, leave",
        ),
        (
            "lifecycle:\n  hook: h\n  heartbat-interval: 1m\n",
            "unknown field `heartbat-interval`",
        ),
    ];
    for (extra, expected) in cases {
        let e = err(&format!("{MINIMAL}{extra}"));
        assert!(
            e.contains(expected),
            "{extra:?}\n  expected: {expected}\n  got: {e}"
        );
        assert!(e.starts_with("attach.yml:"), "{e}");
    }
    let e = err(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {cluster: k, 'cps:slot': '1'}\n    size: 1\nidentity:\n  mode: slot\n  max-slots: 3\n",
    );
    assert!(
        e.contains("must not contain the identity tag \"cps:slot\""),
        "{e}"
    );
}

#[test]
fn file_contents_can_come_from_the_secret_stores() {
    use cps_provider::SecretRef;
    let c = AttachConfig::parse(
        "attach.yml",
        &format!(
            "{MINIMAL}files:\n  - path: /etc/a\n    content-from: ssm:/kafka/jaas\n    mode: '0600'\n  - path: /etc/b\n    content-from: 'secretsmanager:arn:aws:secretsmanager:eu-west-1:123456789012:secret:kafka/tls-AbCdEf'\n  - path: /etc/c\n    content-from: ssm:plain_name.v2\n"
        ),
        &Overrides::default(),
    )
    .unwrap();
    let f = &c.node.files;
    assert_eq!(
        f.iter().map(|f| f.secret.clone()).collect::<Vec<_>>(),
        [
            Some(SecretRef::Parameter("/kafka/jaas".into())),
            Some(SecretRef::Secret(
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:kafka/tls-AbCdEf".into()
            )),
            Some(SecretRef::Parameter("plain_name.v2".into())),
        ]
    );
    assert!(f[0].content.is_empty() && !f[0].template && f[0].mode == 0o600);

    for (entry, expected) in [
        (
            "content-from: vault:kv/x",
            "7:19: \"vault\" is not a secret store: content-from takes ssm:PARAMETER-NAME-OR-ARN or secretsmanager:SECRET-NAME-OR-ARN",
        ),
        (
            "content-from: /kafka/jaas",
            "7:19: \"/kafka/jaas\": content-from takes",
        ),
        (
            "content-from: 'ssm:'",
            "7:19: ssm: needs a name or ARN of 1 to 2048 characters",
        ),
        (
            "content-from: 'ssm:/kafka/pass word'",
            "\"/kafka/pass word\" is not a usable ssm name: ' ' is not allowed",
        ),
        (
            "content-from: ssm:kafka/jaas",
            "parameter \"kafka/jaas\": a name with a hierarchy starts with / (/kafka/jaas)",
        ),
        (
            "content: a\n    content-from: ssm:/x",
            "8:19: give one of content, content-base64, content-from, not both content and content-from",
        ),
    ] {
        let e = err(&format!("{MINIMAL}files:\n  - path: /etc/x\n    {entry}\n"));
        assert!(
            e.contains(expected),
            "{entry:?}\n  expected: {expected}\n  got: {e}"
        );
    }
}
