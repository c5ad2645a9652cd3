//! Benchmarks: counts first (API calls, attach attempts, volumes created), wall time second.
//! Prints a Markdown report; docs/benchmarks.md records a run of it.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cps_orchestrate::backoff::RetryPolicy;
use cps_orchestrate::boot::claim::{Claim, ClaimTarget, claim_volume};
use cps_orchestrate::{AttachConfig, Overrides};
use cps_provider::memory::{MemoryCloud, Timing};
use cps_provider::{CallLog, InstanceIdentity, Tags, VolumeService, VolumeSpec};
use cps_testbed::{Bench, BenchOptions, Delays, Emulator, REGION, run_instances};

const AZ: &str = "us-east-1a";

fn config() -> AttachConfig {
    AttachConfig::parse(
        "bench.yml",
        "block-provider:\n  aws-ebs:\n    ebs-tags: {cluster: bench}\n    size: 1\n",
        &Overrides::default(),
    )
    .expect("bench config")
}

fn identity(id: &str) -> InstanceIdentity {
    InstanceIdentity {
        instance_id: id.into(),
        region: REGION.into(),
        availability_zone: AZ.into(),
    }
}

fn calls_text(calls: &BTreeMap<&'static str, u64>) -> String {
    calls
        .iter()
        .map(|(op, n)| format!("{op} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn total(calls: &BTreeMap<&'static str, u64>) -> u64 {
    calls.values().sum()
}

/// What a herd claims.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HerdMode {
    /// N pooled volumes exist; N agents claim them.
    Pool,
    /// No volumes; N agents claim slots 1..=N, creating each slot's volume.
    Slot,
}

impl HerdMode {
    fn name(self) -> &'static str {
        match self {
            Self::Pool => "pool of N volumes",
            Self::Slot => "N slots from zero",
        }
    }

    fn target(self, cfg: &AttachConfig, ids: &[String]) -> ClaimTarget {
        match self {
            Self::Pool => ClaimTarget::pool(cfg),
            // The peers are what boot() reads from the group: N instances booting.
            Self::Slot => ClaimTarget::Slot {
                tags: cfg.tags.clone(),
                key: "cps:slot".into(),
                max: ids.len() as u32,
                peers: ids.to_vec(),
            },
        }
    }
}

pub async fn run(attach_bin: &Path, herd: &[usize]) -> io::Result<()> {
    memory_paths().await;
    herds(herd).await?;
    binary_paths(attach_bin).await?;
    node_paths(attach_bin).await?;
    Ok(())
}

/// The real binary's boot paths alone (`--parts binary`): how one build of cps-attach compares
/// with another (ci/release measures its profile choices and gnu against musl with it).
pub async fn binary(attach_bin: &Path) -> io::Result<()> {
    binary_paths(attach_bin).await?;
    node_paths(attach_bin).await
}

/// The herd tables alone (`--parts herds`): counts that do not depend on the build.
pub async fn herds(herd: &[usize]) -> io::Result<()> {
    herd_header("Herds: N agents booting at once");
    for mode in [HerdMode::Pool, HerdMode::Slot] {
        for &n in herd {
            memory_herd(n, mode).await;
        }
        for &n in herd {
            emulator_herd(n, mode).await?;
        }
    }
    println!();
    held_header();
    for &n in herd {
        held_herd(n, false).await?;
    }
    for &n in herd {
        held_herd(n, true).await?;
    }
    println!();
    Ok(())
}

/// One agent's three paths on the in-memory cloud with simulated latency (real time).
async fn memory_paths() {
    let timing = Timing {
        latency: Duration::from_millis(50),
        create_delay: Duration::from_millis(1000),
        attach_delay: Duration::from_millis(1000),
    };
    println!("## One agent, in-memory cloud\n");
    println!(
        "Simulated: {} ms per API request, volumes take {} ms to create and {} ms to attach. \
         Ideal = the requests a path cannot do without (create: list, create, look, attach, look = 5; \
         reattach: list, attach, look = 3; re-run: list = 1) × latency + the cloud's own create/attach \
         time. Overhead = wall − ideal: polling lag and the agent's own work.\n",
        timing.latency.as_millis(),
        timing.create_delay.as_millis(),
        timing.attach_delay.as_millis()
    );
    println!("| path | API calls | wall | agent overhead |");
    println!("|---|---|---|---|");
    let cloud = MemoryCloud::new(timing);
    let cfg = config();
    cloud.with(|w| {
        w.add_instance("i-a", AZ);
        w.add_instance("i-b", AZ);
    });
    let measure = async |name: &str, instance: &str, required: u32, inherent: Duration| {
        cloud.calls().reset();
        let start = Instant::now();
        claim_volume(
            &cloud,
            &identity(instance),
            &cfg,
            &ClaimTarget::pool(&cfg),
            RetryPolicy::default(),
        )
        .await
        .expect("claim");
        let wall = start.elapsed();
        let calls = cloud.calls().snapshot();
        let overhead = wall.saturating_sub(timing.latency * required + inherent);
        println!(
            "| {name} | {} ({}) | {:.2} s | {:.3} s |",
            total(&calls),
            calls_text(&calls),
            wall.as_secs_f64(),
            overhead.as_secs_f64()
        );
    };
    measure(
        "create (first boot)",
        "i-a",
        5,
        timing.create_delay + timing.attach_delay,
    )
    .await;
    cloud.with(|w| w.terminate_instance("i-a"));
    measure("reattach (replacement)", "i-b", 3, timing.attach_delay).await;
    measure("re-run", "i-b", 1, Duration::ZERO).await;
    println!();
}

#[allow(clippy::too_many_arguments)]
fn herd_line(
    mode: HerdMode,
    where_: &str,
    n: usize,
    claims: &[Claim],
    calls: &CallLog,
    wall: Duration,
    created: u64,
    volumes_after: usize,
) {
    let attempts: u32 = claims.iter().map(|c| c.attach_attempts).sum();
    let mut ids: Vec<&str> = claims.iter().map(|c| c.volume.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    println!(
        "| {} | {where_} | {n} | {attempts} ({:.2}×N) | {} | {} | {created} | {} | {} | {:.1} s |",
        mode.name(),
        f64::from(attempts) / n as f64,
        claims.iter().map(|c| c.attach_attempts).max().unwrap_or(0),
        calls.count("DescribeVolumes"),
        volumes_after.saturating_sub(n),
        ids.len(),
        wall.as_secs_f64()
    );
}

fn herd_header(title: &str) {
    println!("## {title}\n");
    println!(
        "| claim | cloud | agents N | AttachVolume attempts | worst agent | DescribeVolumes | CreateVolume calls | extra volumes | distinct volumes claimed | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
}

fn held_header() {
    println!("## Herds that must create: N agents, N/2 matching volumes held by running servers\n");
    println!(
        "| cloud | agents N | held volumes | DescribeInstances | DescribeVolumes | CreateVolume | wall |"
    );
    println!("|---|---|---|---|---|---|---|");
}

/// N agents boot at once in pool mode while every matching volume (N/2 of them) is held by a
/// running server: each looks up the holders and creates its own volume.
async fn held_herd(n: usize, on_emulator: bool) -> io::Result<()> {
    let cfg = Arc::new(config());
    let held = n / 2;
    let spec = VolumeSpec::gp3(AZ, 1, &cfg.tags);
    let row = |calls: &CallLog, wall: Duration, where_: &str| {
        println!(
            "| {where_} | {n} | {held} | {} | {} | {} | {:.1} s |",
            calls.count("DescribeInstances"),
            calls.count("DescribeVolumes"),
            calls.count("CreateVolume"),
            wall.as_secs_f64()
        );
    };
    let ids: Vec<String> = (0..n).map(|i| format!("i-{i:04}")).collect();
    if !on_emulator {
        let cloud = MemoryCloud::new(Timing {
            latency: Duration::from_millis(50),
            ..Timing::default()
        });
        cloud.with(|w| {
            for id in &ids {
                w.add_instance(id, AZ);
            }
            for i in 0..held {
                let v = w.add_volume(AZ, 1, &cfg.tags);
                w.add_instance(&format!("i-holder-{i}"), AZ);
                let _ = w.attach(&v, &format!("i-holder-{i}"), "/dev/xvdc");
            }
        });
        let start = Instant::now();
        herd(Arc::new(cloud.clone()), &ids, &cfg, ClaimTarget::pool(&cfg))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        row(cloud.calls(), start.elapsed(), "in-memory, 50 ms/request");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let emu = Emulator::start(Delays::default(), dir.path().join("emulator.log"))?;
    let api = Arc::new(cps_testbed::emulator_volumes(&emu));
    let ids = run_instances(&emu.ec2(), AZ, n as i32).await?;
    let holders = run_instances(&emu.ec2(), AZ, held as i32).await?;
    for (i, holder) in holders.iter().enumerate() {
        let v = api
            .create_volume(&spec, &format!("held-{i}"))
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        api.attach_volume(&v.id, holder, "/dev/xvdc")
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    api.calls().reset();
    let start = Instant::now();
    herd(api.clone(), &ids, &cfg, ClaimTarget::pool(&cfg))
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    row(api.calls(), start.elapsed(), "emulator");
    Ok(())
}

/// Every instance in `ids` claims a volume at the same moment, each as its own task.
async fn herd<V: VolumeService + 'static>(
    api: Arc<V>,
    ids: &[String],
    cfg: &Arc<AttachConfig>,
    target: ClaimTarget,
) -> Result<Vec<Claim>, cps_orchestrate::Error> {
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let (api, cfg, id, target) = (api.clone(), cfg.clone(), id.clone(), target.clone());
            tokio::spawn(async move {
                claim_volume(
                    api.as_ref(),
                    &identity(&id),
                    &cfg,
                    &target,
                    RetryPolicy::default(),
                )
                .await
            })
        })
        .collect();
    let mut claims = Vec::new();
    for t in tasks {
        claims.push(t.await.expect("claim task panicked")?);
    }
    Ok(claims)
}

/// N agents at once, in memory with 50 ms latency (and 1 s to create a volume).
async fn memory_herd(n: usize, mode: HerdMode) {
    let cloud = MemoryCloud::new(Timing {
        latency: Duration::from_millis(50),
        create_delay: Duration::from_secs(1),
        ..Timing::default()
    });
    let cfg = Arc::new(config());
    let ids: Vec<String> = (0..n).map(|i| format!("i-{i:04}")).collect();
    cloud.with(|w| {
        for id in &ids {
            w.add_instance(id, AZ);
            if mode == HerdMode::Pool {
                w.add_volume(AZ, 1, &cfg.tags);
            }
        }
    });
    let start = Instant::now();
    let claims = herd(Arc::new(cloud.clone()), &ids, &cfg, mode.target(&cfg, &ids))
        .await
        .expect("claim");
    let created = cloud.calls().count("CreateVolume");
    let after = cloud.volumes().len();
    herd_line(
        mode,
        "in-memory",
        n,
        &claims,
        cloud.calls(),
        start.elapsed(),
        created,
        after,
    );
}

/// The same herd over the wire, against the emulator (its patch layer makes AttachVolume the
/// lock it is on AWS).
async fn emulator_herd(n: usize, mode: HerdMode) -> io::Result<()> {
    let dir = tempfile::tempdir()?;
    let emu = Emulator::start(Delays::default(), dir.path().join("emulator.log"))?;
    let ec2 = emu.ec2();
    let cfg = Arc::new(config());
    let api = Arc::new(cps_testbed::emulator_volumes(&emu));
    let ids = run_instances(&ec2, AZ, n as i32).await?;
    if mode == HerdMode::Pool {
        for i in 0..n {
            let spec = VolumeSpec::gp3(AZ, 1, &cfg.tags);
            api.create_volume(&spec, &format!("pool-{i}"))
                .await
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
    }
    api.calls().reset();
    let start = Instant::now();
    let claims = herd(api.clone(), &ids, &cfg, mode.target(&cfg, &ids))
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    let wall = start.elapsed();
    let created = api.calls().count("CreateVolume");
    let volumes = api
        .volumes_tagged(&Tags::from([("cluster".to_owned(), "bench".to_owned())]))
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    herd_line(
        mode,
        "emulator",
        n,
        &claims,
        api.calls(),
        wall,
        created,
        volumes.len(),
    );
    Ok(())
}

struct ChildRun {
    code: i32,
    wall: Duration,
    max_rss_kib: i64,
    calls: String,
}

/// One Markdown row of a measured cps-attach run.
fn print_row(name: &str, r: &ChildRun) {
    println!(
        "| {name} | {} | {} | {:.2} s | {:.1} MiB |",
        r.code,
        r.calls.replace(',', ", ").replace('=', " "),
        r.wall.as_secs_f64(),
        r.max_rss_kib as f64 / 1024.0
    );
}

/// Runs a child and measures its own peak RSS.
///
/// Not with `ru_maxrss`: when a process is spawned by vfork/posix_spawn (as std does), exec
/// records the *parent's* high-water RSS as the child's, so every child of this (large) bench
/// would report the bench's size. The child's `VmHWM` (its own address space's high-water
/// mark) is sampled from /proc while it runs instead.
fn run_measured(mut cmd: std::process::Command) -> io::Result<ChildRun> {
    cmd.env("CPS_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || io::read_to_string(stderr).unwrap_or_default());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (done, status) = (done.clone(), format!("/proc/{}/status", child.id()));
        std::thread::spawn(move || {
            let mut peak = 0i64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kib) = std::fs::read_to_string(&status).ok().and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
                }) {
                    peak = peak.max(kib);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let status = child.wait()?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak_kib = sampler.join().unwrap_or(0);
    let wall = start.elapsed();
    let log = reader.join().unwrap_or_default();
    let calls = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "volume ready")
        .and_then(|v| v["calls"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("(no result) {}", log.lines().last().unwrap_or("")));
    Ok(ChildRun {
        code: status.code().unwrap_or(-1),
        wall,
        max_rss_kib: peak_kib,
        calls,
    })
}

/// The real binary on the bench (emulator, IMDS, loop devices), attach and create immediate.
async fn binary_paths(attach_bin: &Path) -> io::Result<()> {
    println!("## The cps-attach binary on the bench\n");
    let size = std::fs::metadata(attach_bin)?.len();
    println!(
        "Binary: `{}`, {:.1} MiB.\n",
        attach_bin.display(),
        size as f64 / (1 << 20) as f64
    );
    println!(
        "Emulator state changes are immediate here, so wall time is the agent itself plus the emulator's and the tools' own time (mkfs.xfs on create).\n"
    );
    println!("| path | exit | API calls | wall | peak RSS |");
    println!("|---|---|---|---|---|");
    let bench = Bench::start(BenchOptions {
        delays: Delays::default(),
        device_appears_after: Duration::ZERO,
    })?;
    let target = bench.dir().join("data");
    let _guard = cps_fixtures::MountGuard(target.clone());
    let config = bench.dir().join("attach.yml");
    std::fs::write(
        &config,
        format!(
            "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: bench-bin}}\n    size: 1\nfile-system:\n  type: xfs\nmount:\n  target: {}\n",
            target.display()
        ),
    )?;
    let a = bench.launch(AZ).await?;
    print_row(
        "create (first boot)",
        &run_measured(bench.attach_command(attach_bin, &a, &config))?,
    );
    let vols: Vec<String> = bench
        .volumes_tagged(&Tags::from([(
            "cluster".to_owned(),
            "bench-bin".to_owned(),
        )]))
        .await
        .into_iter()
        .map(|v| v.id)
        .collect();
    bench.terminate(&a).await?;
    let ids: Vec<&str> = vols.iter().map(String::as_str).collect();
    bench.wait_devices_gone(&ids);
    let b = bench.launch(AZ).await?;
    print_row(
        "reattach (replacement)",
        &run_measured(bench.attach_command(attach_bin, &b, &config))?,
    );
    print_row(
        "re-run",
        &run_measured(bench.attach_command(attach_bin, &b, &config))?,
    );
    println!();
    Ok(())
}

/// The node-id path with the real binary: identity from the group's tag, a fixed-IP interface,
/// hooks and the launch lifecycle hook, on first boot, replacement and re-run.
async fn node_paths(attach_bin: &Path) -> io::Result<()> {
    println!("## A node with an id, an interface and a lifecycle hook (cps-attach on the bench)\n");
    println!(
        "First boot of node 1, its replacement (terminated in its group without lowering capacity), and a re-run on the replacement. Calls include the Auto Scaling ones.\n"
    );
    println!("| path | exit | API calls | wall | peak RSS |");
    println!("|---|---|---|---|---|");
    let bench = Bench::start(BenchOptions {
        delays: Delays::default(),
        device_appears_after: Duration::ZERO,
    })?;
    let node = Tags::from([
        ("cluster".to_owned(), "bench-node".to_owned()),
        ("cps:node-id".to_owned(), "1".to_owned()),
    ]);
    bench.create_interface(AZ, 40, &node).await?;
    bench
        .create_group(
            "bench-node-1",
            AZ,
            1,
            &node,
            "launch",
            Duration::from_secs(600),
        )
        .await?;
    let mut guards = Vec::new();
    let mut boot = async |instance_id: &str, name: &str| -> io::Result<()> {
        let instance = bench.adopt(instance_id).await?;
        let target = instance.home.join("data");
        guards.push(cps_fixtures::MountGuard(target.clone()));
        let config = instance.home.join("attach.yml");
        std::fs::write(
            &config,
            format!(
                "block-provider:\n  aws-ebs:\n    ebs-tags: {{cluster: bench-node}}\n    size: 1\nfile-system:\n  type: xfs\nmount:\n  target: {}\nidentity:\n  mode: node-id\nnetwork-interface:\n  device-index: 1\nhooks:\n  configure: ['true']\n  health: ['true']\nlifecycle:\n  hook: launch\n",
                target.display()
            ),
        )?;
        print_row(
            name,
            &run_measured(bench.attach_command(attach_bin, &instance, &config))?,
        );
        Ok(())
    };
    let first = bench
        .wait_pending("bench-node-1", 1, Duration::from_secs(10))
        .await?[0]
        .clone();
    boot(&first, "first boot (creates the volume)").await?;
    bench.terminate_in_group(&first).await?;
    let next = bench
        .wait_pending("bench-node-1", 1, Duration::from_secs(10))
        .await?
        .into_iter()
        .find(|id| *id != first)
        .ok_or_else(|| io::Error::other("no replacement launched"))?;
    boot(&next, "replacement (reattach volume and interface)").await?;
    boot(&next, "re-run").await?;
    println!();
    Ok(())
}
