//! The demo on real guests (`ci/demo --vm`): node 1 of a cluster boots as a QEMU guest through
//! cloud-init with the user data the Terraform module renders, reboots, and is replaced by
//! another guest that gets the same volume and IP.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cps_provider::Tags;
use cps_testbed::vm::{Disks, Guest, GuestImage};
use cps_testbed::{Bench, BenchOptions};

use crate::demo::{say, show, step};

const GROUP: &str = "vm-1";
const HOOK: &str = "vm-launch";
/// A boot under software emulation, through cloud-init and cps-attach.
const BOOT: Duration = Duration::from_secs(900);

fn input(var: &str) -> io::Result<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .ok_or_else(|| io::Error::other(format!("{var} is not set; run ci/demo --vm")))
}

async fn boot(bench: &Bench, image: &GuestImage, id: &str) -> io::Result<Guest> {
    let user_data = std::fs::read(input("CPS_VM_USER_DATA")?)?;
    let files = BTreeMap::from([("/cps-attach".to_owned(), input("CPS_VM_ATTACH")?)]);
    let started = Instant::now();
    let guest = bench
        .boot_guest(image, id, Some(user_data), files, Disks::Nvme)
        .await?;
    say(&format!(
        "guest {id} started; its console is {}",
        bench
            .dir()
            .join("guests")
            .join(id)
            .join("console.log")
            .display()
    ));
    tokio::task::block_in_place(|| guest.vm.wait_console("\"volume ready\"", 1, BOOT))
        .map_err(io::Error::other)?;
    let ready = guest.ready().unwrap_or_default();
    say(&format!(
        "cloud-init ran the user data: it downloaded cps-attach, checked its SHA-256 and ran it; {:.0} s after the guest started:",
        started.elapsed().as_secs_f64()
    ));
    say(&format!(
        "volume {} on {} (found by its NVMe serial), {} {}, mounted at {}; interface {} ({}); lifecycle {}",
        ready["volume_id"].as_str().unwrap_or("?"),
        ready["device"].as_str().unwrap_or("?"),
        ready["fstype"].as_str().unwrap_or("?"),
        if ready["formatted"] == true {
            "made now (the volume was empty)"
        } else {
            "kept (not formatted)"
        },
        ready["mount_target"].as_str().unwrap_or("?"),
        ready["interface_id"].as_str().unwrap_or("?"),
        ready["ip"].as_str().unwrap_or("?"),
        ready["lifecycle"].as_str().unwrap_or("?"),
    ));
    Ok(guest)
}

/// Waits for the data service's `n`th line and shows it.
fn app_line(guest: &Guest, n: usize) -> io::Result<()> {
    tokio::task::block_in_place(|| guest.vm.wait_console("cps-bench-app: wrote", n, BOOT))
        .map_err(io::Error::other)?;
    let lines = guest.app_lines();
    let line = lines.get(n - 1).map(String::as_str).unwrap_or_default();
    let text = line.split_once("cps-bench-app: ").map_or(line, |(_, t)| t);
    say(&format!("the data service, ordered after the boot: {text}"));
    Ok(())
}

/// The narration, step after step (longer than a screen: one step per paragraph, in order).
pub async fn run() -> io::Result<()> {
    step(
        1,
        "Build (or find) the guest image: Debian 12 with its cloud kernel, systemd, udev and cloud-init",
    );
    let image = tokio::task::block_in_place(GuestImage::build)?;
    say(&format!("{}", image.dir.display()));
    let bench = Bench::start(BenchOptions {
        device_appears_after: Duration::from_secs(1),
        ..BenchOptions::default()
    })?;
    say(&format!(
        "AWS emulator at {}; guests reach only it, their metadata service and the file server",
        bench.endpoint()
    ));

    step(
        2,
        "Terraform's part: node 1's fixed-IP network interface, and a one-instance group with a launch lifecycle hook",
    );
    let node: Tags = [
        ("cps:cluster".to_owned(), "vm".to_owned()),
        ("cps:node-id".to_owned(), "1".to_owned()),
    ]
    .into();
    let (eni, ip, a) = bench
        .create_node(
            GROUP,
            "us-east-1a",
            10,
            &node,
            HOOK,
            Duration::from_secs(1800),
        )
        .await?;
    say(&format!(
        "network interface {eni} with the fixed IP {ip}; instance {a} waits in Pending:Wait"
    ));

    step(
        3,
        "Instance A boots as a guest: kernel, systemd, cloud-init; cps-attach creates node 1's volume, EC2 attaches it (a hot-plugged NVMe controller) and the interface (a hot-plugged NIC)",
    );
    let ga = boot(&bench, &image, &a).await?;
    app_line(&ga, 1)?;
    show(&bench, &node, GROUP).await?;

    step(
        4,
        "A reboots (Ctrl-Alt-Del at its console): fstab mounts the volume, the module's per-boot script runs cps-attach again",
    );
    ga.vm.reboot()?;
    app_line(&ga, 2)?;

    step(
        5,
        "The group replaces A: the instance is terminated, its guest shuts down (EC2 holds it shutting-down meanwhile), the group launches B",
    );
    bench.terminate_in_group(&a).await?;
    tokio::task::block_in_place(|| bench.wait_shut_down(&ga, Duration::from_secs(180)))?;
    let b = bench
        .wait_pending(GROUP, 1, Duration::from_secs(60))
        .await?
        .into_iter()
        .find(|id| *id != a)
        .ok_or_else(|| io::Error::other("the group launched no replacement"))?;

    step(
        6,
        "Instance B boots as a new guest and gets node 1's volume (the same bytes) and IP",
    );
    let gb = boot(&bench, &image, &b).await?;
    app_line(&gb, 1)?;
    show(&bench, &node, GROUP).await?;
    bench.power_off_guest(&gb)?;

    // What step 7 says, checked.
    let volumes = bench.volumes_tagged(&node).await.len();
    let formatted = [&ga, &gb].map(|g| g.ready().is_some_and(|r| r["formatted"] == true));
    let three = gb
        .app_lines()
        .first()
        .is_some_and(|l| l.contains("(3 lines)"));
    if volumes != 1 || formatted != [true, false] || !three {
        return Err(io::Error::other(format!(
            "expected one volume, formatted on the first boot only, three lines on it; saw {volumes} volume(s), formatted {formatted:?}, three lines: {three}"
        )));
    }
    let errors = bench.udev().errors();
    if !errors.is_empty() {
        return Err(io::Error::other(format!(
            "the bench's EC2 player reported: {errors:?}"
        )));
    }
    step(
        7,
        "Done: one volume, formatted once, three boots of two real guests; the boots file on it has a line for each",
    );
    Ok(())
}
