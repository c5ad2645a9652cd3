//! The real cps-roll binary on the bench: the AWS emulator over the wire, single-instance Auto
//! Scaling groups with launch lifecycle hooks, and a simulator that plays each new instance's
//! boot by completing its lifecycle action after a fixed time.

mod messages;

use std::process::Stdio;
use std::time::Duration;

use cps_provider::Tags;
use cps_testbed::{Bench, BenchOptions, Fate, Fates, Task};
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_cps-roll");
const TIER: &str = "cps-roll end to end (emulator)";
const HOOK: &str = "cps-launch";
const ZONE: &str = "us-east-1a";

struct Cluster {
    bench: Bench,
    name: String,
    groups: Vec<String>,
    templates: Vec<String>,
    fates: Fates,
    _boots: Task,
}

impl Cluster {
    /// `n` single-instance groups tagged cps:cluster=`name`, every node InService on template
    /// version 1; new instances boot (complete their lifecycle action) `boot` after launch.
    async fn start(name: &str, n: usize, boot: Duration) -> Option<Self> {
        if !cps_testbed::ready(TIER) {
            return None;
        }
        let bench = Bench::start(BenchOptions::default()).expect("bench");
        let groups: Vec<String> = (1..=n).map(|i| format!("{name}-node-{i}")).collect();
        let fates = Fates::default();
        let boots = bench.simulate_boots(&groups, HOOK, boot, fates.clone());
        let mut templates = Vec::new();
        for (i, g) in groups.iter().enumerate() {
            let tags = Tags::from([
                ("cps:cluster".to_string(), name.to_string()),
                ("cps:node-id".to_string(), (i + 1).to_string()),
            ]);
            templates.push(
                bench
                    .create_group(g, ZONE, 1, &tags, HOOK, Duration::from_secs(600))
                    .await
                    .expect("group"),
            );
        }
        bench
            .wait_in_service(&groups, Duration::from_secs(60))
            .await
            .expect("every node InService");
        Some(Self {
            bench,
            name: name.into(),
            groups,
            templates,
            fates,
            _boots: boots,
        })
    }

    async fn new_version(&self) {
        for t in &self.templates {
            assert_eq!(self.bench.new_template_version(t).await.unwrap(), 2);
        }
    }

    async fn instances(&self) -> Vec<(String, Option<String>)> {
        let mut all = Vec::new();
        for g in &self.groups {
            for m in self.bench.members(g).await.unwrap() {
                all.push((m.instance_id, m.launch_template_version));
            }
        }
        all
    }

    /// cps-roll with `args`, aimed at this cluster.
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = self.raw(args);
        cmd.args(["--cluster", &self.name]);
        cmd
    }

    /// cps-roll with `args` only.
    fn raw(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = self.bench.roll_command(BIN.as_ref());
        cmd.args(args);
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.kill_on_drop(true);
        cmd
    }

    async fn roll(&self, args: &[&str]) -> (i32, String, String) {
        Self::output(self.command(args)).await
    }

    async fn output(mut cmd: tokio::process::Command) -> (i32, String, String) {
        let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
            .await
            .expect("cps-roll finishes")
            .expect("cps-roll runs");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

const FAST: [&str; 5] = ["run", "--poll-interval", "200ms", "--timeout", "60s"];

fn terminated_order(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| {
            let rest = l.split("] node ").nth(1)?;
            let (node, what) = rest.split_once(": ")?;
            what.starts_with("terminating").then(|| node.to_owned())
        })
        .collect()
}

/// Instance ids in order of first appearance → placeholders of the same width.
fn normalize(text: &str) -> String {
    let mut out = String::new();
    let mut seen: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(pos) = rest.find("i-") {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos + 2..];
        let len = tail
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(tail.len());
        if len >= 8 {
            let id = &rest[pos..pos + 2 + len];
            let n = match seen.iter().position(|s| s == id) {
                Some(n) => n,
                None => {
                    seen.push(id.to_owned());
                    seen.len() - 1
                }
            };
            out.push_str(&format!("i-{:0>17}", n + 1));
            rest = &rest[pos + 2 + len..];
        } else {
            out.push_str("i-");
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

async fn rolls_every_node_one_at_a_time(n: usize) {
    let Some(c) = Cluster::start(&format!("roll{n}"), n, Duration::from_millis(1500)).await else {
        return;
    };
    let before = c.instances().await;
    c.new_version().await;
    let (_sampler, samples) = c.bench.sample_unavailable(&c.groups);
    // With 3 nodes, also the operator's commands: node 1 is the leader (replaced last), and the
    // health command must see which node was just replaced.
    let log = c.bench.dir().join("health.log");
    let health = format!("echo \"$CPS_ROLL_NODE\" >> '{}'", log.display());
    let mut args = FAST.to_vec();
    if n == 3 {
        args.extend(["--leader-command", "echo 1", "--health-command", &health]);
    }
    let (code, stdout, stderr) = c.roll(&args).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let order: Vec<String> = if n == 3 {
        assert!(
            stdout.contains("node 1 is the leader: replacing it last"),
            "{stdout}"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "2\n3\n1\n");
        vec!["2".into(), "3".into(), "1".into()]
    } else {
        (1..=n).map(|i| i.to_string()).collect()
    };
    assert_eq!(terminated_order(&stdout), order, "{stdout}");
    assert!(
        stdout.contains(&format!("done: {n} node(s) replaced")),
        "{stdout}"
    );
    let seen = samples.lock().unwrap().clone();
    assert!(seen.len() > 20, "the sampler ran ({} samples)", seen.len());
    assert_eq!(
        seen.iter().max(),
        Some(&1),
        "never two out of service at once"
    );
    let after = c.instances().await;
    assert_eq!(after.len(), n);
    for ((old, _), (new, version)) in before.iter().zip(&after) {
        assert_ne!(old, new);
        assert_eq!(version.as_deref(), Some("2"));
    }

    // Up to date now: a second run changes nothing.
    let (code, stdout, _) = c.roll(&FAST).await;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("every node is up to date; nothing done"),
        "{stdout}"
    );
    assert_eq!(c.instances().await, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_are_replaced_one_at_a_time() {
    rolls_every_node_one_at_a_time(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_are_replaced_one_at_a_time() {
    rolls_every_node_one_at_a_time(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_shows_every_node_and_what_run_would_do() {
    let Some(c) = Cluster::start("plan", 3, Duration::from_millis(500)).await else {
        return;
    };
    c.new_version().await;
    let (code, stdout, stderr) = c.roll(&["plan"]).await;
    assert_eq!(code, 0, "{stderr}");
    let expected = "\
cluster: 3 nodes, 0 out of service, at most 1 at a time

NODE  GROUP        INSTANCE             VERSION (CURRENT → TARGET)                       STATE              ACTION
1     plan-node-1  i-00000000000000001  plan-node-1-lt v1 → plan-node-1-lt v2 ($Latest)  InService Healthy  replace
2     plan-node-2  i-00000000000000002  plan-node-2-lt v1 → plan-node-2-lt v2 ($Latest)  InService Healthy  replace
3     plan-node-3  i-00000000000000003  plan-node-3-lt v1 → plan-node-3-lt v2 ($Latest)  InService Healthy  replace

replace in this order: 1, 2, 3
";
    assert_eq!(normalize(&stdout), expected, "{stdout}");

    let (code, json, _) = c.roll(&["plan", "--output", "json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(v["size"], 3);
    assert_eq!(v["rows"][1]["node"], "2");
    assert_eq!(v["rows"][1]["action"], "replace");
    assert_eq!(v["rows"][1]["current"], "plan-node-2-lt v1");
    assert_eq!(v["refusals"].as_array().map(Vec::len), Some(0));

    // Two nodes at a time would leave one of three: refused, exit 3, nothing changed.
    let before = c.instances().await;
    let (code, stdout, _) = c.roll(&["run", "--max-unavailable", "2"]).await;
    assert_eq!(code, 3, "{stdout}");
    assert!(
        stdout.contains("fewer than a majority (2); at most 1"),
        "{stdout}"
    );
    assert_eq!(c.instances().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replacement_stops_the_roll_with_node_3_untouched() {
    let Some(c) = Cluster::start("fail", 3, Duration::from_millis(1000)).await else {
        return;
    };
    let node3 = c.bench.members(&c.groups[2]).await.unwrap();
    c.new_version().await;
    // Node 2's new instances never finish booting: they wait in Pending:Wait.
    c.fates
        .lock()
        .unwrap()
        .insert(c.groups[1].clone(), Fate::Hang);
    let (code, stdout, stderr) = c
        .roll(&["run", "--poll-interval", "200ms", "--timeout", "8s"])
        .await;
    assert_eq!(code, 4, "{stdout}\n{stderr}");
    assert_eq!(terminated_order(&stdout), ["1", "2"], "{stdout}");
    assert!(
        stdout.contains("roll stopped: the replacement of node 2"),
        "{stdout}"
    );
    assert!(stdout.contains("what to do now:"), "{stdout}");
    assert!(
        stdout.contains("Not replaced by this run: 2, 3."),
        "{stdout}"
    );
    assert_eq!(
        c.bench.members(&c.groups[2]).await.unwrap(),
        node3,
        "node 3 untouched"
    );
    // Nodes 1 (replaced) and 3 are in service: the cluster kept its majority.
    let up: usize = {
        let mut up = 0;
        for g in [&c.groups[0], &c.groups[2]] {
            up += c
                .bench
                .members(g)
                .await
                .unwrap()
                .iter()
                .filter(|m| m.lifecycle_state == "InService")
                .count();
        }
        up
    };
    assert_eq!(up, 2);

    // The report names the abandon command for the stuck instance; it refuses a healthy one.
    let stuck = c
        .bench
        .wait_pending(&c.groups[1], 1, Duration::from_secs(5))
        .await
        .unwrap();
    let step = format!(
        "cps-roll abandon --asg {} --instance {}",
        c.groups[1], stuck[0]
    );
    assert!(stdout.contains(&step), "{stdout}");
    let healthy = &node3[0].instance_id;
    let (code, _, stderr) =
        Cluster::output(c.raw(&["abandon", "--asg", &c.groups[2], "--instance", healthy])).await;
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("not Pending:Wait"), "{stderr}");
    assert_eq!(c.bench.members(&c.groups[2]).await.unwrap(), node3);

    // Abandon the stuck instance, and fix the cause: the group's next instance boots.
    let (code, stdout, stderr) = Cluster::output(c.raw(&["abandon", "--asg", &c.groups[1]])).await;
    c.fates.lock().unwrap().clear();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!(
            "{}: lifecycle action of hook {HOOK} completed with ABANDON",
            stuck[0]
        )),
        "{stdout}"
    );
    c.bench
        .wait_in_service(&c.groups, Duration::from_secs(30))
        .await
        .expect("node 2's group recovers");
    assert!(!c.instances().await.iter().any(|(id, _)| *id == stuck[0]));
    let (code, stdout, stderr) = c.roll(&FAST).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(terminated_order(&stdout), ["3"], "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_roll_settles_then_resumes() {
    let Some(c) = Cluster::start("intr", 3, Duration::from_millis(2000)).await else {
        return;
    };
    c.new_version().await;
    let mut child = c
        .command(&FAST)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cps-roll starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    let mut signalled = false;
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if !signalled && line.contains("node 1: terminating") {
                // SAFETY: SIGINT (what Ctrl-C sends) to the child this test started.
                unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
                signalled = true;
            }
            stdout.push_str(&line);
            stdout.push('\n');
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("output ends");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(status.code(), Some(6), "{stdout}");
    assert!(signalled, "{stdout}");
    assert!(
        stdout.contains("node 1: replaced"),
        "the node in flight settled: {stdout}"
    );
    assert!(
        stdout.contains("interrupted after 1 replacement(s)"),
        "{stdout}"
    );
    assert_eq!(terminated_order(&stdout), ["1"]);

    let (code, stdout, stderr) = c.roll(&FAST).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(terminated_order(&stdout), ["2", "3"], "{stdout}");
}
