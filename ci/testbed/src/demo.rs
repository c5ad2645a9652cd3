//! The demo: one cluster node through a server replacement, with the real cps-attach — its
//! data, its fixed IP, its files and hooks, and the Auto Scaling lifecycle hook.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use cps_fixtures::{MountGuard, is_mountpoint};
use cps_provider::Tags;
use cps_testbed::{Bench, BenchOptions, Delays, Instance};

const GROUP: &str = "demo-node-2";
const HOOK: &str = "cps-launch";

const CONFIG: &str = "\
# Node 2 of the demo cluster: its volume and interface carry cluster=demo and cps:node-id=2,
# and the id comes from the group's cps:node-id tag.
block-provider:
  aws-ebs:
    ebs-tags: {cluster: demo}
    type: gp3
    size: 1
file-system:
  type: xfs
  label: demo-data
mount:
  target: {home}/var/lib/demo
  options: [noatime]
  mode: '0750'
identity:
  mode: node-id
network-interface:
  device-index: 1
files:
  - path: {home}/etc/demo/node.properties
    content: \"node.id=${CPS_NODE_ID}\\nlisten=${CPS_ENI_IP}:9092\\ndata=${CPS_MOUNT_PATH}\\n\"
hooks:
  configure: [sh, -c, 'echo \"$(date +%T) joined as node $CPS_NODE_ID at $CPS_ENI_IP\" >> \"$CPS_MOUNT_PATH/cluster.log\"']
  health: [sh, -c, 'grep -q \"node $CPS_NODE_ID\" \"$CPS_MOUNT_PATH/cluster.log\"']
  health-interval: 1s
lifecycle:
  hook: cps-launch
";

pub(crate) fn step(n: u32, text: &str) {
    println!("\n==> {n}. {text}");
}

pub(crate) fn say(text: &str) {
    println!("    {text}");
}

fn attach(bench: &Bench, bin: &Path, instance: &Instance) -> io::Result<()> {
    let config = instance.home.join("attach.yml");
    std::fs::write(
        &config,
        CONFIG.replace("{home}", &instance.home.to_string_lossy()),
    )?;
    let started = Instant::now();
    let status = bench.attach_command(bin, instance, &config).status()?;
    say(&format!(
        "cps-attach exited with {status} after {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    if !status.success() {
        return Err(io::Error::other(format!(
            "cps-attach failed on {}",
            instance.id
        )));
    }
    Ok(())
}

/// The node's volumes as EC2 shows them, and the group's instances.
pub(crate) async fn show(bench: &Bench, tags: &Tags, group: &str) -> io::Result<()> {
    for v in bench.volumes_tagged(tags).await {
        let holder = v
            .attachments
            .first()
            .map(|a| {
                format!(
                    "attached to {} as {} ({})",
                    a.instance_id, a.device, a.state
                )
            })
            .unwrap_or_else(|| "not attached".into());
        say(&format!(
            "EC2 volume {} ({} GiB {}, node {}): {holder}",
            v.id,
            v.size_gib,
            v.volume_type,
            v.tags.get("cps:node-id").map(String::as_str).unwrap_or("?")
        ));
    }
    for m in bench.members(group).await? {
        say(&format!(
            "Auto Scaling {group}: {} is {} (launch template version {})",
            m.instance_id,
            m.lifecycle_state,
            m.launch_template_version.as_deref().unwrap_or("?")
        ));
    }
    Ok(())
}

pub async fn run(bin: &Path) -> io::Result<()> {
    step(
        1,
        "Start the bench: AWS emulator on 127.0.0.1, a stand-in for udev that turns attachments into loop devices and network interfaces",
    );
    let bench = Bench::start(BenchOptions {
        delays: Delays {
            attach: Duration::from_millis(800),
            create: Duration::from_millis(500),
            detach: Duration::from_secs(1),
            shutdown: Duration::from_secs(3),
        },
        ..BenchOptions::default()
    })?;
    say(&format!(
        "emulator at {}; everything lives under {}",
        bench.endpoint(),
        bench.dir().display()
    ));

    let demo_tags: Tags = [("cluster".to_owned(), "demo".to_owned())].into();
    step(
        2,
        "Terraform's part: node 2's fixed-IP network interface, and a one-instance group with a launch lifecycle hook",
    );
    let node: Tags = [
        ("cluster".to_owned(), "demo".to_owned()),
        ("cps:node-id".to_owned(), "2".to_owned()),
    ]
    .into();
    let (eni, ip, a) = bench
        .create_node(
            GROUP,
            "us-east-1a",
            12,
            &node,
            HOOK,
            Duration::from_secs(600),
        )
        .await?;
    say(&format!("network interface {eni} with the fixed IP {ip}"));
    show(&bench, &demo_tags, GROUP).await?;

    step(
        3,
        "Instance A boots (waiting in Pending:Wait) and runs cps-attach: no volume yet, so it creates, formats and mounts node 2's; then the interface, files, hooks, and CONTINUE",
    );
    let a = bench.adopt(&a).await?;
    let _ga = MountGuard(a.home.join("var/lib/demo"));
    attach(&bench, bin, &a)?;
    show(&bench, &demo_tags, GROUP).await?;
    say(&format!(
        "node.properties: {:?}",
        std::fs::read_to_string(a.home.join("etc/demo/node.properties"))?
    ));
    std::fs::write(
        a.home.join("var/lib/demo/topic-0.log"),
        "offset 0: hello\noffset 1: world\n",
    )?;
    say("the node writes data: topic-0.log");

    step(
        4,
        "The group replaces A (a new launch template version, a failed host…): A is terminated and, for a few seconds, still holds the volume and the interface while it shuts down",
    );
    bench.terminate_in_group(&a.id).await?;
    let b = bench
        .wait_pending(GROUP, 1, Duration::from_secs(10))
        .await?
        .into_iter()
        .find(|id| *id != a.id)
        .ok_or_else(|| io::Error::other("the group launched no replacement"))?;
    show(&bench, &demo_tags, GROUP).await?;

    step(
        5,
        "Instance B boots meanwhile: it sees who holds node 2's volume and interface, waits for A to let go, then gets both — same data, same IP — and goes InService",
    );
    let b = bench.adopt(&b).await?;
    let _gb = MountGuard(b.home.join("var/lib/demo"));
    attach(&bench, bin, &b)?;
    show(&bench, &demo_tags, GROUP).await?;
    say(&format!(
        "the data is back: topic-0.log = {:?}",
        std::fs::read_to_string(b.home.join("var/lib/demo/topic-0.log"))?
    ));
    say(&format!(
        "cluster.log on the volume:\n      {}",
        std::fs::read_to_string(b.home.join("var/lib/demo/cluster.log"))?
            .trim()
            .replace('\n', "\n      ")
    ));
    say(&format!(
        "identity file: {}",
        std::fs::read_to_string(b.home.join("run/node.env"))?
            .lines()
            .filter(|l| l.starts_with("CPS_NODE_ID")
                || l.starts_with("CPS_ENI_IP")
                || l.starts_with("CPS_VOLUME_ID"))
            .collect::<Vec<_>>()
            .join("  ")
    ));
    say(&format!(
        "mounted at {}: {}",
        b.home.join("var/lib/demo").display(),
        is_mountpoint(&b.home.join("var/lib/demo"))
    ));

    step(
        6,
        "B runs cps-attach again (a reboot, a re-run of user data): nothing to do, nothing to complete",
    );
    attach(&bench, bin, &b)?;

    let errors = bench.udev().errors();
    if !errors.is_empty() {
        return Err(io::Error::other(format!(
            "the udev stand-in reported: {errors:?}"
        )));
    }
    step(
        7,
        "Done: one volume, created once, formatted once; the node kept its data and its IP across the replacement",
    );
    say("the bench removes its loop devices, mounts and emulator now");
    Ok(())
}
