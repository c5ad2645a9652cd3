//! Looking at the cluster: its groups, their launch templates' versions, instance refreshes,
//! and the snapshot of nodes the plan and the run work from.

use std::collections::{BTreeMap, BTreeSet};

use cps_provider::{LaunchSource, ScalingGroup, TemplateVersions};

use super::*;
use crate::Error;
use crate::backoff::{hash_str, retry};

/// Looks at the cluster: its groups (batched, paginated), what their `$Latest`/`$Default`
/// stand for when they launch those, and instance refreshes in progress (one request per
/// group).
pub async fn observe(clouds: RollClouds<'_>, settings: &RollSettings) -> Result<Snapshot, Error> {
    Ok(observe_resolving(clouds, settings).await?.0)
}

pub(super) type Versions = BTreeMap<String, TemplateVersions>;

/// The groups as they are now, with versions resolved earlier (a run fixes its targets at the
/// start, so later looks need the groups' states only: one request per 100 groups).
pub(super) async fn look(
    clouds: RollClouds<'_>,
    settings: &RollSettings,
    versions: &Versions,
) -> Result<Snapshot, Error> {
    let groups = describe(clouds, settings).await?;
    Ok(snapshot(&groups, versions, &settings.node_id_tag))
}

pub(super) async fn describe(
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
pub(super) fn name_templates(mut groups: Vec<ScalingGroup>) -> Vec<ScalingGroup> {
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
pub(super) async fn observe_resolving(
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
pub(super) async fn active_refreshes(
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
pub(super) const WIDTH: usize = 8;

/// `each` over `items`, at most [`WIDTH`] at a time, the results in item order.
pub(super) async fn in_parallel<'a, T, R, Fut>(
    items: &'a [T],
    each: impl Fn(&'a T) -> Fut,
) -> Vec<R>
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
pub(super) fn resolve(
    version: &str,
    id: &str,
    versions: &BTreeMap<String, TemplateVersions>,
) -> Option<i64> {
    match version {
        "$Latest" => versions.get(id).map(|v| v.latest_version),
        "$Default" => versions.get(id).map(|v| v.default_version),
        n => n.parse().ok(),
    }
}

/// The version number a launch source stands for, when it is a template's.
pub(super) fn number(source: Option<&LaunchSource>, versions: &Versions) -> Option<i64> {
    match source {
        Some(LaunchSource::Template { id, version, .. }) => resolve(version, id, versions),
        _ => None,
    }
}

pub(super) fn label(
    source: Option<&LaunchSource>,
    versions: &BTreeMap<String, TemplateVersions>,
) -> String {
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
pub(super) fn is_outdated(
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
pub(super) fn node_order(a: &str, b: &str) -> std::cmp::Ordering {
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
pub(super) enum Standing {
    /// Counted towards the desired capacity: replaced by the group when it leaves.
    Member,
    /// In the group but not counted (Standby, being detached): out of service, and no
    /// replacement of the group's.
    Held,
    /// On its way out (Terminating…): no node any more.
    Leaving,
}

pub(super) fn standing(state: &str) -> Standing {
    if state.starts_with("Terminat") || state == "Warmed:Terminated" {
        Standing::Leaving
    } else if state.contains("Standby") || state.starts_with("Detach") {
        Standing::Held
    } else {
        Standing::Member
    }
}

/// One group's nodes, capacity and leaving instances, added to `snap`.
pub(super) fn add_group(
    snap: &mut Snapshot,
    g: &ScalingGroup,
    versions: &Versions,
    node_id_tag: &str,
) {
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

pub(super) fn instance_node(
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
