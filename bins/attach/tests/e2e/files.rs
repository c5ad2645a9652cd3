//! Node files with the real binary: a trap the service account leaves on its volume for the
//! next server, and contents read at boot from SSM Parameter Store and Secrets Manager.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use cps_fixtures::{MountGuard, Need, ServiceUser, require};
use cps_testbed::{Bench, BenchOptions};

use crate::{TIER, run, write_config};

/// The service account owns the mount root (`mount.owner`) and plants a link to a directory of
/// root's in place of the node file's directory, on the volume. The replacement server gets
/// the volume and refuses to write through the link: exit 5, the link named, nothing outside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_planted_on_the_volume_is_refused_by_the_next_server() {
    if !cps_testbed::ready(TIER) || !require(TIER, &[Need::Tool("useradd", "passwd")]) {
        return;
    }
    let user = ServiceUser::create("e2e").unwrap();
    let bench = Bench::start(BenchOptions::default()).unwrap();
    // The account must reach its directory, as it would under /var/lib.
    std::fs::set_permissions(bench.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mount = bench.dir().join("data");
    let _guard = MountGuard(mount.clone());
    let outside = bench.dir().join("root-only");
    std::fs::create_dir(&outside).unwrap();
    let config = format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: trap}}\n    size: 1\nfile-system:\n  type: xfs\n\
         mount:\n  target: {mount}\n  owner: {u}\n  group: {u}\n  mode: '0755'\n\
         files:\n  - path: {mount}/conf/server.properties\n    content: \"broker.id=1\\n\"\n    owner: {u}\n    mode: '0640'\n\
         timeouts:\n  device: 30s\n",
        mount = mount.display(),
        u = user.name
    );

    let a = bench.launch("us-east-1a").await.unwrap();
    let first = run(&bench, &a, &write_config(&a, &config), &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let file = mount.join("conf/server.properties");
    assert_eq!(std::fs::metadata(&file).unwrap().uid(), user.uid);

    // On the volume, as the account: the directory moved aside, a link in its place.
    user.run(
        "mv",
        &[
            &mount.join("conf").to_string_lossy(),
            &mount.join("conf.old").to_string_lossy(),
        ],
    )
    .unwrap();
    user.symlink(&outside, &mount.join("conf")).unwrap();

    bench.terminate(&a).await.unwrap();
    let b = bench.launch("us-east-1a").await.unwrap();
    let second = run(&bench, &b, &write_config(&b, &config), &[]);
    assert_eq!(second.code, 5, "refused:\n{}", second.stderr);
    let conf = mount.join("conf");
    assert!(
        second.stderr.contains(&*conf.to_string_lossy()) && second.stderr.contains("symbolic link"),
        "the message names the link:\n{}",
        second.stderr
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "root created nothing through the link"
    );
    let meta = std::fs::metadata(&outside).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
}

/// Contents from SSM Parameter Store (a SecureString) and Secrets Manager, over the wire: they
/// land in the files and nowhere in the log; a missing parameter fails the boot (exit 4) naming
/// the file and the parameter, before any file is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_contents_come_from_the_secret_stores_and_never_reach_the_log() {
    let Some((bench, a)) = crate::bench_with_instance().await else {
        return;
    };
    const JAAS: &str = "KafkaServer { password=\"pw-4f1c9a\"; };\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIEv-7d2e11\n-----END PRIVATE KEY-----\n";
    bench.put_parameter("/e2e/kafka/jaas", JAAS).unwrap();
    bench.create_secret("e2e/kafka/tls-key", KEY).unwrap();
    let mount = bench.dir().join("data");
    let _guard = MountGuard(mount.clone());
    let etc = a.home.join("etc");
    let config = |extra: &str| {
        format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: secrets}}\n    size: 1\nmount:\n  target: {}\n\
             files:\n  - path: {etc}/jaas.conf\n    content-from: ssm:/e2e/kafka/jaas\n    mode: '0600'\n\
             \x20 - path: {etc}/tls.key\n    content-from: secretsmanager:e2e/kafka/tls-key\n    mode: '0400'\n{extra}\
             timeouts:\n  device: 30s\n",
            mount.display(),
            etc = etc.display()
        )
    };

    let path = write_config(&a, &config(""));
    let out = run(&bench, &a, &path, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        std::fs::read_to_string(etc.join("jaas.conf")).unwrap(),
        JAAS
    );
    assert_eq!(std::fs::read_to_string(etc.join("tls.key")).unwrap(), KEY);
    let mode = |f: &str| std::fs::metadata(etc.join(f)).unwrap().mode() & 0o7777;
    assert_eq!((mode("jaas.conf"), mode("tls.key")), (0o600, 0o400));
    for secret in ["pw-4f1c9a", "MIIEv-7d2e11"] {
        assert!(!out.stderr.contains(secret), "a secret in the log");
        assert!(
            !std::fs::read_to_string(&path).unwrap().contains(secret),
            "a secret in the configuration"
        );
    }
    let calls = out.ready()["calls"].as_str().unwrap().to_owned();
    assert!(
        calls.contains("GetParameter=1") && calls.contains("GetSecretValue=1"),
        "{calls}"
    );

    // A parameter that does not exist: exit 4, named, and the other files are not rewritten.
    std::fs::remove_file(etc.join("jaas.conf")).unwrap();
    let missing = format!(
        "  - path: {}/other.conf\n    content-from: ssm:/e2e/kafka/missing\n",
        etc.display()
    );
    let path = write_config(&a, &config(&missing));
    let out = run(&bench, &a, &path, &[]);
    assert_eq!(out.code, 4, "a cloud error:\n{}", out.stderr);
    let error = out
        .log
        .iter()
        .rev()
        .find(|l| l["level"] == "ERROR")
        .map(|l| l["message"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    assert!(
        error.contains(&format!("{}/other.conf", etc.display()))
            && error.contains("/e2e/kafka/missing")
            && error.contains("ParameterNotFound"),
        "{error}"
    );
    assert!(!etc.join("jaas.conf").exists(), "nothing written");
    assert!(!etc.join("other.conf").exists());
}
