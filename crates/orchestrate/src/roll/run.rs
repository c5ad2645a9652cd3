//! Running the roll: one node at a time within the budget, each replacement gated on health;
//! and `abandon` for an instance stuck in its launch hook.

use std::collections::BTreeSet;
use std::time::Duration;

use cps_provider::{GroupService, LifecycleResult, LifecycleService, ScalingGroup};
use tokio::time::Instant;

use super::observe::{Versions, look, observe_resolving};
use super::*;
use crate::Error;
use crate::backoff::{RetryPolicy, hash_str, retry};

pub(super) const TERMINATING: &str = "autoscaling:EC2_INSTANCE_TERMINATING";

/// A node to replace, fixed at the start: its instance is the one the roll may terminate.
#[derive(Clone, Debug)]
pub(super) struct Target {
    node: String,
    group: String,
    instance_id: String,
}

/// A node being replaced.
pub(super) struct InFlight {
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
pub(super) struct Roll<'a> {
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
pub(super) enum Pass {
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
pub(super) fn unavailable_now(snap: &Snapshot, in_flight: &[InFlight]) -> usize {
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
pub(super) fn next_candidate(
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

pub(super) fn out_of_service(snap: &Snapshot) -> String {
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
pub(super) fn later(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Runs the cluster health check until it passes or the timeout expires.
pub(super) async fn health_gate(
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
pub(super) fn recovery(snap: &Snapshot, group: Option<&str>, remaining: &[String]) -> Vec<String> {
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
pub(super) fn waiting_instance(g: &ScalingGroup, instance: Option<&str>) -> Result<String, String> {
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
pub(super) async fn launch_hook(
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
