//! The real cps-roll binary on the bench: the AWS emulator over the wire, single-instance Auto
//! Scaling groups with launch lifecycle hooks, and a simulator that plays each new instance's
//! boot by completing its lifecycle action after a fixed time.

mod groups;
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
    // For machines: the replacement order, and versions as numbers.
    assert_eq!(v["order"], serde_json::json!(["1", "2", "3"]), "{json}");
    assert_eq!(v["rows"][1]["current_version"], 1, "{json}");
    assert_eq!(v["rows"][1]["target_version"], 2, "{json}");

    // A cluster with no groups says so, and nothing about quorum.
    for output in ["text", "json"] {
        let (code, stdout, stderr) =
            Cluster::output(c.raw(&["plan", "--cluster", "no-such-cluster", "--output", output]))
                .await;
        assert_eq!(code, 3, "{stdout}\n{stderr}");
        assert!(
            stdout.contains("no Auto Scaling group is tagged cps:cluster=no-such-cluster"),
            "{stdout}"
        );
        assert!(!stdout.contains("0 of 0"), "{stdout}");
        assert!(!stdout.contains("majority"), "{stdout}");
    }
    let (_, stdout, _) = Cluster::output(c.raw(&["plan", "--cluster", "no-such-cluster"])).await;
    assert!(
        stdout.starts_with("cluster: no Auto Scaling groups found"),
        "{stdout}"
    );

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

/// A duration beyond any sensible bound is a usage error (exit 2) before anything is touched,
/// never a panic half-way through a roll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_duration_is_a_usage_error_and_changes_nothing() {
    let Some(c) = Cluster::start("dur", 3, Duration::from_millis(500)).await else {
        return;
    };
    c.new_version().await;
    let before = c.instances().await;
    for flag in ["--timeout", "--poll-interval", "--command-timeout"] {
        for value in ["18446744073709551615", "25h"] {
            let (code, stdout, stderr) = c.roll(&["run", flag, value]).await;
            assert_eq!(code, 2, "{flag} {value}: {stdout}\n{stderr}");
            assert!(
                stderr.contains("between 1ms and 24h"),
                "{flag} {value}: {stderr}"
            );
        }
    }
    assert_eq!(c.instances().await, before, "nothing was terminated");
}

/// `abandon` without `--instance` ends a launch only when exactly one waits: with several in
/// Pending:Wait (a slot group booting), some may be healthy boots in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandon_needs_an_instance_when_several_wait() {
    let Some(c) = Cluster::start("abn", 1, Duration::from_millis(500)).await else {
        return;
    };
    // A slot group whose two boots nobody completes: both wait in Pending:Wait.
    let slots = "abn-slots";
    let tags = Tags::from([("cps:cluster".to_string(), "abn-other".to_string())]);
    c.bench
        .create_group(slots, ZONE, 2, &tags, HOOK, Duration::from_secs(600))
        .await
        .unwrap();
    let waiting = c
        .bench
        .wait_pending(slots, 2, Duration::from_secs(10))
        .await
        .unwrap();
    let (code, stdout, stderr) = Cluster::output(c.raw(&["abandon", "--asg", slots])).await;
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    for id in &waiting {
        assert!(stderr.contains(id.as_str()), "names {id}: {stderr}");
    }
    assert!(stderr.contains("--instance"), "{stderr}");
    let still: Vec<String> = c
        .bench
        .members(slots)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.lifecycle_state == "Pending:Wait")
        .map(|m| m.instance_id)
        .collect();
    assert_eq!(still, waiting, "nothing was abandoned");

    // Naming one ends that one only.
    let (code, stdout, stderr) =
        Cluster::output(c.raw(&["abandon", "--asg", slots, "--instance", &waiting[0]])).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let members = c.bench.members(slots).await.unwrap();
    assert!(!members.iter().any(|m| m.instance_id == waiting[0]));
    assert!(
        members
            .iter()
            .any(|m| m.instance_id == waiting[1] && m.lifecycle_state == "Pending:Wait")
    );
}

/// Mixed-instances groups whose override carries its own launch template: an instance launched
/// from the override is compared with the override's template, so a rolled cluster converges
/// (a second run replaces nothing) instead of being outdated forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_instances_overrides_are_compared_with_their_own_template() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).expect("bench");
    let main = groups::template(&bench, "mixed-main", "m6i.large").await;
    let arm = groups::template(&bench, "mixed-arm", "m7g.large").await;
    let names: Vec<String> = (1..=3).map(|i| format!("mixed-node-{i}")).collect();
    let _boots = bench.simulate_boots(&names, HOOK, Duration::from_millis(500), Fates::default());
    for (i, g) in names.iter().enumerate() {
        let tags = Tags::from([
            ("cps:cluster".to_string(), "mixed".to_string()),
            ("cps:node-id".to_string(), (i + 1).to_string()),
        ]);
        groups::mixed_group(&bench, g, ZONE, &main, &arm, &tags, HOOK).await;
    }
    bench.wait_in_service(&names, groups::SETTLE).await.unwrap();
    let roll = |args: &[&str]| {
        let mut cmd = tokio::process::Command::from(bench.roll_command(BIN.as_ref()));
        cmd.args(args)
            .args(["--cluster", "mixed"])
            .kill_on_drop(true);
        Cluster::output(cmd)
    };
    let (code, stdout, stderr) = roll(&["plan", "--output", "json"]).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    for row in v["rows"].as_array().unwrap() {
        assert_eq!(row["action"], "keep", "{stdout}");
        assert_eq!(row["target"], "mixed-arm v1 ($Latest)", "{stdout}");
    }
    let (code, stdout, _) = roll(&FAST).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("every node is up to date"), "{stdout}");

    // A new version of the override's template outdates every node once.
    assert_eq!(bench.new_template_version(&arm).await.unwrap(), 2);
    let (code, stdout, stderr) = roll(&FAST).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(terminated_order(&stdout), ["1", "2", "3"], "{stdout}");
    let (code, stdout, _) = roll(&FAST).await;
    assert_eq!(code, 0);
    assert!(stdout.contains("every node is up to date"), "{stdout}");
}

/// A node in Standby (its group's capacity lowered) is out of service and no replacement of
/// the roll's: it is never terminated, and it counts against the budget. In a 4-node cluster
/// with one in Standby, replacing any other node would leave 2 of 4: refused, nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_node_is_left_alone_and_uses_the_budget() {
    let Some(c) = Cluster::start("stby", 4, Duration::from_millis(500)).await else {
        return;
    };
    c.new_version().await;
    let standby = c.bench.members(&c.groups[3]).await.unwrap()[0]
        .instance_id
        .clone();
    groups::enter_standby(&c.bench, &c.groups[3], &standby, true).await;
    let before = c.instances().await;

    let (code, json, stderr) = c.roll(&["plan", "--output", "json"]).await;
    assert_eq!(code, 3, "{json}\n{stderr}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(
        v["size"], 4,
        "the Standby node is one of the cluster's: {json}"
    );
    assert_eq!(v["unavailable"], 1, "{json}");
    assert_eq!(v["rows"][3]["action"], "left-alone", "{json}");
    let refusals = v["refusals"].to_string();
    assert!(
        refusals.contains("node 4") && refusals.contains("Standby"),
        "{refusals}"
    );

    let (code, stdout, stderr) = c.roll(&FAST).await;
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert!(terminated_order(&stdout).is_empty(), "{stdout}");
    assert!(stdout.contains("Standby"), "{stdout}");
    assert_eq!(c.instances().await, before, "nothing was terminated");
    let members = c.bench.members(&c.groups[3]).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].instance_id, standby);
    assert_eq!(members[0].lifecycle_state, "Standby");
}

/// A node whose group is at desired capacity 0 (its instance detached) is out of service and
/// left alone; with --max-unavailable 2 on 5 nodes the other four are replaced one at a time,
/// never more than 2 of 5 out counting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_capacity_counts_as_out_while_the_rest_roll() {
    let Some(c) = Cluster::start("zero", 5, Duration::from_millis(1000)).await else {
        return;
    };
    c.new_version().await;
    let detached = c.bench.members(&c.groups[4]).await.unwrap()[0]
        .instance_id
        .clone();
    groups::detach(&c.bench, &c.groups[4], &detached).await;
    let (_sampler, samples) = c.bench.sample_unavailable(&c.groups);
    let (code, stdout, stderr) = c
        .roll(&[FAST.as_slice(), &["--max-unavailable", "2"]].concat())
        .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(terminated_order(&stdout), ["1", "2", "3", "4"], "{stdout}");
    assert!(
        stdout.contains("node 5"),
        "the report names the node left alone: {stdout}"
    );
    // The sampler counts desired − in service per group: node 5's group wants 0, so the
    // node out of service it stands for is one more than the samples show.
    let seen = samples.lock().unwrap().clone();
    assert!(seen.len() > 20, "the sampler ran ({} samples)", seen.len());
    assert_eq!(
        seen.iter().max(),
        Some(&1),
        "never more than 2 of 5 out: {seen:?}"
    );
    assert!(c.bench.members(&c.groups[4]).await.unwrap().is_empty());
}

/// Suspended processes a replacement needs, and an instance refresh in progress, refuse the
/// roll before any change, each named with the way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_processes_and_instance_refreshes_refuse_the_roll() {
    let Some(c) = Cluster::start("susp", 3, Duration::from_millis(500)).await else {
        return;
    };
    c.new_version().await;
    let before = c.instances().await;
    let refused = |stdout: &str, what: &[&str]| {
        for w in what {
            assert!(stdout.contains(w), "{w:?} in {stdout}");
        }
    };
    for process in ["Launch", "Terminate", "HealthCheck", "ReplaceUnhealthy"] {
        groups::processes(&c.bench, &c.groups[1], &[process], true).await;
        let (code, stdout, stderr) = c.roll(&["plan"]).await;
        assert_eq!(code, 3, "{process}: {stdout}\n{stderr}");
        refused(
            &stdout,
            &[
                &c.groups[1],
                &format!("has {process} suspended"),
                "resume-processes",
            ],
        );
        let (code, stdout, _) = c.roll(&FAST).await;
        assert_eq!(code, 3, "{process}: {stdout}");
        assert!(terminated_order(&stdout).is_empty(), "{stdout}");
        groups::processes(&c.bench, &c.groups[1], &[process], false).await;
    }
    // A process the roll does not need is no reason to refuse.
    groups::processes(&c.bench, &c.groups[1], &["AZRebalance"], true).await;
    let (code, stdout, _) = c.roll(&["plan"]).await;
    assert_eq!(code, 0, "{stdout}");

    groups::refresh(&c.bench, &c.groups[2], true).await;
    let (code, stdout, _) = c.roll(&["plan"]).await;
    assert_eq!(code, 3, "{stdout}");
    refused(
        &stdout,
        &[
            "instance refresh",
            "InProgress",
            &c.groups[2],
            "cancel-instance-refresh",
        ],
    );
    let (code, stdout, _) = c.roll(&FAST).await;
    assert_eq!(code, 3, "{stdout}");
    assert_eq!(c.instances().await, before, "nothing was terminated");

    groups::refresh(&c.bench, &c.groups[2], false).await;
    let (code, stdout, stderr) = c.roll(&FAST).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(terminated_order(&stdout), ["1", "2", "3"], "{stdout}");
}

/// With a terminating lifecycle hook (a drain), the old instance waits in Terminating:Wait
/// still holding the node's volume and interface: the roll keeps the group from launching the
/// replacement until it has left, so the replacement never boots beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminating_hook_holds_the_replacement_until_the_old_instance_leaves() {
    let Some(c) = Cluster::start("drain", 3, Duration::from_millis(500)).await else {
        return;
    };
    for g in &c.groups {
        groups::terminating_hook(&c.bench, g, "drain").await;
    }
    let (_drainer, seen) = groups::drain(&c.bench, &c.groups, "drain", Duration::from_secs(2));
    c.new_version().await;
    let (code, stdout, stderr) = c.roll(&FAST).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(terminated_order(&stdout), ["1", "2", "3"], "{stdout}");
    assert!(stdout.contains("waits in Terminating:Wait"), "{stdout}");
    assert!(stdout.contains("Launch resumed"), "{stdout}");
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the drains were seen");
    for group in &seen {
        assert_eq!(
            group.len(),
            1,
            "no replacement beside an instance in Terminating:Wait: {group:?}"
        );
    }
    for g in &c.groups {
        let (code, stdout, _) =
            Cluster::output(c.raw(&["plan", "--asg", g, "--allow-downtime"])).await;
        assert_eq!(code, 0, "{g}: Launch was resumed: {stdout}");
    }
}

/// cps-roll against an endpoint that refuses connections, with static credentials: every
/// request fails transiently and is retried.
fn unreachable_roll(args: &[&str]) -> tokio::process::Command {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AWS_REGION", "us-east-1")
        .env("CPS_AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Sends `signal` to a child once `ready` has seen a line of its stderr, and returns its exit
/// code and output. The waits are bounds for the test, far below the roll's own timeout.
async fn signal_when(
    mut cmd: tokio::process::Command,
    ready: impl Fn(&str) -> bool,
    signal: i32,
) -> (Option<i32>, String, String) {
    let mut child = cmd.spawn().expect("cps-roll starts");
    let pid = child.id().unwrap() as i32;
    let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stderr = String::new();
    let seen = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = err.next_line().await {
            stderr.push_str(&line);
            stderr.push('\n');
            if ready(&line) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(seen, Ok(true), "the moment to signal came: {stderr}");
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(pid, signal) };
    let rest = async {
        while let Ok(Some(line)) = err.next_line().await {
            stderr.push_str(&line);
            stderr.push('\n');
        }
    };
    let out = tokio::time::timeout(Duration::from_secs(30), async {
        rest.await;
        child.wait_with_output().await
    })
    .await
    .expect("cps-roll ends promptly after the signal")
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

/// SIGTERM (systemd, Terraform cancelling, a CI timeout) and SIGINT end a run that is
/// retrying requests with nothing in flight at once: exit 6, nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_ends_retries_at_once() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let cmd = unreachable_roll(&["run", "--cluster", "sig", "--timeout", "10m"]);
        let (code, stdout, stderr) = signal_when(cmd, |l| l.contains("retrying"), signal).await;
        assert_eq!(code, Some(6), "signal {signal}: {stdout}\n{stderr}");
        assert!(stdout.contains("Nothing was changed"), "{stdout}");
    }
}

/// An interrupt also ends the wait for the cluster health command before the first change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_ends_the_health_wait_before_the_first_change() {
    let Some(c) = Cluster::start("gate", 3, Duration::from_millis(500)).await else {
        return;
    };
    c.new_version().await;
    // Node 3 is being replaced (a run died): the roll waits for it, then for the health
    // command, which keeps failing.
    let old = c.bench.members(&c.groups[2]).await.unwrap()[0]
        .instance_id
        .clone();
    c.bench.terminate_in_group(&old).await.unwrap();
    let marker = c.bench.dir().join("health-ran");
    let health = format!("touch '{}'; exit 1", marker.display());
    let mut cmd = c.command(&[
        "run",
        "--poll-interval",
        "200ms",
        "--timeout",
        "10m",
        "--health-command",
        &health,
    ]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let watch = marker.clone();
    let wait = tokio::spawn(async move {
        for _ in 0..600 {
            if watch.exists() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    let mut child = cmd.spawn().unwrap();
    assert!(wait.await.unwrap(), "the health command ran");
    let after_node_3 = c.instances().await;
    // SAFETY: SIGINT to the child this test started.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("cps-roll ends promptly after the signal")
        .unwrap();
    assert_eq!(status.code(), Some(6));
    assert_eq!(c.instances().await, after_node_3, "nothing was terminated");
}
/// Without credentials nothing can succeed: cps-roll fails at once (exit 5) instead of
/// retrying for the command's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_cps_roll_fails_at_once() {
    let Some(c) = Cluster::start("nocred", 1, Duration::from_millis(500)).await else {
        return;
    };
    let empty = c.bench.dir().join("no-credentials");
    std::fs::write(&empty, "").unwrap();
    for args in [&["plan"][..], &["run", "--timeout", "10m"][..]] {
        let mut cmd = tokio::process::Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AWS_REGION", "us-east-1")
            .env("CPS_AWS_ENDPOINT", c.bench.endpoint())
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONFIG_FILE", &empty)
            .env("AWS_SHARED_CREDENTIALS_FILE", &empty)
            .args(args)
            .args(["--cluster", "nocred"])
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("cps-roll gives up without retrying for minutes")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(5), "{args:?}: {stderr}");
        assert!(stderr.contains("credentials"), "{stderr}");
        assert!(
            !stderr.contains("retrying"),
            "a permanent error is not retried: {stderr}"
        );
    }
}

/// `--version` names version, commit and build date, and the first log line of a run says the
/// same (here a run that then fails for want of a region).
#[test]
fn the_version_names_commit_and_date_and_opens_the_log() {
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    let shown = version
        .trim_end()
        .strip_prefix("cps-roll ")
        .unwrap_or_else(|| panic!("{version:?}"));
    assert!(
        shown.starts_with(concat!(env!("CARGO_PKG_VERSION"), " (commit "))
            && shown.contains(", built ")
            && shown.ends_with(')'),
        "{version:?}"
    );
    let run = std::process::Command::new(BIN)
        .args(["--log-format", "json", "plan", "--asg", "nothing"])
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap_or("")).unwrap();
    assert_eq!(first["version"], shown, "{log}");
}
