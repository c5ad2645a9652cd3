//! Growing a volume in place. When the configured size, type, iops or throughput differ from
//! the volume's, the volume is modified (growth only, never while another modification is in
//! progress, and an answer of "too soon after the last one" is a warning, not a failure); then
//! the filesystem is grown to the device, which also covers a volume someone else enlarged.

use std::sync::Arc;
use std::time::Duration;

use cps_blockdev::{BlockHost, Device, Filesystem, Grown};
use cps_provider::{
    Error as CloudError, Modification, ModificationState, Volume, VolumeChange, VolumeService,
};
use tracing::{info, warn};

use super::claim::Claim;
use super::device::on_host;
use crate::backoff::{self, Poll, RetryPolicy, Schedule, hash_str};
use crate::config::{AttachConfig, VolumeOptions};
use crate::error::Error;

/// The filesystems cps grows (online: mounted, in use).
const GROWABLE: [&str; 5] = ["ext2", "ext3", "ext4", "xfs", "btrfs"];

/// What the configuration asks of an existing volume.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The attributes to change; `None` when the volume is as configured.
    pub change: Option<VolumeChange>,
    /// The configured size is below the volume's: `(volume, configured)` GiB. Never shrunk.
    pub smaller: Option<(i32, i32)>,
}

/// Compares the volume with the configuration. The type is compared only when it was
/// configured (the default type must not convert volumes made elsewhere), iops and throughput
/// only when set.
pub fn wanted(volume: &Volume, options: &VolumeOptions) -> Wanted {
    let mut change = VolumeChange::default();
    let mut smaller = None;
    if options.size_gib > volume.size_gib {
        change.size_gib = Some(options.size_gib);
    } else if options.size_gib < volume.size_gib {
        smaller = Some((volume.size_gib, options.size_gib));
    }
    if options.type_configured && options.volume_type != volume.volume_type {
        change.volume_type = Some(options.volume_type.clone());
    }
    if options.iops.is_some() && options.iops != volume.iops {
        change.iops = options.iops;
    }
    if options.throughput.is_some() && options.throughput != volume.throughput {
        change.throughput = options.throughput;
    }
    Wanted {
        change: (change != VolumeChange::default()).then_some(change),
        smaller,
    }
}

/// What to do about a wanted change, given the volume's latest modification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send ModifyVolume.
    Modify(VolumeChange),
    /// Another modification is still under way: AWS refuses a second one; a later run asks.
    Busy(ModificationState),
}

/// A change is sent only when no modification is modifying or optimizing.
pub fn step(change: VolumeChange, latest: Option<&Modification>) -> Step {
    match latest.map(|m| m.state) {
        Some(s @ (ModificationState::Modifying | ModificationState::Optimizing)) => Step::Busy(s),
        _ => Step::Modify(change),
    }
}

/// What happened to the volume's size and the filesystem's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GrowOutcome {
    /// The modification sent now, if any.
    pub modified: Option<VolumeChange>,
    /// Why a wanted modification was not sent (busy, too soon, smaller), for the log.
    pub deferred: Option<String>,
    /// The filesystem before and after, in bytes, when it was grown.
    pub filesystem: Option<(u64, u64)>,
}

/// Modifies the volume if the configuration asks for more, then grows the mounted filesystem
/// to its device. `claim.volume` is the volume as the claim last saw it.
pub(super) async fn grow(
    host: &Arc<dyn BlockHost>,
    cloud: &dyn VolumeService,
    claim: &Claim,
    config: &AttachConfig,
    device: &Device,
    fs: &Filesystem,
    policy: RetryPolicy,
) -> Result<GrowOutcome, Error> {
    let mut out = GrowOutcome::default();
    let vid = claim.volume.id.as_str();
    let wanted = wanted(&claim.volume, &config.volume);
    if let Some((have, want)) = wanted.smaller {
        warn!(
            volume_id = vid,
            volume_gib = have,
            configured_gib = want,
            "the configured size is below the volume's; EBS volumes never shrink, keeping it"
        );
        out.deferred = Some(format!("configured {want} GiB < volume {have} GiB"));
    }
    let mut device_gib = claim.volume.size_gib;
    if let Some(change) = wanted.change {
        match modify(cloud, claim, config, change, policy).await? {
            Modified::Sent(change) => {
                device_gib = change.size_gib.unwrap_or(device_gib);
                out.modified = Some(change);
            }
            Modified::Deferred(why) => out.deferred = Some(why),
        }
    }
    if !GROWABLE.contains(&fs.fstype.as_str()) {
        if out.modified.is_some() {
            warn!(volume_id = vid, fstype = %fs.fstype, "cps grows ext2/3/4, xfs and btrfs only; grow this filesystem yourself");
        }
        return Ok(out);
    }
    let d = device.clone();
    let wanted_bytes = u64::try_from(device_gib).unwrap_or(0) << 30;
    wait_for_device(host, config, &d, fs, wanted_bytes).await?;
    let (f, t) = (fs.clone(), config.mount.target.clone());
    match on_host(host, vid, move |h| h.grow_filesystem(&d, &f, &t)).await {
        Ok(Grown::AlreadyFull(_)) => {}
        // The host will not grow it online (ext without CAP_SYS_RESOURCE, ext2): the node runs
        // at its old size, and the warning says how to grow it by hand.
        Err(Error::Host { source, .. })
            if matches!(*source, cps_blockdev::Error::CannotGrow { .. }) =>
        {
            warn!(volume_id = vid, error = %source, "the filesystem stays at its old size");
            out.deferred = Some(source.to_string());
        }
        Err(e) => return Err(e),
        Ok(Grown::Grown { before, after }) => {
            info!(volume_id = vid, device = %device.path.display(), fstype = %fs.fstype,
                from_bytes = before.filesystem_bytes, to_bytes = after.filesystem_bytes, "filesystem grown to the device");
            out.filesystem = Some((before.filesystem_bytes, after.filesystem_bytes));
        }
    }
    Ok(out)
}

/// What `cps-attach grow` did, for its report.
#[derive(Clone, Debug)]
pub struct RunningGrowth {
    pub volume_id: String,
    pub device: std::path::PathBuf,
    pub grow: GrowOutcome,
}

/// `cps-attach grow`: on a running node, the volume with the cluster's tags attached here and
/// mounted at the target is modified to the configuration and its filesystem grown. Nothing
/// else is touched; a volume not attached here, or not mounted there, is an error (the boot,
/// `cps-attach run`, is what claims and mounts).
pub async fn grow_running(
    cloud: &dyn VolumeService,
    host: Arc<dyn BlockHost>,
    identity: &cps_provider::InstanceIdentity,
    config: &AttachConfig,
) -> Result<RunningGrowth, Error> {
    let policy = RetryPolicy::within(config.node.command_timeout);
    let me = identity.instance_id.as_str();
    let claim = Claim {
        volume: attached_here(cloud, me, config, policy).await?,
        instance_id: me.to_owned(),
        origin: super::claim::Origin::Reused,
        attach_attempts: 0,
        slot: None,
        relocated_from: None,
    };
    let vid = claim.volume.id.clone();
    let device = super::device::locate_device(&host, &claim, config).await?;
    let fstype = mounted_at_target(host.as_ref(), &device, config, me)?;
    let d = device.clone();
    let fs = match on_host(&host, &vid, move |h| h.identify(&d)).await? {
        cps_blockdev::Probe::Filesystem(fs) => fs,
        _ => Filesystem {
            fstype,
            uuid: None,
            label: None,
        },
    };
    let grow = grow(&host, cloud, &claim, config, &device, &fs, policy).await?;
    Ok(RunningGrowth {
        volume_id: vid,
        device: device.path,
        grow,
    })
}

/// The one volume with the cluster's tags attached here.
async fn attached_here(
    cloud: &dyn VolumeService,
    me: &str,
    config: &AttachConfig,
    policy: RetryPolicy,
) -> Result<Volume, Error> {
    let volumes = backoff::retry(policy, "DescribeVolumes", hash_str(me), || {
        cloud.volumes_tagged(&config.tags)
    })
    .await
    .map_err(Error::cloud("listing volumes by tag"))?;
    let here: Vec<&Volume> = volumes
        .iter()
        .filter(|v| {
            v.attachment_to(me)
                .is_some_and(|a| a.state == cps_provider::AttachmentState::Attached)
        })
        .collect();
    match here.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::NotRunning {
            instance_id: me.to_owned(),
            what: "no volume with the configured tags is attached here".into(),
        }),
        many => Err(Error::Ambiguous {
            instance_id: me.to_owned(),
            count: many.len(),
            volumes: many
                .iter()
                .map(|v| v.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The type of the filesystem mounted from `device` at the target; anything else is an error.
fn mounted_at_target(
    host: &dyn BlockHost,
    device: &Device,
    config: &AttachConfig,
    me: &str,
) -> Result<String, Error> {
    let vid = device.volume_id.as_str();
    let target = &config.mount.target;
    let not_running = |what: String| Error::NotRunning {
        instance_id: me.to_owned(),
        what,
    };
    match host.mount_state(device, target).map_err(Error::host(vid))? {
        cps_blockdev::MountState::Mounted { fstype } => Ok(fstype),
        cps_blockdev::MountState::NotMounted => Err(not_running(format!(
            "{vid} is not mounted at {}",
            target.display()
        ))),
        cps_blockdev::MountState::MountedElsewhere { mountpoint } => Err(not_running(format!(
            "{vid} is mounted at {}, not at {}",
            mountpoint.display(),
            target.display()
        ))),
        cps_blockdev::MountState::TargetBusy { source, .. } => Err(not_running(format!(
            "{} holds {source}, not {vid}",
            target.display()
        ))),
    }
}

enum Modified {
    Sent(VolumeChange),
    Deferred(String),
}

/// Sends the change unless a modification is under way, then waits (bounded) until AWS has it
/// `optimizing` or `completed`: from then the device has its new size.
async fn modify(
    cloud: &dyn VolumeService,
    claim: &Claim,
    config: &AttachConfig,
    change: VolumeChange,
    policy: RetryPolicy,
) -> Result<Modified, Error> {
    let vid = claim.volume.id.as_str();
    let seed = hash_str(vid);
    let latest = backoff::retry(policy, "DescribeVolumesModifications", seed, || {
        cloud.latest_modification(vid)
    })
    .await
    .map_err(Error::cloud("reading the volume's modifications"))?;
    let change = match step(change, latest.as_ref()) {
        Step::Busy(state) => {
            warn!(volume_id = vid, state = ?state, "another modification of the volume is under way; a later run asks for the configured size, type or performance");
            return Ok(Modified::Deferred(format!("a modification is {state:?}")));
        }
        Step::Modify(change) => change,
    };
    info!(
        volume_id = vid,
        size_gib = change.size_gib,
        volume_type = change.volume_type.as_deref(),
        iops = change.iops,
        throughput = change.throughput,
        "modifying the volume to the configuration"
    );
    match backoff::retry(policy, "ModifyVolume", seed, || {
        cloud.modify_volume(vid, &change)
    })
    .await
    {
        Ok(_) => {}
        Err(CloudError::ModificationCooldown { message, .. }) => {
            warn!(volume_id = vid, aws = %message, "AWS allows one modification of a volume every 6 hours; a later run asks again");
            return Ok(Modified::Deferred(
                "too soon after the last modification".into(),
            ));
        }
        Err(CloudError::ModificationInProgress { message, .. }) => {
            warn!(volume_id = vid, aws = %message, "another modification of the volume is under way; a later run asks again");
            return Ok(Modified::Deferred("a modification is under way".into()));
        }
        Err(e) => return Err(Error::cloud("modifying the volume")(e)),
    }
    wait_for_modification(cloud, vid, config.timeouts.modify, policy).await?;
    Ok(Modified::Sent(change))
}

/// Polls the modification until it is `optimizing` or `completed`; `failed` is an error.
async fn wait_for_modification(
    cloud: &dyn VolumeService,
    vid: &str,
    timeout: Duration,
    policy: RetryPolicy,
) -> Result<(), Error> {
    let seed = hash_str(vid);
    let settled = backoff::poll(Schedule::CLOUD_STATE, timeout, || async {
        let m = backoff::retry(policy, "DescribeVolumesModifications", seed, || {
            cloud.latest_modification(vid)
        })
        .await
        .map_err(Error::cloud("waiting for the volume modification"))?;
        Ok::<_, Error>(match m {
            Some(m) if m.state == ModificationState::Failed => {
                return Err(Error::ModificationFailed {
                    volume_id: vid.to_owned(),
                    message: m.status_message.unwrap_or_default(),
                });
            }
            Some(m)
                if matches!(
                    m.state,
                    ModificationState::Optimizing | ModificationState::Completed
                ) =>
            {
                Poll::Ready(())
            }
            Some(m) => Poll::Pending(format!(
                "the modification of {vid} is {:?} ({}%)",
                m.state,
                m.progress_percent.unwrap_or(0)
            )),
            None => Poll::Pending(format!("no modification of {vid} shown yet")),
        })
    })
    .await?;
    settled.map_err(|t| Error::Timeout {
        what: format!("the modification of {vid} to reach optimizing"),
        waited: t.waited,
        last: t.last,
    })
}

/// Waits (bounded by the device timeout) until the kernel shows the device at least
/// `wanted_bytes` large: the device grows a little after the modification is optimizing.
async fn wait_for_device(
    host: &Arc<dyn BlockHost>,
    config: &AttachConfig,
    device: &Device,
    fs: &Filesystem,
    wanted_bytes: u64,
) -> Result<(), Error> {
    let vid = device.volume_id.as_str();
    let target = &config.mount.target;
    let seen = backoff::poll(Schedule::DEVICE, config.timeouts.device, || {
        let r = host.sizes(device, fs, target).map(|s| {
            if s.device_bytes >= wanted_bytes {
                Poll::Ready(())
            } else {
                Poll::Pending(format!(
                    "{} has {} bytes, the volume {wanted_bytes}",
                    device.path.display(),
                    s.device_bytes
                ))
            }
        });
        async move { r }
    })
    .await
    .map_err(Error::host(vid))?;
    seen.map_err(|t| Error::Timeout {
        what: format!("{} to show the volume's new size", device.path.display()),
        waited: t.waited,
        last: t.last,
    })
}

#[cfg(test)]
mod tests {
    use cps_provider::{Tags, VolumeState};

    use super::*;

    fn volume(
        size_gib: i32,
        volume_type: &str,
        iops: Option<i32>,
        throughput: Option<i32>,
    ) -> Volume {
        Volume {
            id: "vol-0grow".into(),
            availability_zone: "us-east-1a".into(),
            size_gib,
            volume_type: volume_type.into(),
            iops,
            throughput,
            encrypted: true,
            state: VolumeState::InUse,
            attachments: Vec::new(),
            tags: Tags::new(),
            snapshot_id: None,
        }
    }

    fn options(
        size_gib: i32,
        volume_type: Option<&str>,
        iops: Option<i32>,
        throughput: Option<i32>,
    ) -> VolumeOptions {
        VolumeOptions {
            volume_type: volume_type.unwrap_or("gp3").into(),
            type_configured: volume_type.is_some(),
            size_gib,
            iops,
            throughput,
            encrypted: true,
            kms_key_id: None,
        }
    }

    fn modification(state: ModificationState) -> Modification {
        Modification {
            volume_id: "vol-0grow".into(),
            state,
            target_size_gib: 20,
            target_volume_type: "gp3".into(),
            target_iops: None,
            target_throughput: None,
            original_size_gib: 10,
            progress_percent: Some(40),
            started: None,
            status_message: None,
        }
    }

    /// A row: its name, the volume, the configuration, the change asked for, the shrink refused.
    type Row = (
        &'static str,
        Volume,
        VolumeOptions,
        Option<VolumeChange>,
        Option<(i32, i32)>,
    );

    #[test]
    fn what_differs_is_asked_for_and_nothing_else() {
        let gp3 = |s| volume(s, "gp3", Some(3000), Some(125));
        let cases: Vec<Row> = vec![
            (
                "as configured",
                gp3(10),
                options(10, None, None, None),
                None,
                None,
            ),
            (
                "as configured, performance set to what it has",
                gp3(10),
                options(10, Some("gp3"), Some(3000), Some(125)),
                None,
                None,
            ),
            (
                "larger",
                gp3(10),
                options(20, None, None, None),
                Some(VolumeChange {
                    size_gib: Some(20),
                    ..VolumeChange::default()
                }),
                None,
            ),
            (
                "smaller: never shrunk",
                gp3(20),
                options(10, None, None, None),
                None,
                Some((20, 10)),
            ),
            (
                "smaller, and more iops: the iops only",
                gp3(20),
                options(10, None, Some(6000), None),
                Some(VolumeChange {
                    iops: Some(6000),
                    ..VolumeChange::default()
                }),
                Some((20, 10)),
            ),
            (
                "a default type does not convert a gp2 volume",
                volume(10, "gp2", None, None),
                options(10, None, None, None),
                None,
                None,
            ),
            (
                "a configured type does",
                volume(10, "gp2", None, None),
                options(10, Some("gp3"), None, None),
                Some(VolumeChange {
                    volume_type: Some("gp3".into()),
                    ..VolumeChange::default()
                }),
                None,
            ),
            (
                "throughput",
                gp3(10),
                options(10, None, None, Some(500)),
                Some(VolumeChange {
                    throughput: Some(500),
                    ..VolumeChange::default()
                }),
                None,
            ),
            (
                "all at once",
                volume(10, "gp2", None, None),
                options(30, Some("gp3"), Some(4000), Some(250)),
                Some(VolumeChange {
                    size_gib: Some(30),
                    volume_type: Some("gp3".into()),
                    iops: Some(4000),
                    throughput: Some(250),
                }),
                None,
            ),
        ];
        for (name, v, o, change, smaller) in cases {
            assert_eq!(wanted(&v, &o), Wanted { change, smaller }, "{name}");
        }
    }

    #[test]
    fn no_modification_is_sent_while_another_is_under_way() {
        let change = VolumeChange {
            size_gib: Some(20),
            ..VolumeChange::default()
        };
        assert_eq!(
            step(change.clone(), None),
            Step::Modify(change.clone()),
            "never modified"
        );
        for (state, busy) in [
            (ModificationState::Modifying, true),
            (ModificationState::Optimizing, true),
            (ModificationState::Completed, false),
            (ModificationState::Failed, false),
        ] {
            let got = step(change.clone(), Some(&modification(state)));
            let expected = if busy {
                Step::Busy(state)
            } else {
                Step::Modify(change.clone())
            };
            assert_eq!(got, expected, "{state:?}");
        }
    }
}
