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
    assert!(e.contains("`a` is given twice"), "{e}");
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
            "6:11: file path \"etc/x\" must be an absolute path",
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
fn a_node_id_is_refused_blank_too_long_or_with_control_characters() {
    for (value, says) in [
        ("'  '", "empty or only whitespace"),
        ("\"7\\nrole=admin\"", "control characters"),
        ("\"a\\tb\"", "control characters"),
    ] {
        let text = format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{a: b}}\n    size: 1\nidentity:\n  mode: node-id\n  node-id: {value}\n"
        );
        let err = AttachConfig::parse("n.yml", &text, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains(says), "{value}: {err}");
        assert!(err.to_string().starts_with("n.yml:7:"), "{value}: {err}");
    }
    assert!(super::check_node_id(&"x".repeat(257)).is_err());
    assert!(super::check_node_id("broker-1").is_ok());
}

// ---- the limits the documentation states, each enforced where the value is ---------------

/// `err` for a document whose error must point at `line:column` and say `expected`.
fn refused_at(text: &str, at: &str, expected: &str) {
    let e = err(text);
    assert!(
        e.starts_with(&format!("attach.yml:{at}: ")),
        "expected the error at {at}:\n{text}\ngot: {e}"
    );
    assert!(
        e.contains(expected),
        "expected {expected:?}:\n{text}\ngot: {e}"
    );
}

#[test]
fn durations_are_between_one_second_and_a_day_and_read_one_way() {
    refused_at(
        &format!("{MINIMAL}timeouts:\n  attach: 1ms\n"),
        "6:11",
        "between 1s and 24h",
    );
    refused_at(
        &format!("{MINIMAL}timeouts:\n  attach: 999ms\n"),
        "6:11",
        "between 1s and 24h",
    );
    refused_at(
        &format!("{MINIMAL}timeouts:\n  attach: 1h1h\n"),
        "6:11",
        "largest first",
    );
    refused_at(
        &format!("{MINIMAL}timeouts:\n  attach: 30s1m\n"),
        "6:11",
        "largest first",
    );
    refused_at(
        &format!("{MINIMAL}command-timeout: 25h\n"),
        "5:18",
        "between 1s and 24h",
    );
    refused_at(
        &format!("{MINIMAL}hooks:\n  health-interval: 10ms\n"),
        "6:20",
        "between 1s and 24h",
    );
    let c = parse(&format!(
        "{MINIMAL}timeouts:\n  create: 1500ms\n  attach: 1h30m\n  device: 24h\n"
    ))
    .unwrap();
    assert_eq!(c.timeouts.create, Duration::from_millis(1500));
    assert_eq!(c.timeouts.attach, Duration::from_secs(5400));
    assert_eq!(
        parse_duration("1h1h"),
        None,
        "cps-roll's flags use the same parser"
    );
    let o = Overrides {
        attach_timeout: Some("5ms".into()),
        ..Overrides::default()
    };
    let e = AttachConfig::parse("attach.yml", MINIMAL, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("--attach-timeout (CPS_ATTACH_TIMEOUT): "),
        "{e}"
    );
}

#[test]
fn integers_are_written_as_plain_decimal_numbers() {
    let ebs = |size: &str| {
        format!("block-provider:\n  aws-ebs:\n    ebs-tags: {{a: b}}\n    size: {size}\n")
    };
    refused_at(&ebs("\"200\""), "4:11", "write 200 without quotes");
    refused_at(&ebs("'200'"), "4:11", "write 200 without quotes");
    refused_at(&ebs("0x10"), "4:11", "not a plain decimal number; write 16");
    refused_at(&ebs("1_000"), "4:11", "write 1000");
    refused_at(&ebs("010"), "4:11", "not a plain decimal number");
    assert_eq!(parse(&ebs("200")).unwrap().volume.size_gib, 200);
    refused_at(
        &format!("{MINIMAL}identity:\n  mode: slot\n  max-slots: \"3\"\n"),
        "7:14",
        "without quotes",
    );
    refused_at(
        &format!("{MINIMAL}identity:\n  mode: node-id\nnetwork-interface:\n  device-index: 0x1\n"),
        "8:17",
        "write 1",
    );
    refused_at(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {a: b}\n    size: 10\n    iops: 3_000\n",
        "5:11",
        "write 3000",
    );
    // An alias is judged by the anchor's spelling.
    let c = parse(&format!(
        "{MINIMAL}identity: {{mode: slot, max-slots: &n 3}}\nnetwork-interface: {{device-index: *n}}\n"
    ))
    .unwrap();
    assert_eq!(c.node.interface.unwrap().device_index, 3);
    refused_at(
        &format!(
            "{MINIMAL}identity: {{mode: slot, max-slots: &n '3'}}\nnetwork-interface: {{device-index: *n}}\n"
        ),
        "5:38",
        "without quotes",
    );
}

#[test]
fn paths_must_say_what_they_mean() {
    refused_at(
        &format!("{MINIMAL}mount:\n  target: /a/..\n"),
        "6:11",
        "must not contain . or ..",
    );
    refused_at(
        &format!("{MINIMAL}mount:\n  target: /var/./lib\n"),
        "6:11",
        "must not contain . or ..",
    );
    refused_at(
        &format!("{MINIMAL}mount:\n  target: /\n"),
        "6:11",
        "other than /",
    );
    refused_at(&format!("{MINIMAL}env-file: /run/../etc/x\n"), "5:11", "..");
    refused_at(
        &format!("{MINIMAL}mount:\n  persist: fstab\n  fstab: /etc/../fstab\n"),
        "7:10",
        "..",
    );
    refused_at(
        &format!("{MINIMAL}files:\n  - path: /etc/../x\n    content: a\n"),
        "6:11",
        "..",
    );
    refused_at(
        &format!("{MINIMAL}mount:\n  target: \"/data\\nx\"\n"),
        "6:11",
        "control character U+000A",
    );
    assert_eq!(
        parse(&format!("{MINIMAL}mount:\n  target: /data/\n"))
            .unwrap()
            .mount
            .target,
        PathBuf::from("/data")
    );
}

#[test]
fn tags_follow_the_limits_of_aws() {
    let many = |n: usize| -> String {
        let tags: Vec<String> = (0..n).map(|i| format!("k{i}: v")).collect();
        format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{{}}}\n    size: 1\n",
            tags.join(", ")
        )
    };
    refused_at(&many(51), "3:15", "51 tags; AWS allows 50");
    assert_eq!(parse(&many(50)).unwrap().tags.len(), 50);
    // node-id and slot modes add their own tag to the volume.
    refused_at(
        &format!("{}identity:\n  mode: node-id\n", many(50)),
        "3:15",
        "50 tags plus the identity tag \"cps:node-id\"",
    );
    refused_at(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {role: \"ka\\u0007fka\"}\n    size: 1\n",
        "3:22",
        "control character U+0007",
    );
    refused_at(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {\"ro\\0le\": kafka}\n    size: 1\n",
        "3:16",
        "control character U+0000",
    );
    refused_at(
        &format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{a: {}}}\n    size: 1\n",
            "x".repeat(257)
        ),
        "3:19",
        "at most 256 characters",
    );
    // AWS counts characters: 128 two-byte characters are a valid key, 256 a valid value.
    let wide = format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{{}: {}}}\n    size: 1\n",
        "é".repeat(128),
        "ü".repeat(256)
    );
    assert_eq!(parse(&wide).unwrap().tags.len(), 1);
    refused_at(
        &format!(
            "{MINIMAL}identity:\n  mode: node-id\nnetwork-interface:\n  tags: {{role: \"a\\tb\"}}\n"
        ),
        "8:16",
        "control character U+0009",
    );
    let o = Overrides {
        tags: vec![("role".into(), "a\u{1b}[31m".into())],
        ..Overrides::default()
    };
    let e = AttachConfig::parse("attach.yml", MINIMAL, &o)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--tag (CPS_TAGS): "), "{e}");
    assert!(e.contains("U+001B") && !e.contains('\u{1b}'), "{e}");
}

#[test]
fn names_have_no_control_characters() {
    refused_at(
        &format!("{MINIMAL}lifecycle:\n  hook: \"launch\\0\"\n"),
        "6:9",
        "control character U+0000",
    );
    refused_at(
        &format!("{MINIMAL}lifecycle:\n  hook: launch hook\n"),
        "6:9",
        "letters, digits, -, _ and /",
    );
    refused_at(
        &format!("{MINIMAL}lifecycle:\n  hook: h\n  group: \"g\\r\"\n"),
        "7:10",
        "control character U+000D",
    );
    refused_at(
        &format!("{MINIMAL}identity:\n  node-id: \"2\\n\"\n"),
        "6:12",
        "control characters",
    );
    refused_at(
        &format!("{MINIMAL}identity:\n  mode: node-id\n  id-tag: \"cps:\\x00\"\n"),
        "7:11",
        "control character U+0000",
    );
    refused_at(
        &format!("{MINIMAL}mount:\n  owner: \"kafka\\0\"\n"),
        "6:10",
        "control character",
    );
    refused_at(
        &format!("{MINIMAL}file-system:\n  type: ext4\n  label: \"a\\u001b\"\n"),
        "7:10",
        "control character",
    );
    let o = Overrides {
        lifecycle_hook: Some("bad\nname".into()),
        ..Overrides::default()
    };
    let e = AttachConfig::parse("attach.yml", MINIMAL, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("--lifecycle-hook (CPS_LIFECYCLE_HOOK): "),
        "{e}"
    );
}

#[test]
fn kms_key_ids_have_a_shape_aws_accepts() {
    let kms = |id: &str| {
        format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{a: b}}\n    size: 1\n    kms-key-id: {id}\n"
        )
    };
    refused_at(&kms(&"a".repeat(64 << 10)), "5:17", "1 to 2048 characters");
    refused_at(&kms("'my key'"), "5:17", "a key id, alias/NAME or an ARN");
    refused_at(&kms("\"alias/x\\0\""), "5:17", "control character");
    for good in [
        "1234abcd-12ab-34cd-56ef-1234567890ab",
        "mrk-1234abcd12ab34cd56ef1234567890ab",
        "alias/cps-data",
        "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "arn:aws:kms:us-east-1:111122223333:alias/cps",
    ] {
        assert_eq!(
            parse(&kms(good)).unwrap().volume.kms_key_id.as_deref(),
            Some(good)
        );
    }
}

#[test]
fn mount_options_fit_an_fstab_line() {
    refused_at(
        &format!("{MINIMAL}mount:\n  options: [noatime, 'nodiratime defaults']\n"),
        "6:12",
        "whitespace",
    );
    refused_at(
        &format!("{MINIMAL}mount:\n  options: 'noatime,#x'\n"),
        "6:12",
        "starts a comment in fstab",
    );
    refused_at(
        &format!("{MINIMAL}mount:\n  options: [\"a\\tb\"]\n"),
        "6:12",
        "whitespace",
    );
    let o = Overrides {
        mount_options: Some(vec!["noatime".into(), "x y".into()]),
        ..Overrides::default()
    };
    let e = AttachConfig::parse("attach.yml", MINIMAL, &o)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("--mount-option (CPS_MOUNT_OPTIONS): "), "{e}");
    let c = parse(&format!(
        "{MINIMAL}mount:\n  options: 'noatime, commit=60'\n"
    ))
    .unwrap();
    assert_eq!(c.mount.options, ["noatime", "commit=60"]);
}

// ---- mkfs: only the verified device, never forced ---------------------------------------

/// The four ways mkfs arguments arrive, for a filesystem `fs` and extra arguments `args`:
/// typed options in the file, the raw list in the file, and the two flags.
fn mkfs_spellings(fs: &str, args: &[&str]) -> Vec<(String, Result<AttachConfig, ConfigError>)> {
    let list = args
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let typed = format!("{MINIMAL}file-system:\n  type: {fs}\n  options: [{list}]\n");
    let raw = format!("{MINIMAL}file-system:\n  mkfs: [-t, {fs}, {list}]\n");
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let flag_typed = Overrides {
        fs_type: Some(fs.into()),
        fs_options: Some(owned(args)),
        ..Overrides::default()
    };
    let mut raw_args = vec!["-t", fs];
    raw_args.extend(args);
    let flag_raw = Overrides {
        mkfs_args: Some(owned(&raw_args)),
        ..Overrides::default()
    };
    let mut all = vec![
        (raw.clone(), parse(&raw)),
        (
            "--mkfs-arg".into(),
            AttachConfig::parse("attach.yml", MINIMAL, &flag_raw),
        ),
    ];
    // ext2 and ext3 have only the raw form.
    if FsType::parse(fs).is_some() {
        all.push((typed.clone(), parse(&typed)));
        all.push((
            "--fs-option".into(),
            AttachConfig::parse("attach.yml", MINIMAL, &flag_typed),
        ));
    }
    all
}

fn mkfs_refused(fs: &str, args: &[&str], expected: &str) {
    for (how, result) in mkfs_spellings(fs, args) {
        match result {
            Ok(_) => panic!("{fs} {args:?} accepted ({how})"),
            Err(e) => {
                let e = e.to_string();
                assert!(
                    e.contains(expected),
                    "{fs} {args:?} ({how}): expected {expected:?}, got: {e}"
                );
            }
        }
    }
}

fn mkfs_accepted(fs: &str, args: &[&str]) {
    for (how, result) in mkfs_spellings(fs, args) {
        if let Err(e) = result {
            panic!("{fs} {args:?} refused ({how}): {e}");
        }
    }
}

#[test]
fn force_flags_are_refused_in_every_spelling() {
    for fs in ["ext4", "ext3", "ext2"] {
        for args in [
            &["-F"][..],
            &["-qF"],
            &["-FF"],
            &["-Fq"],
            &["-q", "-F"],
            &["-m", "0", "-F"],
            &["-jF"],
            &["--force"],
        ] {
            mkfs_refused(fs, args, "forces");
        }
    }
    for args in [
        &["-f"][..],
        &["-Kf"],
        &["-fK"],
        &["-qf"],
        &["-K", "-f"],
        &["--force"],
    ] {
        mkfs_refused("xfs", args, "forces");
    }
    for args in [
        &["-f"][..],
        &["-Kf"],
        &["-fq"],
        &["--force"],
        &["--forc"],
        &["--fo"],
        &["-L", "x", "-f"],
    ] {
        mkfs_refused("btrfs", args, "forces");
    }
}

#[test]
fn mkfs_options_that_write_to_other_devices_are_refused() {
    for args in [
        &["-J", "device=/dev/sdb"][..],
        &["-Jdevice=/dev/sdb"],
        &["-J", "size=64,device=UUID=0b0c"],
        &["-E", "nodiscard,device=/dev/sdb"],
        &["-z", "/dev/sdb"],
        &["/dev/sdb"],
    ] {
        mkfs_refused("ext4", args, "another device");
    }
    for args in [
        &["-l", "logdev=/dev/sdb"][..],
        &["-llogdev=/dev/sdb"],
        &["-l", "size=10m,logdev=/dev/sdb"],
        &["-l", "name=/dev/sdb"],
        &["-d", "name=/dev/sdb"],
        &["-dname=/dev/sdb"],
        &["-r", "rtdev=/dev/sdb"],
        &["-K", "/dev/sdb"],
    ] {
        mkfs_refused("xfs", args, "another device");
    }
    for args in [
        &["/dev/sdb"][..],
        &["-d", "raid1", "/dev/sdb"],
        &["--", "/dev/sdb"],
    ] {
        mkfs_refused("btrfs", args, "another device");
    }
}

#[test]
fn mkfs_options_that_need_a_value_have_one() {
    refused_at(
        &format!("{MINIMAL}file-system:\n  mkfs: [-m, '0', -t]\n"),
        "6:19",
        "-t needs a value",
    );
    mkfs_refused("ext4", &["-L"], "needs a value");
    mkfs_refused("xfs", &["-K", "-l"], "needs a value");
    mkfs_refused("btrfs", &["--label"], "needs a value");
}

#[test]
fn ordinary_mkfs_options_are_accepted() {
    mkfs_accepted("ext4", &["-m", "0", "-E", "nodiscard,lazy_itable_init=0"]);
    mkfs_accepted(
        "ext4",
        &["-m0", "-O", "^has_journal", "-J", "size=64", "-q", "-j"],
    );
    mkfs_accepted(
        "xfs",
        &["-K", "-m", "crc=1,reflink=1", "-l", "size=64m,lazy-count=1"],
    );
    mkfs_accepted("xfs", &["-d", "agcount=4", "-i", "size=512", "-q"]);
    mkfs_accepted(
        "btrfs",
        &["--nodiscard", "-d", "single", "--csum", "xxhash", "-Kq"],
    );
    mkfs_accepted(
        "btrfs",
        &["--checksum=sha256", "--features", "quota", "-m", "dup"],
    );
    // The original format, as its README has it.
    assert!(parse(SEED_EXAMPLE).is_ok());
}

#[test]
fn mkfs_errors_point_at_the_argument() {
    refused_at(
        &format!("{MINIMAL}file-system:\n  type: xfs\n  options:\n    - -K\n    - -qf\n"),
        "9:7",
        "-qf",
    );
}

// ---- unreadable files, long lines, and the words of an error --------------------------------

fn load_bytes(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("attach.yml");
    std::fs::write(&path, bytes).unwrap();
    let e = AttachConfig::load(&path, true, &Overrides::default())
        .unwrap_err()
        .to_string();
    e.replace(&path.display().to_string(), "attach.yml")
}

#[test]
fn a_file_that_is_not_utf8_gets_a_position() {
    let mut bytes = b"block-provider:\n  aws-ebs:\n    ebs-tags: {a: b".to_vec();
    bytes.push(0xff);
    bytes.extend_from_slice(b"}\n    size: 1\n");
    let e = load_bytes(&bytes);
    assert!(
        e.starts_with("attach.yml:3:20: the file is not UTF-8 text: byte 0xff at offset 46"),
        "{e}"
    );
    assert!(e.contains("save it as UTF-8"), "{e}");

    let utf16: Vec<u8> = "block-device: /dev/xvdc\n"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    for bytes in [[&[0xff, 0xfe][..], &utf16].concat(), utf16.clone()] {
        let e = load_bytes(&bytes);
        assert!(e.starts_with("attach.yml:1:"), "{e}");
        assert!(
            e.contains("UTF-16") && e.contains("save it as UTF-8"),
            "{e}"
        );
    }
}

#[test]
fn long_lines_are_cut_in_messages() {
    let huge = "x".repeat(5 << 20);
    for text in [
        format!("block-provider:\n  aws-ebs:\n    ebs-tags: {{a: b}}\n    size: {huge}\n"),
        format!("{MINIMAL}block-device: /dev/{huge}\n"),
        format!("{MINIMAL}mount:\n  target: {huge}\n"),
        format!("{MINIMAL}{huge}: 1\n"),
        format!("{MINIMAL}mount: {{target: /data, {huge}: 1}}\n"),
    ] {
        let e = err(&text);
        assert!(e.len() < 1000, "{} bytes: {}", e.len(), &e[..300]);
        assert!(e.starts_with("attach.yml:"), "{}", &e[..200]);
    }
}

#[test]
fn yaml_limits_are_said_in_words() {
    // An alias bomb: a 1 MiB scalar repeated until the parser's scalar budget runs out.
    let big = "y".repeat(1 << 20);
    let aliases = vec!["*big"; 70].join(", ");
    let e = err(&format!(
        "{MINIMAL}mount:\n  options: [&big {big}, {aliases}]\n"
    ));
    assert!(!e.contains('{') && !e.contains("ScalarBytes"), "{e}");
    assert!(e.contains("too large"), "{e}");
    assert!(e.len() < 1000, "{e}");
}

#[test]
fn mutated_configs_never_panic_and_every_error_has_a_position() {
    // Cheap, deterministic fuzzing: byte edits, token insertions, truncations and line
    // duplications of the documented examples. Each parse must return (no panic, no hang) and
    // every error must start with the file's position and stay short.
    let seeds = [SEED_EXAMPLE, MINIMAL, FULL_EXAMPLE];
    let tokens: [&[u8]; 16] = [
        b"\0", b"\xff", b"\t", b"&a ", b"*a", b"{", b"[", b"'", b"\"", b"\n  ", b": ", b"- ",
        b"0x10", b"1h1h", b"-qF", b"#",
    ];
    let mut seed = 0x5eed_u64;
    let mut next = move || {
        seed = crate::backoff::mix(seed);
        seed
    };
    for round in 0..3000u32 {
        let base = seeds[round as usize % seeds.len()].as_bytes();
        let mut bytes = base.to_vec();
        for _ in 0..1 + next() % 4 {
            let at = (next() % (bytes.len() as u64 + 1)) as usize;
            match next() % 4 {
                0 if at < bytes.len() => bytes[at] = (next() % 256) as u8,
                1 => {
                    let t = tokens[(next() % tokens.len() as u64) as usize];
                    bytes.splice(at..at, t.iter().copied());
                }
                2 => bytes.truncate(at),
                _ => {
                    let line_start = bytes[..at]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |p| p + 1);
                    let line_end = bytes[at..]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(bytes.len(), |p| at + p + 1);
                    let line = bytes[line_start..line_end].to_vec();
                    bytes.splice(line_end..line_end, line);
                }
            }
        }
        let result = match String::from_utf8(bytes) {
            Ok(text) => parse(&text).map(|_| ()),
            Err(e) => Err(super::decode("attach.yml", e.into_bytes()).unwrap_err()),
        };
        if let Err(e) = result {
            let e = e.to_string();
            assert!(e.starts_with("attach.yml:"), "round {round}: {e}");
            assert!(e.len() < 2000, "round {round}: {} bytes", e.len());
        }
    }
}

/// Every key, as the reference documents them.
const FULL_EXAMPLE: &str = "block-device: /dev/sdf
block-provider:
  aws-ebs:
    ebs-tags: {cluster: kafka, node: '2'}
    type: gp3
    size: 100
    iops: 6000
    throughput: 250
    kms-key-id: alias/cps
file-system:
  type: xfs
  label: kafka-data
  options: [-K]
mount:
  target: /var/lib/kafka
  options: noatime,nodiratime
  owner: kafka
  mode: '0750'
  persist: fstab
timeouts: {create: 2m, attach: 90, device: 1m30s}
identity: {mode: node-id, release-timeout: 5m}
network-interface: {device-index: 1, timeout: 90s}
files:
  - path: /etc/kafka/server.properties
    content: \"broker.id=${CPS_NODE_ID}\"
hooks: {configure: [/bin/true], health: [/bin/true], health-interval: 15s}
lifecycle: {hook: kafka-launch, heartbeat-interval: 1m}
command-timeout: 30m
";

#[test]
fn hook_commands_cannot_carry_a_nul() {
    // execve(2) cannot pass a NUL: the hook would fail at every boot, after the volume work.
    refused_at(
        &format!("{MINIMAL}hooks:\n  health: [sh, -c, \"check\\0\"]\n"),
        "6:11",
        "argument 3 contains a NUL",
    );
    assert!(parse(&format!("{MINIMAL}hooks:\n  health: [sh, -c, \"a\\tb\"]\n")).is_ok());
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

/// `MINIMAL` with lines added under `aws-ebs:` and at the top level.
fn life(ebs: &str, top: &str) -> String {
    format!("block-provider:\n  aws-ebs:\n    ebs-tags: {{role: kafka}}\n    size: 10\n{ebs}{top}")
}

#[test]
fn restore_and_relocation_are_read() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.restore, Restore::default());
    assert_eq!(c.relocation, Relocation::default());

    let c = parse(&life(
        "    snapshot-id: snap-0123456789abcdef0\n    initialization-rate: 300\n",
        "",
    ))
    .unwrap();
    assert_eq!(
        c.restore.source,
        Some(SnapshotSource::Id("snap-0123456789abcdef0".into()))
    );
    assert_eq!(c.restore.initialization_rate, Some(300));

    let c = parse(&life(
        "    snapshot: latest\n    snapshot-tags: {backup: nightly}\n",
        "",
    ))
    .unwrap();
    assert_eq!(
        c.restore.source,
        Some(SnapshotSource::Latest {
            tags: Some([("backup".to_string(), "nightly".to_string())].into()),
            or_empty: false
        })
    );

    let c = parse(&life(
        "    restore-if-missing: true\n",
        "identity:\n  mode: node-id\n  node-id: '2'\nrelocation:\n  mode: snapshot\n  lock-table: kafka-cps-locks\n  delete-source: true\n  lease: 2m\n  grace: 30s\n",
    ))
    .unwrap();
    assert_eq!(
        c.restore.source,
        Some(SnapshotSource::Latest {
            tags: None,
            or_empty: true
        })
    );
    assert_eq!(
        c.relocation,
        Relocation {
            mode: RelocationMode::Snapshot,
            lock_table: Some("kafka-cps-locks".into()),
            delete_source: true,
            lease: Duration::from_secs(120),
            snapshot_timeout: Duration::from_secs(3600),
            grace: Duration::from_secs(30),
        }
    );
}

#[test]
fn restore_and_relocation_refuse_what_they_cannot_mean() {
    for (ebs, top, at, says) in [
        (
            "    snapshot-id: vol-0123456789abcdef0\n",
            "",
            "attach.yml:5:18",
            "is not a snapshot id",
        ),
        (
            "    snapshot: newest\n",
            "",
            "attach.yml:5:15",
            "the one value is `latest`",
        ),
        (
            "    snapshot-id: snap-01234567\n    snapshot: latest\n",
            "",
            "attach.yml:6:15",
            "keep one",
        ),
        (
            "    snapshot: latest\n    restore-if-missing: true\n",
            "identity:\n  mode: node-id\n  node-id: '1'\n",
            "attach.yml:6:25",
            "keep one of them",
        ),
        (
            "    restore-if-missing: true\n",
            "",
            "attach.yml:5:25",
            "needs a node identity",
        ),
        (
            "    snapshot-tags: {backup: nightly}\n",
            "",
            "attach.yml:5:20",
            "set one of them",
        ),
        (
            "    snapshot: latest\n    snapshot-tags: {}\n",
            "",
            "attach.yml:6:20",
            "would match every snapshot",
        ),
        (
            "    initialization-rate: 200\n",
            "",
            "attach.yml:5:26",
            "applies to a volume restored",
        ),
        (
            "    snapshot: latest\n    initialization-rate: 500\n",
            "",
            "attach.yml:6:26",
            "100–300",
        ),
        (
            "",
            "relocation:\n  mode: always\n",
            "attach.yml:6:9",
            "one of never, snapshot",
        ),
        (
            "",
            "identity:\n  mode: node-id\nrelocation:\n  mode: snapshot\n",
            "attach.yml:8:3",
            "needs relocation.lock-table",
        ),
        (
            "",
            "identity:\n  mode: node-id\nrelocation:\n  mode: snapshot\n  lock-table: 'a b'\n",
            "attach.yml:9:15",
            "not a DynamoDB table name",
        ),
        (
            "",
            "relocation:\n  lease: 0s\n",
            "attach.yml:6:10",
            "between 1s and 24h",
        ),
        (
            "",
            "relocation:\n  shards: 2\n",
            "attach.yml:6:3",
            "unknown field",
        ),
    ] {
        let e = err(&life(ebs, top));
        assert!(e.contains(at) && e.contains(says), "{ebs}{top}: {e}");
    }
}

/// A key given twice is said in words, at the second one; nothing of the parser's own options.
#[test]
fn a_key_given_twice_is_named_at_its_second_place() {
    let e = err(&format!(
        "{MINIMAL}mount:\n  target: /a\nmount:\n  target: /b\n"
    ));
    assert!(e.contains("attach.yml:7:1"), "{e}");
    assert!(e.contains("`mount` is given twice"), "{e}");
    assert!(
        !e.contains("DuplicateKeyPolicy") && !e.contains("Options"),
        "{e}"
    );
}
