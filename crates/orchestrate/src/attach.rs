//! The attach flow: claim the volume in the cloud, then prepare it on the host.
//!
//! Claiming, in order:
//! 1. a volume with the tags already attached to this instance is reused (a re-run is a no-op);
//! 2. otherwise an available one in this zone is attached — each agent tries the candidates in
//!    its own pseudo-random order, so a herd does not pile onto the first one; `VolumeInUse`
//!    means another agent won it, so the agent lists again and takes its next pick;
//! 3. with no candidate left, a volume is created with its tags in the same call and a client
//!    token derived from instance and configuration, so a retried or re-run create cannot make a
//!    second volume; then it is attached like any other.
//!
//! Preparing: wait for the kernel device and verify it, look at the mount table, probe, make a
//! filesystem only on a device the probe proved empty, mount, set ownership, persist.

use std::path::PathBuf;
use std::sync::Arc;

use cps_blockdev::{BlockHost, Device, Filesystem, FstabEntry, Lookup, MountState, Probe, Wanted};
use cps_provider::{
    AttachmentState, Error as CloudError, InstanceIdentity, InstanceState, Volume, VolumeService,
    VolumeSpec, VolumeState,
};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::backoff::{self, Poll, RetryPolicy, Schedule, hash_str, mix};
use crate::config::AttachConfig;
use crate::error::AttachError;

/// How many volumes one run may create before giving up (each creation after the first means
/// another agent claimed the volume this one had just created).
const MAX_CREATES: u32 = 3;

/// Where the claimed volume came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// It was already attached to this instance.
    Reused,
    /// An existing available volume was attached.
    Claimed,
    /// No volume could be claimed; this one was created.
    Created,
}

/// A volume attached to this instance, as EC2 reports it.
#[derive(Clone, Debug)]
pub struct Claim {
    pub volume: Volume,
    /// The instance it is attached to (this one).
    pub instance_id: String,
    pub origin: Origin,
    /// AttachVolume requests made (0 when reused).
    pub attach_attempts: u32,
}

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

/// The whole flow: claim, then prepare.
pub async fn attach(
    cloud: &dyn VolumeService,
    host: Arc<dyn BlockHost>,
    identity: &InstanceIdentity,
    config: &AttachConfig,
) -> Result<AttachOutcome, AttachError> {
    let claim = claim_volume(cloud, identity, config, RetryPolicy::default()).await?;
    prepare_device(host, &claim, config).await
}

/// The volume this run creates when it must: the configured one, in this zone, tagged.
pub fn volume_spec(identity: &InstanceIdentity, config: &AttachConfig) -> VolumeSpec {
    VolumeSpec {
        availability_zone: identity.availability_zone.clone(),
        size_gib: config.volume.size_gib,
        volume_type: config.volume.volume_type.clone(),
        iops: config.volume.iops,
        throughput: config.volume.throughput,
        encrypted: config.volume.encrypted,
        kms_key_id: config.volume.kms_key_id.clone(),
        tags: config.tags.clone(),
    }
}

/// Same instance, same spec, same attempt → same token; the cloud then returns the volume the
/// first request made instead of making another.
pub fn client_token(identity: &InstanceIdentity, spec: &VolumeSpec, attempt: u32) -> String {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    };
    field(&identity.instance_id);
    field(&spec.availability_zone);
    field(&spec.volume_type);
    field(&spec.size_gib.to_string());
    field(&format!("{:?}/{:?}", spec.iops, spec.throughput));
    field(&format!("{}/{:?}", spec.encrypted, spec.kms_key_id));
    for (k, v) in &spec.tags {
        field(k);
        field(v);
    }
    field(&attempt.to_string());
    let digest = h.finalize();
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("cps-{hex}")
}

fn cloud(step: &'static str) -> impl FnOnce(CloudError) -> AttachError {
    move |source| AttachError::Cloud { step, source }
}

/// Steps 1–4 and the wait until EC2 reports the volume attached here.
pub async fn claim_volume(
    cloud_api: &dyn VolumeService,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    policy: RetryPolicy,
) -> Result<Claim, AttachError> {
    let me = identity.instance_id.as_str();
    let seed = hash_str(me);
    let device_name = config.block_device.as_str();
    let started = tokio::time::Instant::now();
    // The whole claim may take as long as creating and attaching one volume.
    let claim_deadline = config.timeouts.create + config.timeouts.attach;
    let mut attach_attempts = 0u32;
    let mut creates = 0u32;
    let mut logged_elsewhere = false;
    let mut logged_in_use = false;
    // Lost races are bounded by the pool first seen; waiting for a holder by the attach timeout.
    let mut race_budget: Option<u32> = None;
    let mut lost_races = 0u32;
    let mut holder_wait: Option<(tokio::time::Instant, u32)> = None;
    let claimed = |volume: Volume, origin: Origin, attach_attempts: u32| Claim {
        volume,
        instance_id: me.to_owned(),
        origin,
        attach_attempts,
    };

    loop {
        if started.elapsed() > claim_deadline {
            return Err(AttachError::Timeout {
                what: "a volume to claim".into(),
                waited: started.elapsed(),
                last: format!("{attach_attempts} attach attempts, {creates} volumes created"),
            });
        }
        let volumes = backoff::retry(policy, "DescribeVolumes", seed, || {
            cloud_api.volumes_tagged(&config.tags)
        })
        .await
        .map_err(cloud("listing volumes by tag"))?;

        // 1. Already attached to this instance? (Also what a lost AttachVolume reply looks like.)
        let mine: Vec<&Volume> = volumes
            .iter()
            .filter(|v| {
                v.attachment_to(me).is_some_and(|a| {
                    matches!(
                        a.state,
                        AttachmentState::Attaching | AttachmentState::Attached
                    )
                })
            })
            .collect();
        match mine.as_slice() {
            [] => {}
            [volume] => {
                info!(volume_id = %volume.id, "volume with these tags is already attached to this instance; reusing it");
                let attached = volume
                    .attachment_to(me)
                    .is_some_and(|a| a.state == AttachmentState::Attached);
                let volume = if attached {
                    (*volume).clone()
                } else {
                    wait_attached(cloud_api, identity, config, &volume.id, policy).await?
                };
                return Ok(claimed(volume, Origin::Reused, attach_attempts));
            }
            many => {
                return Err(AttachError::Ambiguous {
                    instance_id: me.to_owned(),
                    count: many.len(),
                    volumes: many
                        .iter()
                        .map(|v| v.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        let budget = *race_budget.get_or_insert(4 * volumes.len() as u32 + 16);
        if lost_races > budget {
            return Err(AttachError::Exhausted {
                attempts: attach_attempts,
                detail: format!(
                    "lost {lost_races} races for a volume; the pool keeps being taken by other instances"
                ),
            });
        }

        // 2. An available volume in this zone, in this agent's own order.
        let elsewhere: Vec<&str> = volumes
            .iter()
            .filter(|v| v.availability_zone != identity.availability_zone)
            .map(|v| v.id.as_str())
            .collect();
        if !elsewhere.is_empty() && !logged_elsewhere {
            logged_elsewhere = true;
            info!(
                zone = %identity.availability_zone,
                skipped = %elsewhere.join(","),
                "skipping matching volumes in other availability zones (EBS attaches within a zone only)"
            );
        }
        let here = || {
            volumes
                .iter()
                .filter(|v| v.availability_zone == identity.availability_zone)
        };
        let mut candidates: Vec<&Volume> = here()
            .filter(|v| v.state == VolumeState::Available && v.attachments.is_empty())
            .collect();
        candidates.sort_by_key(|v| mix(seed ^ hash_str(&v.id)));
        if let Some(candidate) = candidates.first() {
            attach_attempts += 1;
            info!(volume_id = %candidate.id, device = device_name, candidates = candidates.len(), "attaching existing volume");
            if try_attach(cloud_api, &candidate.id, me, device_name, seed, policy).await? {
                let volume =
                    wait_attached(cloud_api, identity, config, &candidate.id, policy).await?;
                return Ok(claimed(volume, Origin::Claimed, attach_attempts));
            }
            lost_races += 1;
            continue;
        }

        // 3. A matching volume here held by a server that is going away (shutting down, or
        // already detaching) will be available shortly: wait for it rather than create a second
        // volume for the same data. Held by a running server, it is that server's.
        let held: Vec<&Volume> = here().filter(|v| !v.attachments.is_empty()).collect();
        if !held.is_empty() {
            let holders: Vec<String> = held
                .iter()
                .flat_map(|v| v.attachments.iter())
                .filter(|a| {
                    !matches!(
                        a.state,
                        AttachmentState::Detaching | AttachmentState::Detached
                    )
                })
                .map(|a| a.instance_id.clone())
                .collect();
            let states = if holders.is_empty() {
                Default::default()
            } else {
                backoff::retry(policy, "DescribeInstances", seed, || {
                    cloud_api.instance_states(&holders)
                })
                .await
                .map_err(cloud("looking up the instances holding matching volumes"))?
            };
            let describe = |v: &Volume| -> (bool, String) {
                let mut leaving = true;
                let parts: Vec<String> = v
                    .attachments
                    .iter()
                    .map(|a| match a.state {
                        AttachmentState::Detaching | AttachmentState::Detached => {
                            format!("detaching from {}", a.instance_id)
                        }
                        _ => {
                            let state = states
                                .get(&a.instance_id)
                                .map(ToString::to_string)
                                .unwrap_or_else(|| "unknown".into());
                            leaving &= states
                                .get(&a.instance_id)
                                .is_some_and(InstanceState::is_going_away);
                            format!("{} to {}, which is {state}", a.state, a.instance_id)
                        }
                    })
                    .collect();
                (leaving, format!("{} ({})", v.id, parts.join("; ")))
            };
            let (leaving, staying): (Vec<_>, Vec<_>) =
                held.iter().map(|v| describe(v)).partition(|(l, _)| *l);
            if !leaving.is_empty() {
                let what: Vec<&str> = leaving.iter().map(|(_, d)| d.as_str()).collect();
                let (since, looks) = holder_wait.get_or_insert((tokio::time::Instant::now(), 0));
                if since.elapsed() >= config.timeouts.attach {
                    return Err(AttachError::Timeout {
                        what: "a matching volume to be released by a server that is going away \
                               (not creating a second volume meanwhile)"
                            .into(),
                        waited: since.elapsed(),
                        last: what.join("; "),
                    });
                }
                if *looks == 0 {
                    info!(volumes = %what.join("; "), "a matching volume is held by a server that is going away; waiting for it");
                }
                tokio::time::sleep(Schedule::CLOUD_STATE.delay(*looks)).await;
                *looks += 1;
                continue;
            }
            if !logged_in_use {
                logged_in_use = true;
                let what: Vec<&str> = staying.iter().map(|(_, d)| d.as_str()).collect();
                info!(volumes = %what.join("; "), "matching volumes here are in use by running servers");
            }
        }

        // 4. Nothing to claim: create one.
        if creates >= MAX_CREATES {
            return Err(AttachError::Exhausted {
                attempts: attach_attempts,
                detail: format!(
                    "created {creates} volumes and another instance claimed each before this one could attach it"
                ),
            });
        }
        let spec = volume_spec(identity, config);
        let token = client_token(identity, &spec, creates);
        creates += 1;
        info!(zone = %spec.availability_zone, size_gib = spec.size_gib, volume_type = %spec.volume_type, client_token = %token, "no volume to claim; creating one");
        let created = backoff::retry(policy, "CreateVolume", seed, || {
            cloud_api.create_volume(&spec, &token)
        })
        .await
        .map_err(cloud("creating a volume"))?;
        info!(volume_id = %created.id, "volume created");
        if !wait_available(cloud_api, config, &created.id, seed, policy).await? {
            debug!(volume_id = %created.id, "the new volume was claimed by another instance; looking again");
            lost_races += 1;
            continue;
        }
        attach_attempts += 1;
        info!(volume_id = %created.id, device = device_name, "attaching new volume");
        if try_attach(cloud_api, &created.id, me, device_name, seed, policy).await? {
            let volume = wait_attached(cloud_api, identity, config, &created.id, policy).await?;
            return Ok(claimed(volume, Origin::Created, attach_attempts));
        }
        lost_races += 1;
    }
}

/// AttachVolume; `Ok(false)` when another instance got the volume first.
async fn try_attach(
    cloud_api: &dyn VolumeService,
    volume_id: &str,
    me: &str,
    device: &str,
    seed: u64,
    policy: RetryPolicy,
) -> Result<bool, AttachError> {
    match backoff::retry(policy, "AttachVolume", seed, || {
        cloud_api.attach_volume(volume_id, me, device)
    })
    .await
    {
        Ok(_) => Ok(true),
        // Lost the race, or the volume changed state under us: list again. (If an earlier try of
        // this very request took effect and only its reply was lost, the next listing shows the
        // volume attached here and it is reused.)
        Err(CloudError::VolumeInUse { .. } | CloudError::IncorrectState { .. }) => {
            debug!(
                volume_id,
                "volume was taken by another instance; looking again"
            );
            Ok(false)
        }
        Err(e) => Err(AttachError::Cloud {
            step: "attaching the volume",
            source: e,
        }),
    }
}

/// Polls until the new volume is available; `Ok(false)` if someone else attached it first.
async fn wait_available(
    cloud_api: &dyn VolumeService,
    config: &AttachConfig,
    volume_id: &str,
    seed: u64,
    policy: RetryPolicy,
) -> Result<bool, AttachError> {
    let waited = backoff::poll(Schedule::CLOUD_STATE, config.timeouts.create, || async {
        match backoff::retry(policy, "DescribeVolumes", seed, || {
            cloud_api.volume(volume_id)
        })
        .await
        {
            Ok(v) => match v.state {
                VolumeState::Available => Ok(Poll::Ready(true)),
                VolumeState::InUse => Ok(Poll::Ready(false)),
                VolumeState::Creating => Ok(Poll::Pending("creating".into())),
                other => Err(AttachError::Cloud {
                    step: "waiting for the new volume",
                    source: CloudError::Api {
                        operation: "CreateVolume",
                        code: None,
                        message: format!("{volume_id} went to state {other} instead of available"),
                    },
                }),
            },
            // Describe is eventually consistent: a fresh volume may not be visible yet.
            Err(CloudError::NotFound { .. }) => Ok(Poll::Pending("not visible yet".into())),
            Err(e) => Err(cloud("waiting for the new volume")(e)),
        }
    })
    .await?;
    waited.map_err(|t| AttachError::Timeout {
        what: format!("{volume_id} to become available"),
        waited: t.waited,
        last: t.last,
    })
}

/// Polls until EC2 reports the attachment to this instance as attached.
async fn wait_attached(
    cloud_api: &dyn VolumeService,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    volume_id: &str,
    policy: RetryPolicy,
) -> Result<Volume, AttachError> {
    let me = identity.instance_id.as_str();
    let seed = hash_str(me);
    let waited = backoff::poll(Schedule::CLOUD_STATE, config.timeouts.attach, || async {
        let v = backoff::retry(policy, "DescribeVolumes", seed, || {
            cloud_api.volume(volume_id)
        })
        .await
        .map_err(cloud("waiting for the attachment"))?;
        let state = v.attachment_to(me).map(|a| a.state.clone());
        match state {
            Some(AttachmentState::Attached) => Ok(Poll::Ready(v)),
            Some(AttachmentState::Attaching) => {
                Ok(Poll::Pending(format!("{volume_id} is attaching")))
            }
            // Describe is eventually consistent: right after AttachVolume it may not show yet.
            None if v.attachments.is_empty() => Ok(Poll::Pending(format!(
                "{volume_id} shows no attachment yet"
            ))),
            None => Err(AttachError::Lost {
                volume_id: volume_id.to_owned(),
                instance_id: me.to_owned(),
                state: format!(
                    "attached to {}",
                    v.attachments
                        .iter()
                        .map(|a| a.instance_id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
            Some(other) => Err(AttachError::Lost {
                volume_id: volume_id.to_owned(),
                instance_id: me.to_owned(),
                state: other.to_string(),
            }),
        }
    })
    .await?;
    let volume = waited.map_err(|t| AttachError::Timeout {
        what: format!("{volume_id} to be attached to {me}"),
        waited: t.waited,
        last: t.last,
    })?;
    info!(volume_id, "volume attached");
    Ok(volume)
}

/// Runs a host operation off the async threads (mkfs and mount can take seconds).
async fn on_host<T: Send + 'static>(
    host: &Arc<dyn BlockHost>,
    volume_id: &str,
    op: impl FnOnce(&dyn BlockHost) -> Result<T, cps_blockdev::Error> + Send + 'static,
) -> Result<T, AttachError> {
    let host = Arc::clone(host);
    let result = tokio::task::spawn_blocking(move || op(host.as_ref()))
        .await
        .map_err(|e| AttachError::Host {
            volume_id: volume_id.to_owned(),
            source: cps_blockdev::Error::Io {
                path: PathBuf::new(),
                action: "run host operation",
                source: std::io::Error::other(e.to_string()),
            },
        })?;
    result.map_err(AttachError::host(volume_id))
}

/// Finds and verifies the device, then makes sure a filesystem is on it and mounted.
pub async fn prepare_device(
    host: Arc<dyn BlockHost>,
    claim: &Claim,
    config: &AttachConfig,
) -> Result<AttachOutcome, AttachError> {
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
    .map_err(AttachError::host(vid))?;
    let device: Device = located.map_err(|t| AttachError::Timeout {
        what: format!("the kernel device of {vid} (attached as {requested})"),
        waited: t.waited,
        last: t.last,
    })?;
    info!(volume_id = vid, device = %device.path.display(), verified_by = ?device.verification, "found the volume's device");

    let target = config.mount.target.clone();
    let state = host
        .mount_state(&device, &target)
        .map_err(AttachError::host(vid))?;
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
            return Err(AttachError::Refused {
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
            return Err(AttachError::Refused {
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
                    return Err(AttachError::Refused {
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
            let uuid = fs.uuid.clone().ok_or_else(|| AttachError::Host {
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
