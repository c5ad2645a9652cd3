//! The mount table, mounting, and the mounted root's ownership.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sys_mount::{Mount, MountFlags};

use crate::probe::check_node;
use crate::{Device, Error, Filesystem};

/// How a device and a mount point relate to the current mount table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountState {
    NotMounted,
    /// The device is mounted at the target already (a re-run).
    Mounted {
        fstype: String,
    },
    /// The device is mounted, but somewhere else.
    MountedElsewhere {
        mountpoint: PathBuf,
    },
    /// Something else is mounted at the target.
    TargetBusy {
        source: String,
        fstype: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MountEntry {
    /// The mount's id, as `/proc/self/fdinfo/N` reports it for a descriptor on this mount.
    id: u64,
    rdev: (u32, u32),
    mountpoint: PathBuf,
    fstype: String,
    source: String,
}

/// A parsed `/proc/self/mountinfo`.
#[derive(Clone, Debug, Default)]
pub struct MountInfo {
    entries: Vec<MountEntry>,
}

impl MountInfo {
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = fs::read_to_string(path).map_err(Error::io(path, "read"))?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter_map(|line| {
                // id parent major:minor root mountpoint options [optional…] - fstype source super
                let (left, right) = line.split_once(" - ")?;
                let left: Vec<&str> = left.split(' ').collect();
                let right: Vec<&str> = right.split(' ').collect();
                let (major, minor) = left.get(2)?.split_once(':')?;
                Some(MountEntry {
                    id: left.first()?.parse().ok()?,
                    rdev: (major.parse().ok()?, minor.parse().ok()?),
                    mountpoint: PathBuf::from(unescape_octal(left.get(4)?)),
                    fstype: right.first()?.to_string(),
                    source: unescape_octal(right.get(1)?),
                })
            })
            .collect();
        Self { entries }
    }

    /// The visible mount at `target`, when it is `device`'s: its mount id and type.
    pub(crate) fn own_mount(&self, device: &Device, target: &Path) -> Option<(u64, String)> {
        let target = fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
        self.top(&target)
            .filter(|top| is_ours(top, device))
            .map(|top| (top.id, top.fstype.clone()))
    }

    /// Where `device` is mounted, if anywhere.
    pub(crate) fn mountpoint_of(&self, device: &Device) -> Option<PathBuf> {
        self.entries
            .iter()
            .find(|e| is_ours(e, device))
            .map(|e| e.mountpoint.clone())
    }

    /// The last entry for a mount point is the one on top, the one that is visible.
    fn top(&self, target: &Path) -> Option<&MountEntry> {
        self.entries.iter().rev().find(|e| e.mountpoint == target)
    }

    /// Where `device` is mounted and what covers `target`.
    pub fn state_of(&self, device: &Device, target: &Path) -> MountState {
        let target = fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
        let ours = |e: &MountEntry| is_ours(e, device);
        if let Some(top) = self.top(&target) {
            return if ours(top) {
                MountState::Mounted {
                    fstype: top.fstype.clone(),
                }
            } else {
                MountState::TargetBusy {
                    source: top.source.clone(),
                    fstype: top.fstype.clone(),
                }
            };
        }
        match self.entries.iter().find(|e| ours(e)) {
            Some(e) => MountState::MountedElsewhere {
                mountpoint: e.mountpoint.clone(),
            },
            None => MountState::NotMounted,
        }
    }
}

/// Whether a mount table entry is `device`'s. btrfs reports an anonymous device number, so the
/// source path counts too.
fn is_ours(e: &MountEntry, device: &Device) -> bool {
    e.rdev == (libc::major(device.rdev), libc::minor(device.rdev))
        || Path::new(&e.source) == device.path
        || fs::canonicalize(&e.source).is_ok_and(|p| p == device.path)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits fstab-style options into mount(2) flags and the filesystem's own data string.
/// Options that only mean something to fstab or systemd (`nofail`, `x-…`) are dropped.
pub fn split_mount_options(options: &[String]) -> (MountFlags, String) {
    let mut flags = MountFlags::empty();
    let mut data = Vec::new();
    for option in options
        .iter()
        .flat_map(|o| o.split(','))
        .map(str::trim)
        .filter(|o| !o.is_empty())
    {
        match option {
            "ro" => flags |= MountFlags::RDONLY,
            "rw" => flags.remove(MountFlags::RDONLY),
            "noatime" => flags |= MountFlags::NOATIME,
            "nodiratime" => flags |= MountFlags::NODIRATIME,
            "relatime" => flags |= MountFlags::RELATIME,
            "strictatime" => flags |= MountFlags::STRICTATIME,
            "lazytime" => flags |= MountFlags::from_bits_retain(libc::MS_LAZYTIME),
            "nosuid" => flags |= MountFlags::NOSUID,
            "nodev" => flags |= MountFlags::NODEV,
            "noexec" => flags |= MountFlags::NOEXEC,
            "sync" => flags |= MountFlags::SYNCHRONOUS,
            "dirsync" => flags |= MountFlags::DIRSYNC,
            "atime" | "suid" | "dev" | "exec" | "async" | "defaults" | "auto" | "noauto"
            | "nofail" | "_netdev" | "user" | "nouser" | "users" => {}
            o if o.starts_with("x-") || o.starts_with("comment=") => {}
            o => data.push(o.to_owned()),
        }
    }
    (flags, data.join(","))
}

pub(crate) fn mount(
    device: &Device,
    fs: &Filesystem,
    target: &Path,
    options: &[String],
    mountinfo: &Path,
) -> Result<(), Error> {
    check_node(device)?;
    match MountInfo::read(mountinfo)?.state_of(device, target) {
        MountState::NotMounted => {}
        MountState::Mounted { .. } => return Ok(()),
        MountState::MountedElsewhere { mountpoint } => {
            return Err(Error::MountedElsewhere {
                device: device.path.clone(),
                volume_id: device.volume_id.clone(),
                mountpoint,
                target: target.to_path_buf(),
            });
        }
        MountState::TargetBusy { source, fstype } => {
            return Err(Error::TargetBusy {
                target: target.to_path_buf(),
                device: device.path.clone(),
                source_device: source,
                fstype,
            });
        }
    }
    // The mount point may sit in a directory another account controls (a target under the
    // service's home): it is reached, and made if missing, without following a link that
    // account could have planted, and mount(2) is given the opened directory itself.
    let point = crate::files::open_dir(target, true)?.into_file();
    let at = PathBuf::from(format!("/proc/self/fd/{}", point.as_raw_fd()));
    let (flags, data) = split_mount_options(options);
    let mount_error = |source| Error::Mount {
        device: device.path.clone(),
        target: target.to_path_buf(),
        fstype: fs.fstype.clone(),
        source,
    };
    let mut builder = Mount::builder().fstype(fs.fstype.as_str()).flags(flags);
    if !data.is_empty() {
        builder = builder.data(&data);
    }
    let _mounted: Mount = builder.mount(&device.path, &at).map_err(mount_error)?;
    drop(point);
    match MountInfo::read(mountinfo)?.state_of(device, target) {
        MountState::Mounted { .. } => Ok(()),
        other => Err(mount_error(std::io::Error::other(format!(
            "mount(2) succeeded but the mount table shows {other:?}"
        )))),
    }
}

/// Owner, group and permission bits for the root of the mounted filesystem.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    /// User name or numeric uid.
    pub owner: Option<String>,
    /// Group name or numeric gid.
    pub group: Option<String>,
    pub mode: Option<u32>,
}

impl Ownership {
    pub fn is_empty(&self) -> bool {
        self.owner.is_none() && self.group.is_none() && self.mode.is_none()
    }
}

/// The numeric uid and gid an ownership names (looked up in the user database).
pub fn resolve_ownership(ownership: &Ownership) -> Result<(Option<u32>, Option<u32>), Error> {
    Ok((
        ownership.owner.as_deref().map(resolve_user).transpose()?,
        ownership.group.as_deref().map(resolve_group).transpose()?,
    ))
}

/// Applies owner, group and mode to the directory `target`, opened without following a link
/// another user could have planted (see [`crate::files`]) and changed through its descriptor:
/// a mount point in a service's directory must not hand root's directories to that service.
pub fn set_ownership(target: &Path, ownership: &Ownership) -> Result<(), Error> {
    let (uid, gid) = resolve_ownership(ownership)?;
    if ownership.is_empty() {
        return Ok(());
    }
    let dir = crate::files::open_dir(target, false)?.into_file();
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::fchown(&dir, uid, gid).map_err(Error::io(target, "chown"))?;
    }
    if let Some(mode) = ownership.mode {
        dir.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(Error::io(target, "chmod"))?;
    }
    Ok(())
}

fn resolve_user(name: &str) -> Result<u32, Error> {
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        _ => Err(Error::UnknownId {
            kind: "user",
            name: name.to_owned(),
        }),
    }
}

fn resolve_group(name: &str) -> Result<u32, Error> {
    if let Ok(id) = name.parse() {
        return Ok(id);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        _ => Err(Error::UnknownId {
            kind: "group",
            name: name.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Verification;

    const TABLE: &str = "\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
40 22 259:3 / /data rw,noatime shared:2 - xfs /dev/nvme1n1 rw
41 22 0:45 / /mnt/my\\040data rw - btrfs /dev/nvme2n1 rw
42 40 0:50 / /data rw - tmpfs tmpfs rw
";

    fn device(path: &str, major: u32, minor: u32) -> Device {
        Device {
            path: path.into(),
            rdev: libc::makedev(major, minor),
            volume_id: "vol-1".into(),
            verification: Verification::NvmeSerial,
        }
    }

    #[test]
    fn mountinfo_states() {
        let table = MountInfo::parse(TABLE);
        let nvme1 = device("/dev/nvme1n1", 259, 3);
        // /data has a tmpfs stacked on top of the xfs: the target is covered by something else.
        assert_eq!(
            table.state_of(&nvme1, Path::new("/data")),
            MountState::TargetBusy {
                source: "tmpfs".into(),
                fstype: "tmpfs".into()
            }
        );
        assert_eq!(
            table.state_of(&nvme1, Path::new("/elsewhere")),
            MountState::MountedElsewhere {
                mountpoint: "/data".into()
            }
        );
        // btrfs: matched by source, and the escaped space is decoded.
        let nvme2 = device("/dev/nvme2n1", 259, 5);
        assert_eq!(
            table.state_of(&nvme2, Path::new("/mnt/my data")),
            MountState::Mounted {
                fstype: "btrfs".into()
            }
        );
        let fresh = device("/dev/nvme3n1", 259, 7);
        assert_eq!(
            table.state_of(&fresh, Path::new("/srv")),
            MountState::NotMounted
        );
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let (flags, data) = split_mount_options(&[
            "noatime,nodiratime".into(),
            "discard".into(),
            "nofail".into(),
            "x-systemd.device-timeout=5".into(),
            "commit=60".into(),
        ]);
        assert!(flags.contains(MountFlags::NOATIME | MountFlags::NODIRATIME));
        assert_eq!(data, "discard,commit=60");
    }

    #[test]
    fn numeric_ids_need_no_lookup() {
        assert_eq!(resolve_user("1234").unwrap(), 1234);
        assert_eq!(resolve_user("root").unwrap(), 0);
        assert!(matches!(
            resolve_group("no-such-group-cps"),
            Err(Error::UnknownId { .. })
        ));
    }
}
