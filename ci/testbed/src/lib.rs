//! The local bench on which cps is proven without an AWS account: the AWS emulator (moto with
//! a patch layer for the AWS behaviour it lacks), one fake IMDS per simulated instance, and a
//! udev stand-in that turns EBS attachments into loop devices (or, for a guest of the VM tier,
//! `vm`, into NVMe hot-plug). Used by the end-to-end tests,
//! the demo (`cps-testbed demo`) and the benchmarks (`cps-testbed bench`).

mod cluster;
pub mod emulator;
mod fleet;
pub mod imds;
mod locks;
mod secrets;
pub mod udev;
pub mod vm;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cps_fixtures::{Need, require};
use cps_provider::{InstanceIdentity, Tags, Volume, VolumeService};

pub use cluster::Member;
pub use emulator::{Delays, Emulator, REGION};
pub use fleet::{Fate, Fates, NODE_KEY, Task};
pub use imds::FakeImds;
pub use udev::{FakeUdev, Machine};

/// Whether the bench can run here; in CI a missing prerequisite fails instead (see
/// [`cps_fixtures::require`]).
pub fn ready(tier: &str) -> bool {
    let python = emulator::python();
    let mut needs = cps_fixtures::kernel_needs();
    needs.push(Need::Path(&python, "the emulator venv; run ci/setup"));
    require(tier, &needs)
}

/// A simulated EC2 instance: its id, zone, metadata service and device/sysfs roots.
pub struct Instance {
    pub id: String,
    pub availability_zone: String,
    pub imds: FakeImds,
    pub dev_root: PathBuf,
    pub sys_root: PathBuf,
    /// A directory private to this instance (configs, mount points, fstab).
    pub home: PathBuf,
}

impl Instance {
    pub fn identity(&self) -> InstanceIdentity {
        InstanceIdentity {
            instance_id: self.id.clone(),
            region: REGION.into(),
            availability_zone: self.availability_zone.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    pub delays: Delays,
    /// How long after "attached" the device node appears.
    pub device_appears_after: Duration,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            delays: Delays::default(),
            device_appears_after: Duration::from_millis(150),
        }
    }
}

/// Emulator + udev stand-in + instances, all under one temporary directory, all removed on
/// drop (loop devices and mounts included).
pub struct Bench {
    // Field order is drop order: udev (unmounts, detaches loops) before the emulator.
    udev: FakeUdev,
    emulator: Emulator,
    ec2: aws_sdk_ec2::Client,
    asg: aws_sdk_autoscaling::Client,
    instances: Mutex<BTreeMap<String, Arc<Instance>>>,
    dir: tempfile::TempDir,
}

impl Bench {
    pub fn start(options: BenchOptions) -> io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("cps-bench-").tempdir()?;
        let emulator = Emulator::start(options.delays, dir.path().join("emulator.log"))?;
        let udev = FakeUdev::start(
            emulator.endpoint(),
            dir.path().join("volumes"),
            options.device_appears_after,
        )?;
        std::fs::write(dir.path().join("aws-config"), "")?;
        Ok(Self {
            ec2: emulator.ec2(),
            asg: emulator::autoscaling_for(emulator.endpoint()),
            udev,
            emulator,
            instances: Mutex::new(BTreeMap::new()),
            dir,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn endpoint(&self) -> &str {
        self.emulator.endpoint()
    }

    /// The emulator itself, for its control paths (delays, aged modifications).
    pub fn emulator(&self) -> &Emulator {
        &self.emulator
    }

    pub fn ec2(&self) -> &aws_sdk_ec2::Client {
        &self.ec2
    }

    pub fn asg(&self) -> &aws_sdk_autoscaling::Client {
        &self.asg
    }

    pub fn udev(&self) -> &FakeUdev {
        &self.udev
    }

    /// The cps-aws provider on this emulator (counts its own calls).
    pub fn volumes_api(&self) -> cps_aws::Ec2Api {
        emulator_volumes(&self.emulator)
    }

    /// Launches an instance in `zone` (`us-east-1a`) with its own IMDS and device roots.
    pub async fn launch(&self, zone: &str) -> io::Result<Arc<Instance>> {
        let id = run_instance(&self.ec2, zone).await?;
        self.adopt(&id).await
    }

    /// Gives an instance the emulator launched (for an Auto Scaling group) its machine: IMDS,
    /// device and sysfs roots, a home directory. Idempotent.
    pub async fn adopt(&self, id: &str) -> io::Result<Arc<Instance>> {
        if let Some(i) = self
            .instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return Ok(i.clone());
        }
        let zone = self.zone_of(id).await?;
        let zone = zone.as_str();
        let id = id.to_owned();
        let home = self.dir.path().join("instances").join(&id);
        let (dev_root, sys_root) = (home.join("dev"), home.join("sys"));
        std::fs::create_dir_all(&dev_root)?;
        std::fs::create_dir_all(&sys_root)?;
        let imds = FakeImds::start(InstanceIdentity {
            instance_id: id.clone(),
            region: REGION.into(),
            availability_zone: zone.to_owned(),
        })?;
        self.udev.add_machine(
            &id,
            Machine {
                dev_root: dev_root.clone(),
                sys_root: sys_root.clone(),
            },
        );
        let instance = Arc::new(Instance {
            id: id.clone(),
            availability_zone: zone.to_owned(),
            imds,
            dev_root,
            sys_root,
            home,
        });
        self.instances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, instance.clone());
        Ok(instance)
    }

    /// The availability zone the emulator placed instance `id` in.
    pub async fn zone_of(&self, id: &str) -> io::Result<String> {
        let out = self
            .ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .map_err(sdk)?;
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find_map(|i| i.placement().and_then(|p| p.availability_zone()))
            .map(str::to_owned)
            .ok_or_else(|| io::Error::other(format!("{id} has no placement")))
    }

    /// Terminates an instance; its volumes detach, and the udev stand-in takes its devices away.
    pub async fn terminate(&self, instance: &Instance) -> io::Result<()> {
        self.ec2
            .terminate_instances()
            .instance_ids(&instance.id)
            .send()
            .await
            .map_err(sdk)?;
        Ok(())
    }

    /// Waits until the udev stand-in has removed every device of `instance` (bounded).
    pub fn wait_devices_gone(&self, volume_ids: &[&str]) -> bool {
        volume_ids
            .iter()
            .all(|v| self.udev.wait_backed(v, false, Duration::from_secs(10)))
    }

    /// The real cps-attach binary, set up as it would run on `instance`: its IMDS, this
    /// emulator, its device and sysfs roots, static test credentials.
    pub fn attach_command(&self, binary: &Path, instance: &Instance, config: &Path) -> Command {
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(config)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CPS_IMDS_ENDPOINT", instance.imds.endpoint())
            .env("CPS_AWS_ENDPOINT", self.endpoint())
            .env("CPS_DEVICE_ROOT", &instance.dev_root)
            .env("CPS_SYSFS_ROOT", &instance.sys_root)
            .env("CPS_ENV_FILE", instance.home.join("run/node.env"))
            .env("CPS_RUN_DIR", instance.home.join("run"))
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            // Not the shared config or credentials of the machine running the bench.
            .env("AWS_CONFIG_FILE", self.dir.path().join("aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                self.dir.path().join("aws-config"),
            );
        cmd
    }

    /// Volumes carrying all `tags`, as the emulator reports them.
    pub async fn volumes_tagged(&self, tags: &Tags) -> Vec<Volume> {
        self.volumes_api()
            .volumes_tagged(tags)
            .await
            .unwrap_or_default()
    }
}

/// The cps-aws provider on an emulator (counts its own calls).
pub fn emulator_volumes(emulator: &Emulator) -> cps_aws::Ec2Api {
    cps_aws::Ec2Api::from_client(emulator.ec2())
}

/// Starts one instance in `zone` on the emulator (any of its images) and returns its id.
pub async fn run_instance(ec2: &aws_sdk_ec2::Client, zone: &str) -> io::Result<String> {
    let mut ids = run_instances(ec2, zone, 1).await?;
    ids.pop()
        .ok_or_else(|| io::Error::other("RunInstances returned no instance"))
}

/// Starts `count` instances in `zone` in one request and returns their ids.
pub async fn run_instances(
    ec2: &aws_sdk_ec2::Client,
    zone: &str,
    count: i32,
) -> io::Result<Vec<String>> {
    let images = ec2.describe_images().send().await.map_err(sdk)?;
    let image = images
        .images()
        .first()
        .and_then(|i| i.image_id())
        .ok_or_else(|| io::Error::other("the emulator has no images"))?;
    let out = ec2
        .run_instances()
        .image_id(image)
        .min_count(count)
        .max_count(count)
        .instance_type(aws_sdk_ec2::types::InstanceType::M6iLarge)
        .placement(
            aws_sdk_ec2::types::Placement::builder()
                .availability_zone(zone)
                .build(),
        )
        .send()
        .await
        .map_err(sdk)?;
    Ok(out
        .instances()
        .iter()
        .filter_map(|i| i.instance_id())
        .map(str::to_owned)
        .collect())
}

pub(crate) fn sdk<E: std::error::Error + 'static, R: std::fmt::Debug>(
    e: aws_sdk_ec2::error::SdkError<E, R>,
) -> io::Error {
    io::Error::other(aws_sdk_ec2::error::DisplayErrorContext(&e).to_string())
}
