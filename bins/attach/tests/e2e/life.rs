//! The volume's life with the real binary on the emulator and loop devices: a node whose
//! volume was deleted comes back from its newest snapshot; a node whose subnet moved to
//! another zone comes up there with its data (the source retired); agents racing in two zones
//! move it once; the mover killed (-9) after each of its steps, then run again, converges;
//! slots and a pool volume left in a lost zone come up in the other one with their data.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cps_fixtures::MountGuard;
use cps_provider::{Tags, Volume, VolumeService};
use cps_testbed::{Bench, BenchOptions, Instance};

use crate::{BIN, Run, TIER, run, tags, write_config};

const LOCKS: &str = "cps-e2e-locks";

fn config_text(mount: &Path, ebs_extra: &str, extra: &str) -> String {
    format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: life}}\n    size: 1\n{ebs_extra}\
         file-system:\n  type: xfs\nmount:\n  target: {}\nidentity:\n  mode: node-id\n  node-id: '3'\n  release-timeout: 30s\n{extra}",
        mount.display()
    )
}

fn relocation() -> String {
    format!("relocation:\n  mode: snapshot\n  lock-table: {LOCKS}\n  lease: 10s\n")
}

/// An instance in `zone` with the node's configuration and a mount guard.
async fn machine(
    bench: &Bench,
    zone: &str,
    ebs_extra: &str,
    extra: &str,
) -> (Arc<Instance>, PathBuf, MountGuard) {
    let instance = bench.launch(zone).await.unwrap();
    let mount = instance.home.join("data");
    let config = write_config(&instance, &config_text(&mount, ebs_extra, extra));
    (instance, config, MountGuard(mount))
}

fn node_volumes(volumes: &[Volume]) -> Vec<&Volume> {
    volumes
        .iter()
        .filter(|v| {
            v.tags.get("cps:node-id").map(String::as_str) == Some("3")
                && !v.tags.contains_key("cps:retired-by")
        })
        .collect()
}

/// Node 3's first boot in `zone`, a file written, the instance terminated and its devices gone.
async fn first_node(bench: &Bench, zone: &str, extra: &str) -> String {
    let (instance, config, guard) = machine(bench, zone, "", extra).await;
    let out = run(bench, &instance, &config, &[]);
    assert_eq!(out.code, 0, "first boot:\n{}", out.stderr);
    std::fs::write(guard.0.join("kept"), b"node 3's data").unwrap();
    let volume = out.ready()["volume_id"].as_str().unwrap().to_owned();
    bench.terminate(&instance).await.unwrap();
    assert!(
        bench.wait_devices_gone(&[&volume]),
        "the volume left the instance"
    );
    volume
}

fn read_kept(mount: &Path) -> Vec<u8> {
    std::fs::read(mount.join("kept")).unwrap_or_default()
}

async fn wait_snapshot(api: &cps_aws::Ec2Api, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = api.snapshot(id).await.unwrap();
        if s.state == cps_provider::SnapshotState::Completed {
            return;
        }
        assert!(Instant::now() < deadline, "snapshot {id} still {}", s.state);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_volume_was_deleted_comes_back_from_its_newest_snapshot() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    let volume = first_node(&bench, "us-east-1a", "").await;
    let node: Tags = tags(&[("cluster", "life"), ("cps:node-id", "3")]);
    let api = bench.volumes_api();
    let snap = api.create_snapshot(&volume, "backup", &node).await.unwrap();
    wait_snapshot(&api, &snap.id).await;
    api.delete_volume(&volume).await.unwrap();
    let snap_id = snap.id;

    let (instance, config, guard) =
        machine(&bench, "us-east-1a", "    restore-if-missing: true\n", "").await;
    let out = run(&bench, &instance, &config, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let ready = out.ready();
    assert_eq!(ready["formatted"], false, "{ready}");
    assert_eq!(read_kept(&guard.0), b"node 3's data");
    let volumes = bench.volumes_tagged(&node).await;
    assert_eq!(volumes.len(), 1);
    assert_eq!(volumes[0].snapshot_id.as_deref(), Some(snap_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_subnet_moved_comes_up_in_the_new_zone_with_its_data() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    bench.create_lock_table(LOCKS).unwrap();
    let source = first_node(&bench, "us-east-1a", &relocation()).await;

    let (instance, config, guard) = machine(&bench, "us-east-1b", "", &relocation()).await;
    let out = run(&bench, &instance, &config, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.said("the volume was moved to this zone"),
        "{}",
        out.stderr
    );
    assert_eq!(read_kept(&guard.0), b"node 3's data");
    let volumes = bench.volumes_tagged(&tags(&[("cluster", "life")])).await;
    let node = node_volumes(&volumes);
    assert_eq!(node.len(), 1, "{volumes:?}");
    assert_eq!(node[0].availability_zone, "us-east-1b");
    assert_eq!(node[0].tags.get("cps:relocated-from"), Some(&source));
    let src = volumes
        .iter()
        .find(|v| v.id == source)
        .expect("the source is kept");
    assert_eq!(src.tags.get("cps:retired-by"), Some(&node[0].id));
    assert!(!src.tags.contains_key("cps:node-id"));

    // The re-run is a no-op: no second snapshot or copy.
    let again = run(&bench, &instance, &config, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.ready()["origin"], "Reused");
    assert_eq!(
        bench
            .volumes_tagged(&tags(&[("cluster", "life")]))
            .await
            .len(),
        2
    );
}

/// Three agents of node 3, two in the new zone and one in the old, start at once: one moves
/// the volume (or the old zone's claims it), never both, no second copy or snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_in_two_zones_racing_move_the_volume_once() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Arc::new(Bench::start(BenchOptions::default()).unwrap());
    bench.create_lock_table(LOCKS).unwrap();
    let source = first_node(&bench, "us-east-1a", &relocation()).await;
    let mut machines = Vec::new();
    for zone in ["us-east-1b", "us-east-1b", "us-east-1a"] {
        machines.push(machine(&bench, zone, "", &relocation()).await);
    }
    let outs = run_at_once(&bench, &machines);
    let ok = outs.iter().filter(|o| o.code == 0).count();
    assert!(
        ok >= 1,
        "someone is node 3: {:?}",
        outs.iter().map(|o| &o.stderr).collect::<Vec<_>>()
    );
    let volumes = bench.volumes_tagged(&tags(&[("cluster", "life")])).await;
    let node = node_volumes(&volumes);
    assert_eq!(node.len(), 1, "one claimable volume: {volumes:?}");
    let copies = volumes
        .iter()
        .filter(|v| v.tags.get("cps:relocated-from") == Some(&source))
        .count();
    assert!(copies <= 1, "{copies} copies");
    let attached: usize = node.iter().map(|v| v.attachments.len()).sum();
    assert_eq!(attached, 1, "attached once: {node:?}");
    let winner = machines
        .iter()
        .find(|(i, _, _)| node[0].attachments[0].instance_id == i.id)
        .unwrap();
    assert_eq!(read_kept(&winner.2.0), b"node 3's data");
}

/// cps-attach on every machine at once; the runs in the machines' order.
fn run_at_once(bench: &Arc<Bench>, machines: &[(Arc<Instance>, PathBuf, MountGuard)]) -> Vec<Run> {
    let runs: Vec<_> = machines
        .iter()
        .map(|(instance, config, _)| {
            let (bench, instance, config) = (bench.clone(), instance.clone(), config.clone());
            std::thread::spawn(move || run(&bench, &instance, &config, &[]))
        })
        .collect();
    runs.into_iter().map(|r| r.join().unwrap()).collect()
}

/// Runs cps-attach and kills it (-9) as soon as its log says `step`; returns whether it got
/// there.
fn killed_after(bench: &Bench, instance: &Instance, config: &Path, step: &str) -> bool {
    let mut cmd = bench.attach_command(Path::new(BIN), instance, config);
    let mut child = cmd
        .env("CPS_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = false;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if line.contains(step) {
            seen = true;
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    seen
}

/// The mover killed -9 right after each logged step of the move (the lock taken, the
/// snapshot started, the copy created, the source retired), then run again on the same
/// instance: it converges to one claimable volume in the new zone with the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mover_killed_after_each_step_converges_on_the_next_run() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    for step in [
        "relocation lock taken",
        "snapshot of the volume to move started",
        "copy of the volume created from the snapshot",
        "source retired",
    ] {
        let bench = Bench::start(BenchOptions::default()).unwrap();
        bench.create_lock_table(LOCKS).unwrap();
        bench
            .emulator()
            .set_snapshot_delay(Duration::from_secs(2))
            .unwrap();
        let source = first_node(&bench, "us-east-1a", &relocation()).await;
        let (instance, config, guard) = machine(&bench, "us-east-1b", "", &relocation()).await;
        assert!(
            killed_after(&bench, &instance, &config, step),
            "{step}: never logged"
        );
        // The killed run held the lock: the next run takes it once the 10 s lease is over.
        let out = run(&bench, &instance, &config, &[]);
        assert_eq!(out.code, 0, "{step}: the re-run:\n{}", out.stderr);
        assert_eq!(read_kept(&guard.0), b"node 3's data", "{step}");
        let volumes = bench.volumes_tagged(&tags(&[("cluster", "life")])).await;
        let node = node_volumes(&volumes);
        assert_eq!(node.len(), 1, "{step}: {volumes:?}");
        assert_eq!(node[0].availability_zone, "us-east-1b", "{step}");
        assert_eq!(
            volumes.len(),
            2,
            "{step}: the source and one copy: {volumes:?}"
        );
        assert!(
            volumes.iter().any(|v| v.id == source),
            "{step}: source kept"
        );
    }
}

/// Slot mode with two slots, and `extra` appended.
fn slot_config_text(mount: &Path, extra: &str) -> String {
    format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: life}}\n    size: 1\n\
         file-system:\n  type: xfs\nmount:\n  target: {}\nidentity:\n  mode: slot\n  max-slots: 2\n{extra}",
        mount.display()
    )
}

/// The tags of volume `id` as the emulator shows them.
async fn tags_of(bench: &Bench, id: &str) -> Tags {
    bench.volumes_api().volume(id).await.unwrap().tags
}

/// Both slots of a cluster whose zone was lost (its servers gone, its volumes free there) come
/// up in the other zone, on two agents started at once: each moves a different slot and
/// mounts that slot's data; the sources are retired, not deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_left_in_a_lost_zone_come_up_in_the_other_with_their_data() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Arc::new(Bench::start(BenchOptions::default()).unwrap());
    bench.create_lock_table(LOCKS).unwrap();
    let mut old = Vec::new();
    for _ in 0..2 {
        let instance = bench.launch("us-east-1a").await.unwrap();
        let mount = instance.home.join("data");
        let config = write_config(
            &instance,
            &slot_config_text(&mount, &format!("{}  grace: 1s\n", relocation())),
        );
        let out = run(&bench, &instance, &config, &[]);
        assert_eq!(out.code, 0, "first boot:\n{}", out.stderr);
        let volume = out.ready()["volume_id"].as_str().unwrap().to_owned();
        let slot = tags_of(&bench, &volume).await["cps:slot"].clone();
        std::fs::write(mount.join("kept"), format!("slot {slot}'s data")).unwrap();
        old.push((instance, MountGuard(mount), volume, slot));
    }
    for (instance, _, volume, _) in &old {
        bench.terminate(instance).await.unwrap();
        assert!(bench.wait_devices_gone(&[volume.as_str()]), "{volume} left");
    }

    let mut machines = Vec::new();
    for _ in 0..2 {
        let instance = bench.launch("us-east-1b").await.unwrap();
        let mount = instance.home.join("data");
        let config = write_config(
            &instance,
            &slot_config_text(&mount, &format!("{}  grace: 1s\n", relocation())),
        );
        machines.push((instance, config, MountGuard(mount)));
    }
    let outs = run_at_once(&bench, &machines);
    let mut slots = Vec::new();
    for (out, (_, _, guard)) in outs.iter().zip(&machines) {
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.ready()["formatted"], false, "moved, not made");
        let volume = out.ready()["volume_id"].as_str().unwrap();
        let t = tags_of(&bench, volume).await;
        let slot = t["cps:slot"].clone();
        assert_eq!(
            read_kept(&guard.0),
            format!("slot {slot}'s data").into_bytes()
        );
        let (_, _, source, _) = old.iter().find(|o| o.3 == slot).unwrap();
        assert_eq!(t.get("cps:relocated-from"), Some(source));
        let src = tags_of(&bench, source).await;
        assert_eq!(src.get("cps:retired-by").map(String::as_str), Some(volume));
        assert!(!src.contains_key("cps:slot"), "{src:?}");
        slots.push(slot);
    }
    slots.sort();
    assert_eq!(slots, ["1", "2"], "one slot each");
}

/// A pool volume free only in another zone is moved here rather than a new, empty one made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_volume_left_in_another_zone_is_moved_here_with_its_data() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).unwrap();
    bench.create_lock_table(LOCKS).unwrap();
    let pool = |mount: &Path| {
        format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: life}}\n    size: 1\n\
             file-system:\n  type: xfs\nmount:\n  target: {}\n{}",
            mount.display(),
            relocation()
        )
    };
    let first = bench.launch("us-east-1a").await.unwrap();
    let mount = first.home.join("data");
    let config = write_config(&first, &pool(&mount));
    let out = run(&bench, &first, &config, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let source = out.ready()["volume_id"].as_str().unwrap().to_owned();
    std::fs::write(mount.join("kept"), b"the pool's data").unwrap();
    drop(MountGuard(mount));
    bench.terminate(&first).await.unwrap();
    assert!(bench.wait_devices_gone(&[&source]));

    let here = bench.launch("us-east-1b").await.unwrap();
    let mount = here.home.join("data");
    let config = write_config(&here, &pool(&mount));
    let guard = MountGuard(mount);
    let out = run(&bench, &here, &config, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ready()["formatted"], false);
    assert_eq!(read_kept(&guard.0), b"the pool's data");
    let copy = out.ready()["volume_id"].as_str().unwrap();
    let t = tags_of(&bench, copy).await;
    assert_eq!(t.get("cps:relocated-from"), Some(&source));
    assert!(!t.contains_key("cps:handover"), "handed over: {t:?}");
    assert_eq!(
        tags_of(&bench, &source)
            .await
            .get("cps:retired-by")
            .map(String::as_str),
        Some(copy)
    );
}
