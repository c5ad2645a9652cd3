//! Building clusters on the emulator the way the Terraform module does: per node a fixed-IP
//! network interface and a single-instance Auto Scaling group with a launch lifecycle hook.

use std::io;
use std::time::{Duration, Instant};

use aws_sdk_autoscaling::types::Tag as AsgTag;
use aws_sdk_ec2::types::{
    LaunchTemplateInstanceNetworkInterfaceSpecificationRequest, RequestLaunchTemplateData,
    ResourceType, Tag, TagSpecification,
};
use cps_provider::Tags;

use crate::{Bench, sdk};

/// One instance of a group, as Auto Scaling reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub instance_id: String,
    pub lifecycle_state: String,
    pub launch_template_version: Option<String>,
}

pub(crate) fn asg_error<E: std::error::Error + 'static, R: std::fmt::Debug>(
    e: aws_sdk_autoscaling::error::SdkError<E, R>,
) -> io::Error {
    io::Error::other(aws_sdk_autoscaling::error::DisplayErrorContext(&e).to_string())
}

/// Group tags, propagated to the group's instances.
pub(crate) fn group_tags(group: &str, tags: &Tags) -> Vec<AsgTag> {
    tags.iter()
        .map(|(k, v)| {
            AsgTag::builder()
                .key(k)
                .value(v)
                .propagate_at_launch(true)
                .resource_id(group)
                .resource_type("auto-scaling-group")
                .build()
        })
        .collect()
}

impl Bench {
    /// The default subnet of `zone` and its CIDR block.
    pub async fn subnet(&self, zone: &str) -> io::Result<(String, String)> {
        let out = self.ec2.describe_subnets().send().await.map_err(sdk)?;
        out.subnets()
            .iter()
            .find(|s| s.availability_zone() == Some(zone))
            .and_then(|s| Some((s.subnet_id()?.to_owned(), s.cidr_block()?.to_owned())))
            .ok_or_else(|| io::Error::other(format!("no subnet in {zone}")))
    }

    /// A network interface with a fixed private IP (host number `host` in the zone's subnet).
    pub async fn create_interface(
        &self,
        zone: &str,
        host: u8,
        tags: &Tags,
    ) -> io::Result<(String, String)> {
        let (subnet, cidr) = self.subnet(zone).await?;
        let base: Vec<u8> = cidr
            .split('/')
            .next()
            .unwrap_or_default()
            .split('.')
            .filter_map(|o| o.parse().ok())
            .collect();
        let ip = format!("{}.{}.{}.{}", base[0], base[1], base[2], host);
        let out = self
            .ec2
            .create_network_interface()
            .subnet_id(subnet)
            .private_ip_address(&ip)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::NetworkInterface)
                    .set_tags(Some(
                        tags.iter()
                            .map(|(k, v)| Tag::builder().key(k).value(v).build())
                            .collect(),
                    ))
                    .build(),
            )
            .send()
            .await
            .map_err(sdk)?;
        let id = out
            .network_interface()
            .and_then(|n| n.network_interface_id())
            .ok_or_else(|| io::Error::other("CreateNetworkInterface returned no id"))?
            .to_owned();
        Ok((id, ip))
    }

    /// The first image the emulator offers (any will do for a launch template).
    pub(crate) async fn any_image(&self) -> io::Result<String> {
        let images = self.ec2.describe_images().send().await.map_err(sdk)?;
        images
            .images()
            .first()
            .and_then(|i| i.image_id())
            .map(str::to_owned)
            .ok_or_else(|| io::Error::other("the emulator has no images"))
    }

    /// A launch template (any image) and a group of `size` in `zone`, with `tags` propagated to
    /// its instances and a launching lifecycle hook `hook` (default result ABANDON).
    pub async fn create_group(
        &self,
        name: &str,
        zone: &str,
        size: i32,
        tags: &Tags,
        hook: &str,
        heartbeat_timeout: Duration,
    ) -> io::Result<String> {
        let image = self.any_image().await?;
        let (subnet, _) = self.subnet(zone).await?;
        let template = self
            .ec2
            .create_launch_template()
            .launch_template_name(format!("{name}-lt"))
            .launch_template_data(
                RequestLaunchTemplateData::builder()
                    .image_id(image)
                    .instance_type(aws_sdk_ec2::types::InstanceType::M6iLarge)
                    .network_interfaces(
                        LaunchTemplateInstanceNetworkInterfaceSpecificationRequest::builder()
                            .device_index(0)
                            .subnet_id(&subnet)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .map_err(sdk)?;
        let template_id = template
            .launch_template()
            .and_then(|t| t.launch_template_id())
            .ok_or_else(|| io::Error::other("CreateLaunchTemplate returned no id"))?
            .to_owned();
        let asg_tags = group_tags(name, tags);
        self.asg
            .create_auto_scaling_group()
            .auto_scaling_group_name(name)
            .launch_template(
                aws_sdk_autoscaling::types::LaunchTemplateSpecification::builder()
                    .launch_template_id(&template_id)
                    .version("$Latest")
                    .build(),
            )
            .min_size(0)
            .max_size(size.max(1))
            .desired_capacity(0)
            .vpc_zone_identifier(&subnet)
            .set_tags(Some(asg_tags))
            .send()
            .await
            .map_err(asg_error)?;
        self.asg
            .put_lifecycle_hook()
            .auto_scaling_group_name(name)
            .lifecycle_hook_name(hook)
            .lifecycle_transition("autoscaling:EC2_INSTANCE_LAUNCHING")
            .heartbeat_timeout(heartbeat_timeout.as_secs() as i32)
            .default_result("ABANDON")
            .send()
            .await
            .map_err(asg_error)?;
        // Capacity after the hook exists, so the first instances wait in Pending:Wait.
        self.asg
            .set_desired_capacity()
            .auto_scaling_group_name(name)
            .desired_capacity(size)
            .send()
            .await
            .map_err(asg_error)?;
        Ok(template_id)
    }

    pub async fn members(&self, group: &str) -> io::Result<Vec<Member>> {
        let out = self
            .asg
            .describe_auto_scaling_groups()
            .auto_scaling_group_names(group)
            .send()
            .await
            .map_err(asg_error)?;
        Ok(out
            .auto_scaling_groups()
            .iter()
            .flat_map(|g| g.instances())
            .map(|i| Member {
                instance_id: i.instance_id().unwrap_or_default().to_owned(),
                lifecycle_state: i
                    .lifecycle_state()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_default(),
                launch_template_version: i
                    .launch_template()
                    .and_then(|t| t.version())
                    .map(str::to_owned),
            })
            .collect())
    }

    /// Waits (bounded) until `group` has `count` instances in Pending:Wait; returns their ids.
    pub async fn wait_pending(
        &self,
        group: &str,
        count: usize,
        timeout: Duration,
    ) -> io::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let waiting: Vec<String> = self
                .members(group)
                .await?
                .into_iter()
                .filter(|m| m.lifecycle_state == "Pending:Wait")
                .map(|m| m.instance_id)
                .collect();
            if waiting.len() >= count {
                return Ok(waiting);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{group}: {} of {count} instances in Pending:Wait after {timeout:?}",
                    waiting.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One node as the Terraform module makes it: its fixed-IP interface (host `host` of the
    /// zone's subnet) and a one-instance group `group` with the launching hook `hook`, tagged
    /// `tags`; waits for the group's first instance in Pending:Wait. Returns (interface, IP,
    /// instance).
    pub async fn create_node(
        &self,
        group: &str,
        zone: &str,
        host: u8,
        tags: &Tags,
        hook: &str,
        heartbeat_timeout: Duration,
    ) -> io::Result<(String, String, String)> {
        let (eni, ip) = self.create_interface(zone, host, tags).await?;
        self.create_group(group, zone, 1, tags, hook, heartbeat_timeout)
            .await?;
        let first = self.wait_pending(group, 1, Duration::from_secs(30)).await?;
        Ok((eni, ip, first[0].clone()))
    }

    /// Replaces an instance the way an operator or a roll does: terminate it in its group
    /// without lowering capacity, so the group launches another.
    pub async fn terminate_in_group(&self, instance_id: &str) -> io::Result<()> {
        self.asg
            .terminate_instance_in_auto_scaling_group()
            .instance_id(instance_id)
            .should_decrement_desired_capacity(false)
            .send()
            .await
            .map_err(asg_error)?;
        Ok(())
    }
}
