//! The rolling update: find a cluster's nodes, tell which are outdated, and replace them one at
//! a time — never more than `max_unavailable` out of service — each gated on its replacement
//! being InService and Healthy (which the launch lifecycle hook ties to cluster health).
//!
//! State lives in the cloud only. Every step starts from a fresh look at the groups, so a
//! re-run after an interrupt or a failure resumes: replaced nodes are up to date and drop out,
//! a replacement still booting is waited for, a stuck node on a bad version is replaced first.

mod observe;
mod plan;
mod run;

pub use observe::{observe, snapshot};
pub use plan::{plan, quorum_allows};
pub use run::{abandon, run};

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cps_provider::{GroupService, TemplateService};
use serde::Serialize;
use tokio::sync::Notify;

use crate::backoff::RetryPolicy;

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
