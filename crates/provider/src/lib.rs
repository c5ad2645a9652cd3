//! Domain types and the cloud traits the cps orchestration is written against: volumes and
//! instances ([`VolumeService`]), network interfaces ([`InterfaceService`]), and Auto Scaling
//! membership and lifecycle hooks ([`LifecycleService`]), secrets for node files
//! ([`SecretService`]), a lock with a lease and a fencing token ([`LockService`]) for moving a
//! node's volume between zones, and the operator's view of groups and launch templates for rolling
//! updates ([`GroupService`], [`TemplateService`]).
//!
//! Two implementations exist: `cps-aws` (EC2 and Auto Scaling over the real wire protocol) and [`memory`], an
//! in-process cloud with simulated latency and fault injection for logic tests and benchmarks.
//! Nothing here knows about AWS SDK types; errors are classified into [`Error`] variants the
//! orchestration can act on (a `VolumeInUse` means "try the next candidate", a `Throttled`
//! means "back off and retry").

mod calls;
mod error;
pub mod lock;
pub mod memory;
mod types;

pub use calls::CallLog;
pub use error::Error;
pub use lock::{Acquired, Lease, LockItem, LockService};
pub use types::{
    Attachment, AttachmentState, GroupInstance, GroupMember, InstanceIdentity, InstanceRefresh,
    InstanceState, InterfaceAttachment, LaunchOverride, LaunchSource, LifecycleHook,
    LifecycleResult, Modification, ModificationState, NetworkInterface, ScalingGroup, Snapshot,
    SnapshotState, Tags, TemplateVersions, Volume, VolumeChange, VolumeSpec, VolumeState,
};

use std::collections::BTreeMap;

use async_trait::async_trait;

/// The block-storage operations of a cloud, as the attach flow needs them.
///
/// Every method is one logical API request (implementations may follow pagination inside
/// [`VolumeService::volumes_tagged`]); callers count on that when they budget calls.
#[async_trait]
pub trait VolumeService: Send + Sync {
    /// Every volume carrying all of `tags` (key and value), in any state and any zone.
    async fn volumes_tagged(&self, tags: &Tags) -> Result<Vec<Volume>, Error>;

    /// One volume by id.
    async fn volume(&self, volume_id: &str) -> Result<Volume, Error>;

    /// Creates a volume with its tags applied atomically. `client_token` makes the request
    /// idempotent: the same token and spec return the volume the first request created.
    async fn create_volume(&self, spec: &VolumeSpec, client_token: &str) -> Result<Volume, Error>;

    /// Adds or overwrites tags on a volume (one request). The format journal lives here: it
    /// must outlive the instance, as the volume does.
    async fn tag_volume(&self, volume_id: &str, tags: &Tags) -> Result<(), Error>;

    /// Requests attachment of `volume_id` to `instance_id` as `device`. Succeeds for exactly
    /// one caller while the volume is available; the others get [`Error::VolumeInUse`].
    async fn attach_volume(
        &self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
    ) -> Result<AttachmentState, Error>;

    /// The states of the given instances (one request). Instances the cloud no longer knows
    /// are reported as [`InstanceState::Terminated`].
    async fn instance_states(
        &self,
        instance_ids: &[String],
    ) -> Result<BTreeMap<String, InstanceState>, Error>;

    /// The tags of one instance.
    async fn instance_tags(&self, instance_id: &str) -> Result<Tags, Error>;

    /// Starts changing a volume's size, type or performance in place (ModifyVolume, one
    /// request). The volume reports the target values at once; the block device grows when the
    /// modification reaches [`ModificationState::Optimizing`]. A change within 6 hours of the
    /// previous one's start is [`Error::ModificationCooldown`], one while another is under way
    /// [`Error::ModificationInProgress`]; a smaller size is refused. An empty change is never
    /// sent: it would start a modification all the same.
    async fn modify_volume(
        &self,
        volume_id: &str,
        change: &VolumeChange,
    ) -> Result<Modification, Error>;

    /// The volume's most recent modification (DescribeVolumesModifications, one request);
    /// `None` when it was never modified.
    async fn latest_modification(&self, volume_id: &str) -> Result<Option<Modification>, Error>;

    /// Starts a snapshot of a volume (CreateSnapshot, one request) with `tags` applied in the
    /// same request. It is `Pending` until EBS has copied the volume as it was at this moment.
    async fn create_snapshot(
        &self,
        volume_id: &str,
        description: &str,
        tags: &Tags,
    ) -> Result<Snapshot, Error>;

    /// One snapshot by id (DescribeSnapshots); an unknown id is [`Error::NotFound`].
    async fn snapshot(&self, snapshot_id: &str) -> Result<Snapshot, Error>;

    /// Every snapshot this account owns carrying all of `tags`, in any state (DescribeSnapshots
    /// with tag filters, paginated inside).
    async fn snapshots_tagged(&self, tags: &Tags) -> Result<Vec<Snapshot>, Error>;

    /// Removes tags from a volume by key, whatever their values (DeleteTags, one request). No
    /// keys: nothing is sent — DeleteTags without keys would remove every tag.
    async fn untag_volume(&self, volume_id: &str, keys: &[String]) -> Result<(), Error>;

    /// Deletes a volume (DeleteVolume, one request). An attached volume is refused
    /// ([`Error::VolumeInUse`]), as EC2 refuses it; its snapshots stay.
    async fn delete_volume(&self, volume_id: &str) -> Result<(), Error>;
}

/// Elastic network interfaces: the fixed-IP identity of a node.
#[async_trait]
pub trait InterfaceService: Send + Sync {
    /// Every interface carrying all of `tags`, in any state and zone.
    async fn interfaces_tagged(&self, tags: &Tags) -> Result<Vec<NetworkInterface>, Error>;

    /// One interface by id.
    async fn interface(&self, interface_id: &str) -> Result<NetworkInterface, Error>;

    /// Attaches an interface at `device_index`; returns the attachment id. One caller wins
    /// while it is available; the others get [`Error::InterfaceInUse`].
    async fn attach_interface(
        &self,
        interface_id: &str,
        instance_id: &str,
        device_index: i32,
    ) -> Result<String, Error>;
}

/// Auto Scaling: which group an instance is in, and its lifecycle hooks.
#[async_trait]
pub trait LifecycleService: Send + Sync {
    /// The group and lifecycle state of an instance; `None` when it is in no group.
    async fn membership(&self, instance_id: &str) -> Result<Option<GroupMember>, Error>;

    /// A group with its tags and instances; `None` when it does not exist.
    async fn group(&self, name: &str) -> Result<Option<ScalingGroup>, Error>;

    /// A lifecycle hook of a group; `None` when it does not exist.
    async fn lifecycle_hook(&self, group: &str, hook: &str)
    -> Result<Option<LifecycleHook>, Error>;

    /// Extends the wait of an instance held by a lifecycle hook.
    async fn heartbeat(&self, group: &str, hook: &str, instance_id: &str) -> Result<(), Error>;

    /// Ends the wait: CONTINUE puts the instance in service, ABANDON terminates it.
    async fn complete(
        &self,
        group: &str,
        hook: &str,
        instance_id: &str,
        result: LifecycleResult,
    ) -> Result<(), Error>;
}

/// Auto Scaling groups as an operator sees them: what a rolling update reads and changes.
#[async_trait]
pub trait GroupService: Send + Sync {
    /// The named groups that exist (missing names are left out). Implementations ask for at
    /// most 100 names per request and follow pagination.
    async fn groups_named(&self, names: &[String]) -> Result<Vec<ScalingGroup>, Error>;

    /// Every group carrying the tag `key` = `value` (paginated inside).
    async fn groups_tagged(&self, key: &str, value: &str) -> Result<Vec<ScalingGroup>, Error>;

    /// Every lifecycle hook of a group.
    async fn lifecycle_hooks(&self, group: &str) -> Result<Vec<LifecycleHook>, Error>;

    /// Terminates an instance without lowering the group's desired capacity, so the group
    /// launches a replacement.
    async fn terminate_in_group(&self, instance_id: &str) -> Result<(), Error>;

    /// The group's recent instance refreshes, newest first (one request).
    async fn instance_refreshes(&self, group: &str) -> Result<Vec<InstanceRefresh>, Error>;

    /// Suspends scaling processes of a group (`Launch`: it launches nothing meanwhile).
    async fn suspend_processes(&self, group: &str, processes: &[String]) -> Result<(), Error>;

    /// Resumes suspended scaling processes of a group.
    async fn resume_processes(&self, group: &str, processes: &[String]) -> Result<(), Error>;
}

/// Launch templates: what `$Default` and `$Latest` stand for.
#[async_trait]
pub trait TemplateService: Send + Sync {
    /// The default and latest version numbers of the given templates (missing ids are left
    /// out); batched and paginated inside.
    async fn template_versions(&self, ids: &[String]) -> Result<Vec<TemplateVersions>, Error>;
}

/// Where a secret lives in the cloud: the content of a node file kept out of user data (which
/// any process on the instance can read through the metadata service), read at boot with the
/// instance's own role.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SecretRef {
    /// A parameter of the cloud's parameter store (SSM Parameter Store on AWS), by name or ARN;
    /// an encrypted one is decrypted.
    Parameter(String),
    /// A secret of the cloud's secret manager (Secrets Manager on AWS), by name or ARN; its
    /// current version.
    Secret(String),
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Parameter(name) => write!(f, "parameter {name}"),
            Self::Secret(id) => write!(f, "secret {id}"),
        }
    }
}

/// A secret's value. Its `Debug` shows the length only, so it never lands in a log.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretValue({} bytes)", self.0.len())
    }
}

/// Secrets the instance's role may read.
#[async_trait]
pub trait SecretService: Send + Sync {
    /// The current value (one request). A secret that does not exist is [`Error::NotFound`].
    async fn secret(&self, secret: &SecretRef) -> Result<SecretValue, Error>;
}
