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
    Error, GroupInstance, GroupMember, LifecycleHook, LifecycleResult, LifecycleService,
    ScalingGroup, Tags,
};

pub const DESCRIBE_AUTO_SCALING_INSTANCES: &str = "DescribeAutoScalingInstances";
pub const DESCRIBE_AUTO_SCALING_GROUPS: &str = "DescribeAutoScalingGroups";
pub const DESCRIBE_LIFECYCLE_HOOKS: &str = "DescribeLifecycleHooks";
pub const RECORD_LIFECYCLE_ACTION_HEARTBEAT: &str = "RecordLifecycleActionHeartbeat";
pub const COMPLETE_LIFECYCLE_ACTION: &str = "CompleteLifecycleAction";

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

struct Member {
    lifecycle_state: String,
    /// While in Pending:Wait: the hook and the time its timeout runs out.
    waiting: Option<(String, Instant)>,
}

pub(super) struct Group {
    tags: Tags,
    hooks: BTreeMap<String, LifecycleHook>,
    members: BTreeMap<String, Member>,
}

impl World {
    pub fn add_group(&mut self, name: &str, tags: &Tags) {
        self.groups.insert(
            name.to_owned(),
            Group {
                tags: tags.clone(),
                hooks: BTreeMap::new(),
                members: BTreeMap::new(),
            },
        );
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
                },
                None => Member {
                    lifecycle_state: "InService".into(),
                    waiting: None,
                },
            };
            g.members.insert(instance_id.to_owned(), member);
        }
        self.tag_instance(instance_id, "aws:autoscaling:groupName", group);
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
            LifecycleResult::Abandon => self.terminate_instance(instance_id),
        }
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
            Ok(world.groups.get(name).map(|g| ScalingGroup {
                name: name.to_owned(),
                tags: g.tags.clone(),
                desired_capacity: g.members.len() as i32,
                instances: g
                    .members
                    .iter()
                    .map(|(id, m)| GroupInstance {
                        instance_id: id.clone(),
                        availability_zone: world
                            .instances
                            .get(id)
                            .map(|i| i.availability_zone.clone())
                            .unwrap_or_default(),
                        lifecycle_state: m.lifecycle_state.clone(),
                        health_status: "Healthy".into(),
                    })
                    .collect(),
            }))
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
