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
