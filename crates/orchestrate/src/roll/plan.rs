//! What a roll would do: each node's action, and the refusals checked before anything is
//! terminated (targets, quorum, node states, suspended processes).

use std::collections::BTreeSet;

use super::*;

/// The most nodes that may be out at once and still leave a majority (n/2 + 1) up.
pub fn quorum_allows(size: usize) -> usize {
    size.saturating_sub(size / 2 + 1)
}

/// What the roll does with one node, and why when it leaves it alone.
pub(super) fn action(n: &NodeView, settings: &RollSettings) -> (Action, Option<String>) {
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

pub(super) fn selected(n: &NodeView, settings: &RollSettings) -> bool {
    settings.only.is_empty() || settings.only.iter().any(|o| names(n, o))
}

/// `o` (from `--only`) names this node, its instance or its group.
pub(super) fn names(n: &NodeView, o: &str) -> bool {
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
pub(super) fn target_refusals(snapshot: &Snapshot, settings: &RollSettings) -> Vec<String> {
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
pub(super) fn quorum_refusal(snapshot: &Snapshot, settings: &RollSettings) -> Option<String> {
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
pub(super) fn terminating_notes(snapshot: &Snapshot) -> Vec<String> {
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
pub(super) const NEEDED_PROCESSES: [&str; 4] =
    ["Launch", "Terminate", "HealthCheck", "ReplaceUnhealthy"];

/// What the cluster's state forbids: nodes left alone using up the budget, suspended
/// processes and instance refreshes, unhealthy nodes.
pub(super) fn state_refusals(
    snapshot: &Snapshot,
    plan: &Plan,
    settings: &RollSettings,
) -> Vec<String> {
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
pub(super) fn held_refusal(
    snapshot: &Snapshot,
    plan: &Plan,
    settings: &RollSettings,
) -> Option<String> {
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
pub(super) fn process_refusals(snapshot: &Snapshot, plan: &Plan) -> Vec<String> {
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

pub(super) fn blocked_refusal(plan: &Plan) -> Option<String> {
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
