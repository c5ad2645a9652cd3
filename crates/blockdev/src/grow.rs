//! Growing a filesystem to fill its enlarged device — only ever larger, and only the verified
//! device's own filesystem.
//!
//! - The filesystem is reached through its mount: the mount table must show the verified
//!   device on top at the target, and the directory opened there without following a link
//!   another account planted ([`crate::files`]) must be on that mount. xfs_growfs and btrfs
//!   are handed that open directory as `/proc/self/fd/N`, a path nobody can swap.
//! - Every tool gets an explicit new size, at least the current one, computed here — never
//!   "max" or "the device's size": resize2fs and btrfs shrink a filesystem to a smaller device,
//!   and newer xfs can shrink too. A device smaller than its filesystem is refused.
//! - A tail the type cannot use (shorter than xfs's smallest allocation group, an ext block
//!   group too small for its own metadata, less than a btrfs sector) counts as full, so a
//!   re-run is `AlreadyFull` and runs nothing.
//!
//! No tool here has a timeout: the crate has no pattern for one, and killing a resize half-way
//! is worse than waiting for it; the reads are quick.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::mount::MountInfo;
use crate::probe::{self, Output, check_node};
use crate::{Device, Error, Filesystem, Grown, Sizes, locate};

/// The kernel leaves out a last xfs allocation group shorter than this (XFS_MIN_AG_BLOCKS).
const XFS_MIN_AG_BLOCKS: u64 = 64;
/// resize2fs leaves out a new last ext block group with fewer blocks than its metadata plus 50.
const EXT_LAST_GROUP_SLACK: u64 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Ext,
    Xfs,
    Btrfs,
}

fn family_of(device: &Device, fstype: &str) -> Result<Family, Error> {
    match fstype {
        "ext2" | "ext3" | "ext4" => Ok(Family::Ext),
        "xfs" => Ok(Family::Xfs),
        "btrfs" => Ok(Family::Btrfs),
        other => Err(Error::CannotGrow {
            path: device.path.clone(),
            volume_id: device.volume_id.clone(),
            fstype: other.to_owned(),
            found: "cps reads the size of and grows only ext2/3/4, xfs and btrfs".into(),
            remedy: "Grow it with that filesystem's own tools".into(),
        }),
    }
}

/// What the size of a filesystem is made of, in the units its grow tool takes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Geometry {
    Ext(Ext),
    Xfs {
        block_size: u64,
        blocks: u64,
        ag_blocks: u64,
    },
    /// The size btrfs records for this device (`devid`) of the filesystem.
    Btrfs {
        devid: u64,
        sector_size: u64,
        bytes: u64,
    },
}

/// The superblock fields that decide how far an ext filesystem can grow.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ext {
    block_size: u64,
    blocks: u64,
    first_block: u64,
    blocks_per_group: u64,
    inode_blocks_per_group: u64,
    reserved_gdt_blocks: u64,
    desc_size: u64,
}

impl Geometry {
    fn bytes(&self) -> u64 {
        match self {
            Self::Ext(e) => e.blocks * e.block_size,
            Self::Xfs {
                block_size, blocks, ..
            } => blocks * block_size,
            Self::Btrfs { bytes, .. } => *bytes,
        }
    }

    /// The current size, in the unit of [`Self::reach`].
    fn current(&self) -> u64 {
        match self {
            Self::Ext(e) => e.blocks,
            Self::Xfs { blocks, .. } => *blocks,
            Self::Btrfs { bytes, .. } => *bytes,
        }
    }

    /// The size growing reaches on a device of `device_bytes` — blocks for ext and xfs, bytes
    /// for btrfs — never less than now: what the type's own rules can use of the device.
    fn reach(&self, device_bytes: u64, page_size: u64) -> u64 {
        let reach = match self {
            Self::Ext(e) => e.reach(device_bytes, page_size),
            Self::Xfs {
                block_size,
                ag_blocks,
                ..
            } => {
                let blocks = device_bytes / block_size;
                let tail = blocks % ag_blocks.max(&1);
                if tail < XFS_MIN_AG_BLOCKS {
                    blocks - tail
                } else {
                    blocks
                }
            }
            Self::Btrfs { sector_size, .. } => device_bytes - device_bytes % sector_size.max(&1),
        };
        reach.max(self.current())
    }
}

impl Ext {
    /// resize2fs's own choice on this device: whole pages of blocks, and a new last group
    /// only if it holds its metadata (the kernel's online rule needs less, so it agrees).
    fn reach(&self, device_bytes: u64, page_size: u64) -> u64 {
        let mut blocks = device_bytes / self.block_size;
        let per_page = (page_size / self.block_size).max(1);
        blocks -= blocks % per_page;
        let bpg = self.blocks_per_group.max(1);
        if blocks <= self.blocks || blocks <= self.first_block {
            return blocks;
        }
        let tail = (blocks - self.first_block) % bpg;
        let groups = (blocks - self.first_block).div_ceil(bpg);
        let desc_blocks = (groups * self.desc_size).div_ceil(self.block_size);
        // An upper bound on a group's own metadata: superblock backup, descriptors, reserved
        // descriptors, two bitmaps, the inode table.
        let metadata = 1 + desc_blocks + self.reserved_gdt_blocks + 2 + self.inode_blocks_per_group;
        let starts_a_group = blocks - tail >= self.blocks;
        if tail != 0 && starts_a_group && tail < metadata + EXT_LAST_GROUP_SLACK {
            blocks - tail
        } else {
            blocks
        }
    }
}

/// A measurement: the sizes and what they are made of.
struct Measured {
    sizes: Sizes,
    geometry: Geometry,
}

pub(crate) fn sizes(
    device: &Device,
    fs: &Filesystem,
    target: &Path,
    mountinfo: &Path,
) -> Result<Sizes, Error> {
    let family = family_of(device, &fs.fstype)?;
    check_node(device)?;
    let table = MountInfo::read(mountinfo)?;
    // ext is read from the device, so it needs no mount; the others are read through theirs.
    let root = if family == Family::Ext && table.mountpoint_of(device).is_none() {
        None
    } else {
        Some(open_mount(device, &fs.fstype, target, &table)?)
    };
    Ok(measure(family, device, root.as_ref())?.sizes)
}

pub(crate) fn grow_filesystem(
    device: &Device,
    fs: &Filesystem,
    target: &Path,
    sys_root: &Path,
    mountinfo: &Path,
) -> Result<Grown, Error> {
    let family = family_of(device, &fs.fstype)?;
    check_node(device)?;
    let root = open_mount(device, &fs.fstype, target, &MountInfo::read(mountinfo)?)?;
    let before = measure(family, device, Some(&root))?;
    let Some(reach) = decide(device, &fs.fstype, &before)? else {
        return Ok(Grown::AlreadyFull(before.sizes));
    };
    // Device numbers are reused after a detach and another attach; the serial is not.
    check_node(device)?;
    locate::reverify(sys_root, device)?;
    let fd = format!("/proc/self/fd/{}", root.as_raw_fd());
    let reach_arg = reach.to_string();
    log_growing(device, &before.sizes, "mounted");
    let out = match &before.geometry {
        Geometry::Xfs { .. } => run_tool("xfs_growfs", &["-D", &reach_arg, &fd], Some(&root))?,
        Geometry::Btrfs { devid, .. } => {
            let size = format!("{devid}:{reach}");
            run_tool("btrfs", &["filesystem", "resize", &size, &fd], Some(&root))?
        }
        // resize2fs finds the mount point itself, by the mount table's path — which nobody can
        // rename or replace while it is mounted — and the checks above tied it to this device.
        Geometry::Ext(_) => {
            let path = device.path.to_string_lossy();
            run_tool("resize2fs", &[&path, &reach_arg], None)?
        }
    };
    if out.code != Some(0) {
        return Err(
            ext_refusal(device, fs, &before.sizes, &out, true).unwrap_or_else(|| out.failure())
        );
    }
    grown(
        device,
        fs,
        before,
        measure(family, device, Some(&root))?,
        &out,
    )
}

/// Growing an unmounted ext filesystem. resize2fs insists that one was checked (`e2fsck -f`)
/// since it was last mounted, and cps does not run that check on its own: a forced full check
/// writes to a filesystem nobody has looked at, takes time in proportion to its metadata (hours
/// on a large volume, in the boot path), and buys nothing where the grow can run online after
/// the mount (root on EC2 may resize online). Forcing resize2fs past its demand (`-f`) is out of
/// the question. So this runs only when resize2fs accepts the filesystem as it is, and otherwise
/// says what to do.
pub(crate) fn grow_unmounted(
    device: &Device,
    fs: &Filesystem,
    sys_root: &Path,
    mountinfo: &Path,
) -> Result<Grown, Error> {
    let cannot = |found: String, remedy: &str| Error::CannotGrow {
        path: device.path.clone(),
        volume_id: device.volume_id.clone(),
        fstype: fs.fstype.clone(),
        found,
        remedy: remedy.to_owned(),
    };
    if family_of(device, &fs.fstype)? != Family::Ext {
        return Err(cannot(
            format!("{} grows only while mounted", fs.fstype),
            "Mount it, then grow it (cps-attach does, after mounting)",
        ));
    }
    check_node(device)?;
    if let Some(at) = MountInfo::read(mountinfo)?.mountpoint_of(device) {
        return Err(cannot(
            format!("it is mounted at {}", at.display()),
            "Grow it where it is mounted instead",
        ));
    }
    // Nothing may hold it (a mount racing in, LVM, RAID); resize2fs then opens it exclusively.
    drop(probe::open_exclusive(device)?);
    let before = measure(Family::Ext, device, None)?;
    let Some(reach) = decide(device, &fs.fstype, &before)? else {
        return Ok(Grown::AlreadyFull(before.sizes));
    };
    check_node(device)?;
    locate::reverify(sys_root, device)?;
    log_growing(device, &before.sizes, "unmounted");
    let path = device.path.to_string_lossy();
    let out = run_tool("resize2fs", &[&path, &reach.to_string()], None)?;
    if out.code != Some(0) {
        return Err(
            ext_refusal(device, fs, &before.sizes, &out, false).unwrap_or_else(|| out.failure())
        );
    }
    grown(
        device,
        fs,
        before,
        measure(Family::Ext, device, None)?,
        &out,
    )
}

fn log_growing(device: &Device, sizes: &Sizes, how: &str) {
    tracing::info!(volume_id = %device.volume_id, device = %device.path.display(),
        device_bytes = sizes.device_bytes, filesystem_bytes = sizes.filesystem_bytes,
        "growing the {how} filesystem to fill its device");
}

/// Refuses a device smaller than its filesystem; `None` when the filesystem already fills
/// what its type can use of the device, else the size to grow to.
fn decide(device: &Device, fstype: &str, m: &Measured) -> Result<Option<u64>, Error> {
    let Sizes {
        device_bytes,
        filesystem_bytes,
    } = m.sizes;
    if device_bytes < filesystem_bytes {
        return Err(Error::DeviceSmaller {
            path: device.path.clone(),
            volume_id: device.volume_id.clone(),
            fstype: fstype.to_owned(),
            device_bytes,
            filesystem_bytes,
        });
    }
    let reach = m.geometry.reach(device_bytes, page_size());
    Ok((reach > m.geometry.current()).then_some(reach))
}

/// After a tool said it grew the filesystem: it must have. A tool that "succeeds" without
/// growing would be run again on every boot, so that is an error, not a quiet success.
fn grown(
    device: &Device,
    fs: &Filesystem,
    before: Measured,
    after: Measured,
    out: &Output,
) -> Result<Grown, Error> {
    if after.sizes.filesystem_bytes <= before.sizes.filesystem_bytes {
        return Err(Error::CannotGrow {
            path: device.path.clone(),
            volume_id: device.volume_id.clone(),
            fstype: fs.fstype.clone(),
            found: format!(
                "`{}` succeeded, but the filesystem still has {} of the device's {} bytes",
                out.command, after.sizes.filesystem_bytes, after.sizes.device_bytes
            ),
            remedy: "Grow it by hand with that command and look at what it says".into(),
        });
    }
    tracing::info!(volume_id = %device.volume_id, device = %device.path.display(),
        from = before.sizes.filesystem_bytes, to = after.sizes.filesystem_bytes, "grew the filesystem");
    Ok(Grown::Grown {
        before: before.sizes,
        after: after.sizes,
    })
}

/// resize2fs's refusals that are not failures of the tool: the kernel will not grow it while
/// mounted (no CAP_SYS_RESOURCE, or no online resize for this filesystem), or, unmounted, it
/// wants a check first. Anything else stays a tool failure.
fn ext_refusal(
    device: &Device,
    fs: &Filesystem,
    sizes: &Sizes,
    out: &Output,
    online: bool,
) -> Option<Error> {
    let said = out
        .stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("resize2fs "))
        .collect::<Vec<_>>()
        .join(" ");
    let dev = device.path.display();
    let has = |words: &[&str]| words.iter().any(|w| said.contains(w));
    let (found, remedy) = if online
        && has(&[
            "Permission denied",
            "Operation not permitted",
            "not supported",
            "on-line resiz",
            "online resiz",
        ]) {
        (
            format!(
                "the kernel refused to grow it while mounted ({said}): online resize needs \
                     CAP_SYS_RESOURCE, and a filesystem made with online resize support"
            ),
            format!(
                "Grow it offline: stop the service, unmount it, run `e2fsck -f {dev}` and \
                     `resize2fs {dev}`, and mount it again; or run cps-attach again on a host that \
                     allows online resize (root with CAP_SYS_RESOURCE, as on EC2)"
            ),
        )
    } else if !online && said.contains("e2fsck") {
        (
            format!(
                "resize2fs grows an unmounted ext filesystem only when it was checked since it \
                     was last mounted ({said}), and cps does not run that check on its own"
            ),
            format!(
                "Let cps grow it online after the mount, or run `e2fsck -f {dev}` yourself and grow it again"
            ),
        )
    } else {
        return None;
    };
    Some(Error::CannotGrow {
        path: device.path.clone(),
        volume_id: device.volume_id.clone(),
        fstype: fs.fstype.clone(),
        found: format!(
            "it has {} of the device's {} bytes, and {found}",
            sizes.filesystem_bytes, sizes.device_bytes
        ),
        remedy,
    })
}

/// The root of `device`'s filesystem as mounted at `target`: the mount table shows the
/// verified device on top there, and the directory reached without following a link another
/// account planted is on that very mount (same mount id; st_dev would not do: a btrfs
/// subvolume reports its own).
fn open_mount(
    device: &Device,
    expected: &str,
    target: &Path,
    table: &MountInfo,
) -> Result<File, Error> {
    let not_there = |found: String| Error::NotMountedThere {
        device: device.path.clone(),
        volume_id: device.volume_id.clone(),
        target: target.to_path_buf(),
        found,
    };
    let Some((mount_id, mounted)) = table.own_mount(device, target) else {
        return Err(not_there(format!("{:?}", table.state_of(device, target))));
    };
    // The tool is chosen by the caller's type; the kernel's must be of the same family.
    if family_of(device, &mounted).ok() != family_of(device, expected).ok() {
        return Err(not_there(format!(
            "it is mounted as {mounted}, not {expected}"
        )));
    }
    let root = crate::files::open_dir(target, false)?.into_file();
    let fdinfo = format!("/proc/self/fdinfo/{}", root.as_raw_fd());
    let opened = std::fs::read_to_string(&fdinfo)
        .map_err(Error::io(&fdinfo, "read"))?
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:")?.trim().parse::<u64>().ok());
    if opened != Some(mount_id) {
        return Err(not_there(format!(
            "the directory there is on mount {opened:?}, the device's mount is {mount_id}"
        )));
    }
    Ok(root)
}

/// Reads the device's size and the filesystem's geometry. `root` is the mount's root, which
/// xfs and btrfs are read through; ext is read from the device's superblock.
fn measure(family: Family, device: &Device, root: Option<&File>) -> Result<Measured, Error> {
    let unmounted = || Error::NotMountedThere {
        device: device.path.clone(),
        volume_id: device.volume_id.clone(),
        target: PathBuf::new(),
        found: "not mounted; xfs and btrfs are measured through their mount".into(),
    };
    let geometry = match family {
        Family::Ext => Geometry::Ext(ext_geometry(device)?),
        Family::Xfs => xfs_geometry(root.ok_or_else(unmounted)?)?,
        Family::Btrfs => btrfs_geometry(device, root.ok_or_else(unmounted)?)?,
    };
    Ok(Measured {
        sizes: Sizes {
            device_bytes: device_bytes(device)?,
            filesystem_bytes: geometry.bytes(),
        },
        geometry,
    })
}

/// The device's size: the end of the verified node, opened without exclusivity (it may be
/// mounted), its device number checked on the open descriptor.
fn device_bytes(device: &Device) -> Result<u64, Error> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&device.path)
        .map_err(Error::io(&device.path, "open"))?;
    let rdev = file
        .metadata()
        .map_err(Error::io(&device.path, "stat"))?
        .rdev();
    if rdev != device.rdev {
        return Err(Error::Changed {
            path: device.path.clone(),
            volume_id: device.volume_id.clone(),
            expected: device.rdev,
            found: rdev,
        });
    }
    file.seek(SeekFrom::End(0))
        .map_err(Error::io(&device.path, "read the size of"))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// `dumpe2fs -h`: the superblock as `Key: value` lines.
fn ext_geometry(device: &Device) -> Result<Ext, Error> {
    let out = probe::run("dumpe2fs", &["-h"], device)?;
    if out.code != Some(0) {
        return Err(out.failure());
    }
    parse_ext(&out.stdout)
        .ok_or_else(|| unreadable(&out, "Block count, Block size, Blocks per group"))
}

fn parse_ext(text: &str) -> Option<Ext> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(Ext {
        block_size: field("Block size")?,
        blocks: field("Block count")?,
        first_block: field("First block")?,
        blocks_per_group: field("Blocks per group")?,
        inode_blocks_per_group: field("Inode blocks per group")?,
        // Absent without resize_inode / 64bit: none reserved, 32-byte descriptors.
        reserved_gdt_blocks: field("Reserved GDT blocks").unwrap_or(0),
        desc_size: field("Group descriptor size").unwrap_or(32),
    })
}

/// `xfs_growfs -n` (no change): the geometry of the mounted filesystem.
fn xfs_geometry(root: &File) -> Result<Geometry, Error> {
    let fd = format!("/proc/self/fd/{}", root.as_raw_fd());
    let out = run_tool("xfs_growfs", &["-n", &fd], Some(root))?;
    if out.code != Some(0) {
        return Err(out.failure());
    }
    parse_xfs(&out.stdout).ok_or_else(|| unreadable(&out, "agsize, data bsize and blocks"))
}

/// `key=value` in a line of xfs's geometry report (`agsize=20480 blks`, `blocks=81920,`).
fn xfs_field(line: &str, key: &str) -> Option<u64> {
    line.split(|c: char| c.is_whitespace() || c == ',')
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn parse_xfs(text: &str) -> Option<Geometry> {
    let meta = text.lines().find(|l| l.starts_with("meta-data"))?;
    let data = text.lines().find(|l| l.starts_with("data "))?;
    Some(Geometry::Xfs {
        ag_blocks: xfs_field(meta, "agsize")?,
        block_size: xfs_field(data, "bsize")?,
        blocks: xfs_field(data, "blocks")?,
    })
}

/// `btrfs filesystem show --raw`: the size btrfs records for this device (the devid whose
/// path is this node); the sector size is statvfs's block size of the mount (btrfs reports
/// its sector size there), read on the opened root rather than from a sysfs path.
fn btrfs_geometry(device: &Device, root: &File) -> Result<Geometry, Error> {
    let fd = format!("/proc/self/fd/{}", root.as_raw_fd());
    let out = run_tool("btrfs", &["filesystem", "show", "--raw", &fd], Some(root))?;
    if out.code != Some(0) {
        return Err(out.failure());
    }
    let is_device = |path: &str| std::fs::metadata(path).is_ok_and(|m| m.rdev() == device.rdev);
    let (_fsid, devid, bytes) = parse_btrfs(&out.stdout, is_device)
        .ok_or_else(|| unreadable(&out, "the uuid and a devid line for this device"))?;
    let stat = nix::sys::statvfs::fstatvfs(root)
        .map_err(|e| Error::io(Path::new(&fd), "statvfs")(e.into()))?;
    Ok(Geometry::Btrfs {
        devid,
        sector_size: stat.block_size(),
        bytes,
    })
}

/// `(fsid, devid, size)` of the device `is_device` recognises by its path.
fn parse_btrfs(text: &str, is_device: impl Fn(&str) -> bool) -> Option<(String, u64, u64)> {
    let fsid = text
        .lines()
        .find_map(|l| l.split_once("uuid: "))
        .map(|(_, u)| u.trim().to_owned())?;
    text.lines().find_map(|l| {
        let (fields, path) = l.trim().split_once(" path ")?;
        let t: Vec<&str> = fields.split_whitespace().collect();
        match t.as_slice() {
            ["devid", id, "size", size, ..] if is_device(path.trim()) => {
                Some((fsid.clone(), id.parse().ok()?, size.parse().ok()?))
            }
            _ => None,
        }
    })
}

fn unreadable(out: &Output, wanted: &str) -> Error {
    Error::Tool {
        command: out.command.clone(),
        status: format!("its output lacks {wanted}"),
        stderr: out.stdout.chars().take(2000).collect(),
    }
}

/// Runs a tool with a fixed locale, no stdin, in its own process group (a Ctrl-C meant for
/// cps-attach does not cut a resize short). `keep` stays open in the child, so that the path
/// `/proc/self/fd/N` names the very directory opened here.
fn run_tool(program: &str, args: &[&str], keep: Option<&File>) -> Result<Output, Error> {
    let command = format!("{program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args.iter().map(OsString::from))
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .process_group(0);
    if let Some(fd) = keep.map(AsRawFd::as_raw_fd) {
        // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls
        // are allowed; fcntl is one. It clears close-on-exec on a descriptor the child holds.
        unsafe {
            cmd.pre_exec(move || match libc::fcntl(fd, libc::F_SETFD, 0) {
                -1 => Err(std::io::Error::last_os_error()),
                _ => Ok(()),
            });
        }
    }
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::ToolMissing {
                tool: program.to_owned(),
                hint: probe::tool_hint(program),
            }
        } else {
            Error::io(program, "run")(e)
        }
    })?;
    Ok(Output {
        command,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Verification;

    const XFS: &str = "\
meta-data=/dev/loop2             isize=512    agcount=4, agsize=20480 blks
         =                       sectsz=512   attr=2, projid32bit=1
data     =                       bsize=4096   blocks=81920, imaxpct=25
         =                       sunit=0      swidth=0 blks
log      =internal log           bsize=4096   blocks=16384, version=2
realtime =none                   extsz=4096   blocks=0, rtextents=0
";

    const EXT: &str = "\
Filesystem features:      has_journal ext_attr resize_inode dir_index filetype extent 64bit
Block count:              131072
Reserved block count:     6552
First block:              1
Block size:               1024
Reserved GDT blocks:      256
Group descriptor size:    64
Blocks per group:         8192
Inode blocks per group:   512
";

    const BTRFS: &str = "\
Label: none  uuid: 493b2b14-4a6e-45dd-a02a-025371777cc9
\tTotal devices 2 FS bytes used 147456
\tdevid    1 size 268435456 used 92274688 path /dev/loop2
\tdevid    3 size 419430400 used 92274688 path /dev/loop7
";

    fn device() -> Device {
        Device {
            path: "/dev/nvme1n1".into(),
            rdev: libc::makedev(259, 3),
            volume_id: "vol-1".into(),
            verification: Verification::NvmeSerial,
        }
    }

    #[test]
    fn geometry_reports_parse() {
        let xfs = parse_xfs(XFS).unwrap();
        assert_eq!(
            xfs,
            Geometry::Xfs {
                block_size: 4096,
                blocks: 81920,
                ag_blocks: 20480
            }
        );
        assert_eq!(xfs.bytes(), 320 << 20);
        let ext = parse_ext(EXT).unwrap();
        assert_eq!(
            (
                ext.blocks,
                ext.block_size,
                ext.first_block,
                ext.reserved_gdt_blocks
            ),
            (131072, 1024, 1, 256)
        );
        assert_eq!(parse_ext("Block count: 5\n"), None, "fields missing");
        // The devid of this device, not the first one listed.
        let found = parse_btrfs(BTRFS, |p| p == "/dev/loop7").unwrap();
        assert_eq!(
            found,
            ("493b2b14-4a6e-45dd-a02a-025371777cc9".into(), 3, 419430400)
        );
        assert_eq!(parse_btrfs(BTRFS, |_| false), None);
    }

    #[test]
    fn xfs_leaves_out_a_tail_shorter_than_its_smallest_group() {
        let g = parse_xfs(XFS).unwrap();
        let block = 4096;
        let now = 81920 * block;
        assert_eq!(g.reach(now, 4096), 81920);
        assert_eq!(
            g.reach(now + 63 * block + 100, 4096),
            81920,
            "63 blocks: full"
        );
        assert_eq!(g.reach(now + 64 * block, 4096), 81920 + 64);
        // Past a whole group and a short tail: the whole group only.
        assert_eq!(g.reach(now + (20480 + 10) * block, 4096), 81920 + 20480);
        assert_eq!(g.reach(now / 2, 4096), 81920, "never below now");
    }

    #[test]
    fn btrfs_grows_in_whole_sectors() {
        let g = Geometry::Btrfs {
            devid: 1,
            sector_size: 4096,
            bytes: 1 << 30,
        };
        assert_eq!(g.reach((1 << 30) + 4095, 4096), 1 << 30);
        assert_eq!(g.reach((1 << 30) + 8191, 4096), (1 << 30) + 4096);
    }

    #[test]
    fn ext_extends_its_last_group_but_starts_a_new_one_only_with_room_for_its_metadata() {
        let mut e = parse_ext(EXT).unwrap();
        // 131072 blocks from block 1: 15 whole groups and a last one of 8191 blocks.
        assert_eq!(e.reach(131072 * 1024, 4096), 131072);
        // Whole pages only (4 blocks of 1 KiB): 131076, which fills the last group (131073)
        // and would start one of 3 blocks, which is left out.
        assert_eq!(e.reach((131072 + 7) * 1024, 4096), 131073);
        e.blocks = 131073;
        assert_eq!(e.reach((131072 + 7) * 1024, 4096), 131073, "then: full");
        // Ending on a group boundary, a new group needs about 1 + 2 + 256 + 2 + 512 + 50 blocks.
        e.blocks = 8192 * 16 + 1;
        let start = e.blocks;
        assert_eq!(
            e.reach((start + 400) * 1024, 1024),
            start,
            "too small a group"
        );
        assert_eq!(e.reach((start + 900) * 1024, 1024), start + 900);
        assert_eq!(e.reach((start + 8192 + 400) * 1024, 1024), start + 8192);
        // A partial last group grows by any amount.
        e.blocks = 8192 * 16 + 1 - 4000;
        assert_eq!(e.reach((e.blocks + 8) * 1024, 1024), e.blocks + 8);
    }

    #[test]
    fn a_smaller_device_is_refused_and_a_full_filesystem_needs_nothing() {
        let m = |device_bytes| Measured {
            sizes: Sizes {
                device_bytes,
                filesystem_bytes: 320 << 20,
            },
            geometry: parse_xfs(XFS).unwrap(),
        };
        let err = decide(&device(), "xfs", &m(300 << 20)).unwrap_err();
        assert!(err.is_refusal(), "{err}");
        assert!(
            err.to_string().contains("never shrinks") && err.to_string().contains("vol-1"),
            "{err}"
        );
        assert_eq!(decide(&device(), "xfs", &m(320 << 20)).unwrap(), None);
        assert_eq!(
            decide(&device(), "xfs", &m((320 << 20) + 4096)).unwrap(),
            None
        );
        assert_eq!(
            decide(&device(), "xfs", &m(400 << 20)).unwrap(),
            Some(102400)
        );
    }

    #[test]
    fn only_known_types_are_grown() {
        let err = family_of(&device(), "vfat").unwrap_err();
        assert!(matches!(err, Error::CannotGrow { .. }), "{err}");
        assert_eq!(family_of(&device(), "ext3").unwrap(), Family::Ext);
    }

    #[test]
    fn resize2fs_refusals_say_what_to_do_and_other_failures_stay_tool_errors() {
        let sizes = Sizes {
            device_bytes: 2 << 20,
            filesystem_bytes: 1 << 20,
        };
        let fs = Filesystem {
            fstype: "ext4".into(),
            uuid: None,
            label: None,
        };
        let out = |stderr: &str| Output {
            command: "resize2fs /dev/nvme1n1 2048".into(),
            code: Some(1),
            stdout: String::new(),
            stderr: stderr.into(),
        };
        let eperm = out(
            "resize2fs 1.47.0 (5-Feb-2023)\nresize2fs: Permission denied to resize filesystem\n",
        );
        let err = ext_refusal(&device(), &fs, &sizes, &eperm, true).unwrap();
        let text = err.to_string();
        assert!(
            text.contains("Permission denied")
                && text.contains("e2fsck -f /dev/nvme1n1")
                && text.contains("vol-1")
                && !text.contains("5-Feb"),
            "{text}"
        );
        let check =
            out("resize2fs 1.47.0 (5-Feb-2023)\nPlease run 'e2fsck -f /dev/nvme1n1' first.\n");
        let text = ext_refusal(&device(), &fs, &sizes, &check, false)
            .unwrap()
            .to_string();
        assert!(text.contains("does not run that check"), "{text}");
        assert!(ext_refusal(&device(), &fs, &sizes, &out("I/O error"), true).is_none());
        assert!(ext_refusal(&device(), &fs, &sizes, &check, true).is_none());
    }
}
