//! Auto Scaling groups and launch lifecycle hooks in the in-memory cloud.
//!
//! An instance that joins a group with a LAUNCHING hook waits in `Pending:Wait` until it is
//! completed (CONTINUE → `InService`, ABANDON → terminated) or its heartbeat timeout passes
//! (then the hook's default result applies). Every heartbeat and completion is logged with its
//! time, so tests can check cadence and outcome.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{MemoryCloud, World};
use crate::{
    Error, GroupInstance, GroupMember, GroupService, LaunchSource, LifecycleHook, LifecycleResult,
    LifecycleService, ScalingGroup, Tags, TemplateService, TemplateVersions,
};

pub const DESCRIBE_AUTO_SCALING_INSTANCES: &str = "DescribeAutoScalingInstances";
pub const DESCRIBE_AUTO_SCALING_GROUPS: &str = "DescribeAutoScalingGroups";
pub const DESCRIBE_LIFECYCLE_HOOKS: &str = "DescribeLifecycleHooks";
pub const RECORD_LIFECYCLE_ACTION_HEARTBEAT: &str = "RecordLifecycleActionHeartbeat";
pub const COMPLETE_LIFECYCLE_ACTION: &str = "CompleteLifecycleAction";
pub const TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP: &str = "TerminateInstanceInAutoScalingGroup";
pub const DESCRIBE_LAUNCH_TEMPLATES: &str = "DescribeLaunchTemplates";

/// Names or templates per Describe request, as AWS allows.
const BATCH: usize = 100;

const LAUNCHING: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";

/// What happened to a lifecycle action, and when (tokio time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LifecycleEvent {
    Heartbeat {
        instance_id: String,
        at: Instant,
    },
    Completed {
        instance_id: String,
        result: LifecycleResult,
        at: Instant,
    },
    /// The heartbeat timeout passed; the default result applied.
    TimedOut {
        instance_id: String,
        result: LifecycleResult,
        at: Instant,
    },
}

/// How a simulated instance's boot ends, decided when the group launches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Completes its lifecycle action with CONTINUE after this long.
    Continue(Duration),
    /// Completes it with ABANDON after this long (the group then launches another).
    Abandon(Duration),
    /// Never completes; the hook's timeout decides.
    Hang,
}

type BootPlan = Box<dyn FnMut(&str, &str) -> Boot + Send>;

/// How many of the fleet's instances were out of service, from `at` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub at: Instant,
    /// Σ over groups with a capacity: desired − instances InService and Healthy.
    pub unavailable: usize,
}

struct Template {
    name: String,
    default_version: i64,
    latest_version: i64,
}

/// Launch templates, group capacity and simulated boots: what rolling updates need.
#[derive(Default)]
pub(super) struct Fleet {
    templates: BTreeMap<String, Template>,
    boot_plan: Option<BootPlan>,
    /// Lifecycle completions the boot plan scheduled.
    boots: Vec<(Instant, String, LifecycleResult)>,
    samples: Vec<Sample>,
}

struct Member {
    lifecycle_state: String,
    /// While in Pending:Wait: the hook and the time its timeout runs out.
    waiting: Option<(String, Instant)>,
    healthy: bool,
    launch: Option<LaunchSource>,
}

pub(super) struct Group {
    tags: Tags,
    hooks: BTreeMap<String, LifecycleHook>,
    members: BTreeMap<String, Member>,
    /// A group with a capacity launches instances (in `zone`) until it has that many.
    capacity: Option<(usize, String)>,
    launch: Option<LaunchSource>,
}

impl Group {
    fn unavailable(&self) -> usize {
        self.capacity.as_ref().map_or(0, |(desired, _)| {
            let available = self
                .members
                .values()
                .filter(|m| m.lifecycle_state == "InService" && m.healthy)
                .count();
            desired.saturating_sub(available)
        })
    }
}

impl World {
    pub fn add_group(&mut self, name: &str, tags: &Tags) {
        self.groups.insert(
            name.to_owned(),
            Group {
                tags: tags.clone(),
                hooks: BTreeMap::new(),
                members: BTreeMap::new(),
                capacity: None,
                launch: None,
            },
        );
    }

    /// Adds a launch template with version 1 as its default and latest.
    pub fn add_template(&mut self, id: &str, name: &str) {
        self.fleet.templates.insert(
            id.to_owned(),
            Template {
                name: name.to_owned(),
                default_version: 1,
                latest_version: 1,
            },
        );
    }

    /// Adds a version to a template and returns its number.
    pub fn new_template_version(&mut self, id: &str, make_default: bool) -> i64 {
        let t = self.fleet.templates.get_mut(id).expect("template exists");
        t.latest_version += 1;
        if make_default {
            t.default_version = t.latest_version;
        }
        t.latest_version
    }

    /// A group that keeps `desired` instances in `zone`, launched from `version` (a number,
    /// `$Latest` or `$Default`) of template `template_id`; starts full, every instance InService.
    pub fn add_fleet_group(
        &mut self,
        name: &str,
        tags: &Tags,
        zone: &str,
        desired: usize,
        template_id: &str,
        version: &str,
    ) {
        self.add_group(name, tags);
        self.set_group_template(name, template_id, version);
        for _ in 0..desired {
            let id = self.new_instance_id();
            self.add_instance(&id, zone);
            let launch = self.launched_from(name);
            let g = self.groups.get_mut(name).expect("just added");
            g.members.insert(
                id.clone(),
                Member {
                    lifecycle_state: "InService".into(),
                    waiting: None,
                    healthy: true,
                    launch,
                },
            );
            self.tag_instance(&id, "aws:autoscaling:groupName", name);
        }
        if let Some(g) = self.groups.get_mut(name) {
            g.capacity = Some((desired, zone.to_owned()));
        }
        self.sample();
    }

    /// Points a group at another template version (what a template change in Terraform does).
    pub fn set_group_template(&mut self, group: &str, template_id: &str, version: &str) {
        let name = self
            .fleet
            .templates
            .get(template_id)
            .map(|t| t.name.clone())
            .unwrap_or_default();
        if let Some(g) = self.groups.get_mut(group) {
            g.launch = Some(LaunchSource::Template {
                id: template_id.to_owned(),
                name,
                version: version.to_owned(),
            });
        }
    }

    /// Decides how every instance a group launches from now on boots.
    pub fn on_launch(&mut self, plan: impl FnMut(&str, &str) -> Boot + Send + 'static) {
        self.fleet.boot_plan = Some(Box::new(plan));
    }

    /// Marks an instance healthy or not (an instance failing on its own).
    pub fn set_healthy(&mut self, instance_id: &str, healthy: bool) {
        for g in self.groups.values_mut() {
            if let Some(m) = g.members.get_mut(instance_id) {
                m.healthy = healthy;
            }
        }
        self.sample();
    }

    /// The instances of a group, in id order.
    pub fn group_instances(&self, group: &str) -> Vec<String> {
        self.groups
            .get(group)
            .map(|g| g.members.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every change in the number of unavailable instances, in order.
    pub fn samples(&self) -> Vec<Sample> {
        self.fleet.samples.clone()
    }

    /// Records the fleet's unavailability when it changed.
    pub(super) fn sample(&mut self) {
        let unavailable = self.groups.values().map(Group::unavailable).sum();
        if self.fleet.samples.last().map(|s| s.unavailable) != Some(unavailable) {
            self.fleet.samples.push(Sample {
                at: Instant::now(),
                unavailable,
            });
        }
    }

    fn new_instance_id(&mut self) -> String {
        self.next_id += 1;
        format!("i-{:017x}", 0x0b00_0000_0000u64 + self.next_id)
    }

    /// The numbered version a group launches now.
    fn launched_from(&self, group: &str) -> Option<LaunchSource> {
        match self.groups.get(group)?.launch.clone()? {
            LaunchSource::Template { id, name, version } => {
                let t = self.fleet.templates.get(&id)?;
                let number = match version.as_str() {
                    "$Latest" => t.latest_version,
                    "$Default" => t.default_version,
                    n => n.parse().ok()?,
                };
                Some(LaunchSource::Template {
                    id,
                    name,
                    version: number.to_string(),
                })
            }
            other => Some(other),
        }
    }

    /// Launches instances until every group with a capacity is full, as Auto Scaling does.
    fn refill(&mut self, now: Instant) {
        let short: Vec<(String, String, usize)> = self
            .groups
            .iter()
            .filter_map(|(name, g)| {
                let (desired, zone) = g.capacity.clone()?;
                let missing = desired.checked_sub(g.members.len()).filter(|m| *m > 0)?;
                Some((name.clone(), zone, missing))
            })
            .collect();
        for (group, zone, missing) in short {
            for _ in 0..missing {
                let id = self.new_instance_id();
                self.add_instance(&id, &zone);
                self.join_group(&id, &group);
                let launch = self.launched_from(&group);
                let waiting = match self
                    .groups
                    .get_mut(&group)
                    .and_then(|g| g.members.get_mut(&id))
                {
                    Some(m) => {
                        m.launch = launch;
                        m.waiting.is_some()
                    }
                    None => false,
                };
                if waiting && let Some(plan) = self.fleet.boot_plan.as_mut() {
                    match plan(&group, &id) {
                        Boot::Continue(after) => {
                            self.fleet
                                .boots
                                .push((now + after, id, LifecycleResult::Continue))
                        }
                        Boot::Abandon(after) => {
                            self.fleet
                                .boots
                                .push((now + after, id, LifecycleResult::Abandon))
                        }
                        Boot::Hang => {}
                    }
                }
            }
        }
    }

    /// Completes the simulated boots whose time has come, then refills the groups.
    pub(super) fn run_boots(&mut self, now: Instant) {
        self.refill(now);
        let mut due: Vec<(Instant, String, LifecycleResult)> = Vec::new();
        self.fleet.boots.retain(|b| {
            if b.0 <= now {
                due.push(b.clone());
                false
            } else {
                true
            }
        });
        due.sort_by_key(|b| b.0);
        for (at, id, result) in due {
            let waiting = self
                .groups
                .values()
                .any(|g| g.members.get(&id).is_some_and(|m| m.waiting.is_some()));
            if waiting {
                self.lifecycle_log.push(LifecycleEvent::Completed {
                    instance_id: id.clone(),
                    result,
                    at,
                });
                self.finish(&id, result);
                self.sample();
            }
        }
        self.refill(now);
        self.sample();
    }

    pub fn add_launch_hook(
        &mut self,
        group: &str,
        hook: &str,
        heartbeat_timeout: Duration,
        default_result: LifecycleResult,
    ) {
        if let Some(g) = self.groups.get_mut(group) {
            g.hooks.insert(
                hook.to_owned(),
                LifecycleHook {
                    group: group.to_owned(),
                    name: hook.to_owned(),
                    transition: LAUNCHING.into(),
                    heartbeat_timeout,
                    default_result: default_result.as_str().into(),
                },
            );
        }
    }

    /// Puts an instance in a group as a new launch: `Pending:Wait` when a launch hook exists.
    pub fn join_group(&mut self, instance_id: &str, group: &str) {
        let now = Instant::now();
        if let Some(g) = self.groups.get_mut(group) {
            let hook = g.hooks.values().find(|h| h.transition == LAUNCHING);
            let member = match hook {
                Some(h) => Member {
                    lifecycle_state: "Pending:Wait".into(),
                    waiting: Some((h.name.clone(), now + h.heartbeat_timeout)),
                    healthy: true,
                    launch: None,
                },
                None => Member {
                    lifecycle_state: "InService".into(),
                    waiting: None,
                    healthy: true,
                    launch: None,
                },
            };
            g.members.insert(instance_id.to_owned(), member);
        }
        self.tag_instance(instance_id, "aws:autoscaling:groupName", group);
    }

    /// Puts an instance in a group as a new launch that is `Pending` for `for_` before its
    /// launch hook holds it in `Pending:Wait` (on AWS the instance starts first).
    pub fn join_group_pending(&mut self, instance_id: &str, group: &str, for_: Duration) {
        self.join_group(instance_id, group);
        if let Some(m) = self
            .groups
            .get_mut(group)
            .and_then(|g| g.members.get_mut(instance_id))
            .filter(|m| m.waiting.is_some())
        {
            m.lifecycle_state = "Pending".into();
            m.waiting = None;
            let (id, group) = (instance_id.to_owned(), group.to_owned());
            self.at(Instant::now() + for_, move |w| w.join_group(&id, &group));
        }
    }

    pub fn lifecycle_state(&self, instance_id: &str) -> Option<String> {
        self.groups.values().find_map(|g| {
            g.members
                .get(instance_id)
                .map(|m| m.lifecycle_state.clone())
        })
    }

    pub fn lifecycle_log(&self) -> Vec<LifecycleEvent> {
        self.lifecycle_log.clone()
    }

    pub(super) fn leave_groups(&mut self, instance_id: &str) {
        for g in self.groups.values_mut() {
            g.members.remove(instance_id);
        }
    }

    pub(super) fn expire_lifecycle_actions(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for g in self.groups.values() {
            for (id, m) in &g.members {
                if let Some((hook, deadline)) = &m.waiting
                    && now >= *deadline
                {
                    let result = if g
                        .hooks
                        .get(hook)
                        .is_some_and(|h| h.default_result == "CONTINUE")
                    {
                        LifecycleResult::Continue
                    } else {
                        LifecycleResult::Abandon
                    };
                    expired.push((id.clone(), result));
                }
            }
        }
        for (id, result) in expired {
            self.lifecycle_log.push(LifecycleEvent::TimedOut {
                instance_id: id.clone(),
                result,
                at: now,
            });
            self.finish(&id, result);
        }
    }

    fn finish(&mut self, instance_id: &str, result: LifecycleResult) {
        match result {
            LifecycleResult::Continue => {
                for g in self.groups.values_mut() {
                    if let Some(m) = g.members.get_mut(instance_id) {
                        m.lifecycle_state = "InService".into();
                        m.waiting = None;
                    }
                }
            }
            LifecycleResult::Abandon => {
                self.terminate_instance(instance_id);
                self.refill(Instant::now());
            }
        }
    }

    fn describe_group(&self, name: &str) -> Option<ScalingGroup> {
        let g = self.groups.get(name)?;
        Some(ScalingGroup {
            name: name.to_owned(),
            tags: g.tags.clone(),
            desired_capacity: g.capacity.as_ref().map_or(g.members.len(), |(d, _)| *d) as i32,
            instances: g
                .members
                .iter()
                .map(|(id, m)| GroupInstance {
                    instance_id: id.clone(),
                    availability_zone: self
                        .instances
                        .get(id)
                        .map(|i| i.availability_zone.clone())
                        .unwrap_or_default(),
                    lifecycle_state: m.lifecycle_state.clone(),
                    health_status: if m.healthy { "Healthy" } else { "Unhealthy" }.into(),
                    launch: m.launch.clone(),
                })
                .collect(),
            launch: g.launch.clone(),
        })
    }

    fn waiting_member(
        &mut self,
        group: &str,
        hook: &str,
        instance_id: &str,
        operation: &'static str,
    ) -> Result<&mut Member, Error> {
        let no_action = || Error::NoActiveLifecycleAction {
            instance_id: instance_id.to_owned(),
            message: format!("No active Lifecycle Action found with instance ID {instance_id}"),
        };
        let g = self.groups.get_mut(group).ok_or_else(|| Error::NotFound {
            operation,
            resource: group.to_owned(),
            message: format!("AutoScalingGroup name not found - {group}"),
        })?;
        match g.members.get_mut(instance_id) {
            Some(m) if m.waiting.as_ref().is_some_and(|(h, _)| h == hook) => Ok(m),
            _ => Err(no_action()),
        }
    }
}

#[async_trait]
impl LifecycleService for MemoryCloud {
    async fn membership(&self, instance_id: &str) -> Result<Option<GroupMember>, Error> {
        self.request(DESCRIBE_AUTO_SCALING_INSTANCES, |world| {
            Ok(world.groups.iter().find_map(|(name, g)| {
                g.members.get(instance_id).map(|m| GroupMember {
                    group: name.clone(),
                    lifecycle_state: m.lifecycle_state.clone(),
                })
            }))
        })
        .await
    }

    async fn group(&self, name: &str) -> Result<Option<ScalingGroup>, Error> {
        self.request(DESCRIBE_AUTO_SCALING_GROUPS, |world| {
            Ok(world.describe_group(name))
        })
        .await
    }

    async fn lifecycle_hook(
        &self,
        group: &str,
        hook: &str,
    ) -> Result<Option<LifecycleHook>, Error> {
        self.request(DESCRIBE_LIFECYCLE_HOOKS, |world| {
            Ok(world
                .groups
                .get(group)
                .and_then(|g| g.hooks.get(hook).cloned()))
        })
        .await
    }

    async fn heartbeat(&self, group: &str, hook: &str, instance_id: &str) -> Result<(), Error> {
        self.request(RECORD_LIFECYCLE_ACTION_HEARTBEAT, |world| {
            let timeout = world
                .groups
                .get(group)
                .and_then(|g| g.hooks.get(hook))
                .map(|h| h.heartbeat_timeout)
                .unwrap_or_default();
            let now = Instant::now();
            let member = world.waiting_member(
                group,
                hook,
                instance_id,
                RECORD_LIFECYCLE_ACTION_HEARTBEAT,
            )?;
            member.waiting = Some((hook.to_owned(), now + timeout));
            world.lifecycle_log.push(LifecycleEvent::Heartbeat {
                instance_id: instance_id.to_owned(),
                at: now,
            });
            Ok(())
        })
        .await
    }

    async fn complete(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
        result: LifecycleResult,
    ) -> Result<(), Error> {
        self.request(COMPLETE_LIFECYCLE_ACTION, |world| {
            world.waiting_member(group, hook, instance_id, COMPLETE_LIFECYCLE_ACTION)?;
            world.lifecycle_log.push(LifecycleEvent::Completed {
                instance_id: instance_id.to_owned(),
                result,
                at: Instant::now(),
            });
            world.finish(instance_id, result);
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl GroupService for MemoryCloud {
    async fn groups_named(&self, names: &[String]) -> Result<Vec<ScalingGroup>, Error> {
        let mut found = Vec::new();
        for batch in names.chunks(BATCH) {
            let page = self
                .request(DESCRIBE_AUTO_SCALING_GROUPS, |world| {
                    Ok(batch
                        .iter()
                        .filter_map(|n| world.describe_group(n))
                        .collect::<Vec<_>>())
                })
                .await?;
            found.extend(page);
        }
        Ok(found)
    }

    async fn groups_tagged(&self, key: &str, value: &str) -> Result<Vec<ScalingGroup>, Error> {
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        // Bounded: every page moves `after` forward through a finite, ordered map.
        loop {
            let (page, more) = self
                .request(DESCRIBE_AUTO_SCALING_GROUPS, |world| {
                    let mut names: Vec<&String> = world
                        .groups
                        .iter()
                        .filter(|(n, g)| {
                            after.as_ref().is_none_or(|a| *n > a)
                                && g.tags.get(key).is_some_and(|v| v == value)
                        })
                        .map(|(n, _)| n)
                        .take(BATCH + 1)
                        .collect();
                    // Like a NextToken: only when another page follows.
                    let more = names.len() > BATCH;
                    names.truncate(BATCH);
                    let page: Vec<ScalingGroup> = names
                        .iter()
                        .filter_map(|n| world.describe_group(n))
                        .collect();
                    Ok((page, more))
                })
                .await?;
            after = page.last().map(|g| g.name.clone());
            found.extend(page);
            if !more {
                return Ok(found);
            }
        }
    }

    async fn lifecycle_hooks(&self, group: &str) -> Result<Vec<LifecycleHook>, Error> {
        self.request(DESCRIBE_LIFECYCLE_HOOKS, |world| {
            Ok(world
                .groups
                .get(group)
                .map(|g| g.hooks.values().cloned().collect())
                .unwrap_or_default())
        })
        .await
    }

    async fn terminate_in_group(&self, instance_id: &str) -> Result<(), Error> {
        self.request(TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP, |world| {
            if world.lifecycle_state(instance_id).is_none() {
                return Err(Error::NotFound {
                    operation: TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP,
                    resource: instance_id.to_owned(),
                    message: format!("Instance Id not found - {instance_id}"),
                });
            }
            world.terminate_instance(instance_id);
            world.refill(Instant::now());
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl TemplateService for MemoryCloud {
    async fn template_versions(&self, ids: &[String]) -> Result<Vec<TemplateVersions>, Error> {
        let mut found = Vec::new();
        for batch in ids.chunks(BATCH) {
            let page = self
                .request(DESCRIBE_LAUNCH_TEMPLATES, |world| {
                    Ok(batch
                        .iter()
                        .filter_map(|id| {
                            world.fleet.templates.get(id).map(|t| TemplateVersions {
                                id: id.clone(),
                                default_version: t.default_version,
                                latest_version: t.latest_version,
                            })
                        })
                        .collect::<Vec<_>>())
                })
                .await?;
            found.extend(page);
        }
        Ok(found)
    }
}
