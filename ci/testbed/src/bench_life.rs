//! The volume's life with the real cps-attach on the bench: a volume grown outside cps and by
//! `cps-attach grow`, a deleted volume restored from its snapshot, a volume moved to another
//! zone under the relocation lock; then owners racing for that lock on the emulator's DynamoDB,
//! and a lease taken over after its holder stopped.

use std::collections::BTreeMap;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cps_aws::LockTable;
use cps_fixtures::MountGuard;
use cps_provider::{Acquired, LockService, SnapshotState, Tags, VolumeChange, VolumeService};
use cps_testbed::{Bench, BenchOptions, Delays, Emulator, Instance, REGION};
use serde_json::Value;

const LOCKS: &str = "cps-bench-locks";
/// Every cps-attach run ends within this, or the part fails.
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// Lock races: rounds per number of owners, each on its own key.
const ROUNDS: usize = 20;
const SNAPSHOT_DELAY: Duration = Duration::from_secs(2);
const MODIFYING: Duration = Duration::from_secs(1);
const OPTIMIZING: Duration = Duration::from_secs(60);

pub async fn run(attach_bin: &Path) -> io::Result<()> {
    println!("## The volume's life: grow, restore, relocation\n");
    println!(
        "The real cps-attach on the emulator (moto and its patch layer) with loop devices. The \
         counts are exact: the `calls=` field of the binary's final log line (`volume ready` for a \
         boot, `grow done` for `grow`), DynamoDB's requests included. Wall times are indicative \
         only: the machine is shared with other builds and tests.\n"
    );
    grow(attach_bin).await?;
    restore(attach_bin).await?;
    relocation(attach_bin).await?;
    zone_lost(attach_bin).await?;
    lock_races().await?;
    takeover().await?;
    Ok(())
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// One run of the binary: exit code, wall time, and its final log line with the call counts.
struct Measured {
    code: i32,
    wall: Duration,
    last: Value,
    calls: BTreeMap<String, u64>,
}

impl Measured {
    fn calls_text(&self) -> String {
        let total: u64 = self.calls.values().sum();
        let each: Vec<String> = self
            .calls
            .iter()
            .map(|(op, n)| format!("{op} {n}"))
            .collect();
        format!("{total} ({})", each.join(", "))
    }
}

/// Runs `cmd` (bounded by [`RUN_LIMIT`]) and reads the JSON log line whose message is `last`;
/// a run that fails or never logs it is an error, with its log.
async fn measure(mut cmd: std::process::Command, last: &str) -> io::Result<Measured> {
    cmd.env("CPS_LOG_FORMAT", "json");
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let start = Instant::now();
    let out = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .map_err(|_| other(format!("cps-attach ran longer than {RUN_LIMIT:?}")))??;
    let wall = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == last);
    let code = out.status.code().unwrap_or(-1);
    let Some(line) = line.filter(|_| code == 0) else {
        return Err(other(format!(
            "cps-attach exited {code} without '{last}':\n{stderr}"
        )));
    };
    let calls = line["calls"]
        .as_str()
        .unwrap_or("")
        .split(',')
        .filter_map(|kv| {
            let (op, n) = kv.split_once('=')?;
            Some((op.to_owned(), n.parse().ok()?))
        })
        .collect();
    Ok(Measured {
        code,
        wall,
        last: line,
        calls,
    })
}

/// The size of the filesystem mounted at `path`, in bytes (statvfs: blocks × fragment size).
fn filesystem_bytes(path: &Path) -> io::Result<u64> {
    let out = std::process::Command::new("stat")
        .args(["-f", "-c", "%b %S"])
        .arg(path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let n: Vec<u64> = text
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match n[..] {
        [blocks, size] => Ok(blocks * size),
        _ => Err(other(format!("stat -f {}: {text}", path.display()))),
    }
}

/// Waits (bounded) until the volume's device is at least `bytes` long.
async fn wait_device_size(bench: &Bench, volume: &str, bytes: u64) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(device) = bench.udev().device_of(volume)
            && std::fs::File::open(&device)?.seek(SeekFrom::End(0))? >= bytes
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(other(format!(
                "the device of {volume} did not grow in 30 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1 << 20))
}

fn grow_config(name: &str, gib: u32, mount: &Path) -> String {
    format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: bench-grow, node: {name}}}\n    size: {gib}\nfile-system:\n  type: xfs\nmount:\n  target: {}\n",
        mount.display()
    )
}

struct Node {
    instance: Arc<Instance>,
    mount: PathBuf,
    volume: String,
    _guard: MountGuard,
}

/// A node booted with a 1 GiB xfs volume.
async fn grow_node(bench: &Bench, bin: &Path, name: &str) -> io::Result<Node> {
    let instance = bench.launch("us-east-1a").await?;
    let mount = instance.home.join("data");
    let guard = MountGuard(mount.clone());
    let config = instance.home.join("attach.yml");
    std::fs::write(&config, grow_config(name, 1, &mount))?;
    let first = measure(
        bench.attach_command(bin, &instance, &config),
        "volume ready",
    )
    .await?;
    let volume = first.last["volume_id"].as_str().unwrap_or("").to_owned();
    Ok(Node {
        instance,
        mount,
        volume,
        _guard: guard,
    })
}

/// The node's configuration at 2 GiB.
fn grown_config(node: &Node, name: &str) -> io::Result<PathBuf> {
    let config = node.instance.home.join("attach.yml");
    std::fs::write(&config, grow_config(name, 2, &node.mount))?;
    Ok(config)
}

async fn grow(bin: &Path) -> io::Result<()> {
    println!("### Grow: 1 → 2 GiB, xfs, online\n");
    println!(
        "*Outside cps*: the volume modified by ModifyVolume from outside (as Terraform would), the \
         device grown, then the plain re-run with the configuration at 2 GiB. *cps-attach grow*: \
         the configuration asks 2 GiB of a running 1 GiB node; the emulator keeps the modification \
         `modifying` for {} s and `optimizing` for {} s, so the wait for `optimizing` is real.\n",
        MODIFYING.as_secs(),
        OPTIMIZING.as_secs()
    );
    println!("| path | exit | API calls | minimum | wall | filesystem before → after |");
    println!("|---|---|---|---|---|---|");
    let bench = Bench::start(BenchOptions::default())?;
    let row = |path: &str, m: &Measured, minimum: &str, before: u64, after: u64| {
        println!(
            "| {path} | {} | {} | {minimum} | {:.2} s | {} → {} |",
            m.code,
            m.calls_text(),
            m.wall.as_secs_f64(),
            mib(before),
            mib(after)
        );
    };

    let node = grow_node(&bench, bin, "outside").await?;
    let before = filesystem_bytes(&node.mount)?;
    let change = VolumeChange {
        size_gib: Some(2),
        ..Default::default()
    };
    bench
        .volumes_api()
        .modify_volume(&node.volume, &change)
        .await
        .map_err(other)?;
    wait_device_size(&bench, &node.volume, 2 << 30).await?;
    let config = grown_config(&node, "outside")?;
    let m = measure(
        bench.attach_command(bin, &node.instance, &config),
        "volume ready",
    )
    .await?;
    let after = filesystem_bytes(&node.mount)?;
    row(
        "re-run, volume grown outside cps",
        &m,
        "1 (DescribeVolumes 1)",
        before,
        after,
    );

    bench
        .emulator()
        .set_modification_delays(MODIFYING, OPTIMIZING)?;
    let node = grow_node(&bench, bin, "grow").await?;
    let before = filesystem_bytes(&node.mount)?;
    let config = grown_config(&node, "grow")?;
    let mut cmd = bench.attach_command(bin, &node.instance, &config);
    cmd.arg("grow");
    let m = measure(cmd, "grow done").await?;
    let after = filesystem_bytes(&node.mount)?;
    let minimum = "4 (DescribeVolumes 1, DescribeVolumesModifications 1, ModifyVolume 1, \
                   one look at the modification 1) + looks while `modifying`";
    row(
        "`cps-attach grow` (ModifyVolume)",
        &m,
        minimum,
        before,
        after,
    );
    println!();
    Ok(())
}

fn node_config(mount: &Path, ebs_extra: &str, extra: &str) -> String {
    format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: bench-life}}\n    size: 1\n{ebs_extra}\
         file-system:\n  type: xfs\nmount:\n  target: {}\nidentity:\n  mode: node-id\n  node-id: '3'\n  release-timeout: 30s\n{extra}",
        mount.display()
    )
}

fn relocation_config() -> String {
    format!("relocation:\n  mode: snapshot\n  lock-table: {LOCKS}\n  lease: 10s\n")
}

/// An instance of node 3 in `zone`: its configuration and mount guard.
async fn machine(
    bench: &Bench,
    zone: &str,
    ebs_extra: &str,
    extra: &str,
) -> io::Result<(Arc<Instance>, PathBuf, MountGuard)> {
    let instance = bench.launch(zone).await?;
    let mount = instance.home.join("data");
    let guard = MountGuard(mount.clone());
    let config = instance.home.join("attach.yml");
    std::fs::write(&config, node_config(&mount, ebs_extra, extra))?;
    Ok((instance, config, guard))
}

/// Node 3's first boot in us-east-1a, a file written, the instance terminated and the volume
/// gone from it; returns the volume.
async fn first_node(bench: &Bench, bin: &Path, extra: &str) -> io::Result<String> {
    let (instance, config, guard) = machine(bench, "us-east-1a", "", extra).await?;
    let first = measure(
        bench.attach_command(bin, &instance, &config),
        "volume ready",
    )
    .await?;
    std::fs::write(guard.0.join("kept"), b"node 3's data")?;
    let volume = first.last["volume_id"].as_str().unwrap_or("").to_owned();
    bench.terminate(&instance).await?;
    if !bench.wait_devices_gone(&[&volume]) {
        return Err(other(format!(
            "{volume} did not leave the terminated instance"
        )));
    }
    Ok(volume)
}

fn kept(mount: &Path) -> &'static str {
    match std::fs::read(mount.join("kept")) {
        Ok(data) if data == b"node 3's data" => "yes",
        _ => "NO",
    }
}

fn life_header() {
    println!("| path | exit | API calls | minimum | wall | data kept |");
    println!("|---|---|---|---|---|---|");
}

async fn restore(bin: &Path) -> io::Result<()> {
    println!("### Restore: node 3's volume deleted, its snapshot completed\n");
    println!(
        "The node boots with `restore-if-missing: true`; the snapshot carries the node's tags. \
         Volumes are available and attached as soon as asked on the emulator.\n"
    );
    life_header();
    let bench = Bench::start(BenchOptions::default())?;
    let volume = first_node(&bench, bin, "").await?;
    let api = bench.volumes_api();
    let node = Tags::from([
        ("cluster".to_owned(), "bench-life".to_owned()),
        ("cps:node-id".to_owned(), "3".to_owned()),
    ]);
    let snap = api
        .create_snapshot(&volume, "backup", &node)
        .await
        .map_err(other)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.snapshot(&snap.id).await.map_err(other)?.state != SnapshotState::Completed {
        if Instant::now() > deadline {
            return Err(other(format!("snapshot {} not completed in 30 s", snap.id)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    api.delete_volume(&volume).await.map_err(other)?;
    let (instance, config, guard) =
        machine(&bench, "us-east-1a", "    restore-if-missing: true\n", "").await?;
    let m = measure(
        bench.attach_command(bin, &instance, &config),
        "volume ready",
    )
    .await?;
    println!(
        "| restore from the newest snapshot | {} | {} | 6 (DescribeVolumes 1, DescribeSnapshots 1, \
         CreateVolume 1, a look until available 1, AttachVolume 1, a look until attached 1) | \
         {:.2} s | {} |\n",
        m.code,
        m.calls_text(),
        m.wall.as_secs_f64(),
        kept(&guard.0)
    );
    Ok(())
}

async fn relocation(bin: &Path) -> io::Result<()> {
    println!("### Relocation: node 3's volume in us-east-1a, the node boots in us-east-1b\n");
    println!(
        "`relocation: {{mode: snapshot, lease: 10s}}` with a lock table on the emulator's \
         DynamoDB; snapshots stay `pending` for {} s. The minimum: the lock taken, its record \
         written and cleared, released (UpdateItem 4); CreateSnapshot 1 and at least one look \
         until completed; CreateVolume 1 and a look; CreateTags 2 (retire the source, hand the \
         identity over); DeleteTags 1; the claim: a list, AttachVolume 1, a look.\n",
        SNAPSHOT_DELAY.as_secs()
    );
    life_header();
    let bench = Bench::start(BenchOptions::default())?;
    bench.create_lock_table(LOCKS)?;
    bench.emulator().set_snapshot_delay(SNAPSHOT_DELAY)?;
    first_node(&bench, bin, &relocation_config()).await?;
    let (instance, config, guard) = machine(&bench, "us-east-1b", "", &relocation_config()).await?;
    let m = measure(
        bench.attach_command(bin, &instance, &config),
        "volume ready",
    )
    .await?;
    println!(
        "| move by snapshot, {} s snapshot delay | {} | {} | 14 + looks (UpdateItem 4, \
         CreateSnapshot 1, DescribeSnapshots ≥ 1, CreateVolume 1, CreateTags 2, DeleteTags 1, \
         AttachVolume 1, DescribeVolumes 3) | {:.2} s | {} |\n",
        SNAPSHOT_DELAY.as_secs(),
        m.code,
        m.calls_text(),
        m.wall.as_secs_f64(),
        kept(&guard.0)
    );
    Ok(())
}

/// Slot and pool configurations: one slot (a move waits `grace: 1s` first), or a pool.
fn zone_config(mount: &Path, slots: bool) -> String {
    let identity = if slots {
        "identity:\n  mode: slot\n  max-slots: 1\n"
    } else {
        ""
    };
    format!(
        "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: bench-life}}\n    size: 1\n\
         file-system:\n  type: xfs\nmount:\n  target: {}\n{identity}{}  grace: 1s\n",
        mount.display(),
        relocation_config()
    )
}

/// A zone lost in slot and in pool mode: the volume of a server in us-east-1a is free (the
/// server gone) and a server boots in us-east-1b with nothing there to take.
async fn zone_lost(bin: &Path) -> io::Result<()> {
    println!(
        "### Relocation in slot and pool mode: a zone lost
"
    );
    println!(
        "One server's volume left free in us-east-1a; a server boots in us-east-1b, where \
         nothing is to be had, and moves it (slot mode after `grace: 1s`). Snapshots stay \
         `pending` for {} s. The minimum as for a node, but the retirement takes the slot tag \
         off (slot: CreateTags 2, DeleteTags 1) or only tags it (pool: CreateTags 1, then \
         DeleteTags 1 for the handover).\n",
        SNAPSHOT_DELAY.as_secs()
    );
    life_header();
    for (slots, label, minimum) in [
        (
            true,
            "slot 1 moved, 1 s grace",
            "14 + looks (UpdateItem 4, CreateSnapshot 1, DescribeSnapshots ≥ 1, CreateVolume 1, \
             CreateTags 2, DeleteTags 1, AttachVolume 1, DescribeVolumes 3)",
        ),
        (
            false,
            "pool volume moved",
            "13 + looks (UpdateItem 4, CreateSnapshot 1, DescribeSnapshots ≥ 1, CreateVolume 1, \
             CreateTags 1, DeleteTags 1, AttachVolume 1, DescribeVolumes 3)",
        ),
    ] {
        let bench = Bench::start(BenchOptions::default())?;
        bench.create_lock_table(LOCKS)?;
        bench.emulator().set_snapshot_delay(SNAPSHOT_DELAY)?;
        let old = bench.launch("us-east-1a").await?;
        let mount = old.home.join("data");
        let _old_guard = MountGuard(mount.clone());
        let config = old.home.join("attach.yml");
        std::fs::write(&config, zone_config(&mount, slots))?;
        let first = measure(bench.attach_command(bin, &old, &config), "volume ready").await?;
        std::fs::write(mount.join("kept"), b"node 3's data")?;
        let volume = first.last["volume_id"].as_str().unwrap_or("").to_owned();
        bench.terminate(&old).await?;
        if !bench.wait_devices_gone(&[&volume]) {
            return Err(other(format!(
                "{volume} did not leave the terminated instance"
            )));
        }
        let here = bench.launch("us-east-1b").await?;
        let mount = here.home.join("data");
        let guard = MountGuard(mount.clone());
        let config = here.home.join("attach.yml");
        std::fs::write(&config, zone_config(&mount, slots))?;
        let m = measure(bench.attach_command(bin, &here, &config), "volume ready").await?;
        println!(
            "| {label} | {} | {} | {minimum} | {:.2} s | {} |",
            m.code,
            m.calls_text(),
            m.wall.as_secs_f64(),
            kept(&guard.0)
        );
    }
    println!();
    Ok(())
}

/// A lock table on the emulator's DynamoDB, with the bench's static key and bounded requests.
fn lock_table(emu: &Emulator, name: &str) -> io::Result<LockTable> {
    use aws_sdk_ec2::config::timeout::TimeoutConfig;
    use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
    emu.create_lock_table(name)?;
    let config = aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(emu.endpoint())
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "testing", "testing", None, None, "bench",
        )))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(10))
                .build(),
        )
        .build();
    Ok(LockTable::new(&config, name))
}

/// One owner's part in a race: takes the lock, or gives up once someone else is known to hold
/// it; retries (20 ms apart, for at most 10 s) only when the lock looked free or the request
/// failed retryably. Returns when it won, measured from `start`.
async fn contend(
    locks: &LockTable,
    key: &str,
    owner: &str,
    start: Instant,
) -> io::Result<Option<Duration>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match locks
            .acquire(key, owner, Duration::from_secs(30), SystemTime::now())
            .await
        {
            Ok(Acquired::Held(..)) => return Ok(Some(start.elapsed())),
            Ok(Acquired::Busy(item)) if item.holder_at(SystemTime::now()).is_some() => {
                return Ok(None);
            }
            Ok(Acquired::Busy(_)) => {}
            Err(e) if e.is_retryable() => {}
            Err(e) => return Err(other(e)),
        }
        if Instant::now() > deadline {
            return Err(other(format!(
                "{owner}: no holder of {key} known after 10 s"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` owners released at once for one key: the time to the single winner.
async fn race(locks: &LockTable, key: &str, n: usize) -> io::Result<Duration> {
    let barrier = Arc::new(tokio::sync::Barrier::new(n + 1));
    let mut owners = tokio::task::JoinSet::new();
    for i in 0..n {
        let (locks, key, barrier) = (locks.clone(), key.to_owned(), barrier.clone());
        owners.spawn(async move {
            barrier.wait().await;
            let start = Instant::now();
            contend(&locks, &key, &format!("owner-{i}"), start).await
        });
    }
    barrier.wait().await;
    let mut winners = Vec::new();
    while let Some(done) = owners.join_next().await {
        if let Some(t) = done.map_err(other)?? {
            winners.push(t);
        }
    }
    assert_eq!(winners.len(), 1, "{key}: {} winners of {n}", winners.len());
    Ok(winners[0])
}

async fn lock_races() -> io::Result<()> {
    println!("### The relocation lock: owners racing for one key\n");
    println!(
        "`cps_aws::LockTable` on the emulator's DynamoDB (conditional writes atomic). N owners \
         (tokio tasks on one runtime) are released at once for a fresh key; each calls `acquire` \
         until it holds or learns who does. {ROUNDS} rounds per N, each on its own key. The \
         minimum: one UpdateItem per owner and one GetItem per loser.\n"
    );
    println!(
        "| owners N | rounds | winners per round | UpdateItem | GetItem | per round (minimum) | time to the winner: median | max |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let dir = tempfile::tempdir()?;
    let emu = Emulator::start(Delays::default(), dir.path().join("emulator.log"))?;
    let locks = lock_table(&emu, LOCKS)?;
    for n in [3usize, 10] {
        locks.calls().reset();
        let mut times = Vec::with_capacity(ROUNDS);
        for round in 0..ROUNDS {
            let key = format!("race-{n}-{round}");
            let won = tokio::time::timeout(Duration::from_secs(30), race(&locks, &key, n))
                .await
                .map_err(|_| other(format!("{key}: the race took over 30 s")))??;
            times.push(won);
        }
        times.sort();
        let (update, get) = (
            locks.calls().count("UpdateItem"),
            locks.calls().count("GetItem"),
        );
        println!(
            "| {n} | {ROUNDS} | 1 | {update} | {get} | {:.1} + {:.1} ({n} + {}) | {:.0} ms | {:.0} ms |",
            update as f64 / ROUNDS as f64,
            get as f64 / ROUNDS as f64,
            n - 1,
            times[ROUNDS / 2].as_secs_f64() * 1000.0,
            times[ROUNDS - 1].as_secs_f64() * 1000.0
        );
    }
    println!();
    Ok(())
}

/// The holder takes the lock and stops without releasing it; another owner asks every 100 ms.
async fn takeover() -> io::Result<()> {
    println!("### The relocation lock: taking over from a holder that stopped\n");
    println!(
        "| lease | asked every | time until another owner holds | its UpdateItem | its GetItem | token |"
    );
    println!("|---|---|---|---|---|---|");
    let dir = tempfile::tempdir()?;
    let emu = Emulator::start(Delays::default(), dir.path().join("emulator.log"))?;
    let locks = lock_table(&emu, LOCKS)?;
    let every = Duration::from_millis(100);
    for lease in [Duration::from_secs(2), Duration::from_secs(5)] {
        let key = format!("takeover-{}", lease.as_secs());
        let held = locks
            .acquire(&key, "stopped", lease, SystemTime::now())
            .await
            .map_err(other)?;
        let Acquired::Held(..) = held else {
            return Err(other(format!("{key}: the first take was refused")));
        };
        let start = Instant::now();
        locks.calls().reset();
        let token = loop {
            let now = SystemTime::now();
            if let Acquired::Held(l, _) = locks
                .acquire(&key, "next", lease, now)
                .await
                .map_err(other)?
            {
                break l.token;
            }
            if start.elapsed() > lease + Duration::from_secs(10) {
                return Err(other(format!("{key}: not taken over in the lease + 10 s")));
            }
            tokio::time::sleep(every).await;
        };
        println!(
            "| {} s | {} ms | {:.2} s | {} | {} | {token} |",
            lease.as_secs(),
            every.as_millis(),
            start.elapsed().as_secs_f64(),
            locks.calls().count("UpdateItem"),
            locks.calls().count("GetItem")
        );
    }
    println!();
    Ok(())
}
