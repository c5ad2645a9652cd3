//! [`LifecycleService`] and [`GroupService`] on the Auto Scaling API.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_autoscaling::types::{AutoScalingGroup, Filter, LaunchTemplateSpecification};
use cps_provider::{
    CallLog, Error, GroupInstance, GroupMember, GroupService, InstanceRefresh, LaunchOverride,
    LaunchSource, LifecycleHook, LifecycleResult, LifecycleService, ScalingGroup,
};

use crate::classify::{Context, classify};
use crate::pages::paginate;

/// Group names per DescribeAutoScalingGroups request, and records per page: AWS's maximum.
const BATCH: usize = 100;

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

fn to_hook(group: &str, h: &aws_sdk_autoscaling::types::LifecycleHook) -> LifecycleHook {
    LifecycleHook {
        group: group.to_owned(),
        name: h.lifecycle_hook_name().unwrap_or_default().to_owned(),
        transition: h.lifecycle_transition().unwrap_or_default().to_owned(),
        heartbeat_timeout: Duration::from_secs(h.heartbeat_timeout().unwrap_or(3600).max(0) as u64),
        default_result: h.default_result().unwrap_or("ABANDON").to_owned(),
    }
}

fn to_template(t: &LaunchTemplateSpecification) -> LaunchSource {
    LaunchSource::Template {
        id: t.launch_template_id().unwrap_or_default().to_owned(),
        name: t.launch_template_name().unwrap_or_default().to_owned(),
        // AWS's own default when a group names no version.
        version: t.version().unwrap_or("$Default").to_owned(),
    }
}

/// The mixed-instances overrides that name their own launch template.
fn overrides(g: &AutoScalingGroup) -> Vec<LaunchOverride> {
    g.mixed_instances_policy()
        .and_then(|p| p.launch_template())
        .map(|t| t.overrides())
        .unwrap_or_default()
        .iter()
        .filter_map(|o| {
            Some(LaunchOverride {
                instance_type: o.instance_type().map(str::to_owned),
                launch: to_template(o.launch_template_specification()?),
            })
        })
        .collect()
}

fn to_group(g: &AutoScalingGroup) -> ScalingGroup {
    let launch = g
        .launch_template()
        .or_else(|| {
            g.mixed_instances_policy()
                .and_then(|p| p.launch_template())
                .and_then(|t| t.launch_template_specification())
        })
        .map(to_template)
        .or_else(|| {
            g.launch_configuration_name()
                .map(|name| LaunchSource::Configuration {
                    name: name.to_owned(),
                })
        });
    ScalingGroup {
        name: g.auto_scaling_group_name().unwrap_or_default().to_owned(),
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
                launch: i.launch_template().map(to_template).or_else(|| {
                    i.launch_configuration_name()
                        .map(|name| LaunchSource::Configuration {
                            name: name.to_owned(),
                        })
                }),
                instance_type: i.instance_type().map(str::to_owned),
            })
            .collect(),
        launch,
        overrides: overrides(g),
        suspended_processes: g
            .suspended_processes()
            .iter()
            .filter_map(|p| p.process_name().map(str::to_owned))
            .collect(),
    }
}

impl AutoScalingApi {
    /// A group's lifecycle hooks (one request), or only the one named.
    async fn describe_hooks(
        &self,
        group: &str,
        name: Option<&str>,
    ) -> Result<Vec<LifecycleHook>, Error> {
        self.calls.record("DescribeLifecycleHooks");
        let out = self
            .client
            .describe_lifecycle_hooks()
            .auto_scaling_group_name(group)
            .set_lifecycle_hook_names(name.map(|n| vec![n.to_owned()]))
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
            .map(|h| to_hook(group, h))
            .collect())
    }

    /// One paginated DescribeAutoScalingGroups listing.
    async fn describe_groups(
        &self,
        names: Option<&[String]>,
        filter: Option<Filter>,
        what: &str,
    ) -> Result<Vec<ScalingGroup>, Error> {
        paginate(&self.calls, "DescribeAutoScalingGroups", 1_000, |token| {
            let request = self
                .client
                .describe_auto_scaling_groups()
                .set_auto_scaling_group_names(names.map(<[String]>::to_vec))
                .set_filters(filter.clone().map(|f| vec![f]))
                .max_records(BATCH as i32)
                .set_next_token(token);
            async move {
                let page = request.send().await.map_err(|e| {
                    classify(
                        "DescribeAutoScalingGroups",
                        Context {
                            group: Some(what),
                            ..Context::default()
                        },
                        e,
                    )
                })?;
                let groups = page.auto_scaling_groups().iter().map(to_group).collect();
                Ok((groups, page.next_token().map(str::to_owned)))
            }
        })
        .await
    }
}

#[async_trait]
impl GroupService for AutoScalingApi {
    async fn groups_named(&self, names: &[String]) -> Result<Vec<ScalingGroup>, Error> {
        let mut found = Vec::new();
        for batch in names.chunks(BATCH) {
            let what = batch.first().map(String::as_str).unwrap_or_default();
            found.extend(self.describe_groups(Some(batch), None, what).await?);
        }
        Ok(found)
    }

    async fn groups_tagged(&self, key: &str, value: &str) -> Result<Vec<ScalingGroup>, Error> {
        let filter = Filter::builder()
            .name(format!("tag:{key}"))
            .values(value)
            .build();
        let what = format!("groups tagged {key}={value}");
        self.describe_groups(None, Some(filter), &what).await
    }

    async fn lifecycle_hooks(&self, group: &str) -> Result<Vec<LifecycleHook>, Error> {
        self.describe_hooks(group, None).await
    }

    async fn terminate_in_group(&self, instance_id: &str) -> Result<(), Error> {
        self.calls.record("TerminateInstanceInAutoScalingGroup");
        self.client
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance_id)
            .should_decrement_desired_capacity(false)
            .send()
            .await
            .map_err(|e| {
                classify(
                    "TerminateInstanceInAutoScalingGroup",
                    Context {
                        instance_id: Some(instance_id),
                        ..Context::default()
                    },
                    e,
                )
            })?;
        Ok(())
    }

    async fn instance_refreshes(&self, group: &str) -> Result<Vec<InstanceRefresh>, Error> {
        self.calls.record("DescribeInstanceRefreshes");
        // One page, newest first: an active refresh is always the latest one.
        let out = self
            .client
            .describe_instance_refreshes()
            .auto_scaling_group_name(group)
            .send()
            .await
            .map_err(|e| classify("DescribeInstanceRefreshes", of_group(group), e))?;
        Ok(out
            .instance_refreshes()
            .iter()
            .map(|r| InstanceRefresh {
                id: r.instance_refresh_id().unwrap_or_default().to_owned(),
                status: r
                    .status()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
            })
            .collect())
    }

    async fn suspend_processes(&self, group: &str, processes: &[String]) -> Result<(), Error> {
        self.calls.record("SuspendProcesses");
        self.client
            .suspend_processes()
            .auto_scaling_group_name(group)
            .set_scaling_processes(Some(processes.to_vec()))
            .send()
            .await
            .map_err(|e| classify("SuspendProcesses", of_group(group), e))?;
        Ok(())
    }

    async fn resume_processes(&self, group: &str, processes: &[String]) -> Result<(), Error> {
        self.calls.record("ResumeProcesses");
        self.client
            .resume_processes()
            .auto_scaling_group_name(group)
            .set_scaling_processes(Some(processes.to_vec()))
            .send()
            .await
            .map_err(|e| classify("ResumeProcesses", of_group(group), e))?;
        Ok(())
    }
}

fn of_group(group: &str) -> Context<'_> {
    Context {
        group: Some(group),
        ..Context::default()
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
            .map(to_group))
    }

    async fn lifecycle_hook(
        &self,
        group: &str,
        hook: &str,
    ) -> Result<Option<LifecycleHook>, Error> {
        Ok(self
            .describe_hooks(group, Some(hook))
            .await?
            .into_iter()
            .find(|h| h.name == hook))
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
