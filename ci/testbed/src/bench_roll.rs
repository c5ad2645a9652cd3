//! Rolling updates on the bench: cps-roll and the second design's script side by side on the
//! same emulator and the same simulated boots, and planning a 500-group cluster.

use std::io;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use cps_provider::Tags;
use cps_testbed::{Bench, BenchOptions, Fates, emulator};

const ZONE: &str = "us-east-1a";
const HOOK: &str = "cps-launch";
/// How long every simulated replacement takes to boot (lifecycle action completed after this).
const BOOT: Duration = Duration::from_secs(5);

pub async fn run(roll_bin: &Path, script: &Path) -> io::Result<()> {
    println!("## Rolling update: cps-roll and the second design's script\n");
    println!(
        "Single-instance groups with a launch hook; a simulator completes each new instance's lifecycle action {} s after it appears (the boot). Both tools roll the same cluster from template version k to k+1 (groups pinned to a version number, which the script needs). Overhead per node = (wall − nodes × boot) / nodes. API calls: cps-roll counts its own; the script's are its `aws` invocations. \"Most out\" is the most nodes out of service seen by a 50 ms sampler.\n",
        BOOT.as_secs()
    );
    println!("| nodes | tool | exit | wall | boots | overhead per node | API calls | most out |");
    println!("|---|---|---|---|---|---|---|---|");
    for n in [3usize, 9] {
        side_by_side(roll_bin, script, n).await?;
    }
    println!();
    plan_500(roll_bin).await
}

struct Measured {
    code: i32,
    wall: Duration,
    calls: String,
    most_out: usize,
}

fn row(n: usize, tool: &str, m: &Measured) {
    let boots = BOOT * n as u32;
    let overhead = m.wall.saturating_sub(boots).as_secs_f64() / n as f64;
    println!(
        "| {n} | {tool} | {} | {:.1} s | {:.0} s | {overhead:.2} s | {} | {} |",
        m.code,
        m.wall.as_secs_f64(),
        boots.as_secs_f64(),
        m.calls,
        m.most_out
    );
}

/// The `api calls` line cps-roll logs at the end (JSON log).
fn roll_calls(stderr: &str) -> String {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "api calls")
        .and_then(|v| v["calls"].as_str().map(str::to_owned))
        .map(|c| {
            let total: u64 = c
                .split(' ')
                .filter_map(|kv| kv.split_once('=')?.1.parse::<u64>().ok())
                .sum();
            format!("{total} ({})", c.replace(' ', ", ").replace('=', " "))
        })
        .unwrap_or_else(|| "(no count)".into())
}

async fn measured(
    bench: &Bench,
    groups: &[String],
    mut cmd: tokio::process::Command,
    calls: impl FnOnce(&str) -> String,
) -> io::Result<Measured> {
    let (_sampler, samples) = bench.sample_unavailable(groups);
    let start = Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(900), cmd.output())
        .await
        .map_err(|_| io::Error::other("the roll did not finish in 15 minutes"))??;
    let wall = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let most_out = samples
        .lock()
        .map(|s| s.iter().copied().max().unwrap_or(0))
        .unwrap_or(0);
    if !out.status.success() {
        eprintln!("{}\n{stderr}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(Measured {
        code: out.status.code().unwrap_or(-1),
        wall,
        calls: calls(&stderr),
        most_out,
    })
}

async fn side_by_side(roll_bin: &Path, script: &Path, n: usize) -> io::Result<()> {
    let bench = Bench::start(BenchOptions::default())?;
    let name = format!("cmp{n}");
    let groups: Vec<String> = (1..=n).map(|i| format!("{name}-node-{i}")).collect();
    let _boots = bench.simulate_boots(&groups, HOOK, BOOT, Fates::default());
    let mut templates = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let tags = Tags::from([
            ("cps:cluster".to_string(), name.clone()),
            ("cps:node-id".to_string(), (i + 1).to_string()),
        ]);
        let t = bench
            .create_group(g, ZONE, 1, &tags, HOOK, Duration::from_secs(900))
            .await?;
        bench.set_group_version(g, &t, "1").await?;
        templates.push(t);
    }
    bench
        .wait_in_service(&groups, BOOT * 3 + Duration::from_secs(30))
        .await?;

    // cps-roll: version 1 → 2.
    for (g, t) in groups.iter().zip(&templates) {
        let v = bench.new_template_version(t).await?;
        bench.set_group_version(g, t, &v.to_string()).await?;
    }
    let mut cmd = bench.roll_command(roll_bin);
    cmd.args(["run", "--cluster", &name, "--timeout", "5m"])
        .env("CPS_LOG_FORMAT", "json");
    let m = measured(
        &bench,
        &groups,
        tokio::process::Command::from(cmd),
        roll_calls,
    )
    .await?;
    row(n, "cps-roll", &m);

    // The script: version 2 → 3, its `aws` calls counted by a shim in front of the real CLI.
    if !script.is_file() {
        println!(
            "| {n} | script | – | skipped: {} not found | | | | |",
            script.display()
        );
        return Ok(());
    }
    for (g, t) in groups.iter().zip(&templates) {
        let v = bench.new_template_version(t).await?;
        bench.set_group_version(g, t, &v.to_string()).await?;
    }
    let shim_dir = bench.dir().join("shim");
    std::fs::create_dir_all(&shim_dir)?;
    let count = bench.dir().join("aws-calls");
    let real = emulator::venv().join("bin/aws");
    let shim = shim_dir.join("aws");
    std::fs::write(
        &shim,
        format!(
            "#!/bin/sh\necho \"$1 $2\" >> '{}'\nexec '{}' \"$@\"\n",
            count.display(),
            real.display()
        ),
    )?;
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let path = format!(
        "{}:{}",
        shim_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = bench.roll_command(Path::new("bash"));
    cmd.arg(script)
        .arg("300")
        .args(&groups)
        .env("PATH", path)
        .env("AWS_ENDPOINT_URL", bench.endpoint())
        .env("AWS_DEFAULT_REGION", cps_testbed::REGION)
        .stdin(Stdio::null());
    let m = measured(&bench, &groups, tokio::process::Command::from(cmd), |_| {
        let lines = std::fs::read_to_string(&count).unwrap_or_default();
        let total = lines.lines().count();
        let terminations = lines
            .lines()
            .filter(|l| l.contains("terminate-instance-in-auto-scaling-group"))
            .count();
        format!(
            "{total} (DescribeAutoScalingGroups {}, TerminateInstanceInAutoScalingGroup {terminations})",
            total - terminations
        )
    })
    .await?;
    row(n, "script", &m);
    Ok(())
}

async fn plan_500(roll_bin: &Path) -> io::Result<()> {
    println!("## Planning a 500-group cluster\n");
    let bench = Bench::start(BenchOptions::default())?;
    let names: Vec<String> = (1..=500).map(|i| format!("big-{i:03}")).collect();
    let template = bench
        .create_plain_groups(&names, ZONE, |i| {
            Tags::from([
                ("cps:cluster".to_string(), "big".to_string()),
                ("cps:node-id".to_string(), (i + 1).to_string()),
            ])
        })
        .await?;
    bench.new_template_version(&template).await?;
    println!(
        "| targets | exit | DescribeAutoScalingGroups | all calls | nodes to replace | wall |"
    );
    println!("|---|---|---|---|---|---|");
    for (how, args) in [
        (
            "`--cluster big`",
            vec!["--cluster".to_string(), "big".into()],
        ),
        ("`--asg` × 500", vec!["--asg".to_string(), names.join(",")]),
    ] {
        let mut cmd = bench.roll_command(roll_bin);
        cmd.args(["plan", "--output", "json"])
            .args(&args)
            .env("CPS_LOG_FORMAT", "json");
        let start = Instant::now();
        let out = tokio::process::Command::from(cmd).output().await?;
        let wall = start.elapsed();
        let plan: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let replace = plan["rows"]
            .as_array()
            .map(|r| r.iter().filter(|r| r["action"] == "replace").count())
            .unwrap_or(0);
        let calls = roll_calls(&String::from_utf8_lossy(&out.stderr));
        let describe = calls
            .split("DescribeAutoScalingGroups ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .unwrap_or("?")
            .to_owned();
        println!(
            "| {how} | {} | {describe} | {calls} | {replace} | {:.2} s |",
            out.status.code().unwrap_or(-1),
            wall.as_secs_f64()
        );
    }
    println!();
    Ok(())
}
