//! The demo: one node's volume through a server replacement, with the real cps-attach.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use cps_fixtures::{MountGuard, is_mountpoint};
use cps_testbed::{Bench, BenchOptions, Delays, Instance};

const CONFIG: &str = "\
# The node's volume: every volume with both tags is this node's.
block-provider:
  aws-ebs:
    ebs-tags:
      cluster: demo
      node: '1'
    type: gp3
    size: 1
file-system:
  type: xfs
  label: demo-data
mount:
  target: {target}
  options: [noatime]
  mode: '0750'
  persist: fstab
  fstab: {fstab}
";

fn step(n: u32, text: &str) {
    println!("\n==> {n}. {text}");
}

fn say(text: &str) {
    println!("    {text}");
}

fn attach(bench: &Bench, bin: &Path, instance: &Instance, config: &Path) -> io::Result<()> {
    let started = Instant::now();
    let status = bench.attach_command(bin, instance, config).status()?;
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

async fn show_volumes(bench: &Bench) {
    let tags = [
        ("cluster".to_owned(), "demo".to_owned()),
        ("node".to_owned(), "1".to_owned()),
    ]
    .into();
    for v in bench.volumes_tagged(&tags).await {
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
            "EC2: {} {} GiB {} in {}: {} [{}]",
            v.id, v.size_gib, v.volume_type, v.availability_zone, v.state, holder
        ));
    }
}

pub async fn run(bin: &Path) -> io::Result<()> {
    step(
        1,
        "Start the bench: AWS emulator on 127.0.0.1, a udev stand-in that backs attached volumes with loop devices",
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
    let target = bench.dir().join("var-lib-demo");
    let fstab = bench.dir().join("fstab");
    let _guard = MountGuard(target.clone());
    let config_text = CONFIG
        .replace("{target}", &target.to_string_lossy())
        .replace("{fstab}", &fstab.to_string_lossy());

    step(
        2,
        "Instance A boots in us-east-1a and runs cps-attach: no volume exists, so it creates, formats and mounts one",
    );
    let a = bench.launch("us-east-1a").await?;
    let config_a = a.home.join("attach.yml");
    std::fs::write(&config_a, &config_text)?;
    say(&format!(
        "instance {} (IMDS at {})",
        a.id,
        a.imds.endpoint()
    ));
    attach(&bench, bin, &a, &config_a)?;
    show_volumes(&bench).await;
    say(&format!(
        "mounted at {}: {}",
        target.display(),
        is_mountpoint(&target)
    ));
    std::fs::write(
        target.join("broker.properties"),
        "broker.id=1\nlog.dirs=/var/lib/demo\n",
    )?;
    say("the node writes its data: broker.properties");
    say(&format!(
        "fstab now has: {}",
        std::fs::read_to_string(&fstab)?
            .lines()
            .last()
            .unwrap_or("")
    ));

    step(
        3,
        "The auto-scaling group replaces A: A is terminated. For a few seconds it is shutting down and still holds the volume",
    );
    bench.terminate(&a).await?;
    show_volumes(&bench).await;

    step(
        4,
        "Instance B boots in the same zone meanwhile: it sees who holds the volume, waits for A to let go (no second volume), attaches it and mounts it without formatting",
    );
    let b = bench.launch("us-east-1a").await?;
    let config_b = b.home.join("attach.yml");
    std::fs::write(&config_b, &config_text)?;
    say(&format!("instance {}", b.id));
    attach(&bench, bin, &b, &config_b)?;
    say(&format!(
        "A's mount went away with A; the one at {} now is B's",
        target.display()
    ));
    show_volumes(&bench).await;
    say(&format!(
        "the data is back: broker.properties says {:?}",
        std::fs::read_to_string(target.join("broker.properties"))?
            .lines()
            .next()
            .unwrap_or("")
    ));

    step(
        5,
        "B runs cps-attach again (a reboot, a re-run of user data): nothing to do",
    );
    attach(&bench, bin, &b, &config_b)?;
    show_volumes(&bench).await;

    let errors = bench.udev().errors();
    if !errors.is_empty() {
        return Err(io::Error::other(format!(
            "the udev stand-in reported: {errors:?}"
        )));
    }
    step(
        6,
        "Done: one volume, created once, formatted once, its data carried across the replacement",
    );
    say("the bench removes its loop devices, mounts and emulator now");
    Ok(())
}
