//! [`LifecycleService`] on the Auto Scaling API.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cps_provider::{
    CallLog, Error, GroupInstance, GroupMember, LifecycleHook, LifecycleResult, LifecycleService,
    ScalingGroup,
};

use crate::classify::{Context, classify};

/// Auto Scaling through its client. Counts every request it sends.
#[derive(Clone, Debug)]
pub struct AutoScalingApi {
    client: aws_sdk_autoscaling::Client,
    calls: Arc<CallLog>,
}

impl AutoScalingApi {
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self::from_client(aws_sdk_autoscaling::Client::new(config))
    }

    pub fn from_client(client: aws_sdk_autoscaling::Client) -> Self {
        Self {
            client,
            calls: Arc::new(CallLog::default()),
        }
    }

    pub fn calls(&self) -> &CallLog {
        &self.calls
    }
}

fn in_group<'a>(group: &'a str, instance_id: &'a str) -> Context<'a> {
    Context {
        group: Some(group),
        instance_id: Some(instance_id),
        ..Context::default()
    }
}

#[async_trait]
impl LifecycleService for AutoScalingApi {
    async fn membership(&self, instance_id: &str) -> Result<Option<GroupMember>, Error> {
        self.calls.record("DescribeAutoScalingInstances");
        let out = self
            .client
            .describe_auto_scaling_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .map_err(|e| {
                classify(
                    "DescribeAutoScalingInstances",
                    Context {
                        instance_id: Some(instance_id),
                        ..Context::default()
                    },
                    e,
                )
            })?;
        Ok(out
            .auto_scaling_instances()
            .iter()
            .find(|i| i.instance_id() == Some(instance_id))
            .map(|i| GroupMember {
                group: i.auto_scaling_group_name().unwrap_or_default().to_owned(),
                lifecycle_state: i.lifecycle_state().unwrap_or_default().to_owned(),
            }))
    }

    async fn group(&self, name: &str) -> Result<Option<ScalingGroup>, Error> {
        self.calls.record("DescribeAutoScalingGroups");
        let out = self
            .client
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(name)
            .send()
            .await
            .map_err(|e| {
                classify(
                    "DescribeAutoScalingGroups",
                    Context {
                        group: Some(name),
                        ..Context::default()
                    },
                    e,
                )
            })?;
        Ok(out
            .auto_scaling_groups()
            .iter()
            .find(|g| g.auto_scaling_group_name() == Some(name))
            .map(|g| ScalingGroup {
                name: name.to_owned(),
                tags: g
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_owned(), t.value()?.to_owned())))
                    .collect(),
                desired_capacity: g.desired_capacity().unwrap_or_default(),
                instances: g
                    .instances()
                    .iter()
                    .map(|i| GroupInstance {
                        instance_id: i.instance_id().unwrap_or_default().to_owned(),
                        availability_zone: i.availability_zone().unwrap_or_default().to_owned(),
                        lifecycle_state: i
                            .lifecycle_state()
                            .map(|s| s.as_str().to_owned())
                            .unwrap_or_default(),
                        health_status: i.health_status().unwrap_or_default().to_owned(),
                    })
                    .collect(),
            }))
    }

    async fn lifecycle_hook(
        &self,
        group: &str,
        hook: &str,
    ) -> Result<Option<LifecycleHook>, Error> {
        self.calls.record("DescribeLifecycleHooks");
        let out = self
            .client
            .describe_lifecycle_hooks()
            .auto_scaling_group_name(group)
            .lifecycle_hook_names(hook)
            .send()
            .await
            .map_err(|e| {
                classify(
                    "DescribeLifecycleHooks",
                    Context {
                        group: Some(group),
                        ..Context::default()
                    },
                    e,
                )
            })?;
        Ok(out
            .lifecycle_hooks()
            .iter()
            .find(|h| h.lifecycle_hook_name() == Some(hook))
            .map(|h| LifecycleHook {
                group: group.to_owned(),
                name: hook.to_owned(),
                transition: h.lifecycle_transition().unwrap_or_default().to_owned(),
                heartbeat_timeout: Duration::from_secs(
                    h.heartbeat_timeout().unwrap_or(3600).max(0) as u64,
                ),
                default_result: h.default_result().unwrap_or("ABANDON").to_owned(),
            }))
    }

    async fn heartbeat(&self, group: &str, hook: &str, instance_id: &str) -> Result<(), Error> {
        self.calls.record("RecordLifecycleActionHeartbeat");
        self.client
            .record_lifecycle_action_heartbeat()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .instance_id(instance_id)
            .send()
            .await
            .map_err(|e| {
                classify(
                    "RecordLifecycleActionHeartbeat",
                    in_group(group, instance_id),
                    e,
                )
            })?;
        Ok(())
    }

    async fn complete(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
        result: LifecycleResult,
    ) -> Result<(), Error> {
        self.calls.record("CompleteLifecycleAction");
        self.client
            .complete_lifecycle_action()
            .auto_scaling_group_name(group)
            .lifecycle_hook_name(hook)
            .instance_id(instance_id)
            .lifecycle_action_result(result.as_str())
            .send()
            .await
            .map_err(|e| classify("CompleteLifecycleAction", in_group(group, instance_id), e))?;
        Ok(())
    }
}
