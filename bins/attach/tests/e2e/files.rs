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
