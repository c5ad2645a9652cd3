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

    #[error("{operation}: {resource} not found: {message}")]
    NotFound {
        operation: &'static str,
        resource: String,
        message: String,
    },

    /// The client token was used before with different parameters.
    #[error("{operation}: client token {token} was used with other parameters: {message}")]
    IdempotencyMismatch {
        operation: &'static str,
        token: String,
        message: String,
    },

    #[error("{operation} is not permitted for these credentials: {message}")]
    Unauthorized {
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

    /// Anything else the provider refused, with its error code when it gave one.
    #[error("{operation} failed{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Api {
        operation: &'static str,
        code: Option<String>,
        message: String,
    },
}

impl Error {
    /// Whether repeating the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Transient { .. })
    }
}
