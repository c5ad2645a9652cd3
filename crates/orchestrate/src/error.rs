use std::time::Duration;

/// Why the attach flow or a roll stopped. Every variant carries what it was about (volume,
/// device, instance, group).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{step}: {source}")]
    Cloud {
        step: &'static str,
        #[source]
        source: cps_provider::Error,
    },

    #[error("timed out after {}s waiting for {what}: {last}", waited.as_secs())]
    Timeout {
        what: String,
        waited: Duration,
        last: String,
    },

    /// Found something it must not touch; nothing was changed.
    #[error("refusing to continue with {volume_id}: {source}")]
    Refused {
        volume_id: String,
        #[source]
        source: Box<cps_blockdev::Error>,
    },

    /// The volume carrying the tags attached here is not a data volume (the root disk, or one
    /// deleted with the instance).
    #[error(
        "{volume_id} carries the configured tags and is attached to {instance_id} as {device}, but it is {why}: \
         it cannot keep the node's data across a replacement, so cps-attach will neither format nor mount it. \
         Remove those tags from it (a launch template's tag specification for volumes tags the root disk too) \
         or make ebs-tags specific to the data volume"
    )]
    NotDataVolume {
        volume_id: String,
        instance_id: String,
        device: String,
        why: &'static str,
    },

    /// The volume's format journal and the device disagree; nothing was changed.
    #[error("refusing to continue with {volume_id}: {message}")]
    Journal { volume_id: String, message: String },

    /// AWS ended the volume's modification as `failed`; the volume keeps its old attributes.
    #[error(
        "the modification of {volume_id} failed: {message}. The volume keeps its size and type; \
         check the requested values (`aws ec2 describe-volumes-modifications --volume-ids {volume_id}`) and run again"
    )]
    ModificationFailed { volume_id: String, message: String },

    /// `snapshot-id` names a snapshot that is not complete (pending, or failed).
    #[error(
        "the snapshot {snapshot_id} to restore from is {state}; a volume can only be restored from a completed snapshot. \
         Wait for it, or name another in block-provider.aws-ebs.snapshot-id"
    )]
    SnapshotNotReady { snapshot_id: String, state: String },

    /// `snapshot: latest` found no completed snapshot with the tags.
    #[error(
        "snapshot: latest found no completed snapshot tagged {tags}; nothing was created. Check the snapshots' tags \
         (`aws ec2 describe-snapshots --owner-ids self --filters Name=tag-key,Values=...`), set snapshot-tags, or use \
         restore-if-missing to start empty when there is none"
    )]
    NoSnapshot { tags: String },

    /// The snapshot taken to move a node's volume ended in `error`.
    #[error(
        "the snapshot {snapshot_id} of {volume_id}, taken to move it to this zone, failed; the volume is unchanged. \
         Delete the failed snapshot (`aws ec2 delete-snapshot --snapshot-id {snapshot_id}`) and run again"
    )]
    SnapshotFailed {
        snapshot_id: String,
        volume_id: String,
    },

    /// The source of a move was attached (outside cps's lock) while it was being moved.
    #[error(
        "{original} was attached while cps-attach was moving it here; it is left as it is, and the copy {copy} \
         does not get the node's identity. Find who attached {original} (it should not be), then delete the copy and run again"
    )]
    MovedWhileInUse { original: String, copy: String },

    /// `relocation: snapshot` without a lock service to hold its lock (a bug of the caller).
    #[error(
        "relocation is on but no lock service was given; the node's volume is left where it is"
    )]
    NoLockService,

    /// `cps-attach grow` on an instance whose volume is not attached and mounted: nothing to grow.
    #[error(
        "cps-attach grow works on a running node, and on {instance_id} {what}; nothing was changed. \
         Run `cps-attach run` (the boot) first; it also grows the volume"
    )]
    NotRunning { instance_id: String, what: String },

    /// More than one matching volume is attached to this instance; which one is the node's?
    #[error(
        "{count} volumes with these tags are attached to {instance_id} ({volumes}); cps-attach will not choose between them. \
         Detach the one that is not this node's, or make the tags unique"
    )]
    Ambiguous {
        instance_id: String,
        count: usize,
        volumes: String,
    },

    /// The volume went away from this instance while the flow waited for it.
    #[error(
        "{volume_id} is no longer attached to {instance_id} (now: {state}); something else detached it"
    )]
    Lost {
        volume_id: String,
        instance_id: String,
        state: String,
    },

    /// The node's volume or interface exists, but only in another availability zone.
    #[error(
        "{what} is in another availability zone ({resources}), this instance is in {zone}; \
         volumes and interfaces attach within a zone only: launch the node in that zone (pin its group to that subnet)"
    )]
    WrongZone {
        what: &'static str,
        resources: String,
        zone: String,
    },

    /// Node-id mode, but no id in the configuration or the tags.
    #[error(
        "no node id for {instance_id}: set identity.node-id, or tag the instance or its Auto Scaling group with {tag}"
    )]
    NoNodeId { instance_id: String, tag: String },

    /// A node id read from a tag is not one a configuration could carry.
    #[error(
        "the {tag} tag of {origin} is {value:?}, which cannot be a node id (a node id {reason}); set the tag to this node's id"
    )]
    BadNodeId {
        tag: String,
        origin: String,
        value: String,
        reason: String,
    },

    /// The node's network interface does not exist.
    #[error(
        "no network interface {what}; cps-attach does not create interfaces (their fixed IPs are planned, e.g. by Terraform)"
    )]
    NoInterface { what: String },

    /// The lifecycle hook named in the configuration does not exist on the group.
    #[error("lifecycle hook {hook} does not exist on group {group}; check lifecycle.hook")]
    NoLifecycleHook { group: String, hook: String },

    /// The instance was waiting in the hook, but the action expired before it was completed
    /// (heartbeats failing?): the hook's default result decided.
    #[error(
        "the lifecycle action of hook {hook} on {group} expired before cps-attach completed it ({detail}); \
         the hook's default result decided this instance's fate: check that heartbeats are allowed (IAM) and reach Auto Scaling"
    )]
    LifecycleExpired {
        group: String,
        hook: String,
        detail: String,
    },

    /// Node files, the environment file or the boot marker could not be written.
    #[error("{source}")]
    Node {
        #[source]
        source: cps_node::Error,
    },

    /// A node file's content could not be read from the cloud (`content-from`).
    #[error(
        "node file {}: reading its content from {secret}: {source}; check files[].content-from and that the instance's role may read it",
        path.display()
    )]
    Secret {
        path: std::path::PathBuf,
        secret: cps_provider::SecretRef,
        #[source]
        source: Box<cps_provider::Error>,
    },

    /// A user hook failed.
    #[error("hook {hook} failed: {detail}")]
    Hook { hook: String, detail: String },

    /// More than one volume claims to be one identity.
    #[error(
        "{what} has more than one volume ({volumes}); cps-attach will not choose. Remove or retag the extra one"
    )]
    Duplicates { what: String, volumes: String },

    /// Every slot is taken.
    #[error(
        "no free slot: all {max} slots have a volume, none available in {zone} ({detail}); raise identity.max-slots or free a slot"
    )]
    NoFreeSlot {
        max: u32,
        zone: String,
        detail: String,
    },

    /// Could not claim or create a volume within the attempt budget.
    #[error("gave up claiming a volume after {attempts} attempts: {detail}")]
    Exhausted { attempts: u32, detail: String },

    #[error("{what} failed: {detail}")]
    Check { what: String, detail: String },

    #[error("{what}")]
    Precondition { what: String },

    /// A signal (SIGTERM, Ctrl-C) ended the boot at the wait it was in.
    #[error(
        "interrupted by a signal before the boot finished; nothing was detached, and a filesystem being made or a mount under way was let finish; run cps-attach again to go on"
    )]
    Interrupted,

    #[error("{volume_id}: {source}")]
    Host {
        volume_id: String,
        #[source]
        source: Box<cps_blockdev::Error>,
    },
}

/// Coarse classes of failure, for exit codes and alerting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// The cloud API failed or refused.
    Cloud,
    /// Something did not happen in time.
    Timeout,
    /// A device or mount point holds something cps will not touch.
    Refused,
    /// The host (a tool, mount(2), the filesystem) failed.
    Host,
    /// No identity for this instance: no node id, no free slot, its volume in another zone.
    Identity,
    /// A user hook failed: configure exited non-zero, or health never passed.
    Hook,
    /// Stopped by a signal.
    Interrupted,
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Cloud { .. }
            | Self::Lost { .. }
            | Self::Exhausted { .. }
            | Self::ModificationFailed { .. }
            | Self::SnapshotFailed { .. }
            | Self::SnapshotNotReady { .. } => ErrorClass::Cloud,
            Self::Timeout { .. } => ErrorClass::Timeout,
            Self::Refused { .. }
            | Self::NotRunning { .. }
            | Self::NoLockService
            | Self::MovedWhileInUse { .. }
            | Self::Journal { .. }
            | Self::NotDataVolume { .. }
            | Self::Ambiguous { .. }
            | Self::Duplicates { .. } => ErrorClass::Refused,
            Self::WrongZone { .. }
            | Self::NoFreeSlot { .. }
            | Self::NoNodeId { .. }
            | Self::NoSnapshot { .. }
            | Self::BadNodeId { .. }
            | Self::NoInterface { .. } => ErrorClass::Identity,
            Self::NoLifecycleHook { .. } | Self::LifecycleExpired { .. } | Self::Secret { .. } => {
                ErrorClass::Cloud
            }
            Self::Node { source } if source.is_refusal() => ErrorClass::Refused,
            Self::Node { .. } => ErrorClass::Host,
            Self::Hook { .. } | Self::Check { .. } => ErrorClass::Hook,
            Self::Precondition { .. } => ErrorClass::Refused,
            Self::Interrupted => ErrorClass::Interrupted,
            Self::Host { source, .. } if source.is_refusal() => ErrorClass::Refused,
            Self::Host { .. } => ErrorClass::Host,
        }
    }

    /// Wraps a cloud error with the step it happened in.
    pub(crate) fn cloud(step: &'static str) -> impl FnOnce(cps_provider::Error) -> Self {
        move |source| Self::Cloud { step, source }
    }

    pub(crate) fn host(volume_id: &str) -> impl FnOnce(cps_blockdev::Error) -> Self + '_ {
        move |source| {
            if source.is_refusal() {
                Self::Refused {
                    volume_id: volume_id.to_owned(),
                    source: Box::new(source),
                }
            } else {
                Self::Host {
                    volume_id: volume_id.to_owned(),
                    source: Box::new(source),
                }
            }
        }
    }
}
