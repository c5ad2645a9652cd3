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
use tokio::sync::Notify;
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
    /// `None`: no instance — one is about to launch, or the group's desired capacity is 0.
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
    /// The group counts the node towards its desired capacity, so it replaces the node when
    /// it leaves. Not for an instance in Standby or being detached, nor in a group at desired
    /// capacity 0: the roll never replaces such a node, and counts it as out of service.
    pub in_capacity: bool,
}

impl NodeView {
    fn booting(&self) -> bool {
        self.in_capacity
            && (self.instance_id.is_none() || self.lifecycle_state.starts_with("Pending"))
    }

    /// Out of service, and its group brings it back: replacing it costs no availability.
    fn stuck(&self) -> bool {
        self.in_capacity && !self.available
    }

    /// Why the roll leaves this node alone (it is out of its group's capacity), if it does.
    fn held(&self) -> Option<&'static str> {
        if self.in_capacity {
            return None;
        }
        Some(match self.lifecycle_state.as_str() {
            "Standby" | "EnteringStandby" => "in Standby",
            s if s.starts_with("Detach") => "being detached from its group",
            _ => "its group's desired capacity is 0",
        })
    }
}

/// The groups' capacity and how much of it is in service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupCapacity {
    pub group: String,
    pub desired: usize,
    pub available: usize,
    /// The cluster nodes the group stands for: one for a single-instance group, whatever its
    /// capacity; else its desired capacity plus the instances it does not count (Standby…).
    pub nodes: usize,
    /// Of those, out of service and not coming back by the group's doing (Standby, detached,
    /// desired capacity 0).
    pub held: usize,
    pub suspended_processes: Vec<String>,
}

impl GroupCapacity {
    fn out(&self) -> usize {
        self.nodes.saturating_sub(self.available)
    }
}

/// An instance on its way out: no node any more, but still holding what it held (a
/// terminating lifecycle hook keeps one in Terminating:Wait, volume and interface attached).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Leaving {
    pub group: String,
    pub instance_id: String,
    pub lifecycle_state: String,
}

/// An instance refresh in progress: Auto Scaling replaces instances on its own meanwhile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ActiveRefresh {
    pub group: String,
    pub id: String,
    pub status: String,
}

/// The cluster at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// In node order: node ids compare as numbers when both are numbers.
    pub nodes: Vec<NodeView>,
    pub groups: Vec<GroupCapacity>,
    pub leaving: Vec<Leaving>,
    /// Filled by a full look ([`observe`]) only.
    pub refreshes: Vec<ActiveRefresh>,
}

impl Snapshot {
    /// Nodes the cluster has, in service or not.
    pub fn size(&self) -> usize {
        self.groups.iter().map(|g| g.nodes).sum()
    }

    /// Nodes out of service: per group, its nodes minus its instances InService and Healthy.
    pub fn unavailable(&self) -> usize {
        self.groups.iter().map(GroupCapacity::out).sum()
    }

    /// Nodes out of service that no group brings back (Standby, detached, desired 0).
    pub fn held(&self) -> usize {
        self.groups.iter().map(|g| g.held.min(g.out())).sum()
    }

    fn group(&self, name: &str) -> Option<&GroupCapacity> {
        self.groups.iter().find(|g| g.group == name)
    }

    fn has_instance(&self, group: &str, instance_id: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.group == group && n.instance_id.as_deref() == Some(instance_id))
    }

    /// The instance is still in its group, as a node or on its way out.
    fn listed(&self, group: &str, instance_id: &str) -> bool {
        self.has_instance(group, instance_id) || self.leaving_instance(group, instance_id).is_some()
    }

    fn leaving_instance(&self, group: &str, instance_id: &str) -> Option<&Leaving> {
        self.leaving
            .iter()
            .find(|l| l.group == group && l.instance_id == instance_id)
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
                None if n.in_capacity => "an instance not launched yet".into(),
                None => "no instance (desired capacity 0)".into(),
            })
            .chain(
                self.leaving
                    .iter()
                    .filter(|l| l.group == group)
                    .map(|l| format!("{} {} (leaving)", l.instance_id, l.lifecycle_state)),
            )
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
    /// Out of its group's capacity (Standby, being detached, desired 0): never replaced, and
    /// counted as out of service.
    LeftAlone,
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
            Self::LeftAlone => "left alone (out of service)",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanRow {
    #[serde(flatten)]
    pub node: NodeView,
    pub action: Action,
    /// Why, for a node left alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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
    /// What the roll waits for on the way (an old instance held in Terminating:Wait…).
    pub notes: Vec<String>,
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

    /// Nodes left alone, with why: `node 4 (i-… in G): in Standby`.
    pub fn left_alone(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter(|r| r.action == Action::LeftAlone)
            .map(|r| {
                format!(
                    "node {} ({}{}): {}",
                    r.node.node,
                    r.node
                        .instance_id
                        .as_deref()
                        .map(|i| format!("{i} in "))
                        .unwrap_or_default(),
                    r.node.group,
                    r.reason.as_deref().unwrap_or_default()
                )
            })
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
    /// The group has a terminating lifecycle hook: its Launch process is suspended until the
    /// old instance has left, so the replacement does not boot while the old one still holds
    /// the node's volume and interface.
    LaunchHeld {
        node: String,
        group: String,
        hook: String,
    },
    /// Launch resumed on the group: the old instance has left (or the roll is ending).
    LaunchResumed { group: String },
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
    /// Nodes the roll left alone, with why (see [`Plan::left_alone`]).
    pub left_alone: Vec<String>,
    /// The cluster as last seen.
    pub last: Snapshot,
    /// What the operator should do next (empty on success).
    pub recovery: Vec<String>,
}

/// The interrupt a run watches (Ctrl-C, SIGTERM): once requested, no new node starts, a wait
/// that is not for a node in flight ends at once, and the run returns when the nodes in
/// flight have settled.
#[derive(Debug, Default)]
pub struct Stop {
    requested: AtomicBool,
    notify: Notify,
}

impl Stop {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Resolves once a stop is requested.
    pub async fn wait(&self) {
        // Made before the check: notify_waiters wakes every Notified that exists, polled or not.
        let notified = self.notify.notified();
        if self.requested() {
            return;
        }
        notified.await;
    }

    /// `work`'s result, or `None` when a stop is requested first (`work` is dropped).
    pub async fn or<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.wait() => None,
            v = work => Some(v),
        }
    }
}

/// Looks at the cluster: its groups (batched, paginated), what their `$Latest`/`$Default`
/// stand for when they launch those, and instance refreshes in progress (one request per
/// group).
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
    let mut snap = snapshot(&groups, &versions, &settings.node_id_tag);
    snap.refreshes = active_refreshes(clouds, settings, &groups).await?;
    Ok((snap, versions))
}

/// Instance refreshes in progress on any of the groups (one request per group, a few at a
/// time): a refresh replaces instances on its own, which no budget of the roll's accounts for.
async fn active_refreshes(
    clouds: RollClouds<'_>,
    settings: &RollSettings,
    groups: &[ScalingGroup],
) -> Result<Vec<ActiveRefresh>, Error> {
    let found = in_parallel(groups, |g| async move {
        retry(
            settings.retry,
            "DescribeInstanceRefreshes",
            hash_str(&g.name),
            || clouds.groups.instance_refreshes(&g.name),
        )
        .await
        .map(|refreshes| (g, refreshes))
    })
    .await;
    let mut active = Vec::new();
    for result in found {
        let (g, refreshes) =
            result.map_err(Error::cloud("looking for instance refreshes in progress"))?;
        active.extend(
            refreshes
                .into_iter()
                .filter(|r| r.active())
                .map(|r| ActiveRefresh {
                    group: g.name.clone(),
                    id: r.id,
                    status: r.status,
                }),
        );
    }
    Ok(active)
}

/// Requests per group made at once (well below Auto Scaling's describe rate).
const WIDTH: usize = 8;

/// `each` over `items`, at most [`WIDTH`] at a time, the results in item order.
async fn in_parallel<'a, T, R, Fut>(items: &'a [T], each: impl Fn(&'a T) -> Fut) -> Vec<R>
where
    Fut: std::future::Future<Output = R>,
{
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(WIDTH) {
        let mut running: Vec<std::pin::Pin<Box<Fut>>> =
            chunk.iter().map(|i| Box::pin(each(i))).collect();
        let mut done: Vec<Option<R>> = running.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (f, d) in running.iter_mut().zip(done.iter_mut()) {
                if d.is_none() {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => *d = Some(v),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            if pending {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(())
            }
        })
        .await;
        out.extend(done.into_iter().flatten());
    }
    out
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
    let mut snap = Snapshot::default();
    for g in groups {
        add_group(&mut snap, g, versions, node_id_tag);
    }
    snap.nodes.sort_by(|a, b| {
        node_order(&a.node, &b.node)
            .then_with(|| a.group.cmp(&b.group))
            .then_with(|| a.instance_id.cmp(&b.instance_id))
    });
    snap.groups.sort_by(|a, b| a.group.cmp(&b.group));
    snap
}

/// How an instance stands in its group.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Standing {
    /// Counted towards the desired capacity: replaced by the group when it leaves.
    Member,
    /// In the group but not counted (Standby, being detached): out of service, and no
    /// replacement of the group's.
    Held,
    /// On its way out (Terminating…): no node any more.
    Leaving,
}

fn standing(state: &str) -> Standing {
    if state.starts_with("Terminat") || state == "Warmed:Terminated" {
        Standing::Leaving
    } else if state.contains("Standby") || state.starts_with("Detach") {
        Standing::Held
    } else {
        Standing::Member
    }
}

/// One group's nodes, capacity and leaving instances, added to `snap`.
fn add_group(snap: &mut Snapshot, g: &ScalingGroup, versions: &Versions, node_id_tag: &str) {
    let desired = g.desired_capacity.max(0) as usize;
    let single = desired <= 1;
    let base = g
        .tags
        .get(node_id_tag)
        .cloned()
        .unwrap_or_else(|| g.name.clone());
    let target = label(g.launch.as_ref(), versions);
    let placeholder = |node: String, state: &str, in_capacity: bool| NodeView {
        node,
        group: g.name.clone(),
        instance_id: None,
        lifecycle_state: state.into(),
        health_status: "-".into(),
        current: "-".into(),
        target: target.clone(),
        current_version: None,
        target_version: number(g.launch.as_ref(), versions),
        outdated: false,
        available: false,
        in_capacity,
    };
    let (mut members, mut held) = (0, 0);
    for i in &g.instances {
        let how = standing(&i.lifecycle_state);
        match how {
            Standing::Leaving => {
                snap.leaving.push(Leaving {
                    group: g.name.clone(),
                    instance_id: i.instance_id.clone(),
                    lifecycle_state: i.lifecycle_state.clone(),
                });
                continue;
            }
            Standing::Held => held += 1,
            Standing::Member => members += 1,
        }
        let node = if single {
            base.clone()
        } else {
            i.instance_id.clone()
        };
        let in_capacity = how == Standing::Member && desired > 0;
        snap.nodes
            .push(instance_node(g, i, node, in_capacity, versions));
    }
    for _ in members..desired {
        let node = if single {
            base.clone()
        } else {
            format!("{}/(launching)", g.name)
        };
        snap.nodes.push(placeholder(node, "Launching", true));
    }
    // A single-instance group is a node of the cluster even with nothing in it.
    if single && desired == 0 && members + held == 0 {
        snap.nodes
            .push(placeholder(base.clone(), "no instance", false));
    }
    let available = g.instances.iter().filter(|i| i.available()).count();
    snap.groups.push(GroupCapacity {
        group: g.name.clone(),
        desired,
        available,
        nodes: if single { 1 } else { desired + held },
        held: if single {
            usize::from(desired == 0)
        } else {
            held
        },
        suspended_processes: g.suspended_processes.clone(),
    });
}

fn instance_node(
    g: &ScalingGroup,
    i: &cps_provider::GroupInstance,
    node: String,
    in_capacity: bool,
    versions: &Versions,
) -> NodeView {
    // A mixed-instances override with its own template is what this instance's type launches
    // from.
    let want = g.launch_for(i);
    NodeView {
        node,
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
        in_capacity,
    }
}

/// The most nodes that may be out at once and still leave a majority (n/2 + 1) up.
pub fn quorum_allows(size: usize) -> usize {
    size.saturating_sub(size / 2 + 1)
}

/// What the roll does with one node, and why when it leaves it alone.
fn action(n: &NodeView, settings: &RollSettings) -> (Action, Option<String>) {
    if let Some(why) = n.held() {
        let reason = format!(
            "{why}: it counts as out of service, and cps-roll never replaces a node its group does not count"
        );
        return (Action::LeftAlone, Some(reason));
    }
    let action = if n.instance_id.is_none() {
        Action::Wait
    } else if (n.outdated || settings.force) && selected(n, settings) {
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
    (action, None)
}

fn selected(n: &NodeView, settings: &RollSettings) -> bool {
    settings.only.is_empty() || settings.only.iter().any(|o| names(n, o))
}

/// `o` (from `--only`) names this node, its instance or its group.
fn names(n: &NodeView, o: &str) -> bool {
    o == n.node || n.instance_id.as_deref() == Some(o) || o == n.group
}

/// Decides every node's action and whether the roll may start.
pub fn plan(snapshot: &Snapshot, settings: &RollSettings) -> Plan {
    let rows: Vec<PlanRow> = snapshot
        .nodes
        .iter()
        .map(|n| {
            let (action, reason) = action(n, settings);
            PlanRow {
                node: n.clone(),
                action,
                reason,
            }
        })
        .collect();
    let mut plan = Plan {
        rows,
        size: snapshot.size(),
        unavailable: snapshot.unavailable(),
        max_unavailable: settings.max_unavailable,
        order: Vec::new(),
        notes: terminating_notes(snapshot),
        refusals: target_refusals(snapshot, settings),
    };
    plan.order = plan.queue().iter().map(|n| n.node.clone()).collect();
    let quorum = quorum_refusal(snapshot, settings);
    plan.refusals.extend(quorum);
    let states = state_refusals(snapshot, &plan, settings);
    plan.refusals.extend(states);
    plan
}

/// What `--cluster`, `--asg` and `--only` name that does not exist.
fn target_refusals(snapshot: &Snapshot, settings: &RollSettings) -> Vec<String> {
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
        if !snapshot.nodes.iter().any(|n| names(n, o)) {
            refusals.push(format!(
                "--only {o}: no such node, instance or group in the cluster"
            ));
        }
    }
    refusals
}

/// `--max-unavailable` against the cluster's size.
fn quorum_refusal(snapshot: &Snapshot, settings: &RollSettings) -> Option<String> {
    let size = snapshot.size();
    let max = settings.max_unavailable;
    if max == 0 {
        Some("--max-unavailable must be at least 1".into())
    } else if snapshot.groups.is_empty() {
        // No groups, no cluster: the target refusal says so; a quorum line would mislead.
        None
    } else if size < 3 {
        if !settings.allow_downtime {
            Some(format!(
                "the cluster has {size} node(s): replacing any of them is downtime (no majority survives); \
                 pass --allow-downtime to roll it anyway"
            ))
        } else if max > 1 {
            Some(format!(
                "--max-unavailable {max} on a {size}-node cluster takes it all down; use 1"
            ))
        } else {
            None
        }
    } else if max > quorum_allows(size) {
        Some(format!(
            "--max-unavailable {max} would leave {} of {size} nodes up, fewer than a majority ({}); at most {} for this cluster",
            size - max.min(size),
            size / 2 + 1,
            quorum_allows(size)
        ))
    } else {
        None
    }
}

/// Old instances a terminating lifecycle hook holds: the roll waits for each to leave.
fn terminating_notes(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .leaving
        .iter()
        .filter(|l| l.lifecycle_state == "Terminating:Wait")
        .map(|l| {
            format!(
                "{} in {} waits in Terminating:Wait: a terminating lifecycle hook holds it, with the node's volume and interface; the roll waits for it to leave",
                l.instance_id, l.group
            )
        })
        .collect()
}

/// The processes a replacement needs: without them the group does not launch it, terminate
/// the old instance, or notice and replace a failed one.
const NEEDED_PROCESSES: [&str; 4] = ["Launch", "Terminate", "HealthCheck", "ReplaceUnhealthy"];

/// What the cluster's state forbids: nodes left alone using up the budget, suspended
/// processes and instance refreshes, unhealthy nodes.
fn state_refusals(snapshot: &Snapshot, plan: &Plan, settings: &RollSettings) -> Vec<String> {
    let mut refusals: Vec<String> = held_refusal(snapshot, plan, settings).into_iter().collect();
    refusals.extend(process_refusals(snapshot, plan));
    refusals.extend(snapshot.refreshes.iter().map(|r| {
        format!(
            "instance refresh {} is {} on {}: it replaces instances on its own, outside --max-unavailable; \
             let it finish or cancel it (`aws autoscaling cancel-instance-refresh --auto-scaling-group-name {}`)",
            r.id, r.status, r.group, r.group
        )
    }));
    if !settings.wait_healthy {
        refusals.extend(blocked_refusal(plan));
    }
    refusals
}

/// Nodes left alone count as out of service: when they use up the budget, no in-service node
/// may be taken out.
fn held_refusal(snapshot: &Snapshot, plan: &Plan, settings: &RollSettings) -> Option<String> {
    let held = snapshot.held();
    let takes_one_out = plan.rows.iter().any(|r| r.action == Action::Replace);
    if held == 0 || !takes_one_out || held < settings.max_unavailable {
        return None;
    }
    let size = snapshot.size();
    Some(format!(
        "{} out of service and left alone ({}): replacing any other node would take {} of {size} out, over --max-unavailable {}; \
         bring it back (`aws autoscaling exit-standby`, or restore its group's desired capacity), or raise --max-unavailable if the cluster can spare it (at most {} for {size} nodes)",
        if held == 1 {
            "a node is".to_owned()
        } else {
            format!("{held} nodes are")
        },
        plan.left_alone().join("; "),
        held + 1,
        settings.max_unavailable,
        quorum_allows(size),
    ))
}

/// Groups the roll replaces or waits for a node in, with a process that needs suspended.
fn process_refusals(snapshot: &Snapshot, plan: &Plan) -> Vec<String> {
    let touched: BTreeSet<&str> = plan
        .rows
        .iter()
        .filter(|r| !matches!(r.action, Action::Keep | Action::Skip | Action::LeftAlone))
        .map(|r| r.node.group.as_str())
        .collect();
    snapshot
        .groups
        .iter()
        .filter(|g| touched.contains(g.group.as_str()))
        .filter_map(|g| {
            let off: Vec<&str> = g
                .suspended_processes
                .iter()
                .map(String::as_str)
                .filter(|p| NEEDED_PROCESSES.contains(p))
                .collect();
            (!off.is_empty()).then(|| {
                format!(
                    "{} has {} suspended: Auto Scaling would not launch, terminate or heal the node's replacement as the roll needs; \
                     resume it (`aws autoscaling resume-processes --auto-scaling-group-name {} --scaling-processes {}`) or leave the group out (--only)",
                    g.group,
                    off.join(", "),
                    g.group,
                    off.join(" ")
                )
            })
        })
        .collect()
}

fn blocked_refusal(plan: &Plan) -> Option<String> {
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
    (!blocked.is_empty()).then(|| {
        format!(
            "not every node is InService and Healthy: {}; fix them or pass --wait-healthy to wait up to the timeout",
            blocked.join("; ")
        )
    })
}

const TERMINATING: &str = "autoscaling:EC2_INSTANCE_TERMINATING";

/// A node to replace, fixed at the start: its instance is the one the roll may terminate.
#[derive(Clone, Debug)]
struct Target {
    node: String,
    group: String,
    instance_id: String,
}

/// A node being replaced.
struct InFlight {
    target: Target,
    since: Instant,
    /// The terminating lifecycle hook holding the old instance: this run keeps the group's
    /// Launch suspended until that instance has left.
    hold: Option<String>,
    /// The wait for the held instance was announced.
    said: bool,
}

/// Runs the roll. `stop` is the interrupt: once requested, no new node starts, waits not for
/// a node in flight end, and the run returns when the ones in flight have settled (or failed).
pub async fn run(
    clouds: RollClouds<'_>,
    checks: &dyn ClusterChecks,
    settings: &RollSettings,
    stop: &Stop,
    progress: &(dyn Fn(RollEvent) + Send + Sync),
) -> Result<RollReport, Error> {
    let Some(first_look) = stop.or(observe_resolving(clouds, settings)).await else {
        return Ok(RollReport {
            outcome: RollOutcome::Interrupted,
            replaced: Vec::new(),
            remaining: Vec::new(),
            left_alone: Vec::new(),
            last: Snapshot::default(),
            recovery: vec![
                "Nothing was changed. Re-run the same `cps-roll run` command to start.".into(),
            ],
        });
    };
    let (snap, versions) = first_look?;
    let first = plan(&snap, settings);
    let mut report = RollReport {
        outcome: RollOutcome::Completed,
        replaced: Vec::new(),
        remaining: first.order.clone(),
        left_alone: first.left_alone(),
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
    let mut roll = Roll {
        clouds,
        checks,
        settings,
        stop,
        progress,
        versions,
        report,
        // The targets are fixed now. A node is done when that instance has left its group and
        // the group is back to full strength.
        queue: first
            .queue()
            .iter()
            .filter_map(|n| {
                Some(Target {
                    node: n.node.clone(),
                    group: n.group.clone(),
                    instance_id: n.instance_id.clone()?,
                })
            })
            .collect(),
        in_flight: Vec::new(),
        stalled_since: None,
        stopping_said: false,
        last_wait: None,
        leader_said: None,
        gate_first: first
            .rows
            .iter()
            .any(|r| matches!(r.action, Action::Wait | Action::Blocked)),
    };
    let result = roll.drive(snap).await;
    roll.release_holds(result).await
}

/// A run in progress.
struct Roll<'a> {
    clouds: RollClouds<'a>,
    checks: &'a dyn ClusterChecks,
    settings: &'a RollSettings,
    stop: &'a Stop,
    progress: &'a (dyn Fn(RollEvent) + Send + Sync),
    versions: Versions,
    report: RollReport,
    queue: Vec<Target>,
    in_flight: Vec<InFlight>,
    stalled_since: Option<Instant>,
    stopping_said: bool,
    last_wait: Option<String>,
    /// The leader last announced, so a leader that stays the same is said once.
    leader_said: Option<String>,
    /// Nodes were booting or unhealthy at the start: check the cluster before the first change.
    gate_first: bool,
}

/// What one pass of the loop did.
enum Pass {
    Started,
    Idle,
    Done(Box<RollReport>),
}

impl Roll<'_> {
    /// Loops on fresh looks, starting at most one node per look.
    async fn drive(&mut self, mut snap: Snapshot) -> Result<RollReport, Error> {
        // Bounded: every pass settles, starts or waits a poll interval, and every wait is
        // bounded by `timeout` (per node in flight, or while stalled); starts are bounded by
        // the queue; after an interrupt only the nodes in flight are waited for.
        loop {
            if let Some(done) = self.settle(&snap).await? {
                return Ok(done);
            }
            let pass = if self.stop.requested() {
                if self.in_flight.is_empty() {
                    return Ok(self.interrupted(snap));
                }
                self.say_stopping();
                Pass::Idle
            } else {
                self.advance(&snap).await?
            };
            match pass {
                Pass::Done(report) => return Ok(*report),
                Pass::Started => {}
                Pass::Idle if self.stop.requested() => {
                    tokio::time::sleep(self.settings.poll_interval).await;
                }
                Pass::Idle => {
                    self.stop
                        .or(tokio::time::sleep(self.settings.poll_interval))
                        .await;
                }
            }
            // With nothing in flight an interrupt ends the look (a request being retried).
            let next = if self.in_flight.is_empty() {
                self.stop.or(self.look()).await
            } else {
                Some(self.look().await)
            };
            match next {
                Some(fresh) => snap = fresh?,
                None => return Ok(self.interrupted(snap)),
            }
        }
    }

    async fn look(&self) -> Result<Snapshot, Error> {
        look(self.clouds, self.settings, &self.versions).await
    }

    /// Settles what is in flight: a node is done when its old instance has left its group,
    /// the group is back to full strength and the health command passes.
    async fn settle(&mut self, snap: &Snapshot) -> Result<Option<RollReport>, Error> {
        let mut i = 0;
        while i < self.in_flight.len() {
            self.release_if_gone(i, snap).await?;
            let f = &self.in_flight[i];
            let gone = !snap.listed(&f.target.group, &f.target.instance_id);
            let full = snap
                .group(&f.target.group)
                .is_some_and(|g| g.available >= g.desired);
            if gone && full && f.hold.is_none() {
                let f = self.in_flight.remove(i);
                if let Err(detail) = health_gate(self.checks, self.settings, &f.target.node).await {
                    let last = self.look().await.unwrap_or_else(|_| snap.clone());
                    let mut flying = vec![f.target.node.clone()];
                    flying.extend(self.in_flight.iter().map(|f| f.target.node.clone()));
                    return Ok(Some(self.stopped(last, Some(&f.target), detail, &flying)));
                }
                let new_instance = snap
                    .nodes
                    .iter()
                    .find(|n| n.group == f.target.group && n.node == f.target.node)
                    .and_then(|n| n.instance_id.clone());
                (self.progress)(RollEvent::Replaced {
                    node: f.target.node.clone(),
                    old_instance: f.target.instance_id.clone(),
                    new_instance,
                    took: f.since.elapsed(),
                });
                self.report.replaced.push(f.target.node);
                continue;
            }
            if f.since.elapsed() >= self.settings.timeout {
                return Ok(Some(self.timed_out(i, snap)));
            }
            i += 1;
        }
        Ok(None)
    }

    /// A node in flight whose group's Launch this run holds: once its old instance has left
    /// (and no other held one of the group is still there), Launch is resumed.
    async fn release_if_gone(&mut self, i: usize, snap: &Snapshot) -> Result<(), Error> {
        let f = &self.in_flight[i];
        let Some(hook) = f.hold.clone() else {
            return Ok(());
        };
        let (node, group, old) = (&f.target.node, &f.target.group, &f.target.instance_id);
        if snap.listed(group, old) {
            if !f.said
                && let Some(l) = snap.leaving_instance(group, old)
                && l.lifecycle_state == "Terminating:Wait"
            {
                (self.progress)(RollEvent::Waiting {
                    what: format!(
                        "node {node}: {old} waits in Terminating:Wait, held by the terminating lifecycle hook {hook} (with the node's volume and interface); {group} launches the replacement once it has left"
                    ),
                });
                self.in_flight[i].said = true;
            }
            return Ok(());
        }
        let group = group.clone();
        self.in_flight[i].hold = None;
        if !self
            .in_flight
            .iter()
            .any(|o| o.target.group == group && o.hold.is_some())
        {
            self.resume_launch(&group).await?;
        }
        Ok(())
    }

    async fn resume_launch(&self, group: &str) -> Result<(), Error> {
        let launch = ["Launch".to_owned()];
        retry(
            self.settings.retry,
            "ResumeProcesses",
            hash_str(group),
            || self.clouds.groups.resume_processes(group, &launch),
        )
        .await
        .map_err(Error::cloud("resuming Launch after the old instance left"))?;
        (self.progress)(RollEvent::LaunchResumed {
            group: group.to_owned(),
        });
        Ok(())
    }

    /// Whatever ended the run, no group stays with Launch suspended by it.
    async fn release_holds(
        &mut self,
        mut result: Result<RollReport, Error>,
    ) -> Result<RollReport, Error> {
        let held: BTreeSet<String> = self
            .in_flight
            .iter()
            .filter(|f| f.hold.is_some())
            .map(|f| f.target.group.clone())
            .collect();
        for group in held {
            if let Err(e) = self.resume_launch(&group).await {
                let step = format!(
                    "Launch is still suspended on {group} (cps-roll held it while the old instance was in Terminating:Wait) and resuming it failed ({e}): \
                     `aws autoscaling resume-processes --auto-scaling-group-name {group} --scaling-processes Launch`."
                );
                match &mut result {
                    Ok(report) => report.recovery.insert(0, step),
                    Err(_) => tracing::error!("{step}"),
                }
            }
        }
        result
    }

    /// One pass while not interrupted: start what the budget allows, finish, or wait.
    async fn advance(&mut self, snap: &Snapshot) -> Result<Pass, Error> {
        self.drop_departed(snap);
        if let Some(done) = self.gate_before_first_change(snap).await {
            return Ok(Pass::Done(Box::new(done)));
        }
        let started = self.start_next(snap).await?;
        // Done when nothing is left and every node out of service is one left alone.
        if self.queue.is_empty() && self.in_flight.is_empty() && snap.unavailable() <= snap.held() {
            let mut report = self.report.clone();
            report.outcome = RollOutcome::Completed;
            report.remaining.clear();
            report.last = snap.clone();
            return Ok(Pass::Done(Box::new(report)));
        }
        if self.in_flight.is_empty() && !started {
            if let Some(done) = self.stalled(snap) {
                return Ok(Pass::Done(Box::new(done)));
            }
        } else {
            self.stalled_since = None;
            self.last_wait = None;
        }
        Ok(if started { Pass::Started } else { Pass::Idle })
    }

    /// Targets that left their group on their own, or its capacity (Standby, detached), are
    /// no targets any more.
    fn drop_departed(&mut self, snap: &Snapshot) {
        let progress = self.progress;
        self.queue.retain(|t| {
            let what = match snap.node(&t.instance_id).filter(|n| n.group == t.group) {
                None => format!(
                    "node {}: {} left {} on its own; its replacement launches from the group's current template",
                    t.node, t.instance_id, t.group
                ),
                Some(n) => match n.held() {
                    Some(why) => format!(
                        "node {}: {} is now {why}; the roll leaves it alone and counts it as out of service",
                        t.node, t.instance_id
                    ),
                    None => return true,
                },
            };
            progress(RollEvent::Waiting { what });
            false
        });
    }

    /// After a resume or a wait for health, the cluster check passes before the first
    /// termination, as it would have after the node that was settling.
    async fn gate_before_first_change(&mut self, snap: &Snapshot) -> Option<RollReport> {
        if !self.gate_first
            || self.queue.is_empty()
            || !self.in_flight.is_empty()
            || snap.unavailable() > snap.held()
        {
            return None;
        }
        self.gate_first = false;
        match self
            .stop
            .or(health_gate(self.checks, self.settings, "the cluster"))
            .await
        {
            None => Some(self.interrupted(snap.clone())),
            Some(Ok(())) => None,
            Some(Err(detail)) => Some(self.stopped(snap.clone(), None, detail, &[])),
        }
    }

    /// Starts the next node when the budget allows: never while max-unavailable nodes are out
    /// (counting nodes in flight the look does not show yet), except one already out that its
    /// group brings back; the leader last.
    async fn start_next(&mut self, snap: &Snapshot) -> Result<bool, Error> {
        let max = self.settings.max_unavailable;
        let stuck = |t: &Target| snap.node(&t.instance_id).is_some_and(NodeView::stuck);
        let any_stuck = self.queue.iter().any(stuck);
        let may_start =
            !self.gate_first && (any_stuck || unavailable_now(snap, &self.in_flight) < max);
        if self.queue.is_empty() || !may_start {
            return Ok(false);
        }
        // `None`: the leader is unknown (its command failed with nodes in flight): no start.
        let Some(leader) = self.leader().await? else {
            return Ok(false);
        };
        if let Some(l) = &leader
            && self.leader_said.as_ref() != Some(l)
            && self.queue.iter().any(|t| &t.node == l)
        {
            (self.progress)(RollEvent::Leader { node: l.clone() });
            self.leader_said = Some(l.clone());
        }
        let Some(pos) = next_candidate(snap, &self.queue, &self.in_flight, leader.as_deref())
        else {
            return Ok(false);
        };
        if self.stop.requested()
            || (!stuck(&self.queue[pos]) && unavailable_now(snap, &self.in_flight) >= max)
        {
            return Ok(false);
        }
        self.start(pos, snap).await?;
        // One start per look: the next is decided on a fresh look, so a node that failed
        // meanwhile counts.
        Ok(true)
    }

    /// The leader's node id (`Some(None)`: no leader command, or one node left); `None` when
    /// its command failed with nodes in flight (they settle first; it is asked again).
    async fn leader(&self) -> Result<Option<Option<String>>, Error> {
        if self.queue.len() + self.in_flight.len() <= 1 {
            return Ok(Some(None));
        }
        match self.checks.leader().await {
            Ok(l) => Ok(Some(l)),
            // Nothing in flight: stop before any change.
            Err(detail) if self.in_flight.is_empty() => Err(Error::Check {
                what: "the leader command".into(),
                detail,
            }),
            Err(detail) => {
                (self.progress)(RollEvent::Waiting {
                    what: format!("the leader command failed ({detail}); asking again"),
                });
                Ok(None)
            }
        }
    }

    /// Terminates a node's instance without lowering its group's capacity. With a terminating
    /// lifecycle hook on the group, Launch is suspended first: the old instance waits in
    /// Terminating:Wait holding the node's volume and interface, and a replacement booting
    /// meanwhile would only wait for them until its own timeout.
    async fn start(&mut self, pos: usize, snap: &Snapshot) -> Result<(), Error> {
        let t = self.queue[pos].clone();
        let hook = self.terminating_hook(&t.group).await?;
        let launch = ["Launch".to_owned()];
        if let Some(h) = &hook {
            retry(
                self.settings.retry,
                "SuspendProcesses",
                hash_str(&t.group),
                || self.clouds.groups.suspend_processes(&t.group, &launch),
            )
            .await
            .map_err(Error::cloud(
                "suspending Launch while the terminating hook holds the old instance",
            ))?;
            (self.progress)(RollEvent::LaunchHeld {
                node: t.node.clone(),
                group: t.group.clone(),
                hook: h.clone(),
            });
        }
        let view = snap.node(&t.instance_id);
        (self.progress)(RollEvent::Terminating {
            node: t.node.clone(),
            group: t.group.clone(),
            instance_id: t.instance_id.clone(),
            from: view.map(|n| n.current.clone()).unwrap_or_default(),
            to: view.map(|n| n.target.clone()).unwrap_or_default(),
        });
        let terminated = retry(
            self.settings.retry,
            "TerminateInstanceInAutoScalingGroup",
            hash_str(&t.instance_id),
            || self.clouds.groups.terminate_in_group(&t.instance_id),
        )
        .await;
        if let Err(e) = terminated {
            if hook.is_some()
                && let Err(again) = self.resume_launch(&t.group).await
            {
                tracing::error!(group = %t.group, "{again}; resume Launch on the group by hand");
            }
            return Err(Error::cloud("terminating an outdated instance")(e));
        }
        self.queue.remove(pos);
        self.in_flight.push(InFlight {
            target: t,
            since: Instant::now(),
            hold: hook,
            said: false,
        });
        Ok(())
    }

    /// The group's terminating lifecycle hook, if it has one.
    async fn terminating_hook(&self, group: &str) -> Result<Option<String>, Error> {
        let hooks = retry(
            self.settings.retry,
            "DescribeLifecycleHooks",
            hash_str(group),
            || self.clouds.groups.lifecycle_hooks(group),
        )
        .await
        .map_err(Error::cloud("listing the group's lifecycle hooks"))?;
        Ok(hooks
            .into_iter()
            .find(|h| h.transition == TERMINATING)
            .map(|h| h.name))
    }

    /// Nothing moving and nothing allowed to start: the cluster must recover first, within
    /// the timeout.
    fn stalled(&mut self, snap: &Snapshot) -> Option<RollReport> {
        let max = self.settings.max_unavailable;
        let since = *self.stalled_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.settings.timeout {
            let reason = format!(
                "the cluster did not recover within {}s: {} of {} nodes out of service, --max-unavailable {}",
                self.settings.timeout.as_secs(),
                snap.unavailable(),
                snap.size(),
                max
            );
            return Some(self.stopped(snap.clone(), None, reason, &[]));
        }
        let what = format!(
            "{} of {} nodes out of service (at most {} may be): waiting for {}",
            snap.unavailable(),
            snap.size(),
            max,
            out_of_service(snap)
        );
        if self.last_wait.as_ref() != Some(&what) {
            (self.progress)(RollEvent::Waiting { what: what.clone() });
            self.last_wait = Some(what);
        }
        None
    }

    fn say_stopping(&mut self) {
        if !self.stopping_said {
            self.stopping_said = true;
            (self.progress)(RollEvent::Stopping {
                in_flight: self
                    .in_flight
                    .iter()
                    .map(|f| f.target.node.clone())
                    .collect(),
            });
        }
    }

    /// The report of an interrupted run (nothing in flight any more).
    fn interrupted(&self, last: Snapshot) -> RollReport {
        let mut report = self.report.clone();
        report.outcome = RollOutcome::Interrupted;
        report.remaining = self.queue.iter().map(|t| t.node.clone()).collect();
        report.last = last;
        report.recovery = vec![
            "Every node started has settled. Re-run the same `cps-roll run` command to continue."
                .into(),
        ];
        report
    }

    /// The replacement of in-flight node `i` took longer than the timeout.
    fn timed_out(&self, i: usize, snap: &Snapshot) -> RollReport {
        let t = &self.in_flight[i].target;
        let mut reason = format!(
            "the replacement of node {} ({} terminated) is not InService and Healthy after {}s; group {}: {}",
            t.node,
            t.instance_id,
            self.settings.timeout.as_secs(),
            t.group,
            snap.group_states(&t.group)
        );
        if let Some(hook) = &self.in_flight[i].hold
            && snap.leaving_instance(&t.group, &t.instance_id).is_some()
        {
            reason.push_str(&format!(
                "; its terminating lifecycle hook {hook} still holds {} (cps-roll resumes Launch now, so the group launches the replacement anyway)",
                t.instance_id
            ));
        }
        let flying: Vec<String> = self
            .in_flight
            .iter()
            .map(|f| f.target.node.clone())
            .collect();
        self.stopped(snap.clone(), Some(t), reason, &flying)
    }

    /// Ends the run: `failed` is the node that did not come back, when one did not.
    fn stopped(
        &self,
        last: Snapshot,
        failed: Option<&Target>,
        reason: String,
        in_flight: &[String],
    ) -> RollReport {
        let mut report = self.report.clone();
        report.last = last;
        report.remaining = in_flight
            .iter()
            .cloned()
            .chain(self.queue.iter().map(|t| t.node.clone()))
            .collect();
        let group = failed.map(|t| t.group.as_str());
        report.recovery = recovery(&report.last, group, &report.remaining);
        report.outcome = RollOutcome::Stopped {
            node: failed.map(|t| t.node.clone()),
            reason,
        };
        report
    }
}

/// Out of service now: what the groups show, plus every node in flight the snapshot still
/// lists as available (terminated since the look, or not yet shown as leaving by AWS).
fn unavailable_now(snap: &Snapshot, in_flight: &[InFlight]) -> usize {
    let unseen = in_flight
        .iter()
        .filter(|f| {
            snap.node(&f.target.instance_id)
                .is_some_and(|n| n.available)
        })
        .count();
    snap.unavailable() + unseen
}

/// The next node to start: one already out of service that its group brings back first
/// (replacing it costs nothing), else queue order; the leader only when it is the last one
/// left and nothing else is in flight.
fn next_candidate(
    snap: &Snapshot,
    queue: &[Target],
    in_flight: &[InFlight],
    leader: Option<&str>,
) -> Option<usize> {
    let stuck = |t: &Target| snap.node(&t.instance_id).is_some_and(NodeView::stuck);
    let eligible = |t: &Target| Some(t.node.as_str()) != leader;
    queue
        .iter()
        .position(|t| eligible(t) && stuck(t))
        .or_else(|| queue.iter().position(eligible))
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
                n.instance_id.as_deref().unwrap_or("no instance"),
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
    let id = waiting_instance(&g, instance).map_err(|what| Error::Precondition { what })?;
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
/// group's only waiting instance. `Err` says why there is none.
fn waiting_instance(g: &ScalingGroup, instance: Option<&str>) -> Result<String, String> {
    let group = &g.name;
    let refuse = Err;
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
