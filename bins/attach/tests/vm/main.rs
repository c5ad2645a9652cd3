//! The VM tier: cps-attach on real guests. Each EC2 instance of the emulator is a QEMU guest
//! booted from a Debian image through its kernel, systemd, udev and cloud-init; cloud-init runs
//! the user data the Terraform module renders (downloading cps-attach from the bench's file
//! server and checking its SHA-256); the volume's attachment is an NVMe hot-plug, the node's
//! interface a NIC hot-plug (cps_testbed::vm). The grow scenario's guests play a Xen
//! instance's disks instead (QEMU can grow a virtio disk under a running guest, not an NVMe
//! namespace), and run `cps-attach grow` through QEMU's guest agent, as an operator would
//! through SSM Run Command.
//!
//! Run by `ci/vm/run`, which builds the image and renders the user data; in a plain `cargo test`
//! these tests are ignored (they need both, and minutes of emulated CPU).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use cps_provider::{Tags, VolumeService, VolumeSpec};
use cps_testbed::vm::{Disks, Guest, GuestImage};
use cps_testbed::{Bench, BenchOptions};

const TIER: &str = "VM tier (QEMU guests)";
const HOOK: &str = "vm-launch";
/// A boot under software emulation, through cloud-init and cps-attach.
const BOOT: Duration = Duration::from_secs(900);

/// What ci/vm/run hands the tests.
struct Tier {
    image: GuestImage,
    /// The module's user data for node 1: ext4 (its default), and xfs.
    user_data: Vec<u8>,
    user_data_xfs: Vec<u8>,
    attach: PathBuf,
}

/// The tier's inputs, or `None` (with one line) when it skips here; under CI=true a missing
/// input fails.
fn tier() -> Option<Tier> {
    let need = |var: &str| -> Option<PathBuf> {
        match std::env::var_os(var) {
            Some(v) => Some(PathBuf::from(v)),
            None if cps_fixtures::in_ci() => panic!("{TIER}: {var} is not set; run ci/vm/run"),
            None => {
                eprintln!("SKIP {TIER}: {var} is not set; run ci/vm/run");
                None
            }
        }
    };
    let user_data = need("CPS_VM_USER_DATA")?;
    let user_data_xfs = need("CPS_VM_USER_DATA_XFS")?;
    let attach = need("CPS_VM_ATTACH")?;
    let image = GuestImage::build().unwrap_or_else(|e| panic!("{TIER}: {e}"));
    let read = |p: &PathBuf| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    Some(Tier {
        image,
        user_data: read(&user_data),
        user_data_xfs: read(&user_data_xfs),
        attach,
    })
}

fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Prints a boot's figures for docs/benchmarks.md: host time from QEMU's start to the "volume
/// ready" line (the lifecycle action is complete by then), and cps-attach's share of the boot.
fn report(what: &str, guest: &Guest, started: std::time::Instant) {
    let until_ready = started.elapsed();
    let first = guest.attach_uptimes().first().map(|(t, _)| *t);
    match first.zip(guest.uptime_of("volume ready")) {
        Some((first, ready)) => eprintln!(
            "FIGURE {what}: {:.0} s from VM start to InService (host clock); in the guest cps-attach ran from {first:.1} s to {ready:.1} s of uptime ({:.1} s)",
            until_ready.as_secs_f64(),
            ready - first
        ),
        None => eprintln!("FIGURE {what}: no cps-attach timings on the console"),
    }
}

/// A bench with node 1 as the module makes it (interface, group "vm-1" with the launching hook
/// and `hook_timeout`), its first instance waiting in Pending:Wait: the bench, the node's tags
/// and (interface, IP, instance).
async fn node_1(hook_timeout: Duration) -> (Bench, Tags, (String, String, String)) {
    let bench = Bench::start(BenchOptions {
        device_appears_after: Duration::from_secs(1),
        ..BenchOptions::default()
    })
    .unwrap();
    let node = tags(&[("cps:cluster", "vm"), ("cps:node-id", "1")]);
    let made = bench
        .create_node("vm-1", "us-east-1a", 10, &node, HOOK, hook_timeout)
        .await
        .unwrap();
    (bench, node, made)
}

/// cps-attach's "volume ready" line on `guest`'s console (the test fails without one).
fn volume_ready(guest: &Guest) -> serde_json::Value {
    guest.ready().unwrap_or_else(|| {
        panic!(
            "no 'volume ready' line on the console:\n{:#?}",
            guest.attach_log()
        )
    })
}

/// Waits (bounded) until cps-attach on `guest` has created the node's volume; its id.
async fn created_volume(bench: &Bench, node: &Tags, guest: &Guest) -> String {
    let deadline = std::time::Instant::now() + BOOT;
    loop {
        if let Some(v) = bench.volumes_tagged(node).await.first() {
            return v.id.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cps-attach never created the volume:\n{}",
            guest.vm.console()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Boots the instance `id` as a guest with the module's ext4 user data and NVMe volumes.
async fn boot(bench: &Bench, tier: &Tier, id: &str) -> Guest {
    boot_with(bench, tier, id, &tier.user_data, Disks::Nvme).await
}

async fn boot_with(bench: &Bench, tier: &Tier, id: &str, user_data: &[u8], disks: Disks) -> Guest {
    let files = BTreeMap::from([("/cps-attach".to_owned(), tier.attach.clone())]);
    bench
        .boot_guest(&tier.image, id, Some(user_data.to_vec()), files, disks)
        .await
        .unwrap()
}

/// The `volume ready` lines of cps-attach's runs on `guest` (one per run: the journal's copy of
/// each line carries the uptime, cloud-init's does not).
fn readies(guest: &Guest) -> Vec<serde_json::Value> {
    guest
        .attach_uptimes()
        .into_iter()
        .filter(|(_, l)| l["message"] == "volume ready")
        .map(|(_, l)| l)
        .collect()
}

/// First boot, a reboot, a detach, a replacement — the story of one node on real guests.
///
/// 1. The first guest boots through cloud-init with the module's user data: the volume is
///    created, hot-plugged, found by its serial, formatted, mounted; the interface appears; the
///    lifecycle hook completes with CONTINUE and the data service writes on the volume. Devices
///    come as they come: the node's volume is plugged in 20 s after its attachment, and another
///    volume attached before it is plugged in after it: the guest gets them in the opposite
///    order of their attach calls; the node's is mounted (its serial checked in the guest), the
///    other's bytes are untouched.
/// 2. A clean reboot of the same guest: fstab mounts the volume again before the data service,
///    and the module's per-boot script runs cps-attach again (cloud-init runs user data once per
///    instance, per-boot scripts at every boot): mounted once, nothing formatted.
/// 3. The other volume is detached while the guest runs: it stays `detaching` while the guest
///    cannot answer, and is detached once the guest has let go (see [`a_detach_waits_for_the_guest`]).
/// 4. The instance is terminated in its group: the emulator holds it `shutting-down` until the
///    guest has shut down; the new one gets the same volume (same bytes, not formatted again)
///    and the same interface.
///
/// One function for the four steps (longer than a screen): each boot under emulation costs a
/// minute or two, so the steps share their guests and each starts from the state the last left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the VM tier: run by ci/vm/run"]
async fn a_node_boots_reboots_and_is_replaced_on_real_guests() {
    let Some(tier) = tier() else { return };
    let (bench, node, (eni, ip, first)) = node_1(Duration::from_secs(1800)).await;

    // 1. First boot. Another volume is attached first (before the boot) and plugged in last;
    // the node's own is plugged in 20 s after cps-attach's attach call, past its first looks.
    let api = bench.volumes_api();
    let other = api
        .create_volume(
            &VolumeSpec::gp3("us-east-1a", 1, &tags(&[("role", "scratch")])),
            "other",
        )
        .await
        .unwrap()
        .id;
    api.attach_volume(&other, &first, "/dev/sdg").await.unwrap();
    // Held back until the volume it waits for is named (below).
    bench
        .udev()
        .delay_plug(&other, Duration::ZERO, Some("the node's volume"));
    let started = std::time::Instant::now();
    let g1 = boot(&bench, &tier, &first).await;
    let volume = created_volume(&bench, &node, &g1).await;
    bench
        .udev()
        .delay_plug(&volume, Duration::from_secs(20), None);
    bench
        .udev()
        .delay_plug(&other, Duration::ZERO, Some(&volume));
    g1.vm
        .wait_console("\"volume ready\"", 1, BOOT)
        .unwrap_or_else(|e| panic!("first boot: {e}\nudev: {:?}", bench.udev().errors()));
    report("first boot", &g1, started);
    g1.vm
        .wait_console("cps-bench-app: wrote", 1, BOOT)
        .unwrap_or_else(|e| panic!("first boot: {e}"));
    let log = g1.attach_log();
    let ready = volume_ready(&g1);
    assert_eq!(ready["lifecycle"], "Completed(Continue)", "{ready}");
    assert_eq!(bench.volumes_tagged(&node).await.len(), 1);
    assert_eq!(
        bench.members("vm-1").await.unwrap()[0].lifecycle_state,
        "InService"
    );
    assert_eq!(ready["volume_id"], volume.as_str(), "{ready}");
    assert_eq!(
        ready["formatted"], true,
        "the empty volume got a filesystem: {ready}"
    );
    assert_eq!(ready["ip"], ip.as_str(), "{ready}");
    // Found by its serial, whatever the kernel named it: two controllers plugged a tick apart
    // may be probed in either order, so the name says nothing (it was nvme1n1 in one run). The
    // guest's own view decides: what is mounted carries the node's volume id as its serial.
    let device = ready["device"].as_str().expect("a device").to_owned();
    let seen = g1
        .vm
        .exec(
            &[
                "sh",
                "-c",
                "findmnt -no SOURCE /var/lib/app; cat /sys/block/${1#/dev/}/device/serial",
                "-",
                &device,
            ],
            Duration::from_secs(60),
        )
        .unwrap();
    let lines: Vec<&str> = seen.stdout.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        [device.as_str(), volume.replace('-', "").as_str()],
        "mounted, and the node's volume: {seen:?}"
    );
    let events = bench.udev().events();
    let order: Vec<&String> = events
        .iter()
        .filter(|e| e.starts_with("plugged vol"))
        .collect();
    assert!(
        order.len() == 2 && order[0].contains(&volume) && order[1].contains(&other),
        "the node's volume first, the other after: {events:?}"
    );
    // cps-attach kept looking for the device through the 20 s it took to appear.
    let attached = g1.uptime_of("volume attached").expect("attached");
    let found = g1.uptime_of("found the volume's device").expect("found");
    assert!(
        found - attached >= 15.0,
        "found {found} s, attached {attached} s:\n{log:#?}"
    );
    let lines = g1.app_lines();
    assert!(lines[0].contains("(1 lines)"), "{lines:?}");
    assert!(lines[0].contains("mounted 1 time"), "{lines:?}");

    // 2. A clean reboot of the same guest.
    g1.vm.reboot().unwrap();
    g1.vm
        .wait_console("cps-bench-app: wrote", 2, BOOT)
        .unwrap_or_else(|e| panic!("after the reboot: {e}"));
    let lines = g1.app_lines();
    assert!(
        lines[1].contains("(2 lines)"),
        "the same data after the reboot: {lines:?}"
    );
    assert!(
        lines[1].contains("mounted 1 time"),
        "mounted once: {lines:?}"
    );
    let runs = readies(&g1);
    assert_eq!(
        runs.len(),
        2,
        "cps-attach ran again at the reboot: {runs:#?}"
    );
    assert_eq!(runs[1]["formatted"], false, "{}", runs[1]);
    assert_eq!(runs[1]["volume_id"], volume.as_str(), "{}", runs[1]);

    // 3. A detach while the guest runs.
    a_detach_waits_for_the_guest(&bench, &g1, &other).await;

    // 4. Replacement: the instance goes (its guest shut down first), the group launches another.
    let terminated = std::time::Instant::now();
    bench.terminate_in_group(&first).await.unwrap();
    tokio::task::block_in_place(|| bench.wait_shut_down(&g1, Duration::from_secs(300)))
        .unwrap_or_else(|e| panic!("the terminated instance's guest: {e}"));
    eprintln!(
        "FIGURE termination: the guest off {:.1} s after TerminateInstanceInAutoScalingGroup",
        terminated.elapsed().as_secs_f64()
    );
    let second = bench
        .wait_pending("vm-1", 1, Duration::from_secs(60))
        .await
        .unwrap()
        .into_iter()
        .find(|id| *id != first)
        .expect("a replacement instance");
    let started = std::time::Instant::now();
    let g2 = boot(&bench, &tier, &second).await;
    g2.vm
        .wait_console("\"volume ready\"", 1, BOOT)
        .unwrap_or_else(|e| panic!("the replacement's boot: {e}"));
    report("replacement", &g2, started);
    g2.vm
        .wait_console("cps-bench-app: wrote", 1, BOOT)
        .unwrap_or_else(|e| panic!("the replacement's boot: {e}"));
    let lines = g2.app_lines();
    assert!(
        lines[0].contains("(3 lines)"),
        "the same bytes, not formatted again: {lines:?}"
    );
    let volumes = bench.volumes_tagged(&node).await;
    assert_eq!(volumes.len(), 1, "still one volume: {volumes:?}");
    assert_eq!(volumes[0].id, volume);
    let ready = volume_ready(&g2);
    assert_eq!(
        ready["formatted"], false,
        "the replacement kept the filesystem: {ready}"
    );
    assert_eq!(ready["volume_id"], volume.as_str(), "{ready}");
    let eni_now = bench
        .ec2()
        .describe_network_interfaces()
        .network_interface_ids(&eni)
        .send()
        .await
        .unwrap();
    let attachment = eni_now.network_interfaces()[0].attachment().cloned();
    assert_eq!(
        attachment
            .and_then(|a| a.instance_id().map(str::to_owned))
            .as_deref(),
        Some(second.as_str()),
        "the interface ({ip}) moved to the replacement"
    );
    // The guest was off before its volume went anywhere: no unplug from under its filesystem.
    let events = bench.udev().events();
    let at = |what: &str| events.iter().position(|e| e == what);
    let off = at(&format!("powered off {first} (shutting-down)"));
    let plugged = at(&format!("plugged {volume} into {second}"));
    assert!(
        off.is_some() && off < plugged,
        "powered off before the volume moved: {events:#?}"
    );
    assert!(
        !events.contains(&format!("asked {first} to let go of {volume}")),
        "{events:#?}"
    );
    assert!(
        bench.udev().errors().is_empty(),
        "{:?}",
        bench.udev().errors()
    );
    bench.power_off_guest(&g2).unwrap();
    // The other volume was never written: its sparse image has no block allocated.
    let image = bench.dir().join("volumes").join(format!("{other}.img"));
    let blocks = std::fs::metadata(&image)
        .map(|m| m.blocks())
        .unwrap_or(u64::MAX);
    assert_eq!(blocks, 0, "{other} was written to ({})", image.display());
}

/// The state of `volume_id`'s attachment as the emulator shows it (None: not attached).
async fn attachment_state(bench: &Bench, volume_id: &str) -> Option<String> {
    let reply = bench
        .ec2()
        .describe_volumes()
        .volume_ids(volume_id)
        .send()
        .await
        .unwrap();
    let volume = &reply.volumes()[0];
    let state = volume.attachments().first().and_then(|a| a.state());
    state.map(|s| s.as_str().to_owned())
}

/// `other` (plugged into `guest`, not mounted) is detached while the guest is paused: the
/// emulator holds the detach in `detaching` — the guest cannot answer the hot-unplug request —
/// until the guest, resumed, has let the device go; then the volume is `available` and gone
/// from the guest's `/dev/disk/by-id`, the node's own still there.
async fn a_detach_waits_for_the_guest(bench: &Bench, guest: &Guest, other: &str) {
    let instance = guest.id.as_str();
    guest.vm.pause().unwrap();
    bench
        .ec2()
        .detach_volume()
        .volume_id(other)
        .instance_id(instance)
        .send()
        .await
        .unwrap();
    let asked = format!("asked {instance} to let go of {other}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !bench.udev().events().contains(&asked) {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest was never asked to let go: {:#?}",
            bench.udev().events()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The paused guest cannot let go, however long the stand-in looks.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        attachment_state(bench, other).await.as_deref(),
        Some("detaching"),
        "{:#?}",
        bench.udev().events()
    );
    guest.vm.resume().unwrap();
    let resumed = std::time::Instant::now();
    let deadline = resumed + Duration::from_secs(180);
    while attachment_state(bench, other).await.is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the detach never completed: {:#?}\nudev: {:?}",
            bench.udev().events(),
            bench.udev().errors()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "FIGURE detach: available {:.1} s after the paused guest resumed",
        resumed.elapsed().as_secs_f64()
    );
    let events = bench.udev().events();
    let at = |what: String| events.iter().position(|e| *e == what);
    let (a, u, r) = (
        at(asked.clone()),
        at(format!("unplugged {other} from {instance}")),
        at(format!("released {other}'s detach from {instance}")),
    );
    assert!(
        a.is_some() && a < u && u < r,
        "asked, let go, then released: {events:#?}"
    );
    let ids = guest
        .vm
        .exec(&["ls", "/dev/disk/by-id"], Duration::from_secs(60))
        .unwrap();
    let link = cps_blockdev::nvme_link_name;
    assert!(!ids.stdout.contains(&link(other)), "{}", ids.stdout);
    let node = guest
        .ready()
        .and_then(|r| r["volume_id"].as_str().map(str::to_owned));
    let node = node.expect("the node's volume");
    assert!(ids.stdout.contains(&link(&node)), "{}", ids.stdout);
}

/// The guest is reset (no shutdown) while mkfs writes the node's new volume, slowed to 256 KiB/s
/// so the reset lands inside it. cloud-init does not run the user data again on the next boot of
/// the same instance, but the module's per-boot script runs cps-attach again: it finds the
/// half-made filesystem carrying cps's journal mark, makes it again, completes the lifecycle
/// hook, and the node goes InService on the same instance — no one had to step in, and no one
/// waited for the hook's timeout. (Before the per-boot script, this boot did nothing: the node
/// stayed down until the hook ran out — the module's default is an hour — and ABANDON.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the VM tier: run by ci/vm/run"]
async fn a_reset_inside_mkfs_converges_without_help() {
    let Some(tier) = tier() else { return };
    // Long enough for two boots under emulation: the instance must be finished by its own next
    // boot, not replaced when the hook runs out.
    let (bench, node, (_, _, first)) = node_1(Duration::from_secs(1200)).await;
    let g1 = boot(&bench, &tier, &first).await;
    let volume = created_volume(&bench, &node, &g1).await;
    // Slowed from the moment it is plugged in.
    let deadline = std::time::Instant::now() + BOOT;
    while !g1.vm.plugged().contains(&volume) {
        assert!(
            std::time::Instant::now() < deadline,
            "{volume} never plugged in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    g1.vm.throttle(&volume, 256 << 10).unwrap();
    g1.vm
        .wait_console("\"making filesystem\"", 1, BOOT)
        .unwrap_or_else(|e| panic!("{e}"));
    // The reset comes once mkfs's writes reach the device (the volume's sparse image has
    // blocks), so it lands inside mkfs, not before it has written a byte.
    let image = bench.dir().join("volumes").join(format!("{volume}.img"));
    let deadline = std::time::Instant::now() + BOOT;
    while std::fs::metadata(&image).map(|m| m.blocks()).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "mkfs never wrote to the device"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    g1.vm.reset().unwrap();
    // QEMU keeps a device's throttle across a reset; left on, the next boot's mkfs would stall
    // past the NVMe driver's I/O timeout (a slow disk, not the reset, would be tested).
    g1.vm.throttle(&volume, 0).unwrap();
    assert!(
        !g1.vm.console().contains("\"filesystem made\""),
        "the reset came after mkfs had finished; the test did not test a reset inside it"
    );

    // The same instance boots again; its per-boot script runs cps-attach.
    g1.vm
        .wait_console("cps-bench-app: wrote", 1, BOOT)
        .unwrap_or_else(|e| panic!("the boot after the reset: {e}"));
    let members = bench.members("vm-1").await.unwrap();
    assert!(
        members.len() == 1
            && members[0].instance_id == first
            && members[0].lifecycle_state == "InService",
        "the reset instance itself went InService: {members:?}"
    );
    let log = g1.attach_log();
    let ready = volume_ready(&g1);
    assert_eq!(ready["volume_id"], volume.as_str(), "{ready}");
    assert_eq!(
        ready["formatted"], true,
        "the half-made filesystem was made again: {ready}"
    );
    assert_eq!(ready["lifecycle"], "Completed(Continue)", "{ready}");
    let makes: Vec<&serde_json::Value> = log
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("making a filesystem"))
        })
        .collect();
    assert!(
        makes.iter().any(|l| l["journal"]
            .as_str()
            .is_some_and(|j| j.starts_with("Formatting"))),
        "found cps's journal mark, not a blank device: {makes:#?}"
    );
    assert_eq!(
        bench.volumes_tagged(&node).await.len(),
        1,
        "still one volume"
    );
    bench.power_off_guest(&g1).unwrap();
}

/// 5. Online grow on a real kernel, for ext4 and for xfs: the node boots with the module's user
/// data, its volume a Xen instance's disk (`/dev/xvdf`, a virtio disk QEMU can grow); then, on
/// the running node, `cps-attach grow --size 2` (run through the guest agent, as through SSM Run
/// Command) modifies the volume, waits for its device to grow under the mounted filesystem (the
/// bench resizes the disk once the modification is `optimizing`, as EBS does) and grows the
/// filesystem online — resize2fs on a mounted ext4 needs CAP_SYS_RESOURCE, which the host tier
/// lacks and a guest's root has. The data is still there, and mounted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the VM tier: run by ci/vm/run"]
async fn ext4_and_xfs_grow_online_on_real_guests() {
    let Some(tier) = tier() else { return };
    grow_online(&tier, "ext4", &tier.user_data).await;
    grow_online(&tier, "xfs", &tier.user_data_xfs).await;
}

async fn grow_online(tier: &Tier, fs: &str, user_data: &[u8]) {
    let (bench, node, (_, _, first)) = node_1(Duration::from_secs(1800)).await;
    let g = boot_with(&bench, tier, &first, user_data, Disks::Xen).await;
    g.vm.wait_console("cps-bench-app: wrote", 1, BOOT)
        .unwrap_or_else(|e| panic!("{fs}: first boot: {e}"));
    let ready = volume_ready(&g);
    let volume = ready["volume_id"].as_str().expect("volume id").to_owned();
    // Found under its Xen name: no NVMe serial on this instance.
    assert_eq!(ready["device"], "/dev/vdb", "{fs}: {ready}");
    let run = |argv: &[&str]| {
        let out =
            g.vm.exec(argv, BOOT)
                .unwrap_or_else(|e| panic!("{fs}: {argv:?}: {e}"));
        assert_eq!(out.code, 0, "{fs}: {argv:?}: {out:#?}");
        out.stdout
    };
    let bytes = |text: String| -> u64 {
        text.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{fs}: {text:?}: {e}"))
    };
    let fs_size = || bytes(run(&["findmnt", "-bno", "SIZE", "/var/lib/app"]));
    let before = fs_size();
    assert!(before <= 1 << 30, "{fs}: {before} bytes before");

    let grow =
        g.vm.exec(
            &[
                "/bin/sh",
                "-c",
                "AWS_REGION=us-east-1 exec /usr/local/bin/cps-attach grow \
                 --config /etc/cps/attach.yml --size 2 --log-format json 2>&1",
            ],
            BOOT,
        )
        .unwrap_or_else(|e| panic!("{fs}: cps-attach grow: {e}"));
    assert_eq!(grow.code, 0, "{fs}: cps-attach grow: {grow:#?}");
    let done = grow
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "grow done")
        .unwrap_or_else(|| panic!("{fs}: no 'grow done' line: {grow:#?}"));
    assert_eq!(done["modified"], true, "{fs}: {done}");
    assert_eq!(done["filesystem_grown"], true, "{fs}: {done}");
    let events = bench.udev().events();
    assert!(
        events
            .iter()
            .any(|e| e == &format!("grew {volume} in {first} from 1 to 2 GiB")),
        "{fs}: the device grew under the running guest: {events:?}"
    );

    // The guest's kernel sees 2 GiB; the filesystem, still mounted, fills it.
    assert_eq!(
        bytes(run(&["blockdev", "--getsize64", "/dev/vdb"])),
        2 << 30
    );
    let after = fs_size();
    assert!(
        after > before + (3 << 29) / 2,
        "{fs}: the filesystem grew from {before} to only {after} bytes"
    );
    assert_eq!(
        run(&["findmnt", "-no", "FSTYPE", "/var/lib/app"]).trim(),
        fs
    );
    let mounts = run(&["findmnt", "-rno", "SOURCE", "/var/lib/app"]);
    assert_eq!(mounts.lines().count(), 1, "{fs}: mounted once: {mounts}");
    let boots = run(&["cat", "/var/lib/app/boots"]);
    assert_eq!(boots.lines().count(), 1, "{fs}: the data is there: {boots}");
    let volumes = bench.volumes_tagged(&node).await;
    assert!(
        volumes.len() == 1 && volumes[0].size_gib == 2,
        "{fs}: {volumes:?}"
    );
    assert!(
        bench.udev().errors().is_empty(),
        "{fs}: {:?}",
        bench.udev().errors()
    );
    eprintln!(
        "FIGURE {fs} online grow: {before} → {after} bytes; cps-attach grow: {} API calls ({})",
        done["api_calls"], done["calls"]
    );
    bench.power_off_guest(&g).unwrap();
}
