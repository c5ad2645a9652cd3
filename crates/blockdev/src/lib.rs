//! The host side of attaching a volume: find the kernel device, prove what is on it, make a
//! filesystem only on a device proven empty, mount it, set its ownership, persist it in fstab.
//!
//! Two rules hold for everything in this crate:
//! - a device is only ever used through a [`Device`], which [`BlockHost::locate`] hands out only
//!   after verifying that the node belongs to the requested volume (NVMe serial = volume id);
//! - [`BlockHost::make_filesystem`] probes the device again itself and refuses unless that probe
//!   proves it empty, whatever the caller believes — or, with a [`FormatGrant::Unfinished`] from
//!   the volume's format journal, finds nothing but what that interrupted mkfs writes.
//!
//! - [`BlockHost::grow_filesystem`] only ever enlarges, and only the verified device's own
//!   filesystem, reached through its mount without following a link someone else planted.
//!
//! [`LinuxHost`] is the real implementation (util-linux `blkid`/`wipefs`, `mkfs.*`, mount(2)).
//! The orchestration uses the [`BlockHost`] trait, so its tests can substitute a fake host.

mod error;
mod files;
mod fstab;
mod grow;
mod locate;
mod mkfs;
mod mount;
mod probe;
mod scan;

use std::path::{Path, PathBuf};

pub use error::Error;
pub use files::{write_atomically, write_if_changed};
pub use fstab::FstabEntry;
pub use locate::{Lookup, Verification, Wanted, nvme_link_name, xen_names};
pub use mkfs::{FormatGrant, FsType, MkfsSpec, left_by_mkfs, new_uuid};
pub use mount::{
    MountInfo, MountState, Ownership, resolve_ownership, set_ownership, split_mount_options,
};
pub use probe::{Probe, Refusal};
pub use scan::blank_check_cost;

/// A kernel block device verified to be the block device of `volume_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// The kernel's node, links resolved (`/dev/nvme1n1`).
    pub path: PathBuf,
    /// Device number of the node at verification time; every later step re-checks it.
    pub rdev: u64,
    pub volume_id: String,
    pub verification: Verification,
}

/// A filesystem found on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filesystem {
    pub fstype: String,
    pub uuid: Option<String>,
    pub label: Option<String>,
}

/// How a filesystem's size compares with its device's, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub device_bytes: u64,
    pub filesystem_bytes: u64,
}

/// What growing a filesystem found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grown {
    /// The filesystem fills its device, within what its type can use (a tail shorter than an
    /// allocation unit stays unused); nothing ran.
    AlreadyFull(Sizes),
    Grown {
        before: Sizes,
        after: Sizes,
    },
}

/// The host operations of the attach flow.
pub trait BlockHost: Send + Sync {
    /// Looks once for the device of the wanted volume. Waiting and timeouts are the caller's.
    fn locate(&self, wanted: Wanted<'_>) -> Result<Lookup, Error>;

    /// How `device` and `target` relate to what is mounted now.
    fn mount_state(&self, device: &Device, target: &Path) -> Result<MountState, Error>;

    /// Reads the device's signatures without changing anything.
    fn probe(&self, device: &Device) -> Result<Probe, Error>;

    /// What a device that may be mounted holds, without the exclusive open of [`Self::probe`].
    /// For reporting only (the UUID of a mounted filesystem); never a reason to format.
    fn identify(&self, device: &Device) -> Result<Probe, Error>;

    /// Makes a filesystem, but only if a fresh probe proves the device empty, or finds nothing
    /// but what the interrupted mkfs named by `grant` writes; returns what the probe finds
    /// afterwards.
    fn make_filesystem(
        &self,
        device: &Device,
        spec: &MkfsSpec,
        grant: &FormatGrant,
    ) -> Result<Filesystem, Error>;

    /// Mounts `device` (holding `fs`) at `target`, creating the directory if needed.
    fn mount(
        &self,
        device: &Device,
        fs: &Filesystem,
        target: &Path,
        options: &[String],
    ) -> Result<(), Error>;

    /// Applies owner, group and mode to the mounted filesystem's root.
    fn set_ownership(&self, target: &Path, ownership: &Ownership) -> Result<(), Error>;

    /// Ensures `fstab` holds exactly `entry` for its mount point; returns whether it changed.
    fn persist(&self, fstab: &Path, entry: &FstabEntry) -> Result<bool, Error>;

    /// The device's and the filesystem's sizes, read without changing anything (the device may
    /// be mounted). xfs and btrfs are read through their mount at `target`; ext2/3/4 from the
    /// device, mounted at `target` or not mounted at all.
    fn sizes(&self, device: &Device, fs: &Filesystem, target: &Path) -> Result<Sizes, Error>;

    /// Grows the filesystem on `device`, mounted at `target`, to fill the device; a filesystem
    /// that already fills it (within the type's granularity) is AlreadyFull and nothing runs.
    /// Never shrinks: a device smaller than its filesystem is refused.
    fn grow_filesystem(
        &self,
        device: &Device,
        fs: &Filesystem,
        target: &Path,
    ) -> Result<Grown, Error>;

    /// Grows an ext2/3/4 filesystem on `device` while nothing mounts it (before the mount), but
    /// only when resize2fs accepts it unforced: checked (`e2fsck -f`) since it was last mounted.
    /// cps never runs e2fsck itself; otherwise this is [`Error::CannotGrow`] and nothing changes.
    fn grow_unmounted(&self, device: &Device, fs: &Filesystem) -> Result<Grown, Error>;
}

/// The real host: devices under `device_root` (normally `/dev`), sysfs under `sys_root`
/// (normally `/sys`), mount table from `/proc/self/mountinfo`.
#[derive(Clone, Debug)]
pub struct LinuxHost {
    device_root: PathBuf,
    sys_root: PathBuf,
    mountinfo: PathBuf,
}

impl Default for LinuxHost {
    fn default() -> Self {
        Self::new("/dev", "/sys")
    }
}

impl LinuxHost {
    pub fn new(device_root: impl Into<PathBuf>, sys_root: impl Into<PathBuf>) -> Self {
        Self {
            device_root: device_root.into(),
            sys_root: sys_root.into(),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
        }
    }
}

impl BlockHost for LinuxHost {
    fn locate(&self, wanted: Wanted<'_>) -> Result<Lookup, Error> {
        locate::locate(&self.device_root, &self.sys_root, wanted)
    }

    fn mount_state(&self, device: &Device, target: &Path) -> Result<MountState, Error> {
        probe::check_node(device)?;
        let table = mount::MountInfo::read(&self.mountinfo)?;
        Ok(table.state_of(device, target))
    }

    fn probe(&self, device: &Device) -> Result<Probe, Error> {
        probe::probe(device)
    }

    fn identify(&self, device: &Device) -> Result<Probe, Error> {
        probe::identify(device)
    }

    fn make_filesystem(
        &self,
        device: &Device,
        spec: &MkfsSpec,
        grant: &FormatGrant,
    ) -> Result<Filesystem, Error> {
        mkfs::make_filesystem(device, &self.sys_root, spec, grant)
    }

    fn mount(
        &self,
        device: &Device,
        fs: &Filesystem,
        target: &Path,
        options: &[String],
    ) -> Result<(), Error> {
        mount::mount(device, fs, target, options, &self.mountinfo)
    }

    fn set_ownership(&self, target: &Path, ownership: &Ownership) -> Result<(), Error> {
        mount::set_ownership(target, ownership)
    }

    fn persist(&self, fstab: &Path, entry: &FstabEntry) -> Result<bool, Error> {
        fstab::ensure_entry(fstab, entry)
    }

    fn sizes(&self, device: &Device, fs: &Filesystem, target: &Path) -> Result<Sizes, Error> {
        grow::sizes(device, fs, target, &self.mountinfo)
    }

    fn grow_filesystem(
        &self,
        device: &Device,
        fs: &Filesystem,
        target: &Path,
    ) -> Result<Grown, Error> {
        grow::grow_filesystem(device, fs, target, &self.sys_root, &self.mountinfo)
    }

    fn grow_unmounted(&self, device: &Device, fs: &Filesystem) -> Result<Grown, Error> {
        grow::grow_unmounted(device, fs, &self.sys_root, &self.mountinfo)
    }
}
