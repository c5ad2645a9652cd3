//! Preparing the claimed volume on the host: wait for the kernel device and verify it, look at
//! the mount table, probe, make a filesystem only on a device the probe proved empty, mount, set
//! ownership, persist.

use std::path::PathBuf;
use std::sync::Arc;

use cps_blockdev::{BlockHost, Device, Filesystem, FstabEntry, Lookup, MountState, Probe, Wanted};
use cps_provider::{InstanceIdentity, VolumeService};
use tracing::{debug, info, warn};

use crate::backoff::{self, Poll, RetryPolicy, Schedule};
use crate::claim::{Claim, ClaimTarget, Origin, claim_volume};
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
    let claim = claim_volume(
        cloud,
        identity,
        config,
        &ClaimTarget::pool(config),
        RetryPolicy::default(),
    )
    .await?;
    prepare_device(host, &claim, config).await
}

/// Runs a host operation off the async threads (mkfs and mount can take seconds).
async fn on_host<T: Send + 'static>(
    host: &Arc<dyn BlockHost>,
    volume_id: &str,
    op: impl FnOnce(&dyn BlockHost) -> Result<T, cps_blockdev::Error> + Send + 'static,
) -> Result<T, Error> {
    let host = Arc::clone(host);
    let result = tokio::task::spawn_blocking(move || op(host.as_ref()))
        .await
        .map_err(|e| Error::Host {
            volume_id: volume_id.to_owned(),
            source: cps_blockdev::Error::Io {
                path: PathBuf::new(),
                action: "run host operation",
                source: std::io::Error::other(e.to_string()),
            },
        })?;
    result.map_err(Error::host(volume_id))
}

/// Finds and verifies the device, then makes sure a filesystem is on it and mounted.
pub async fn prepare_device(
    host: Arc<dyn BlockHost>,
    claim: &Claim,
    config: &AttachConfig,
) -> Result<AttachOutcome, Error> {
    let volume_id = claim.volume.id.clone();
    let vid = volume_id.as_str();
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

    let target = config.mount.target.clone();
    let state = host
        .mount_state(&device, &target)
        .map_err(Error::host(vid))?;
    let (filesystem, mount) = match state {
        MountState::Mounted { fstype } => {
            info!(volume_id = vid, device = %device.path.display(), mount_target = %target.display(), fstype, "already mounted; nothing to do");
            let d = device.clone();
            let fs = match on_host(&host, vid, move |h| h.identify(&d)).await? {
                Probe::Filesystem(fs) => fs,
                _ => Filesystem {
                    fstype,
                    uuid: None,
                    label: None,
                },
            };
            (FsOutcome::Existing(fs), MountOutcome::AlreadyMounted)
        }
        MountState::MountedElsewhere { mountpoint } => {
            return Err(Error::Refused {
                volume_id: volume_id.clone(),
                source: cps_blockdev::Error::MountedElsewhere {
                    device: device.path.clone(),
                    volume_id: volume_id.clone(),
                    mountpoint,
                    target,
                },
            });
        }
        MountState::TargetBusy { source, fstype } => {
            return Err(Error::Refused {
                volume_id: volume_id.clone(),
                source: cps_blockdev::Error::TargetBusy {
                    target,
                    device: device.path.clone(),
                    source_device: source,
                    fstype,
                },
            });
        }
        MountState::NotMounted => {
            let d = device.clone();
            let probe = on_host(&host, vid, move |h| h.probe(&d)).await?;
            let outcome = match probe {
                Probe::Empty => {
                    info!(volume_id = vid, device = %device.path.display(), fstype = %config.mkfs.fstype(), "device is empty (no signature, blank); making a filesystem");
                    let (d, spec) = (device.clone(), config.mkfs.clone());
                    let fs = on_host(&host, vid, move |h| h.make_filesystem(&d, &spec)).await?;
                    info!(volume_id = vid, device = %device.path.display(), fstype = %fs.fstype, uuid = fs.uuid.as_deref().unwrap_or(""), "filesystem made");
                    FsOutcome::Created(fs)
                }
                Probe::Filesystem(fs) => {
                    let configured = config.mkfs.fstype();
                    if fs.fstype != configured {
                        warn!(volume_id = vid, device = %device.path.display(), found = %fs.fstype, configured = %configured,
                            "the volume holds another filesystem type than configured; mounting what is there, never reformatting");
                    } else {
                        info!(volume_id = vid, device = %device.path.display(), fstype = %fs.fstype, "existing filesystem found; keeping it");
                    }
                    FsOutcome::Existing(fs)
                }
                Probe::Refused(refusal) => {
                    return Err(Error::Refused {
                        volume_id: volume_id.clone(),
                        source: cps_blockdev::Error::Refused {
                            path: device.path.clone(),
                            volume_id: volume_id.clone(),
                            refusal,
                        },
                    });
                }
            };
            let (d, fs, t, options) = (
                device.clone(),
                outcome.filesystem().clone(),
                target.clone(),
                config.mount.options.clone(),
            );
            on_host(&host, vid, move |h| h.mount(&d, &fs, &t, &options)).await?;
            info!(volume_id = vid, device = %device.path.display(), mount_target = %target.display(), "mounted");
            (outcome, MountOutcome::Mounted)
        }
    };

    if !config.mount.ownership.is_empty() {
        let (t, own) = (target.clone(), config.mount.ownership.clone());
        on_host(&host, vid, move |h| h.set_ownership(&t, &own)).await?;
        debug!(volume_id = vid, mount_target = %target.display(), "ownership applied");
    }

    let fstab_changed = match &config.mount.fstab {
        None => None,
        Some(path) => {
            let fs = filesystem.filesystem();
            let uuid = fs.uuid.clone().ok_or_else(|| Error::Host {
                volume_id: volume_id.clone(),
                source: cps_blockdev::Error::Fstab {
                    path: path.clone(),
                    message: format!(
                        "the {} filesystem on {} has no UUID to name it by",
                        fs.fstype,
                        device.path.display()
                    ),
                },
            })?;
            let entry = FstabEntry {
                uuid,
                target: target.clone(),
                fstype: fs.fstype.clone(),
                options: config.mount.options.clone(),
                volume_id: volume_id.clone(),
            };
            let p = path.clone();
            let changed = on_host(&host, vid, move |h| h.persist(&p, &entry)).await?;
            info!(volume_id = vid, fstab = %path.display(), changed, "fstab entry in place");
            Some(changed)
        }
    };

    Ok(AttachOutcome {
        volume_id,
        origin: claim.origin,
        attach_attempts: claim.attach_attempts,
        device: device.path,
        filesystem,
        mount,
        fstab_changed,
    })
}
