//! cps-roll: plan and run a quorum-safe, node-by-node rolling update of a stateful cluster on
//! Auto Scaling groups, and end a stuck launch (`abandon`).
//!
//! This binary parses arguments, sets up logging and Ctrl-C, prints progress and reports, and
//! maps outcomes to the documented exit codes; the roll itself lives in cps-orchestrate.

mod cli;

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use cli::{AwsArgs, Cli, Cmd, LogFormat, Output, RunArgs, SelectArgs, TargetArgs, VERSION};
use cps_orchestrate::backoff::RetryPolicy;
use cps_orchestrate::roll::{
    self, ClusterChecks, Plan, RollClouds, RollEvent, RollOutcome, RollReport, RollSettings,
    Snapshot, Stop, Targets,
};
use cps_orchestrate::{Error, ErrorClass};
use tokio::time::Instant;
use tracing::error;

/// Exit codes (documented in the README).
mod exit {
    pub const REFUSED: u8 = 3;
    pub const STOPPED: u8 = 4;
    pub const CLOUD: u8 = 5;
    pub const INTERRUPTED: u8 = 6;
    pub const COMMAND: u8 = 8;
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,cps_roll=info,cps_orchestrate=info")
    });
    // Colour is for a person at a terminal: not in a file or the journal, nor with NO_COLOR.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        // Its report of a failed write goes to stderr too, and panics when stderr is gone.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn settings(target: TargetArgs, select: SelectArgs) -> RollSettings {
    let targets = match target.cluster {
        Some(name) => Targets::Cluster {
            tag: select.cluster_tag,
            name,
        },
        None => Targets::Groups(target.asg),
    };
    let mut s = RollSettings::new(targets);
    s.node_id_tag = select.node_id_tag;
    s.force = select.force;
    s.only = select.only;
    s.max_unavailable = select.max_unavailable;
    s.allow_downtime = select.allow_downtime;
    s.wait_healthy = select.wait_healthy;
    s
}

/// The operator's leader and health commands, run with `sh -c`.
struct CommandChecks {
    leader: Option<String>,
    health: Option<String>,
    timeout: Duration,
}

impl CommandChecks {
    async fn sh(&self, command: &str, env: &[(&str, &str)]) -> Result<String, String> {
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C meant for cps-roll must not kill the check.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start sh -c {command:?}: {e}"))?;
        let out = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| format!("{command:?} took longer than {}s", self.timeout.as_secs()))?
            .map_err(|e| format!("{command:?}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
            Err(format!(
                "{command:?} exited with {}{}",
                out.status,
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(
                        ": {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                    )
                }
            ))
        }
    }
}

#[async_trait]
impl ClusterChecks for CommandChecks {
    async fn leader(&self) -> Result<Option<String>, String> {
        let Some(cmd) = &self.leader else {
            return Ok(None);
        };
        let out = self.sh(cmd, &[]).await?;
        match out.lines().next().map(str::trim) {
            Some(id) if !id.is_empty() => Ok(Some(id.to_owned())),
            _ => Err(format!("{cmd:?} printed no node id")),
        }
    }

    async fn healthy(&self, node: &str) -> Result<(), String> {
        match &self.health {
            Some(cmd) => self.sh(cmd, &[("CPS_ROLL_NODE", node)]).await.map(|_| ()),
            None => Ok(()),
        }
    }
}

fn state(n: &roll::NodeView) -> String {
    if n.instance_id.is_none() {
        n.lifecycle_state.clone()
    } else {
        format!("{} {}", n.lifecycle_state, n.health_status)
    }
}

/// A plain table, columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

fn plan_text(p: &Plan) -> String {
    if p.rows.is_empty() && p.size == 0 {
        let mut out = String::from("cluster: no Auto Scaling groups found\n\n");
        for r in &p.refusals {
            let _ = writeln!(out, "cannot start: {r}");
        }
        return out;
    }
    let rows: Vec<Vec<String>> = p
        .rows
        .iter()
        .map(|r| {
            vec![
                r.node.node.clone(),
                r.node.group.clone(),
                r.node.instance_id.clone().unwrap_or_else(|| "-".into()),
                format!("{} → {}", r.node.current, r.node.target),
                state(&r.node),
                r.action.as_str().to_owned(),
            ]
        })
        .collect();
    let mut out = format!(
        "cluster: {} nodes, {} out of service, at most {} at a time\n\n",
        p.size, p.unavailable, p.max_unavailable
    );
    out.push_str(&table(
        &[
            "NODE",
            "GROUP",
            "INSTANCE",
            "VERSION (CURRENT → TARGET)",
            "STATE",
            "ACTION",
        ],
        &rows,
    ));
    out.push('\n');
    if p.order.is_empty() {
        out.push_str("nothing to replace\n");
    } else {
        let _ = writeln!(out, "replace in this order: {}", p.order.join(", "));
    }
    for n in p.left_alone() {
        let _ = writeln!(out, "left alone: {n}");
    }
    for n in &p.notes {
        let _ = writeln!(out, "waits for: {n}");
    }
    for r in &p.refusals {
        let _ = writeln!(out, "cannot start: {r}");
    }
    out
}

fn nodes_text(snap: &Snapshot) -> String {
    let rows: Vec<Vec<String>> = snap
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.clone(),
                n.group.clone(),
                n.instance_id.clone().unwrap_or_else(|| "-".into()),
                n.current.clone(),
                state(n),
            ]
        })
        .collect();
    table(&["NODE", "GROUP", "INSTANCE", "VERSION", "STATE"], &rows)
}

fn report_text(r: &RollReport) -> String {
    let mut out = String::new();
    match &r.outcome {
        RollOutcome::UpToDate => out.push_str("every node is up to date; nothing done\n"),
        RollOutcome::Completed => {
            let _ = writeln!(
                out,
                "done: {} node(s) replaced{}",
                r.replaced.len(),
                if r.replaced.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.replaced.join(", "))
                }
            );
        }
        RollOutcome::Refused { reasons } => {
            out.push_str("refusing to start; nothing was changed:\n");
            for reason in reasons {
                let _ = writeln!(out, "  - {reason}");
            }
        }
        RollOutcome::Stopped { reason, .. } => {
            let _ = writeln!(out, "roll stopped: {reason}");
        }
        RollOutcome::Interrupted => {
            let _ = writeln!(
                out,
                "interrupted after {} replacement(s); every node started has settled",
                r.replaced.len()
            );
        }
    }
    for n in &r.left_alone {
        let _ = writeln!(out, "left alone: {n}");
    }
    if !matches!(r.outcome, RollOutcome::UpToDate | RollOutcome::Completed) {
        out.push('\n');
        out.push_str(&nodes_text(&r.last));
    }
    if !r.recovery.is_empty() {
        out.push_str("\nwhat to do now:\n");
        for (i, step) in r.recovery.iter().enumerate() {
            let _ = writeln!(out, "  {}. {step}", i + 1);
        }
    }
    out
}

struct Clients {
    groups: cps_aws::AutoScalingApi,
    ec2: cps_aws::Ec2Api,
}

async fn clients(aws: &AwsArgs) -> Result<Clients, String> {
    let region = aws
        .region
        .clone()
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .ok_or("no region: pass --region or set AWS_REGION")?;
    let mut settings = cps_aws::AwsSettings::new(region);
    settings.endpoint_url = aws.aws_endpoint.clone();
    let config = settings.load().await;
    Ok(Clients {
        groups: cps_aws::AutoScalingApi::new(&config),
        ec2: cps_aws::Ec2Api::new(&config),
    })
}

fn cloud_failure(e: &Error) -> u8 {
    match e.class() {
        ErrorClass::Hook => exit::COMMAND,
        ErrorClass::Refused => exit::REFUSED,
        _ => exit::CLOUD,
    }
}

fn api_calls(c: &Clients) -> String {
    let mut all = c.groups.calls().snapshot();
    for (k, v) in c.ec2.calls().snapshot() {
        *all.entry(k).or_default() += v;
    }
    all.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn plan_cmd(c: &Clients, s: &RollSettings, output: Output) -> u8 {
    let clouds = RollClouds {
        groups: &c.groups,
        templates: &c.ec2,
    };
    let snap = match roll::observe(clouds, s).await {
        Ok(s) => s,
        Err(e) => {
            error!("{e}");
            return cloud_failure(&e);
        }
    };
    let p = roll::plan(&snap, s);
    match output {
        Output::Text => print!("{}", plan_text(&p)),
        Output::Json => match serde_json::to_string_pretty(&p) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                error!("cannot write the plan as JSON: {e}");
                return 1;
            }
        },
    }
    tracing::info!(calls = %api_calls(c), "api calls");
    if p.refusals.is_empty() {
        0
    } else {
        exit::REFUSED
    }
}

/// What is mid-way while a run goes, for the messages of a second Ctrl-C or an error.
#[derive(Default)]
struct Flight {
    /// Nodes terminated and not yet settled.
    nodes: Mutex<Vec<String>>,
    /// Groups whose Launch this run holds suspended (a terminating hook holds the old instance).
    held: Mutex<Vec<String>>,
}

impl Flight {
    fn nodes(&self) -> String {
        self.nodes.lock().map(|f| f.join(", ")).unwrap_or_default()
    }

    /// What to do about groups whose Launch this run still holds suspended, if any.
    fn held_step(&self) -> Option<String> {
        let groups = self.held.lock().map(|h| h.clone()).unwrap_or_default();
        (!groups.is_empty()).then(|| {
            let commands: Vec<String> = groups
                .iter()
                .map(|g| {
                    format!(
                        "`aws autoscaling resume-processes --auto-scaling-group-name {g} --scaling-processes Launch`"
                    )
                })
                .collect();
            format!(
                "Launch is still suspended on {} (held while an old instance left): the next `cps-roll run` refuses until it is resumed: {}",
                groups.join(", "),
                commands.join("; ")
            )
        })
    }

    /// Notes what an event starts or ends, and returns its progress line.
    fn line(&self, e: RollEvent) -> String {
        let edit = |list: &Mutex<Vec<String>>, item: &str, add: bool| {
            if let Ok(mut l) = list.lock() {
                if add {
                    l.push(item.to_owned());
                } else {
                    l.retain(|n| n != item);
                }
            }
        };
        match e {
            RollEvent::Waiting { what } => format!("waiting: {what}"),
            RollEvent::Leader { node } => format!("node {node} is the leader: replacing it last"),
            RollEvent::Terminating {
                node,
                group,
                instance_id,
                from,
                to,
            } => {
                edit(&self.nodes, &node, true);
                format!("node {node}: terminating {instance_id} in {group} ({from} → {to})")
            }
            RollEvent::Replaced {
                node,
                old_instance,
                new_instance,
                took,
            } => {
                edit(&self.nodes, &node, false);
                format!(
                    "node {node}: replaced {old_instance} by {} in {:.1}s (InService, Healthy)",
                    new_instance.as_deref().unwrap_or("a new instance"),
                    took.as_secs_f64()
                )
            }
            RollEvent::Stopping { in_flight } => {
                format!("stopping after node(s) {} settle", in_flight.join(", "))
            }
            RollEvent::LaunchHeld { node, group, hook } => {
                edit(&self.held, &group, true);
                format!(
                    "node {node}: {group} has the terminating lifecycle hook {hook}: suspending its Launch until the old instance has left"
                )
            }
            RollEvent::LaunchResumed { group } => {
                edit(&self.held, &group, false);
                format!("{group}: Launch resumed; the group launches the replacement")
            }
        }
    }
}

/// Ctrl-C or SIGTERM once: `stop` (no new node starts, waits end, the nodes in flight
/// settle); twice: quit at once, saying what is mid-replacement.
fn watch_signals(stop: Arc<Stop>, flight: Arc<Flight>) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let mut count = 0;
        // Bounded: the second signal exits the process.
        loop {
            tokio::select! {
                // Without a Ctrl-C handler, SIGTERM still works.
                r = tokio::signal::ctrl_c() => if r.is_err() { std::future::pending::<()>().await },
                Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {},
            }
            count += 1;
            if count == 1 {
                stop.request();
                eprintln!(
                    "stopping: no new node starts; waiting for the node(s) in flight to settle (Ctrl-C again to quit now)"
                );
                continue;
            }
            let flying = flight.nodes();
            if flying.is_empty() {
                eprintln!(
                    "quitting now; no node was mid-replacement. Re-run `cps-roll run` to continue."
                );
            } else {
                eprintln!(
                    "quitting now with node(s) {flying} mid-replacement: the old instance is terminated and the group is launching its replacement. \
                     Re-run `cps-roll run` to resume; it waits for that replacement before starting another node."
                );
            }
            if let Some(step) = flight.held_step() {
                eprintln!("{step}");
            }
            std::process::exit(i32::from(exit::INTERRUPTED));
        }
    });
}

async fn run_cmd(c: &Clients, s: &RollSettings, r: RunArgs) -> u8 {
    let clouds = RollClouds {
        groups: &c.groups,
        templates: &c.ec2,
    };
    let checks = CommandChecks {
        leader: r.leader_command,
        health: r.health_command,
        timeout: r.command_timeout,
    };
    let mut s = s.clone();
    s.timeout = r.timeout;
    s.poll_interval = r.poll_interval;
    s.retry = RetryPolicy::within(r.timeout.min(Duration::from_secs(300)));

    let stop = Arc::new(Stop::new());
    let flight = Arc::new(Flight::default());
    watch_signals(stop.clone(), flight.clone());
    let started = Instant::now();
    let lines = flight.clone();
    let progress = move |e: RollEvent| {
        let t = started.elapsed().as_secs_f64();
        println!("[{t:7.1}s] {}", lines.line(e));
    };
    let result = roll::run(clouds, &checks, &s, &stop, &progress).await;
    tracing::info!(calls = %api_calls(c), "api calls");
    match result {
        Ok(report) => {
            print!("{}", report_text(&report));
            match report.outcome {
                RollOutcome::UpToDate | RollOutcome::Completed => 0,
                RollOutcome::Refused { .. } => exit::REFUSED,
                RollOutcome::Stopped { .. } => exit::STOPPED,
                RollOutcome::Interrupted => exit::INTERRUPTED,
            }
        }
        Err(e) => {
            error!("{e}");
            let flying = flight.nodes();
            if !flying.is_empty() {
                error!(
                    "node(s) {flying} were mid-replacement; re-run `cps-roll run` to resume (it waits for them first)"
                );
            }
            if let Some(step) = flight.held_step() {
                error!("{step}");
            }
            cloud_failure(&e)
        }
    }
}

async fn abandon_cmd(c: &Clients, group: &str, instance: Option<&str>, hook: Option<&str>) -> u8 {
    match roll::abandon(
        &c.groups,
        &c.groups,
        group,
        instance,
        hook,
        RetryPolicy::within(Duration::from_secs(60)),
    )
    .await
    {
        Ok((id, hook)) => {
            println!(
                "{id}: lifecycle action of hook {hook} completed with ABANDON; {group} launches a replacement"
            );
            0
        }
        Err(e) => {
            error!("{e}");
            cloud_failure(&e)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.aws.log_format);
    tracing::info!(version = VERSION, "cps-roll {VERSION}");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let c = match clients(&cli.aws).await {
            Ok(c) => c,
            Err(e) => {
                error!("{e}");
                return 2;
            }
        };
        match cli.command {
            Cmd::Plan {
                target,
                select,
                output,
            } => plan_cmd(&c, &settings(target, select), output).await,
            Cmd::Run {
                target,
                select,
                run,
            } => run_cmd(&c, &settings(target, select), run).await,
            Cmd::Abandon {
                asg,
                instance,
                hook,
            } => abandon_cmd(&c, &asg, instance.as_deref(), hook.as_deref()).await,
        }
    });
    ExitCode::from(code)
}
