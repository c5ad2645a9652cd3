use std::collections::BTreeMap;
use std::fmt;

/// Resource tags, ordered so that anything derived from them (logs, tokens) is stable.
pub type Tags = BTreeMap<String, String>;

/// Who and where this machine is, as the instance metadata service reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceIdentity {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeState {
    Creating,
    Available,
    InUse,
    Deleting,
    Deleted,
    Error,
    Other(String),
}

impl VolumeState {
    pub fn parse(s: &str) -> Self {
        match s {
            "creating" => Self::Creating,
            "available" => Self::Available,
            "in-use" => Self::InUse,
            "deleting" => Self::Deleting,
            "deleted" => Self::Deleted,
            "error" => Self::Error,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Creating => "creating",
            Self::Available => "available",
            Self::InUse => "in-use",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Error => "error",
            Self::Other(s) => s,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttachmentState {
    Attaching,
    Attached,
    Detaching,
    Detached,
    Busy,
    Other(String),
}

impl AttachmentState {
    pub fn parse(s: &str) -> Self {
        match s {
            "attaching" => Self::Attaching,
            "attached" => Self::Attached,
            "detaching" => Self::Detaching,
            "detached" => Self::Detached,
            "busy" => Self::Busy,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for AttachmentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Attaching => "attaching",
            Self::Attached => "attached",
            Self::Detaching => "detaching",
            Self::Detached => "detached",
            Self::Busy => "busy",
            Self::Other(s) => s,
        })
    }
}

/// An EC2 instance's lifecycle state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
    /// Not found (gone from the API) or a state this code does not know.
    Other(String),
}

impl InstanceState {
    pub fn parse(s: &str) -> Self {
        match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "shutting-down" => Self::ShuttingDown,
            "terminated" => Self::Terminated,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The instance is being terminated: its volumes will detach without anyone's help.
    pub fn is_going_away(&self) -> bool {
        matches!(self, Self::ShuttingDown | Self::Terminated)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::ShuttingDown => "shutting-down",
            Self::Terminated => "terminated",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Other(s) => s,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub instance_id: String,
    /// The device name requested at attach time (`/dev/xvdc`), not the kernel's name for it.
    pub device: String,
    pub state: AttachmentState,
    /// The volume is deleted when the instance terminates (a root disk, or one the launch
    /// template made): it cannot carry data across a replacement.
    pub delete_on_termination: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub id: String,
    pub availability_zone: String,
    pub size_gib: i32,
    pub volume_type: String,
    /// Provisioned IOPS (gp3, io1, io2; AWS also reports gp2's baseline); `None` when the cloud
    /// does not say.
    pub iops: Option<i32>,
    /// Provisioned throughput in MiB/s (gp3 only).
    pub throughput: Option<i32>,
    pub encrypted: bool,
    pub state: VolumeState,
    pub attachments: Vec<Attachment>,
    pub tags: Tags,
    /// The snapshot the volume was created from; `None` for a volume created empty.
    pub snapshot_id: Option<String>,
}

impl Volume {
    /// The attachment of this volume to `instance_id`, if any (in whatever state).
    pub fn attachment_to(&self, instance_id: &str) -> Option<&Attachment> {
        self.attachments
            .iter()
            .find(|a| a.instance_id == instance_id)
    }

    /// Instances other than `instance_id` holding an attachment, for logs and errors.
    pub fn holders_other_than(&self, instance_id: &str) -> Vec<&Attachment> {
        self.attachments
            .iter()
            .filter(|a| a.instance_id != instance_id && a.state != AttachmentState::Detached)
            .collect()
    }
}

/// An elastic network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkInterface {
    pub id: String,
    pub availability_zone: String,
    pub subnet_id: String,
    /// Lower-case, as the kernel shows it.
    pub mac: String,
    pub private_ip: Option<String>,
    /// `available`, `in-use`, `attaching`, `detaching`.
    pub status: String,
    pub attachment: Option<InterfaceAttachment>,
    pub tags: Tags,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAttachment {
    pub attachment_id: String,
    pub instance_id: String,
    pub device_index: i32,
    pub state: AttachmentState,
}

/// An instance's place in an Auto Scaling group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    pub group: String,
    /// `Pending`, `Pending:Wait`, `InService`, `Terminating`…
    pub lifecycle_state: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInstance {
    pub instance_id: String,
    pub availability_zone: String,
    pub lifecycle_state: String,
    /// `Healthy` or `Unhealthy`.
    pub health_status: String,
    /// What the instance was launched from; `None` when the cloud does not say.
    pub launch: Option<LaunchSource>,
    /// `m7g.large`…; `None` when the cloud does not say.
    pub instance_type: Option<String>,
}

impl GroupInstance {
    /// In service and healthy: counts towards the cluster's quorum.
    pub fn available(&self) -> bool {
        self.lifecycle_state == "InService" && self.health_status == "Healthy"
    }
}

/// What a group launches instances from, or what an instance was launched from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchSource {
    /// A launch template; `version` is a number, or `$Latest`/`$Default` on a group.
    Template {
        id: String,
        name: String,
        version: String,
    },
    /// A (legacy) launch configuration.
    Configuration { name: String },
}

/// The version numbers `$Default` and `$Latest` stand for, for one launch template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateVersions {
    pub id: String,
    pub default_version: i64,
    pub latest_version: i64,
}

/// An Auto Scaling group, as far as cps looks at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalingGroup {
    pub name: String,
    pub tags: Tags,
    pub desired_capacity: i32,
    pub instances: Vec<GroupInstance>,
    /// What new instances are launched from (a mixed-instances policy's template counts).
    pub launch: Option<LaunchSource>,
    /// Mixed-instances overrides that name a launch template of their own.
    pub overrides: Vec<LaunchOverride>,
    /// Scaling processes suspended on the group (`Launch`, `Terminate`, `HealthCheck`…).
    pub suspended_processes: Vec<String>,
}

/// One instance refresh of a group, as Auto Scaling reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceRefresh {
    pub id: String,
    /// `Pending`, `InProgress`, `Successful`, `Cancelled`, `Baking`…
    pub status: String,
}

impl InstanceRefresh {
    /// Still replacing instances, about to, or rolling back.
    pub fn active(&self) -> bool {
        matches!(
            self.status.as_str(),
            "Pending" | "InProgress" | "Cancelling" | "RollbackInProgress" | "Baking"
        )
    }
}

/// A mixed-instances override with its own launch template: instances of its type launch from
/// that template instead of the group's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchOverride {
    /// `None` for an override by instance requirements.
    pub instance_type: Option<String>,
    pub launch: LaunchSource,
}

impl ScalingGroup {
    /// What the group launches an instance like `instance` from now: the override of its
    /// instance type when that override names its own template (else the override whose
    /// template it came from, when its type is unknown or the override has none), else the
    /// group's own template.
    pub fn launch_for(&self, instance: &GroupInstance) -> Option<&LaunchSource> {
        let by_type = instance.instance_type.as_ref().and_then(|t| {
            self.overrides
                .iter()
                .find(|o| o.instance_type.as_ref() == Some(t))
        });
        let by_template = || {
            let Some(LaunchSource::Template { id, .. }) = &instance.launch else {
                return None;
            };
            self.overrides.iter().find(|o| {
                matches!(&o.launch, LaunchSource::Template { id: oid, .. } if oid == id)
                    && (o.instance_type.is_none() || instance.instance_type.is_none())
            })
        };
        by_type
            .or_else(by_template)
            .map(|o| &o.launch)
            .or(self.launch.as_ref())
    }

    /// Instances still on their way in (launching, or held by a launch lifecycle hook).
    pub fn booting(&self) -> usize {
        self.instances
            .iter()
            .filter(|i| i.lifecycle_state.starts_with("Pending"))
            .count()
    }

    /// Instances on their way in, in one availability zone.
    pub fn booting_in(&self, zone: &str) -> usize {
        self.instances
            .iter()
            .filter(|i| i.lifecycle_state.starts_with("Pending") && i.availability_zone == zone)
            .count()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleHook {
    pub group: String,
    pub name: String,
    /// `autoscaling:EC2_INSTANCE_LAUNCHING` or `…_TERMINATING`.
    pub transition: String,
    pub heartbeat_timeout: std::time::Duration,
    pub default_result: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleResult {
    Continue,
    Abandon,
}

impl LifecycleResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Continue => "CONTINUE",
            Self::Abandon => "ABANDON",
        }
    }
}

/// What a modification asks for; `None` leaves that attribute as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeChange {
    pub size_gib: Option<i32>,
    pub volume_type: Option<String>,
    pub iops: Option<i32>,
    pub throughput: Option<i32>,
}

impl VolumeChange {
    /// Nothing asked for: such a request must not be sent (on AWS it still starts a
    /// modification, and with it the 6-hour wait before the next one).
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Where a volume modification is. The new size is usable from `Optimizing` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModificationState {
    Modifying,
    Optimizing,
    Completed,
    Failed,
}

impl ModificationState {
    /// `None` for a state this code does not know.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "modifying" => Some(Self::Modifying),
            "optimizing" => Some(Self::Optimizing),
            "completed" => Some(Self::Completed),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }

    /// Still under way: another modification is refused meanwhile.
    pub fn in_progress(self) -> bool {
        matches!(self, Self::Modifying | Self::Optimizing)
    }

    /// The target size, type and performance are in effect (the block device has grown).
    pub fn took_effect(self) -> bool {
        matches!(self, Self::Optimizing | Self::Completed)
    }
}

impl fmt::Display for ModificationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Modifying => "modifying",
            Self::Optimizing => "optimizing",
            Self::Completed => "completed",
            Self::Failed => "failed",
        })
    }
}

/// A volume modification (ModifyVolume) and how far it got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Modification {
    pub volume_id: String,
    pub state: ModificationState,
    pub target_size_gib: i32,
    pub target_volume_type: String,
    pub target_iops: Option<i32>,
    pub target_throughput: Option<i32>,
    pub original_size_gib: i32,
    pub progress_percent: Option<i64>,
    pub started: Option<std::time::SystemTime>,
    /// Why it failed, when it did.
    pub status_message: Option<String>,
}

/// What to create when no existing volume can be claimed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct VolumeSpec {
    pub availability_zone: String,
    pub size_gib: i32,
    pub volume_type: String,
    pub iops: Option<i32>,
    pub throughput: Option<i32>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    pub tags: Tags,
    /// Create the volume from this snapshot (any zone of the region): it starts with the
    /// snapshot's data. Its size must be at least the snapshot's.
    pub snapshot_id: Option<String>,
    /// How fast a volume created from a snapshot is filled from it, in MiB/s (EBS's volume
    /// initialization rate, 100–300; only with `snapshot_id`). `None`: EBS loads blocks lazily,
    /// on first read.
    pub initialization_rate: Option<i32>,
}

impl VolumeSpec {
    /// An encrypted gp3 volume with the AWS-managed key and baseline performance.
    pub fn gp3(availability_zone: &str, size_gib: i32, tags: &Tags) -> Self {
        Self {
            availability_zone: availability_zone.to_owned(),
            size_gib,
            volume_type: "gp3".into(),
            iops: None,
            throughput: None,
            encrypted: true,
            kms_key_id: None,
            tags: tags.clone(),
            snapshot_id: None,
            initialization_rate: None,
        }
    }
}

/// Where a snapshot is. A volume can be created from it only once it is `Completed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotState {
    Pending,
    Completed,
    Error,
}

impl SnapshotState {
    /// `None` for a state this code does not know (`recoverable`, `recovering`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "completed" => Some(Self::Completed),
            "error" => Some(Self::Error),
            _ => None,
        }
    }
}

impl fmt::Display for SnapshotState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Completed => "completed",
            Self::Error => "error",
        })
    }
}

/// A point-in-time copy of a volume (EBS snapshot): what the volume held when it was started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub id: String,
    /// The volume it was taken of (which may have been deleted since).
    pub volume_id: String,
    pub state: SnapshotState,
    pub progress_percent: Option<i64>,
    pub started: Option<std::time::SystemTime>,
    /// The source volume's size when the snapshot started: the smallest volume made from it.
    pub size_gib: i32,
    pub encrypted: bool,
    pub tags: Tags,
}
