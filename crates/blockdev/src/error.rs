use std::io;
use std::path::PathBuf;

use crate::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: does not exist")]
    Missing { path: PathBuf },

    #[error("{path}: is {found}, not a block device")]
    NotBlockDevice { path: PathBuf, found: &'static str },

    /// The node now has another device number than when it was verified.
    #[error(
        "{path}: device number changed from {expected:#x} to {found:#x} since it was verified for {volume_id}; refusing to continue"
    )]
    Changed {
        path: PathBuf,
        volume_id: String,
        expected: u64,
        found: u64,
    },

    /// Right before a write, sysfs no longer ties the node to the volume it was verified for.
    #[error(
        "{path} is no longer provably {volume_id}'s ({why}); a detach and another attach may have reused the device; \
         nothing was written to it. Run cps-attach again: it looks the volume's device up afresh"
    )]
    NoLongerVerified {
        path: PathBuf,
        volume_id: String,
        why: String,
    },

    /// Something holds the device exclusively (a mount elsewhere, swap, LVM, RAID, dm-crypt).
    #[error(
        "{path} ({volume_id}) is in use by the kernel (mounted elsewhere, swap, LVM, RAID or dm-crypt); not touching it"
    )]
    Busy { path: PathBuf, volume_id: String },

    /// The device holds something that must not be formatted.
    #[error("{path} ({volume_id}): {refusal}")]
    Refused {
        path: PathBuf,
        volume_id: String,
        refusal: Refusal,
    },

    /// mkfs was asked for, but the device already holds a filesystem.
    #[error("{path} ({volume_id}) already holds a {fstype} filesystem; refusing to format it")]
    AlreadyFormatted {
        path: PathBuf,
        volume_id: String,
        fstype: String,
    },

    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("`{tool}` was not found on PATH; {hint}")]
    ToolMissing { tool: String, hint: String },

    #[error("`{command}` failed ({status}): {stderr}")]
    Tool {
        command: String,
        status: String,
        stderr: String,
    },

    /// The probe after mkfs did not find the filesystem mkfs was asked to make.
    #[error("{path}: after mkfs, expected a {expected} filesystem but the probe found {found}")]
    MkfsUnverified {
        path: PathBuf,
        expected: String,
        found: String,
    },

    #[error("mounting {device} at {target} as {fstype} failed: {source}")]
    Mount {
        device: PathBuf,
        target: PathBuf,
        fstype: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "{target} already has {source_device} ({fstype}) mounted on it; refusing to mount {device} over it"
    )]
    TargetBusy {
        target: PathBuf,
        device: PathBuf,
        source_device: String,
        fstype: String,
    },

    #[error(
        "{device} ({volume_id}) is already mounted at {mountpoint}, not at {target}; unmount it or set mount.target to {mountpoint}"
    )]
    MountedElsewhere {
        device: PathBuf,
        volume_id: String,
        mountpoint: PathBuf,
        target: PathBuf,
    },

    #[error("unknown {kind} `{name}`: not in the system's user database")]
    UnknownId { kind: &'static str, name: String },

    #[error("{path}: {message}")]
    Fstab { path: PathBuf, message: String },

    /// Growing goes through the verified device's own mount, and `target` is not that.
    #[error(
        "{device} ({volume_id}) is not what is mounted at {target} ({found}); nothing was grown: \
         cps grows only the verified device's filesystem, through its own mount"
    )]
    NotMountedThere {
        device: PathBuf,
        volume_id: String,
        target: PathBuf,
        found: String,
    },

    /// The device is smaller than the filesystem on it: cps never shrinks, and never "fixes" it.
    #[error(
        "{path} ({volume_id}) has {device_bytes} bytes, fewer than the {filesystem_bytes} of its {fstype} \
         filesystem: the volume was shrunk or replaced by a smaller one. cps never shrinks a filesystem and \
         changed nothing; reads past the device's end fail. Stop the service, find out why the device is \
         smaller, and give it at least {filesystem_bytes} bytes again"
    )]
    DeviceSmaller {
        path: PathBuf,
        volume_id: String,
        fstype: String,
        device_bytes: u64,
        filesystem_bytes: u64,
    },

    /// The filesystem is smaller than its device but cannot be grown here, this way.
    #[error(
        "{path} ({volume_id}): cannot grow its {fstype} filesystem: {found}; nothing was changed. {remedy}"
    )]
    CannotGrow {
        path: PathBuf,
        volume_id: String,
        fstype: String,
        found: String,
        remedy: String,
    },

    /// A path another user could have redirected (a planted link, a swapped file): nothing is
    /// written, created or chowned through it.
    #[error("{path}: {reason}")]
    UnsafePath { path: PathBuf, reason: String },
}

impl Error {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        action: &'static str,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            path,
            action,
            source,
        }
    }

    /// Whether this error means "found something that must not be touched" (as opposed to a
    /// failure of the host or of a tool).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::Refused { .. }
                | Self::AlreadyFormatted { .. }
                | Self::NoLongerVerified { .. }
                | Self::Busy { .. }
                | Self::MountedElsewhere { .. }
                | Self::TargetBusy { .. }
                | Self::UnsafePath { .. }
                | Self::NotMountedThere { .. }
                | Self::DeviceSmaller { .. }
        )
    }
}
