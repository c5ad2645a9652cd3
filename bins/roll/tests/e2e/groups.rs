//! Auto Scaling setups the bench's cluster builder does not make, straight through the SDK:
//! mixed-instances groups whose override names its own launch template.

use std::time::Duration;

use aws_sdk_autoscaling::types::{
    LaunchTemplate, LaunchTemplateOverrides, LaunchTemplateSpecification, MixedInstancesPolicy,
};
use aws_sdk_ec2::types::RequestLaunchTemplateData;
use cps_testbed::Bench;

/// Panics with the SDK's whole error chain.
fn ok<T, E: std::error::Error + 'static, R: std::fmt::Debug>(
    r: Result<T, aws_sdk_ec2::error::SdkError<E, R>>,
) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{}", aws_sdk_ec2::error::DisplayErrorContext(&e)),
    }
}

/// A launch template (any image, `instance_type`); returns its id.
pub async fn template(bench: &Bench, name: &str, instance_type: &str) -> String {
    let image = ok(bench.ec2().describe_images().send().await).images()[0]
        .image_id()
        .unwrap()
        .to_owned();
    let out = ok(bench
        .ec2()
        .create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(image)
                .instance_type(instance_type.into())
                .build(),
        )
        .send()
        .await);
    out.launch_template()
        .and_then(|t| t.launch_template_id())
        .unwrap()
        .to_owned()
}

fn spec(template_id: &str) -> LaunchTemplateSpecification {
    LaunchTemplateSpecification::builder()
        .launch_template_id(template_id)
        .version("$Latest")
        .build()
}

/// A one-instance mixed-instances group tagged `tags`, with a launch hook: its policy names
/// `main` and one override, `m7g.large` from its own template `arm` (both `$Latest`). The
/// group launches that override.
pub async fn mixed_group(
    bench: &Bench,
    name: &str,
    zone: &str,
    main: &str,
    arm: &str,
    tags: &cps_provider::Tags,
    hook: &str,
) {
    let (subnet, _) = bench.subnet(zone).await.unwrap();
    let policy = MixedInstancesPolicy::builder()
        .launch_template(
            LaunchTemplate::builder()
                .launch_template_specification(spec(main))
                .overrides(
                    LaunchTemplateOverrides::builder()
                        .instance_type("m7g.large")
                        .launch_template_specification(spec(arm))
                        .build(),
                )
                .overrides(
                    LaunchTemplateOverrides::builder()
                        .instance_type("m6i.large")
                        .build(),
                )
                .build(),
        )
        .build();
    let group_tags = tags.iter().map(|(k, v)| {
        aws_sdk_autoscaling::types::Tag::builder()
            .key(k)
            .value(v)
            .propagate_at_launch(true)
            .resource_id(name)
            .resource_type("auto-scaling-group")
            .build()
    });
    ok(bench
        .asg()
        .create_auto_scaling_group()
        .auto_scaling_group_name(name)
        .mixed_instances_policy(policy)
        .min_size(0)
        .max_size(1)
        .desired_capacity(0)
        .vpc_zone_identifier(subnet)
        .set_tags(Some(group_tags.collect()))
        .send()
        .await);
    ok(bench
        .asg()
        .put_lifecycle_hook()
        .auto_scaling_group_name(name)
        .lifecycle_hook_name(hook)
        .lifecycle_transition("autoscaling:EC2_INSTANCE_LAUNCHING")
        .heartbeat_timeout(600)
        .default_result("ABANDON")
        .send()
        .await);
    ok(bench
        .asg()
        .set_desired_capacity()
        .auto_scaling_group_name(name)
        .desired_capacity(1)
        .send()
        .await);
}

/// How long the bench waits for a group to settle.
pub const SETTLE: Duration = Duration::from_secs(60);

/// Puts an instance in Standby; `decrement` lowers the group's desired capacity (else the group
/// launches a replacement).
pub async fn enter_standby(bench: &Bench, group: &str, instance: &str, decrement: bool) {
    ok(bench
        .asg()
        .enter_standby()
        .auto_scaling_group_name(group)
        .instance_ids(instance)
        .should_decrement_desired_capacity(decrement)
        .send()
        .await);
}

/// Detaches an instance from its group (it keeps running), lowering the desired capacity.
pub async fn detach(bench: &Bench, group: &str, instance: &str) {
    ok(bench
        .asg()
        .detach_instances()
        .auto_scaling_group_name(group)
        .instance_ids(instance)
        .should_decrement_desired_capacity(true)
        .send()
        .await);
}

/// Suspends (or, `suspend` false, resumes) scaling processes of a group.
pub async fn processes(bench: &Bench, group: &str, names: &[&str], suspend: bool) {
    let names: Vec<String> = names.iter().map(|p| (*p).to_owned()).collect();
    if suspend {
        ok(bench
            .asg()
            .suspend_processes()
            .auto_scaling_group_name(group)
            .set_scaling_processes(Some(names))
            .send()
            .await);
    } else {
        ok(bench
            .asg()
            .resume_processes()
            .auto_scaling_group_name(group)
            .set_scaling_processes(Some(names))
            .send()
            .await);
    }
}

/// Starts an instance refresh on a group, or (`start` false) cancels the one in progress.
pub async fn refresh(bench: &Bench, group: &str, start: bool) {
    if start {
        ok(bench
            .asg()
            .start_instance_refresh()
            .auto_scaling_group_name(group)
            .send()
            .await);
    } else {
        ok(bench
            .asg()
            .cancel_instance_refresh()
            .auto_scaling_group_name(group)
            .send()
            .await);
    }
}

/// A TERMINATING lifecycle hook: instances the group terminates wait in Terminating:Wait.
pub async fn terminating_hook(bench: &Bench, group: &str, hook: &str) {
    ok(bench
        .asg()
        .put_lifecycle_hook()
        .auto_scaling_group_name(group)
        .lifecycle_hook_name(hook)
        .lifecycle_transition("autoscaling:EC2_INSTANCE_TERMINATING")
        .heartbeat_timeout(600)
        .default_result("CONTINUE")
        .send()
        .await);
}

/// What a group held, each time one of its instances was seen in Terminating:Wait.
pub type Seen = std::sync::Arc<std::sync::Mutex<Vec<Vec<(String, String)>>>>;

/// Plays a drain on every group: an instance seen in Terminating:Wait has its terminating
/// action completed `drain` later. Each time one is seen waiting, what its group held at that
/// moment is recorded.
pub fn drain(bench: &Bench, groups: &[String], hook: &str, drain: Duration) -> (Background, Seen) {
    let asg = bench.asg().clone();
    let groups = groups.to_vec();
    let hook = hook.to_owned();
    let seen: Seen = Default::default();
    let sink = seen.clone();
    let task = tokio::spawn(async move {
        let mut first: std::collections::BTreeMap<String, std::time::Instant> = Default::default();
        loop {
            if let Ok(out) = asg
                .describe_auto_scaling_groups()
                .set_auto_scaling_group_names(Some(groups.clone()))
                .send()
                .await
            {
                for g in out.auto_scaling_groups() {
                    let all: Vec<(String, String)> = g
                        .instances()
                        .iter()
                        .map(|i| {
                            (
                                i.instance_id().unwrap_or_default().to_owned(),
                                i.lifecycle_state()
                                    .map(|s| s.as_str().to_owned())
                                    .unwrap_or_default(),
                            )
                        })
                        .collect();
                    for (id, state) in &all {
                        if state != "Terminating:Wait" {
                            continue;
                        }
                        sink.lock().unwrap().push(all.clone());
                        let since = *first
                            .entry(id.clone())
                            .or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= drain {
                            let _ = asg
                                .complete_lifecycle_action()
                                .auto_scaling_group_name(
                                    g.auto_scaling_group_name().unwrap_or_default(),
                                )
                                .lifecycle_hook_name(&hook)
                                .instance_id(id)
                                .lifecycle_action_result("CONTINUE")
                                .send()
                                .await;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (Background(task), seen)
}

/// A background task, stopped on drop.
pub struct Background(tokio::task::JoinHandle<()>);

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}
