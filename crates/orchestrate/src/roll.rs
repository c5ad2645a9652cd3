//! The rolling update: find a cluster's nodes, tell which are outdated, and replace them one at
//! a time — never more than `max_unavailable` out of service — each gated on its replacement
//! being InService and Healthy (which the launch lifecycle hook ties to cluster health).
//!
//! State lives in the cloud only. Every step starts from a fresh look at the groups, so a
//! re-run after an interrupt or a failure resumes: replaced nodes are up to date and drop out,
//! a replacement still booting is waited for, a stuck node on a bad version is replaced first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cps_provider::{
    GroupService, LaunchSource, LifecycleResult, LifecycleService, ScalingGroup, TemplateService,
    TemplateVersions,
};
use serde::Serialize;
use tokio::time::Instant;

use crate::Error;
use crate::backoff::{RetryPolicy, hash_str, retry};

/// Which groups make up the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Every group tagged `tag` = `name`.
    Cluster { tag: String, name: String },
    /// These groups, by name.
    Groups(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct RollSettings {
    pub targets: Targets,
    /// The group tag that names a single-instance group's node (e.g. `cps:node-id`).
    pub node_id_tag: String,
    /// Replace every selected node, outdated or not.
    pub force: bool,
    /// Only these nodes (node ids, or instance ids in multi-instance groups); empty: all.
    pub only: Vec<String>,
    pub max_unavailable: usize,
    /// Clusters of fewer than 3 nodes lose service during any replacement; roll them anyway.
    pub allow_downtime: bool,
    /// Wait (up to `timeout`) for unhealthy nodes instead of refusing to start.
    pub wait_healthy: bool,
    /// How long one replacement may take to become InService and Healthy (and to pass the
    /// health command), and how long the roll waits for the cluster to be healthy enough.
    pub timeout: Duration,
    /// Time between looks at the groups.
    pub poll_interval: Duration,
    pub retry: RetryPolicy,
}

impl RollSettings {
    pub fn new(targets: Targets) -> Self {
        Self {
            targets,
            node_id_tag: "cps:node-id".into(),
            force: false,
            only: Vec::new(),
            max_unavailable: 1,
            allow_downtime: false,
            wait_healthy: false,
            timeout: Duration::from_secs(600),
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy::within(Duration::from_secs(120)),
        }
    }
}

/// The cloud a roll works on.
#[derive(Clone, Copy)]
pub struct RollClouds<'a> {
    pub groups: &'a dyn GroupService,
    pub templates: &'a dyn TemplateService,
}

/// Cluster-level checks the operator supplies (commands, in the binary).
#[async_trait]
pub trait ClusterChecks: Send + Sync {
    /// The node id of the current leader; `None` when no leader check is configured.
    async fn leader(&self) -> Result<Option<String>, String>;

    /// One try of the cluster-level health check after `node` was replaced; `Ok` when healthy
    /// or when no check is configured. Retried until it passes or the timeout expires.
    async fn healthy(&self, node: &str) -> Result<(), String>;
}

/// No leader and no health command: Auto Scaling's InService and Healthy is the gate.
pub struct NoChecks;

#[async_trait]
impl ClusterChecks for NoChecks {
    async fn leader(&self) -> Result<Option<String>, String> {
        Ok(None)
    }
    async fn healthy(&self, _node: &str) -> Result<(), String> {
        Ok(())
    }
}

/// One node as the roll sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub node: String,
    pub group: String,
    /// `None`: the group is short of an instance (one is about to launch).
    pub instance_id: Option<String>,
    pub lifecycle_state: String,
    pub health_status: String,
    /// What the instance was launched from (`name vN`).
    pub current: String,
    /// What its group launches now.
    pub target: String,
    /// The launch template version numbers (`$Latest`/`$Default` resolved); `None` when
    /// unknown or for a launch configuration.
    pub current_version: Option<i64>,
    pub target_version: Option<i64>,
    pub outdated: bool,
    pub available: bool,
}

impl NodeView {
    fn booting(&self) -> bool {
        self.instance_id.is_none() || self.lifecycle_state.starts_with("Pending")
    }
}

/// The groups' capacity and how much of it is in service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupCapacity {
    pub group: String,
    pub desired: usize,
    pub available: usize,
}

/// The cluster at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// In node order: node ids compare as numbers when both are numbers.
    pub nodes: Vec<NodeView>,
    pub groups: Vec<GroupCapacity>,
}

impl Snapshot {
    /// Nodes the cluster should have: the groups' desired capacity.
    pub fn size(&self) -> usize {
        self.groups.iter().map(|g| g.desired).sum()
    }

    /// Nodes out of service: per group, desired minus InService-and-Healthy.
    pub fn unavailable(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.desired.saturating_sub(g.available))
            .sum()
    }

    fn group(&self, name: &str) -> Option<&GroupCapacity> {
        self.groups.iter().find(|g| g.group == name)
    }

    fn has_instance(&self, group: &str, instance_id: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.group == group && n.instance_id.as_deref() == Some(instance_id))
    }

    fn node(&self, instance_id: &str) -> Option<&NodeView> {
        self.nodes
            .iter()
            .find(|n| n.instance_id.as_deref() == Some(instance_id))
    }

    fn group_states(&self, group: &str) -> String {
        let states: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.group == group)
            .map(|n| match &n.instance_id {
                Some(id) => format!(
                    "{id} {} {} ({})",
                    n.lifecycle_state, n.health_status, n.current
                ),
                None => "an instance not launched yet".into(),
            })
            .collect();
        if states.is_empty() {
            "no instances".into()
        } else {
            states.join(", ")
        }
    }
}

/// What the roll will do with a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Outdated (or forced): terminate, wait for the replacement.
    Replace,
    /// Outdated and already out of service (e.g. stuck on a bad version): replaced first;
    /// terminating it costs no availability.
    ReplaceStuck,
    /// Up to date.
    Keep,
    /// Left out by `--only`.
    Skip,
    /// On its way in (a replacement still booting): waited for.
    Wait,
    /// Up to date but out of service: the roll refuses to start (or waits, `--wait-healthy`).
    Blocked,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Replace => "replace",
            Self::ReplaceStuck => "replace (stuck)",
            Self::Keep => "keep",
            Self::Skip => "skip",
            Self::Wait => "wait (booting)",
            Self::Blocked => "blocked (unhealthy)",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanRow {
    #[serde(flatten)]
    pub node: NodeView,
    pub action: Action,
}

/// What `cps-roll plan` shows and `run` starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub rows: Vec<PlanRow>,
    pub size: usize,
    pub unavailable: usize,
    pub max_unavailable: usize,
    /// The nodes `run` replaces, in order (node ids; the leader, when a leader command names
    /// one, goes last at run time).
    pub order: Vec<String>,
    /// Why the roll cannot start; empty when it can.
    pub refusals: Vec<String>,
}

impl Plan {
    /// The nodes to replace, in order: stuck ones first, then node order.
    pub fn queue(&self) -> Vec<&NodeView> {
        let stuck = self
            .rows
            .iter()
            .filter(|r| r.action == Action::ReplaceStuck);
        let rest = self.rows.iter().filter(|r| r.action == Action::Replace);
        stuck.chain(rest).map(|r| &r.node).collect()
    }

    fn blocked(&self) -> Vec<&NodeView> {
        self.rows
            .iter()
            .filter(|r| r.action == Action::Blocked)
            .map(|r| &r.node)
            .collect()
    }
}

/// Progress of a run, as it happens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RollEvent {
    /// The roll is waiting (for health, for a booting node, for the cluster to recover).
    Waiting { what: String },
    /// A node's instance is being terminated; its group launches the replacement.
    Terminating {
        node: String,
        group: String,
        instance_id: String,
        from: String,
        to: String,
    },
    /// The replacement is InService and Healthy (and passed the health command).
    Replaced {
        node: String,
        old_instance: String,
        new_instance: Option<String>,
        took: Duration,
    },
    /// The leader command named this node; it goes last.
    Leader { node: String },
    /// Interrupt acknowledged: no new node starts; in-flight ones settle first.
    Stopping { in_flight: Vec<String> },
}

/// How a run ended (cloud errors are `Err`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RollOutcome {
    /// Nothing outdated: no change made.
    UpToDate,
    Completed,
    /// Preflight refused; nothing was changed.
    Refused {
        reasons: Vec<String>,
    },
    /// A replacement did not become healthy, or the cluster did not recover in time.
    Stopped {
        node: Option<String>,
        reason: String,
    },
    /// Interrupted; every node started has settled. A re-run resumes.
    Interrupted,
}

#[derive(Clone, Debug)]
pub struct RollReport {
    pub outcome: RollOutcome,
    /// Node ids replaced by this run, in order.
    pub replaced: Vec<String>,
    /// Node ids still to replace when the run ended.
    pub remaining: Vec<String>,
    /// The cluster as last seen.
    pub last: Snapshot,
    /// What the operator should do next (empty on success).
    pub recovery: Vec<String>,
}

/// Looks at the cluster: its groups (batched, paginated) and, when a group launches
/// `$Latest`/`$Default`, what those stand for.
pub async fn observe(clouds: RollClouds<'_>, settings: &RollSettings) -> Result<Snapshot, Error> {
    Ok(observe_resolving(clouds, settings).await?.0)
}

type Versions = BTreeMap<String, TemplateVersions>;

/// The groups as they are now, with versions resolved earlier (a run fixes its targets at the
/// start, so later looks need the groups' states only: one request per 100 groups).
async fn look(
    clouds: RollClouds<'_>,
    settings: &RollSettings,
    versions: &Versions,
) -> Result<Snapshot, Error> {
    let groups = describe(clouds, settings).await?;
    Ok(snapshot(&groups, versions, &settings.node_id_tag))
}

async fn describe(
    clouds: RollClouds<'_>,
    settings: &RollSettings,
) -> Result<Vec<ScalingGroup>, Error> {
    retry(settings.retry, "DescribeAutoScalingGroups", 0, || async {
        match &settings.targets {
            Targets::Cluster { tag, name } => clouds.groups.groups_tagged(tag, name).await,
            Targets::Groups(names) => clouds.groups.groups_named(names).await,
        }
    })
    .await
    .map(name_templates)
    .map_err(Error::cloud("describing the cluster's groups"))
}

/// Gives every launch template reference both its id and its name where any reference in the
/// groups shows the pair (an override may name its template either way; instances report
/// both), so templates compare by id and show by name.
fn name_templates(mut groups: Vec<ScalingGroup>) -> Vec<ScalingGroup> {
    fn sources(g: &mut ScalingGroup) -> impl Iterator<Item = &mut LaunchSource> {
        g.launch
            .iter_mut()
            .chain(g.overrides.iter_mut().map(|o| &mut o.launch))
            .chain(g.instances.iter_mut().filter_map(|i| i.launch.as_mut()))
    }
    let mut pairs: BTreeMap<String, String> = BTreeMap::new();
    for g in &mut groups {
        for l in sources(g) {
            if let LaunchSource::Template { id, name, .. } = l
                && !id.is_empty()
                && !name.is_empty()
            {
                pairs.insert(id.clone(), name.clone());
            }
        }
    }
    for g in &mut groups {
        for l in sources(g) {
            let LaunchSource::Template { id, name, .. } = l else {
                continue;
            };
            if name.is_empty() {
                if let Some(n) = pairs.get(id.as_str()) {
                    name.clone_from(n);
                }
            } else if id.is_empty()
                && let Some((i, _)) = pairs.iter().find(|(_, n)| *n == name)
            {
                id.clone_from(i);
            }
        }
    }
    groups
}

/// A full look: the groups and what their `$Latest`/`$Default` stand for.
async fn observe_resolving(
    clouds: RollClouds<'_>,
    settings: &RollSettings,
) -> Result<(Snapshot, Versions), Error> {
    let groups = describe(clouds, settings).await?;
    // Only the groups' templates: an instance's own version is a number (a symbolic one is
    // treated as unknown), and a deleted template an old instance came from must not fail the
    // whole lookup.
    let symbolic: BTreeSet<String> = groups
        .iter()
        .flat_map(|g| g.launch.iter().chain(g.overrides.iter().map(|o| &o.launch)))
        .filter_map(|l| match l {
            LaunchSource::Template { id, version, .. } if version.starts_with('$') => {
                Some(id.clone())
            }
            _ => None,
        })
        .collect();
    let versions: Versions = if symbolic.is_empty() {
        BTreeMap::new()
    } else {
        let ids: Vec<String> = symbolic.into_iter().collect();
        retry(settings.retry, "DescribeLaunchTemplates", 0, || {
            clouds.templates.template_versions(&ids)
        })
        .await
        .map_err(Error::cloud(
            "resolving $Latest/$Default launch template versions",
        ))?
        .into_iter()
        .map(|v| (v.id.clone(), v))
        .collect()
    };
    Ok((
        snapshot(&groups, &versions, &settings.node_id_tag),
        versions,
    ))
}

/// A template version as a number: `$Latest`/`$Default` resolved, `None` when unknown.
fn resolve(version: &str, id: &str, versions: &BTreeMap<String, TemplateVersions>) -> Option<i64> {
    match version {
        "$Latest" => versions.get(id).map(|v| v.latest_version),
        "$Default" => versions.get(id).map(|v| v.default_version),
        n => n.parse().ok(),
    }
}

/// The version number a launch source stands for, when it is a template's.
fn number(source: Option<&LaunchSource>, versions: &Versions) -> Option<i64> {
    match source {
        Some(LaunchSource::Template { id, version, .. }) => resolve(version, id, versions),
        _ => None,
    }
}

fn label(source: Option<&LaunchSource>, versions: &BTreeMap<String, TemplateVersions>) -> String {
    match source {
        Some(LaunchSource::Template { id, name, version }) => {
            let shown = if name.is_empty() { id } else { name };
            match resolve(version, id, versions) {
                Some(n) if version.starts_with('$') => format!("{shown} v{n} ({version})"),
                Some(n) => format!("{shown} v{n}"),
                None => format!("{shown} {version}"),
            }
        }
        Some(LaunchSource::Configuration { name }) => format!("launch configuration {name}"),
        None => "-".into(),
    }
}

/// Whether an instance launched from `current` differs from what its group launches now.
/// Unknown stays unknown: a group with no launch source makes nothing outdated; an instance
/// that does not say what it came from, or an unresolvable version, counts as outdated.
fn is_outdated(
    target: Option<&LaunchSource>,
    current: Option<&LaunchSource>,
    versions: &BTreeMap<String, TemplateVersions>,
) -> bool {
    match (target, current) {
        (None, _) => false,
        (
            Some(LaunchSource::Template {
                id: want_id,
                version: want,
                ..
            }),
            Some(LaunchSource::Template { id, version, .. }),
        ) => {
            if want_id != id {
                return true;
            }
            // What `$Latest` stood for at the instance's launch is not known today.
            match (
                resolve(want, want_id, versions),
                version.parse::<i64>().ok(),
            ) {
                (Some(a), Some(b)) => a != b,
                _ => true,
            }
        }
        (
            Some(LaunchSource::Configuration { name: want }),
            Some(LaunchSource::Configuration { name }),
        ) => want != name,
        _ => true,
    }
}

/// Node ids order as numbers when both are numbers ("2" before "10"), else as text.
fn node_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        _ => a.cmp(b),
    }
}

/// The cluster's nodes from its groups. A single-instance group is one node named by its
/// node-id tag (or the group's name); in a multi-instance group every instance is a node.
pub fn snapshot(
    groups: &[ScalingGroup],
    versions: &BTreeMap<String, TemplateVersions>,
    node_id_tag: &str,
) -> Snapshot {
    let mut nodes = Vec::new();
    let mut capacity = Vec::new();
    for g in groups {
        let desired = g.desired_capacity.max(0) as usize;
        let single = desired <= 1;
        // An instance on its way out (Terminating…, Detaching…) is no node any more; it only
        // shows in the group's capacity as not in service.
        let members: Vec<&cps_provider::GroupInstance> = g
            .instances
            .iter()
            .filter(|i| !leaving(&i.lifecycle_state))
            .collect();
        let base = g
            .tags
            .get(node_id_tag)
            .cloned()
            .unwrap_or_else(|| g.name.clone());
        let target = label(g.launch.as_ref(), versions);
        for i in &members {
            // A mixed-instances override with its own template is what this instance's type
            // launches from.
            let want = g.launch_for(i);
            nodes.push(NodeView {
                node: if single {
                    base.clone()
                } else {
                    i.instance_id.clone()
                },
                group: g.name.clone(),
                instance_id: Some(i.instance_id.clone()),
                lifecycle_state: i.lifecycle_state.clone(),
                health_status: i.health_status.clone(),
                current: label(i.launch.as_ref(), versions),
                target: label(want, versions),
                current_version: number(i.launch.as_ref(), versions),
                target_version: number(want, versions),
                outdated: is_outdated(want, i.launch.as_ref(), versions),
                available: i.available(),
            });
        }
        for _ in members.len()..desired {
            nodes.push(NodeView {
                node: if single {
                    base.clone()
                } else {
                    format!("{}/(launching)", g.name)
                },
                group: g.name.clone(),
                instance_id: None,
                lifecycle_state: "Launching".into(),
                health_status: "-".into(),
                current: "-".into(),
                target: target.clone(),
                current_version: None,
                target_version: number(g.launch.as_ref(), versions),
                outdated: false,
                available: false,
            });
        }
        capacity.push(GroupCapacity {
            group: g.name.clone(),
            desired,
            available: g.instances.iter().filter(|i| i.available()).count(),
        });
    }
    nodes.sort_by(|a, b| {
        node_order(&a.node, &b.node)
            .then_with(|| a.group.cmp(&b.group))
            .then_with(|| a.instance_id.cmp(&b.instance_id))
    });
    capacity.sort_by(|a, b| a.group.cmp(&b.group));
    Snapshot {
        nodes,
        groups: capacity,
    }
}

fn leaving(state: &str) -> bool {
    state.starts_with("Terminat") || state.starts_with("Detach") || state == "Warmed:Terminated"
}

/// The most nodes that may be out at once and still leave a majority (n/2 + 1) up.
pub fn quorum_allows(size: usize) -> usize {
    size.saturating_sub(size / 2 + 1)
}

/// Decides every node's action and whether the roll may start.
pub fn plan(snapshot: &Snapshot, settings: &RollSettings) -> Plan {
    let selected = |n: &NodeView| {
        settings.only.is_empty()
            || settings.only.iter().any(|o| {
                *o == n.node || n.instance_id.as_deref() == Some(o.as_str()) || *o == n.group
            })
    };
    let rows: Vec<PlanRow> = snapshot
        .nodes
        .iter()
        .map(|n| {
            let action = if n.instance_id.is_none() {
                Action::Wait
            } else if (n.outdated || settings.force) && selected(n) {
                if n.available {
                    Action::Replace
                } else {
                    Action::ReplaceStuck
                }
            } else if n.available {
                if n.outdated {
                    Action::Skip
                } else {
                    Action::Keep
                }
            } else if n.booting() {
                Action::Wait
            } else {
                Action::Blocked
            };
            PlanRow {
                node: n.clone(),
                action,
            }
        })
        .collect();
    let size = snapshot.size();
    let mut refusals = Vec::new();
    if snapshot.groups.is_empty() {
        refusals.push(match &settings.targets {
            Targets::Cluster { tag, name } => {
                format!("no Auto Scaling group is tagged {tag}={name}; check --cluster and --cluster-tag")
            }
            Targets::Groups(names) => format!("none of the groups exist: {}", names.join(", ")),
        });
    } else if let Targets::Groups(names) = &settings.targets {
        let missing: Vec<&str> = names
            .iter()
            .filter(|n| snapshot.group(n).is_none())
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            refusals.push(format!(
                "these groups do not exist: {}; check --asg",
                missing.join(", ")
            ));
        }
    }
    for o in &settings.only {
        if !snapshot
            .nodes
            .iter()
            .any(|n| n.node == *o || n.instance_id.as_deref() == Some(o.as_str()) || n.group == *o)
        {
            refusals.push(format!(
                "--only {o}: no such node, instance or group in the cluster"
            ));
        }
    }
    if settings.max_unavailable == 0 {
        refusals.push("--max-unavailable must be at least 1".into());
    } else if snapshot.groups.is_empty() {
        // No groups, no cluster: the refusal above says so; a quorum line would mislead.
    } else if size > 0 && size < 3 {
        if !settings.allow_downtime {
            refusals.push(format!(
                "the cluster has {size} node(s): replacing any of them is downtime (no majority survives); \
                 pass --allow-downtime to roll it anyway"
            ));
        } else if settings.max_unavailable > 1 {
            refusals.push(format!(
                "--max-unavailable {} on a {size}-node cluster takes it all down; use 1",
                settings.max_unavailable
            ));
        }
    } else if settings.max_unavailable > quorum_allows(size) {
        refusals.push(format!(
            "--max-unavailable {} would leave {} of {size} nodes up, fewer than a majority ({}); at most {} for this cluster",
            settings.max_unavailable,
            size - settings.max_unavailable.min(size),
            size / 2 + 1,
            quorum_allows(size)
        ));
    }
    let mut plan = Plan {
        rows,
        size,
        unavailable: snapshot.unavailable(),
        max_unavailable: settings.max_unavailable,
        order: Vec::new(),
        refusals,
    };
    plan.order = plan.queue().iter().map(|n| n.node.clone()).collect();
    if !settings.wait_healthy {
        let blocked: Vec<String> = plan
            .blocked()
            .iter()
            .map(|n| {
                format!(
                    "node {} ({} in {}) is {} and {}",
                    n.node,
                    n.instance_id.as_deref().unwrap_or("-"),
                    n.group,
                    n.lifecycle_state,
                    n.health_status
                )
            })
            .collect();
        if !blocked.is_empty() {
            plan.refusals.push(format!(
                "not every node is InService and Healthy: {}; fix them or pass --wait-healthy to wait up to the timeout",
                blocked.join("; ")
            ));
        }
    }
    plan
}

/// A node being replaced.
struct InFlight {
    node: String,
    group: String,
    instance_id: String,
    since: Instant,
}

/// Runs the roll. `stop` is the interrupt: once set, no new node starts and the run returns
/// when the ones in flight have settled (or failed).
pub async fn run(
    clouds: RollClouds<'_>,
    checks: &dyn ClusterChecks,
    settings: &RollSettings,
    stop: &AtomicBool,
    progress: &(dyn Fn(RollEvent) + Send + Sync),
) -> Result<RollReport, Error> {
    let (mut snap, versions) = observe_resolving(clouds, settings).await?;
    let first = plan(&snap, settings);
    let mut report = RollReport {
        outcome: RollOutcome::Completed,
        replaced: Vec::new(),
        remaining: first.queue().iter().map(|n| n.node.clone()).collect(),
        last: snap.clone(),
        recovery: Vec::new(),
    };
    if !first.refusals.is_empty() {
        report.outcome = RollOutcome::Refused {
            reasons: first.refusals,
        };
        return Ok(report);
    }
    let nothing_booting = !first.rows.iter().any(|r| r.action == Action::Wait);
    if report.remaining.is_empty() && nothing_booting && first.blocked().is_empty() {
        report.outcome = RollOutcome::UpToDate;
        return Ok(report);
    }
    // The targets are fixed now: (node, group, instance). A node is done when that instance
    // has left its group and the group is back to full strength.
    let mut queue: Vec<(String, String, String)> = first
        .queue()
        .iter()
        .filter_map(|n| Some((n.node.clone(), n.group.clone(), n.instance_id.clone()?)))
        .collect();
    let mut in_flight: Vec<InFlight> = Vec::new();
    let mut stalled_since: Option<Instant> = None;
    let mut stopping_said = false;
    let mut last_wait: Option<String> = None;
    // The leader last announced, so a leader that stays the same is said once.
    let mut leader_said: Option<String> = None;
    // Nodes were booting or unhealthy at the start: check the cluster before the first change.
    let mut gate_first = first
        .rows
        .iter()
        .any(|r| matches!(r.action, Action::Wait | Action::Blocked));
    let max = settings.max_unavailable;

    // Bounded: every pass either settles, starts or waits a poll interval, and every wait is
    // bounded by `timeout` (per node in flight, or while stalled); starts are bounded by the
    // queue.
    loop {
        let mut just_started = false;
        // 1. Settle what is in flight.
        let mut i = 0;
        while i < in_flight.len() {
            let f = &in_flight[i];
            let gone = !snap.has_instance(&f.group, &f.instance_id);
            let full = snap
                .group(&f.group)
                .is_some_and(|g| g.available >= g.desired);
            if gone && full {
                let f = in_flight.remove(i);
                if let Err(detail) = health_gate(checks, settings, &f.node).await {
                    report.last = look(clouds, settings, &versions)
                        .await
                        .unwrap_or(snap.clone());
                    let mut flying: Vec<String> = vec![f.node.clone()];
                    flying.extend(in_flight.iter().map(|f| f.node.clone()));
                    return Ok(stopped(
                        report,
                        Some((f.node, f.group)),
                        detail,
                        &queue,
                        &flying,
                    ));
                }
                let new_instance = snap
                    .nodes
                    .iter()
                    .find(|n| n.group == f.group && n.node == f.node)
                    .and_then(|n| n.instance_id.clone());
                progress(RollEvent::Replaced {
                    node: f.node.clone(),
                    old_instance: f.instance_id.clone(),
                    new_instance,
                    took: f.since.elapsed(),
                });
                report.replaced.push(f.node);
                continue;
            }
            if f.since.elapsed() >= settings.timeout {
                let reason = format!(
                    "the replacement of node {} ({} terminated) is not InService and Healthy after {}s; group {}: {}",
                    f.node,
                    f.instance_id,
                    settings.timeout.as_secs(),
                    f.group,
                    snap.group_states(&f.group)
                );
                let failed = (f.node.clone(), f.group.clone());
                let flying: Vec<String> = in_flight.iter().map(|f| f.node.clone()).collect();
                report.last = snap;
                return Ok(stopped(report, Some(failed), reason, &queue, &flying));
            }
            i += 1;
        }

        // 2. An interrupt: start nothing new; return once nothing is in flight.
        if stop.load(Ordering::SeqCst) {
            if in_flight.is_empty() {
                report.outcome = RollOutcome::Interrupted;
                report.remaining = queue.iter().map(|q| q.0.clone()).collect();
                report.last = snap;
                report.recovery = vec![
                    "Every node started has settled. Re-run the same `cps-roll run` command to continue.".into(),
                ];
                return Ok(report);
            }
            if !stopping_said {
                stopping_said = true;
                progress(RollEvent::Stopping {
                    in_flight: in_flight.iter().map(|f| f.node.clone()).collect(),
                });
            }
        } else {
            // 3. Start what the budget allows.
            queue.retain(|(node, group, instance)| {
                let present = snap.has_instance(group, instance);
                if !present {
                    progress(RollEvent::Waiting {
                        what: format!(
                            "node {node}: {instance} left {group} on its own; its replacement launches from the group's current template"
                        ),
                    });
                }
                present
            });
            let mut started = false;
            // After a resume or a wait for health: the cluster check passes before the first
            // termination, as it would have after the node that was settling.
            if gate_first && !queue.is_empty() && snap.unavailable() == 0 && in_flight.is_empty() {
                gate_first = false;
                if let Err(detail) = health_gate(checks, settings, "the cluster").await {
                    report.last = snap;
                    return Ok(stopped(report, None, detail, &queue, &[]));
                }
            }
            let any_stuck = queue
                .iter()
                .any(|(_, _, i)| snap.node(i).is_none_or(|n| !n.available));
            let may_start = !gate_first && (any_stuck || unavailable_now(&snap, &in_flight) < max);
            if !queue.is_empty() && may_start {
                // `None`: the leader is unknown (its command failed with nodes in flight), so no
                // node starts on this pass.
                let leader: Option<Option<String>> = if queue.len() + in_flight.len() > 1 {
                    match checks.leader().await {
                        Ok(l) => Some(l),
                        // Nothing in flight: stop before any change. Otherwise let the nodes
                        // in flight settle and ask again on the next pass.
                        Err(detail) if in_flight.is_empty() => {
                            return Err(Error::Check {
                                what: "the leader command".into(),
                                detail,
                            });
                        }
                        Err(detail) => {
                            progress(RollEvent::Waiting {
                                what: format!("the leader command failed ({detail}); asking again"),
                            });
                            None
                        }
                    }
                } else {
                    Some(None)
                };
                'start: {
                    let Some(leader) = leader else {
                        break 'start;
                    };
                    if let Some(l) = &leader
                        && leader_said.as_ref() != Some(l)
                        && queue.iter().any(|(node, _, _)| node == l)
                    {
                        progress(RollEvent::Leader { node: l.clone() });
                        leader_said = Some(l.clone());
                    }
                    let Some(pos) = next_candidate(&snap, &queue, &in_flight, leader.as_deref())
                    else {
                        break 'start;
                    };
                    if stop.load(Ordering::SeqCst) {
                        break 'start;
                    }
                    let (node, group, instance) = queue[pos].clone();
                    let stuck = snap.node(&instance).is_none_or(|n| !n.available);
                    if !stuck && unavailable_now(&snap, &in_flight) >= max {
                        break 'start;
                    }
                    let view = snap.node(&instance);
                    progress(RollEvent::Terminating {
                        node: node.clone(),
                        group: group.clone(),
                        instance_id: instance.clone(),
                        from: view.map(|n| n.current.clone()).unwrap_or_default(),
                        to: view.map(|n| n.target.clone()).unwrap_or_default(),
                    });
                    retry(
                        settings.retry,
                        "TerminateInstanceInAutoScalingGroup",
                        hash_str(&instance),
                        || clouds.groups.terminate_in_group(&instance),
                    )
                    .await
                    .map_err(Error::cloud("terminating an outdated instance"))?;
                    queue.remove(pos);
                    in_flight.push(InFlight {
                        node,
                        group,
                        instance_id: instance,
                        since: Instant::now(),
                    });
                    started = true;
                    // One start per look: the next one is decided on a fresh look, so a node
                    // that failed meanwhile counts.
                }
            }
            just_started = started;
            if queue.is_empty() && in_flight.is_empty() && snap.unavailable() == 0 {
                report.outcome = RollOutcome::Completed;
                report.remaining.clear();
                report.last = snap;
                return Ok(report);
            }
            // 4. Nothing moving and nothing allowed to start: the cluster must recover first.
            if in_flight.is_empty() && !started {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= settings.timeout {
                    let reason = format!(
                        "the cluster did not recover within {}s: {} of {} nodes out of service, --max-unavailable {}",
                        settings.timeout.as_secs(),
                        snap.unavailable(),
                        snap.size(),
                        max
                    );
                    report.last = snap;
                    return Ok(stopped(report, None, reason, &queue, &[]));
                }
                let what = format!(
                    "{} of {} nodes out of service (at most {} may be): waiting for {}",
                    snap.unavailable(),
                    snap.size(),
                    max,
                    out_of_service(&snap)
                );
                if last_wait.as_ref() != Some(&what) {
                    progress(RollEvent::Waiting { what: what.clone() });
                    last_wait = Some(what);
                }
            } else {
                stalled_since = None;
                last_wait = None;
            }
        }

        if !just_started {
            tokio::time::sleep(settings.poll_interval).await;
        }
        snap = look(clouds, settings, &versions).await?;
    }
}

/// Out of service now: what the groups show, plus every node in flight the snapshot still
/// lists as available (terminated since the look, or not yet shown as leaving by AWS).
fn unavailable_now(snap: &Snapshot, in_flight: &[InFlight]) -> usize {
    let unseen = in_flight
        .iter()
        .filter(|f| snap.node(&f.instance_id).is_some_and(|n| n.available))
        .count();
    snap.unavailable() + unseen
}

/// The next node to start: one already out of service first (replacing it costs nothing), else
/// queue order; the leader only when it is the last one left and nothing else is in flight.
fn next_candidate(
    snap: &Snapshot,
    queue: &[(String, String, String)],
    in_flight: &[InFlight],
    leader: Option<&str>,
) -> Option<usize> {
    let stuck = |i: &str| snap.node(i).is_none_or(|n| !n.available);
    let eligible = |node: &str| Some(node) != leader;
    queue
        .iter()
        .position(|(node, _, i)| eligible(node) && stuck(i))
        .or_else(|| queue.iter().position(|(node, _, _)| eligible(node)))
        .or_else(|| (in_flight.is_empty() && !queue.is_empty()).then_some(0))
}

fn out_of_service(snap: &Snapshot) -> String {
    let out: Vec<String> = snap
        .nodes
        .iter()
        .filter(|n| !n.available)
        .map(|n| {
            format!(
                "node {} ({} {})",
                n.node,
                n.instance_id.as_deref().unwrap_or("launching"),
                n.lifecycle_state
            )
        })
        .collect();
    if out.is_empty() {
        "the groups to report it".into()
    } else {
        out.join(", ")
    }
}

/// Now plus `d`, saturating: a library caller's absurd duration means "a very long time", never
/// an overflow panic.
fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Runs the cluster health check until it passes or the timeout expires.
async fn health_gate(
    checks: &dyn ClusterChecks,
    settings: &RollSettings,
    node: &str,
) -> Result<(), String> {
    let deadline = later(settings.timeout);
    let mut last;
    // Bounded by the deadline.
    loop {
        match checks.healthy(node).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        if later(settings.poll_interval) >= deadline {
            return Err(format!(
                "the cluster health command did not pass within {}s after {node}: {last}",
                settings.timeout.as_secs()
            ));
        }
        tokio::time::sleep(settings.poll_interval).await;
    }
}

/// Ends the run: `failed` is the (node, group) that did not come back, when one did not.
fn stopped(
    mut report: RollReport,
    failed: Option<(String, String)>,
    reason: String,
    queue: &[(String, String, String)],
    in_flight: &[String],
) -> RollReport {
    report.remaining = in_flight
        .iter()
        .cloned()
        .chain(queue.iter().map(|q| q.0.clone()))
        .collect();
    let group = failed.as_ref().map(|(_, g)| g.as_str());
    report.recovery = recovery(&report.last, group, &report.remaining);
    report.outcome = RollOutcome::Stopped {
        node: failed.map(|(n, _)| n),
        reason,
    };
    report
}

/// The way out after a stop, from what the cluster looks like now: the failed node's group,
/// or every group with an instance out of service.
fn recovery(snap: &Snapshot, group: Option<&str>, remaining: &[String]) -> Vec<String> {
    let mut steps = Vec::new();
    for n in snap
        .nodes
        .iter()
        .filter(|n| group.is_none_or(|g| n.group == g) && !n.available)
    {
        if let Some(id) = &n.instance_id {
            steps.push(format!(
                "Look at why {id} did not come up: its boot log (`journalctl -u cps-attach` on the instance, or `aws ec2 get-console-output --instance-id {id}`)."
            ));
            if n.lifecycle_state == "Pending:Wait" {
                steps.push(format!(
                    "It waits in Pending:Wait until its lifecycle hook times out. To give up on it now: `cps-roll abandon --asg {} --instance {id}` (ABANDON: the group terminates it and launches another).",
                    n.group
                ));
            }
        }
    }
    steps.push(
        "If the new launch template is at fault, point the group(s) back at the last good version (or publish a fixed one); \
         the next run replaces the nodes still on the bad version first, the stuck one included."
            .into(),
    );
    steps.push("Re-run the same `cps-roll run` command: it resumes from what AWS shows, replacing only nodes still outdated.".into());
    if !remaining.is_empty() {
        steps.push(format!(
            "Not replaced by this run: {}.",
            remaining.join(", ")
        ));
    }
    steps
}

/// Ends the launch lifecycle action of an instance stuck in Pending:Wait with ABANDON, so the
/// group replaces it now instead of at the hook's timeout. Only a waiting instance is touched:
/// one in any other state is refused, and without `instance` the group must have exactly one
/// waiting (with several, some may be healthy boots in progress). Returns (instance, hook).
pub async fn abandon(
    groups: &dyn GroupService,
    lifecycle: &dyn LifecycleService,
    group: &str,
    instance: Option<&str>,
    hook: Option<&str>,
    policy: RetryPolicy,
) -> Result<(String, String), Error> {
    let names = [group.to_owned()];
    let found = retry(policy, "DescribeAutoScalingGroups", 0, || {
        groups.groups_named(&names)
    })
    .await
    .map_err(Error::cloud("describing the group"))?;
    let Some(g) = found.into_iter().find(|g| g.name == group) else {
        return Err(Error::Precondition {
            what: format!("Auto Scaling group {group} does not exist"),
        });
    };
    let id = waiting_instance(&g, instance)?;
    let hook = match hook {
        Some(h) => h.to_owned(),
        None => launch_hook(groups, group, policy).await?,
    };
    retry(policy, "CompleteLifecycleAction", hash_str(&id), || {
        lifecycle.complete(group, &hook, &id, LifecycleResult::Abandon)
    })
    .await
    .map_err(Error::cloud("completing the lifecycle action with ABANDON"))?;
    Ok((id, hook))
}

/// The one instance `abandon` may end: the one named, if it waits in Pending:Wait; else the
/// group's only waiting instance.
fn waiting_instance(g: &ScalingGroup, instance: Option<&str>) -> Result<String, Error> {
    let group = &g.name;
    let refuse = |what: String| Err(Error::Precondition { what });
    if let Some(id) = instance {
        return match g.instances.iter().find(|i| i.instance_id == id) {
            Some(i) if i.lifecycle_state == "Pending:Wait" => Ok(id.to_owned()),
            Some(i) => refuse(format!(
                "{id} in {group} is {}, not Pending:Wait; abandon only ends a waiting launch action",
                i.lifecycle_state
            )),
            None => refuse(format!("{id} is not an instance of {group}")),
        };
    }
    let waiting: Vec<&str> = g
        .instances
        .iter()
        .filter(|i| i.lifecycle_state == "Pending:Wait")
        .map(|i| i.instance_id.as_str())
        .collect();
    match waiting.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => refuse(format!(
            "no instance of {group} is in Pending:Wait; nothing to abandon"
        )),
        many => refuse(format!(
            "{} instances of {group} wait in Pending:Wait ({}); some may be healthy boots in progress, so abandon ends one at a time: name it with --instance",
            many.len(),
            many.join(", ")
        )),
    }
}

/// The group's launching lifecycle hook, when it has exactly one.
async fn launch_hook(
    groups: &dyn GroupService,
    group: &str,
    policy: RetryPolicy,
) -> Result<String, Error> {
    let hooks = retry(policy, "DescribeLifecycleHooks", 0, || {
        groups.lifecycle_hooks(group)
    })
    .await
    .map_err(Error::cloud("listing the group's lifecycle hooks"))?;
    let launching: Vec<String> = hooks
        .into_iter()
        .filter(|h| h.transition == "autoscaling:EC2_INSTANCE_LAUNCHING")
        .map(|h| h.name)
        .collect();
    match launching.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::Precondition {
            what: format!("{group} has no launching lifecycle hook"),
        }),
        many => Err(Error::Precondition {
            what: format!(
                "{group} has several launching hooks ({}); name one with --hook",
                many.join(", ")
            ),
        }),
    }
}
