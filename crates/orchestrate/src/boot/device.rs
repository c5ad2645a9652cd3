//! Preparing the claimed volume on the host: wait for the kernel device and verify it, look at
//! the mount table, probe, make a filesystem only on a device the probe proved empty (or that
//! the volume's format journal proves holds an interrupted cps mkfs's leftovers), mount, set
//! ownership, persist.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cps_blockdev::{
    BlockHost, Device, Filesystem, FormatGrant, FstabEntry, Lookup, MountState, Probe, Wanted,
};
use cps_provider::{InstanceIdentity, Tags, VolumeService};
use tracing::{debug, info, warn};

use super::claim::{Claim, ClaimTarget, Origin, claim_volume};
use super::journal::{self, Decision, Journal};
use crate::backoff::{self, Poll, RetryPolicy, Schedule};
use crate::config::AttachConfig;
use crate::error::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FsOutcome {
    /// A filesystem was already there and was kept.
    Existing(Filesystem),
    /// The device was proven empty and formatted.
    Created(Filesystem),
}

impl FsOutcome {
    pub fn filesystem(&self) -> &Filesystem {
        match self {
            Self::Existing(fs) | Self::Created(fs) => fs,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountOutcome {
    Mounted,
    AlreadyMounted,
}

/// What one run did.
#[derive(Clone, Debug)]
pub struct AttachOutcome {
    pub volume_id: String,
    pub origin: Origin,
    pub attach_attempts: u32,
    pub device: PathBuf,
    pub filesystem: FsOutcome,
    pub mount: MountOutcome,
    /// The volume modified to the configuration, the filesystem grown to the device.
    pub grow: super::grow::GrowOutcome,
    /// `Some(changed)` when an fstab entry is kept.
    pub fstab_changed: Option<bool>,
}

/// The volume part alone, in pool mode: claim, then prepare.
pub async fn attach(
    cloud: &dyn VolumeService,
    host: Arc<dyn BlockHost>,
    identity: &InstanceIdentity,
    config: &AttachConfig,
) -> Result<AttachOutcome, Error> {
    let policy = RetryPolicy::default();
    let claim = claim_volume(cloud, identity, config, &ClaimTarget::pool(config), policy).await?;
    prepare_device(host, cloud, &claim, config, policy).await
}

/// Runs a host operation off the async threads (mkfs and mount can take seconds).
pub(super) async fn on_host<T: Send + 'static>(
    host: &Arc<dyn BlockHost>,
    volume_id: &str,
    op: impl FnOnce(&dyn BlockHost) -> Result<T, cps_blockdev::Error> + Send + 'static,
) -> Result<T, Error> {
    let host = Arc::clone(host);
    let result = tokio::task::spawn_blocking(move || op(host.as_ref()))
        .await
        .map_err(|e| Error::Host {
            volume_id: volume_id.to_owned(),
            source: Box::new(cps_blockdev::Error::Io {
                path: PathBuf::new(),
                action: "run host operation",
                source: std::io::Error::other(e.to_string()),
            }),
        })?;
    result.map_err(Error::host(volume_id))
}

/// Finds and verifies the device, then makes sure a filesystem is on it and mounted. `cloud`
/// keeps the volume's format journal.
pub async fn prepare_device(
    host: Arc<dyn BlockHost>,
    cloud: &dyn VolumeService,
    claim: &Claim,
    config: &AttachConfig,
    policy: RetryPolicy,
) -> Result<AttachOutcome, Error> {
    let device = locate_device(&host, claim, config).await?;
    let (filesystem, mount) = mount_device(&host, cloud, claim, config, &device, policy).await?;
    let fs = filesystem.filesystem();
    let grow = super::grow::grow(&host, cloud, claim, config, &device, fs, policy).await?;
    let vid = claim.volume.id.as_str();
    let target = &config.mount.target;
    if !config.mount.ownership.is_empty() {
        let (t, own) = (target.clone(), config.mount.ownership.clone());
        on_host(&host, vid, move |h| h.set_ownership(&t, &own)).await?;
        debug!(volume_id = vid, mount_target = %target.display(), "ownership applied");
    }
    let fstab_changed = match &config.mount.fstab {
        None => None,
        Some(path) => Some(persist_fstab(&host, claim, config, &device, &filesystem, path).await?),
    };
    Ok(AttachOutcome {
        volume_id: claim.volume.id.clone(),
        origin: claim.origin,
        attach_attempts: claim.attach_attempts,
        device: device.path,
        filesystem,
        mount,
        grow,
        fstab_changed,
    })
}

/// Waits for the claimed volume's kernel device and verifies it is that volume.
pub(super) async fn locate_device(
    host: &Arc<dyn BlockHost>,
    claim: &Claim,
    config: &AttachConfig,
) -> Result<Device, Error> {
    let vid = claim.volume.id.as_str();
    // The name it was attached under may differ from the configured one (a reused volume
    // attached by an older configuration); the kernel's Xen name follows the attachment.
    let requested = claim
        .volume
        .attachment_to(&claim.instance_id)
        .map(|a| a.device.clone())
        .unwrap_or_else(|| config.block_device.clone());

    let located = backoff::poll(Schedule::DEVICE, config.timeouts.device, || {
        let wanted = Wanted {
            volume_id: vid,
            requested: &requested,
            size_gib: claim.volume.size_gib,
        };
        let result = host.locate(wanted).map(|l| match l {
            Lookup::Found(d) => Poll::Ready(d),
            Lookup::NotYet(why) => Poll::Pending(why),
        });
        async move { result }
    })
    .await
    .map_err(Error::host(vid))?;
    let device: Device = located.map_err(|t| Error::Timeout {
        what: format!("the kernel device of {vid} (attached as {requested})"),
        waited: t.waited,
        last: t.last,
    })?;
    info!(volume_id = vid, device = %device.path.display(), verified_by = ?device.verification, "found the volume's device");
    Ok(device)
}

/// Leaves a device mounted at the target as it is; otherwise makes sure of its filesystem and
/// mounts it. Refuses a device mounted elsewhere and a target something else is mounted on.
async fn mount_device(
    host: &Arc<dyn BlockHost>,
    cloud: &dyn VolumeService,
    claim: &Claim,
    config: &AttachConfig,
    device: &Device,
    policy: RetryPolicy,
) -> Result<(FsOutcome, MountOutcome), Error> {
    let volume_id = &claim.volume.id;
    let vid = volume_id.as_str();
    let target = config.mount.target.clone();
    let refused = |source| Error::Refused {
        volume_id: volume_id.clone(),
        source: Box::new(source),
    };
    match host
        .mount_state(device, &target)
        .map_err(Error::host(vid))?
    {
        MountState::Mounted { fstype } => {
            info!(volume_id = vid, device = %device.path.display(), mount_target = %target.display(), fstype, "already mounted; nothing to do");
            let d = device.clone();
            let fs = match on_host(host, vid, move |h| h.identify(&d)).await? {
                Probe::Filesystem(fs) => fs,
                _ => Filesystem {
                    fstype,
                    uuid: None,
                    label: None,
                },
            };
            Ok((FsOutcome::Existing(fs), MountOutcome::AlreadyMounted))
        }
        MountState::MountedElsewhere { mountpoint } => {
            Err(refused(cps_blockdev::Error::MountedElsewhere {
                device: device.path.clone(),
                volume_id: volume_id.clone(),
                mountpoint,
                target,
            }))
        }
        MountState::TargetBusy { source, fstype } => {
            Err(refused(cps_blockdev::Error::TargetBusy {
                target,
                device: device.path.clone(),
                source_device: source,
                fstype,
            }))
        }
        MountState::NotMounted => {
            let outcome = ensure_filesystem(host, cloud, claim, config, device, policy).await?;
            let (d, fs, t, options) = (
                device.clone(),
                outcome.filesystem().clone(),
                target.clone(),
                config.mount.options.clone(),
            );
            on_host(host, vid, move |h| h.mount(&d, &fs, &t, &options)).await?;
            info!(volume_id = vid, device = %device.path.display(), mount_target = %target.display(), "mounted");
            Ok((outcome, MountOutcome::Mounted))
        }
    }
}

/// Puts the filesystem's fstab entry (by UUID) in place; says whether the file changed.
async fn persist_fstab(
    host: &Arc<dyn BlockHost>,
    claim: &Claim,
    config: &AttachConfig,
    device: &Device,
    filesystem: &FsOutcome,
    path: &Path,
) -> Result<bool, Error> {
    let volume_id = &claim.volume.id;
    let vid = volume_id.as_str();
    let fs = filesystem.filesystem();
    let uuid = fs.uuid.clone().ok_or_else(|| Error::Host {
        volume_id: volume_id.clone(),
        source: Box::new(cps_blockdev::Error::Fstab {
            path: path.to_owned(),
            message: format!(
                "the {} filesystem on {} has no UUID to name it by",
                fs.fstype,
                device.path.display()
            ),
        }),
    })?;
    let entry = FstabEntry {
        uuid,
        target: config.mount.target.clone(),
        fstype: fs.fstype.clone(),
        options: config.mount.options.clone(),
        volume_id: volume_id.clone(),
    };
    let p = path.to_owned();
    let changed = on_host(host, vid, move |h| h.persist(&p, &entry)).await?;
    info!(volume_id = vid, fstab = %path.display(), changed, "fstab entry in place");
    Ok(changed)
}

/// Probes the device and, with the format journal, keeps what is there, makes the filesystem,
/// or refuses (see [`journal`]). Returns once the filesystem is there and, if cps made it, the
/// journal says so — the mount may follow.
async fn ensure_filesystem(
    host: &Arc<dyn BlockHost>,
    cloud: &dyn VolumeService,
    claim: &Claim,
    config: &AttachConfig,
    device: &Device,
    policy: RetryPolicy,
) -> Result<FsOutcome, Error> {
    let vid = claim.volume.id.as_str();
    let d = device.clone();
    let probe = on_host(host, vid, move |h| h.probe(&d)).await?;
    let mut journal = Journal::of(&claim.volume);
    let fresh = cps_blockdev::new_uuid().map_err(Error::host(vid))?;
    let mut decision = journal::decide(&probe, &journal, &config.mkfs, &fresh);
    if let Decision::Make {
        grant: FormatGrant::Unfinished { .. },
        ..
    } = decision
    {
        // Only the journal permits this; read it again now that the volume is ours, rather
        // than trust the listing from before the attach.
        let now = backoff::retry(policy, "DescribeVolumes", 0, || cloud.volume(vid))
            .await
            .map_err(Error::cloud("reading the format journal"))?;
        journal = Journal::of(&now);
        decision = journal::decide(&probe, &journal, &config.mkfs, &fresh);
    }
    match (decision, probe) {
        (Decision::Keep, Probe::Filesystem(fs)) => {
            keep(cloud, vid, &journal, &fs, config, device, policy).await?;
            Ok(FsOutcome::Existing(fs))
        }
        (Decision::Make { uuid, grant }, _) => {
            let spec = match &uuid {
                Some(u) => config.mkfs.with_uuid(u),
                None => config.mkfs.clone(),
            };
            let fstype = spec.fstype();
            let tracked = spec.uuid();
            info!(volume_id = vid, device = %device.path.display(), fstype = %fstype, journal = ?journal,
                "making a filesystem (the device is blank, or holds only an interrupted cps mkfs's leftovers)");
            let formatting = Journal::Formatting {
                fstype: fstype.clone(),
                uuid: tracked.clone(),
            };
            // The mark goes on before mkfs writes a byte; without it there is no mkfs.
            if journal != formatting {
                mark(cloud, vid, &formatting, policy).await?;
            }
            let (d, s) = (device.clone(), spec.clone());
            let fs = on_host(host, vid, move |h| h.make_filesystem(&d, &s, &grant)).await?;
            // …and "made" before the mount, after which the volume may hold data.
            let made = Journal::Made {
                fstype: fs.fstype.clone(),
                uuid: fs.uuid.clone(),
            };
            mark(cloud, vid, &made, policy).await?;
            info!(volume_id = vid, device = %device.path.display(), fstype = %fs.fstype, uuid = fs.uuid.as_deref().unwrap_or(""), "filesystem made");
            Ok(FsOutcome::Created(fs))
        }
        (Decision::Refuse(message), _) => Err(Error::Journal {
            volume_id: vid.to_owned(),
            message,
        }),
        (Decision::ProbeRefused, Probe::Refused(refusal)) => Err(Error::Refused {
            volume_id: vid.to_owned(),
            source: Box::new(cps_blockdev::Error::Refused {
                path: device.path.clone(),
                volume_id: vid.to_owned(),
                refusal,
            }),
        }),
        (decision, probe) => unreachable!("journal decision {decision:?} for {probe:?}"),
    }
}

/// A filesystem that is kept: say so, and settle a stale "formatting" mark (somebody finished
/// the volume by hand), so that no later run takes it for mkfs's leftovers.
async fn keep(
    cloud: &dyn VolumeService,
    vid: &str,
    journal: &Journal,
    fs: &Filesystem,
    config: &AttachConfig,
    device: &Device,
    policy: RetryPolicy,
) -> Result<(), Error> {
    let configured = config.mkfs.fstype();
    if fs.fstype != configured {
        warn!(volume_id = vid, device = %device.path.display(), found = %fs.fstype, configured = %configured,
            "the volume holds another filesystem type than configured; mounting what is there, never reformatting");
    } else {
        info!(volume_id = vid, device = %device.path.display(), fstype = %fs.fstype, "existing filesystem found; keeping it");
    }
    match journal {
        Journal::Formatting { .. } => {
            warn!(volume_id = vid, uuid = fs.uuid.as_deref().unwrap_or(""), journal = ?journal,
                "the volume's format journal says a cps mkfs never finished, but this filesystem is not that mkfs's; keeping it and recording it as made");
            let made = Journal::Made {
                fstype: fs.fstype.clone(),
                uuid: fs.uuid.clone(),
            };
            mark(cloud, vid, &made, policy).await
        }
        Journal::Made { uuid, .. } if uuid.is_some() && *uuid != fs.uuid => {
            warn!(volume_id = vid, found = fs.uuid.as_deref().unwrap_or(""), journal = ?journal,
                "this is not the filesystem cps made on the volume (another UUID); keeping it");
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Writes the journal tag, retrying transient failures within the policy.
async fn mark(
    cloud: &dyn VolumeService,
    vid: &str,
    entry: &Journal,
    policy: RetryPolicy,
) -> Result<(), Error> {
    let value = entry.value().unwrap_or_default();
    let tags: Tags = [(journal::TAG.to_owned(), value.clone())].into();
    backoff::retry(policy, "CreateTags", 0, || cloud.tag_volume(vid, &tags))
        .await
        .map_err(Error::cloud("writing the format journal tag"))?;
    debug!(
        volume_id = vid,
        tag = journal::TAG,
        value,
        "format journal written"
    );
    Ok(())
}
