/// A cloud API failure, classified by what the caller can do about it.
///
/// `operation` is the API action (`AttachVolume`); `message` is the provider's own text, kept
/// whole so that an operator sees what the cloud said.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The volume is attached (or attaching) elsewhere: in a pool, someone else claimed it.
    #[error("{volume_id} is in use by another instance (VolumeInUse): {message}")]
    VolumeInUse { volume_id: String, message: String },

    /// Volume and instance are in different availability zones.
    #[error("{volume_id} is not in the availability zone of {instance_id}: {message}")]
    ZoneMismatch {
        volume_id: String,
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
