//! Rolling updates on the emulator: new launch template versions, a simulator that plays the
//! boots of the instances groups launch (completing their lifecycle actions after a fixed
//! time), and a sampler of how many nodes are out of service.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_autoscaling::types::{LaunchTemplateSpecification, LifecycleState};
use aws_sdk_ec2::types::RequestLaunchTemplateData;
use cps_provider::Tags;

use crate::Bench;
use crate::cluster::{asg_error, group_tags};

/// How a simulated boot in a group ends when it does not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// The boot fails: ABANDON (the group launches another).
    Abandon,
    /// The boot never ends: the instance stays in Pending:Wait.
    Hang,
}

/// Group name → fate, changeable while the simulator runs; groups not named boot fine.
pub type Fates = Arc<Mutex<BTreeMap<String, Fate>>>;

/// A background task, stopped on drop.
pub struct Task(tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Groups' capacity minus instances InService and Healthy.
async fn unavailable(asg: &aws_sdk_autoscaling::Client, groups: &[String]) -> io::Result<usize> {
    let out = asg
        .describe_auto_scaling_groups()
        .set_auto_scaling_group_names(Some(groups.to_vec()))
        .send()
        .await
        .map_err(|e| {
            io::Error::other(aws_sdk_autoscaling::error::DisplayErrorContext(&e).to_string())
        })?;
    Ok(out
        .auto_scaling_groups()
        .iter()
        .map(|g| {
            let up = g
                .instances()
                .iter()
                .filter(|i| {
                    i.lifecycle_state() == Some(&LifecycleState::InService)
                        && i.health_status() == Some("Healthy")
                })
                .count();
            (g.desired_capacity().unwrap_or_default().max(0) as usize).saturating_sub(up)
        })
        .sum())
}

impl Bench {
    /// A `cps-roll` command aimed at this emulator with static test credentials.
    pub fn roll_command(&self, binary: &std::path::Path) -> std::process::Command {
        let mut cmd = std::process::Command::new(binary);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AWS_REGION", crate::REGION)
            .env("CPS_AWS_ENDPOINT", self.endpoint())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_CONFIG_FILE", self.dir().join("aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", self.dir().join("aws-config"));
        cmd
    }

    /// Publishes a new version of a launch template (a copy of version 1) and returns it.
    pub async fn new_template_version(&self, template_id: &str) -> io::Result<i64> {
        let out = self
            .ec2()
            .create_launch_template_version()
            .launch_template_id(template_id)
            .source_version("1")
            .launch_template_data(RequestLaunchTemplateData::builder().build())
            .send()
            .await
            .map_err(crate::sdk)?;
        out.launch_template_version()
            .and_then(|v| v.version_number())
            .ok_or_else(|| io::Error::other("CreateLaunchTemplateVersion returned no number"))
    }

    /// Points a group at a template version (a number, `$Latest` or `$Default`).
    pub async fn set_group_version(
        &self,
        group: &str,
        template_id: &str,
        version: &str,
    ) -> io::Result<()> {
        self.asg()
            .update_auto_scaling_group()
            .auto_scaling_group_name(group)
            .launch_template(
                LaunchTemplateSpecification::builder()
                    .launch_template_id(template_id)
                    .version(version)
                    .build(),
            )
            .send()
            .await
            .map_err(asg_error)?;
        Ok(())
    }

    /// Many one-instance groups (no lifecycle hook) sharing one template: `tags(i)` for group
    /// `i` of `names`. Returns the template id.
    pub async fn create_plain_groups(
        &self,
        names: &[String],
        zone: &str,
        tags: impl Fn(usize) -> Tags,
    ) -> io::Result<String> {
        let image = self.any_image().await?;
        let (subnet, _) = self.subnet(zone).await?;
        let template = self
            .ec2()
            .create_launch_template()
            .launch_template_name(format!("{}-shared-lt", names.first().map_or("", |n| n)))
            .launch_template_data(RequestLaunchTemplateData::builder().image_id(image).build())
            .send()
            .await
            .map_err(crate::sdk)?;
        let template_id = template
            .launch_template()
            .and_then(|t| t.launch_template_id())
            .ok_or_else(|| io::Error::other("CreateLaunchTemplate returned no id"))?
            .to_owned();
        for (i, name) in names.iter().enumerate() {
            let asg_tags = group_tags(name, &tags(i));
            self.asg()
                .create_auto_scaling_group()
                .auto_scaling_group_name(name)
                .launch_template(
                    LaunchTemplateSpecification::builder()
                        .launch_template_id(&template_id)
                        .version("$Latest")
                        .build(),
                )
                .min_size(1)
                .max_size(1)
                .desired_capacity(1)
                .vpc_zone_identifier(&subnet)
                .set_tags(Some(asg_tags))
                .send()
                .await
                .map_err(asg_error)?;
        }
        Ok(template_id)
    }

    /// Plays every boot in `groups`: an instance seen in Pending:Wait has its lifecycle action
    /// completed `boot` later with CONTINUE, unless `fates` names its group.
    pub fn simulate_boots(
        &self,
        groups: &[String],
        hook: &str,
        boot: Duration,
        fates: Fates,
    ) -> Task {
        let asg = self.asg().clone();
        let groups = groups.to_vec();
        let hook = hook.to_owned();
        Task(tokio::spawn(async move {
            let mut seen: BTreeMap<String, Instant> = BTreeMap::new();
            loop {
                if let Ok(out) = asg
                    .describe_auto_scaling_groups()
                    .set_auto_scaling_group_names(Some(groups.clone()))
                    .send()
                    .await
                {
                    for g in out.auto_scaling_groups() {
                        let name = g.auto_scaling_group_name().unwrap_or_default();
                        for i in g.instances() {
                            if i.lifecycle_state() != Some(&LifecycleState::PendingWait) {
                                continue;
                            }
                            let id = i.instance_id().unwrap_or_default().to_owned();
                            let since = *seen.entry(id.clone()).or_insert_with(Instant::now);
                            if since.elapsed() < boot {
                                continue;
                            }
                            let result = match fates.lock().ok().and_then(|f| f.get(name).copied())
                            {
                                None => "CONTINUE",
                                Some(Fate::Abandon) => "ABANDON",
                                Some(Fate::Hang) => continue,
                            };
                            let _ = asg
                                .complete_lifecycle_action()
                                .auto_scaling_group_name(name)
                                .lifecycle_hook_name(&hook)
                                .instance_id(&id)
                                .lifecycle_action_result(result)
                                .send()
                                .await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }))
    }

    /// Samples, every 50 ms, how many nodes of `groups` are out of service; the samples so far
    /// are in the returned vector.
    pub fn sample_unavailable(&self, groups: &[String]) -> (Task, Arc<Mutex<Vec<usize>>>) {
        let asg = self.asg().clone();
        let groups = groups.to_vec();
        let samples: Arc<Mutex<Vec<usize>>> = Arc::default();
        let sink = samples.clone();
        let task = Task(tokio::spawn(async move {
            loop {
                if let Ok(n) = unavailable(&asg, &groups).await
                    && let Ok(mut s) = sink.lock()
                {
                    s.push(n);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
        (task, samples)
    }

    /// Waits (bounded) until every instance of `groups` is InService and Healthy.
    pub async fn wait_in_service(&self, groups: &[String], timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = unavailable(self.asg(), groups).await?;
            if out == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{out} instance(s) of {groups:?} still out of service after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The access key the emulator holds to a node policy (see [`Bench::restrict_key`]).
pub const NODE_KEY: &str = "AKIACPSNODE000000001";

impl Bench {
    /// From now on, requests signed with [`NODE_KEY`] are allowed only what `policy` (an IAM
    /// policy document, JSON) allows, as AWS would evaluate it; other keys stay unrestricted.
    pub fn restrict_key(&self, policy: &str) -> io::Result<()> {
        let body = format!(r#"{{"access_key": "{NODE_KEY}", "policy": {policy}}}"#);
        self.control("POST", "/cps/node-policy", &body)
            .map(drop)
            .map_err(|e| io::Error::other(format!("the emulator refused the node policy: {e}")))
    }

    /// The actions the emulator denied to [`NODE_KEY`] since the policy was set, in order.
    pub fn denied_actions(&self) -> io::Result<Vec<String>> {
        let body = self.control("GET", "/cps/node-policy", "")?;
        let doc: serde_json::Value = serde_json::from_str(&body).map_err(io::Error::other)?;
        Ok(doc["denied"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect())
    }

    /// From now on, instances a group launches stay `Pending` for `pending` before their launch
    /// hook holds them in `Pending:Wait`, and DescribeAutoScalingInstances shows an instance only
    /// `membership` after it joined its group (as AWS may early in a boot).
    pub fn set_lifecycle_delays(&self, pending: Duration, membership: Duration) -> io::Result<()> {
        let body = format!(
            r#"{{"pending_delay": {}, "membership_delay": {}}}"#,
            pending.as_secs_f64(),
            membership.as_secs_f64()
        );
        self.control("POST", "/cps/settings", &body).map(drop)
    }

    /// One request to one of the emulator's control paths (see [`Emulator::control`]).
    fn control(&self, method: &str, path: &str, body: &str) -> io::Result<String> {
        self.emulator.control(method, path, body)
    }
}
