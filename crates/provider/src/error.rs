/// A cloud API failure, classified by what the caller can do about it.
///
/// `operation` is the API action (`AttachVolume`); `message` is the provider's own text, kept
/// whole so that an operator sees what the cloud said.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The volume is attached (or attaching) elsewhere: in a pool, someone else claimed it.
    #[error("{volume_id} is in use by another instance (VolumeInUse): {message}")]
    VolumeInUse { volume_id: String, message: String },

    /// The network interface is attached elsewhere.
    #[error("{interface_id} is in use by another instance: {message}")]
    InterfaceInUse {
        interface_id: String,
        message: String,
    },

    /// A volume or interface and the instance are in different availability zones.
    #[error("{resource} is not in the availability zone of {instance_id}: {message}")]
    ZoneMismatch {
        resource: String,
        instance_id: String,
        message: String,
    },

    /// The instance already has an interface at that device index.
    #[error(
        "{instance_id} already has an interface at device index {device_index}; choose another network-interface.device-index: {message}"
    )]
    DeviceIndexInUse {
        instance_id: String,
        device_index: i32,
        message: String,
    },

    /// The instance is not waiting in a lifecycle hook (not in Pending:Wait): a re-run, or the
    /// hook's timeout already decided.
    #[error("no lifecycle action is waiting for {instance_id}: {message}")]
    NoActiveLifecycleAction {
        instance_id: String,
        message: String,
    },

    /// The requested device name is taken on the instance.
    #[error(
        "device name {device} is already in use on {instance_id}; choose another block-device: {message}"
    )]
    DeviceNameInUse {
        device: String,
        instance_id: String,
        message: String,
    },

    /// The resource is in a state that does not allow the operation yet (volume still creating).
    #[error("{operation} on {resource}: not possible in its current state: {message}")]
    IncorrectState {
        operation: &'static str,
        resource: String,
        message: String,
    },

    /// The volume was modified less than 6 hours ago (VolumeModificationRateExceeded): the
    /// change must wait; the volume keeps working as it is.
    #[error(
        "{volume_id} cannot be modified yet: AWS allows one modification per volume every 6 hours: {message}"
    )]
    ModificationCooldown { volume_id: String, message: String },

    /// A modification of the volume is still under way (IncorrectModificationState).
    #[error("{volume_id} is being modified already: {message}")]
    ModificationInProgress { volume_id: String, message: String },

    #[error("{operation}: {resource} not found: {message}")]
    NotFound {
        operation: &'static str,
        resource: String,
        message: String,
    },

    /// The lease no longer holds the lock: it expired and another owner took the lock (the
    /// fencing token moved on), or it was released. The holder must stop acting on what the
    /// lock protects; retrying the same write can never succeed.
    #[error("lock {key} is no longer held by this lease: {message}")]
    LockLost { key: String, message: String },

    /// The client token was used before with different parameters.
    #[error("{operation}: client token {token} was used with other parameters: {message}")]
    IdempotencyMismatch {
        operation: &'static str,
        token: String,
        message: String,
    },

    /// The credentials are valid but their policy does not allow this action.
    #[error(
        "{operation} is not permitted for these credentials: {message}; allow {operation} in the \
         role's IAM policy (the README lists what each feature needs)"
    )]
    Unauthorized {
        operation: &'static str,
        message: String,
    },

    /// No credentials could be found, or AWS does not accept them (unknown key, bad signature,
    /// expired token): nothing works until they are fixed, so it is never retried.
    #[error(
        "{operation}: no usable AWS credentials: {message}. Give the instance an IAM role \
         (instance profile), or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    )]
    Credentials {
        operation: &'static str,
        message: String,
    },

    /// The request cannot be sent where it is configured to go: a malformed endpoint URL, a
    /// region that is not a name, a host name that does not exist. Never retried.
    #[error(
        "{operation}: cannot reach AWS as configured: {message}. Check the region (AWS_REGION, \
         --region, or the instance's) and the endpoint (--aws-endpoint, CPS_AWS_ENDPOINT)"
    )]
    Endpoint {
        operation: &'static str,
        message: String,
    },

    /// Rate limiting; worth retrying after a pause.
    #[error("{operation} was throttled: {message}")]
    Throttled {
        operation: &'static str,
        message: String,
    },

    /// Timeouts, connection failures and server-side errors; worth retrying.
    #[error("{operation} failed transiently: {message}")]
    Transient {
        operation: &'static str,
        message: String,
    },

    /// Anything else the provider refused, with its error code when it gave one (said once:
    /// not again when the message starts with it).
    #[error("{operation} failed{}: {message}", code.as_deref().filter(|c| !message.starts_with(c)).map(|c| format!(" ({c})")).unwrap_or_default())]
    Api {
        operation: &'static str,
        code: Option<String>,
        message: String,
    },
}

impl Error {
    /// Whether repeating the same request later may succeed. Missing credentials, refused
    /// permissions and an unusable endpoint never do: retrying them for a command timeout only
    /// delays the message that says what to fix.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Transient { .. })
    }
}
