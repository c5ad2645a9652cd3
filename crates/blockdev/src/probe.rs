//! Proving what a device holds.
//!
//! `blkid -p` exits 2 both for "no signature" and for a missing path, a directory or a
//! permission problem, so its "nothing found" is only believed when every guard passed: the node
//! is the block device that was verified (same device number), this process holds it open
//! exclusively (nothing mounted, swapped or assembled on it), blkid wrote nothing on stderr,
//! `wipefs` lists no signature either, and the places [`crate::scan`] reads — backup
//! superblocks, both ends, a spread sample — are all zeros (a fresh EBS volume reads zeros;
//! anything else is a damaged filesystem or data we cannot name).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::process::Command;

use crate::{Device, Error, Filesystem, scan};

/// What a device holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// No signature anywhere, zeros at both ends: safe to format.
    Empty,
    /// A filesystem: mount it, never format it.
    Filesystem(Filesystem),
    /// Something that is neither empty nor a filesystem: never touch it.
    Refused(Refusal),
}

/// Why a device will not be formatted or mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    PartitionTable {
        pttype: String,
    },
    /// A non-filesystem signature: LUKS (`crypto`), LVM or RAID member (`raid`), swap (`other`).
    Signature {
        kind: String,
        usage: String,
    },
    /// blkid found conflicting signatures.
    Ambivalent {
        detail: String,
    },
    /// wipefs found a signature blkid did not report.
    HiddenSignature {
        kind: String,
        offset: String,
    },
    /// No primary signature, but a backup superblock: a damaged filesystem, not an empty device.
    BackupSuperblock {
        fstype: &'static str,
        offset: u64,
        /// How to check and repair it (boxed: keeps every error that carries a refusal small).
        recover: Box<str>,
    },
    /// No signature, but the device is not blank.
    UnknownData {
        offset: u64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PartitionTable { pttype } => write!(
                f,
                "holds a {pttype} partition table; cps-attach uses whole, unpartitioned volumes and will not format or mount it. \
                 If the partitions are yours, mount them yourself; if the volume is disposable, clear it with `wipefs -a`"
            ),
            Self::Signature { kind, usage } => write!(
                f,
                "holds a {kind} signature ({usage}), not a filesystem; it will not be formatted or mounted. \
                 Open or assemble it yourself, or point the tags at another volume"
            ),
            Self::Ambivalent { detail } => write!(
                f,
                "holds conflicting signatures ({detail}); it will not be formatted. Inspect it with `wipefs` and clean it up by hand"
            ),
            Self::HiddenSignature { kind, offset } => write!(
                f,
                "wipefs finds a {kind} signature at offset {offset} that blkid does not report; it will not be formatted. Inspect it with `wipefs`"
            ),
            Self::BackupSuperblock {
                fstype,
                offset,
                recover,
            } => write!(
                f,
                "has no primary signature, but a backup {fstype} superblock at byte {offset}: a damaged {fstype} filesystem, \
                 not an empty volume; it will not be formatted. {recover}"
            ),
            Self::UnknownData { offset } => write!(
                f,
                "has no known signature but is not blank (non-zero bytes at offset {offset}); it will not be formatted. \
                 If it holds nothing you need, delete the volume (cps-attach then creates a new one) or zero all of it \
                 (`blkdiscard -z DEVICE`), then run cps-attach again"
            ),
        }
    }
}

pub(crate) fn probe(device: &Device) -> Result<Probe, Error> {
    let file = open_exclusive(device)?;

    let blkid = run("blkid", &["-p", "-o", "export"], device)?;
    let fields = parse_export(&blkid.stdout);
    match (blkid.code, blkid.stderr.trim().is_empty()) {
        (Some(0), _) => return Ok(classify(&fields)),
        (Some(2), true) => {}
        (Some(8), _) => {
            return Ok(Probe::Refused(Refusal::Ambivalent {
                detail: blkid.stderr.trim().to_owned(),
            }));
        }
        _ => return Err(blkid.failure()),
    }

    // blkid says "nothing": ask wipefs, which lists every signature it knows at any offset.
    let wipefs = run(
        "wipefs",
        &["--no-act", "--noheadings", "--output", "OFFSET,TYPE"],
        device,
    )?;
    if wipefs.code != Some(0) || !wipefs.stderr.trim().is_empty() {
        return Err(wipefs.failure());
    }
    if let Some(line) = wipefs.stdout.lines().find(|l| !l.trim().is_empty()) {
        let mut parts = line.split_whitespace();
        let offset = parts.next().unwrap_or_default().to_owned();
        let kind = parts.next().unwrap_or("unknown").to_owned();
        return Ok(Probe::Refused(Refusal::HiddenSignature { kind, offset }));
    }

    if let Some(refusal) = find_data(&file, device)? {
        return Ok(Probe::Refused(refusal));
    }
    Ok(Probe::Empty)
}

/// What blkid reports for a device that may be in use (mounted), without the exclusive open.
/// Informational only: nothing is ever formatted on the strength of it.
pub(crate) fn identify(device: &Device) -> Result<Probe, Error> {
    check_node(device)?;
    let blkid = run("blkid", &["-p", "-o", "export"], device)?;
    match blkid.code {
        Some(0) => Ok(classify(&parse_export(&blkid.stdout))),
        _ => Err(blkid.failure()),
    }
}

/// Opens the verified node exclusively, after checking it is still that node.
pub(crate) fn open_exclusive(device: &Device) -> Result<File, Error> {
    check_node(device)?;
    // O_EXCL on a block device fails with EBUSY while anything holds it (mount, swap, dm, md).
    // Tools that just closed it (mkfs, a udev probe, a filesystem scan) can hold it for a
    // moment, so EBUSY is believed only when it persists.
    let mut attempt = 0;
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
            .open(&device.path)
        {
            Ok(file) => return Ok(file),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < BUSY_RETRIES => {
                attempt += 1;
                std::thread::sleep(BUSY_PAUSE);
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(Error::Busy {
                    path: device.path.clone(),
                    volume_id: device.volume_id.clone(),
                });
            }
            Err(e) => return Err(Error::io(&device.path, "open exclusively")(e)),
        }
    }
}

const BUSY_RETRIES: u32 = 10;
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// The path must still be a block device with the device number that was verified.
pub(crate) fn check_node(device: &Device) -> Result<(), Error> {
    let meta = match std::fs::metadata(&device.path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Missing {
                path: device.path.clone(),
            });
        }
        Err(e) => return Err(Error::io(&device.path, "stat")(e)),
    };
    let ft = meta.file_type();
    if !ft.is_block_device() {
        let found = if ft.is_dir() {
            "a directory"
        } else if ft.is_file() {
            "a regular file"
        } else if ft.is_char_device() {
            "a character device"
        } else {
            "not a device"
        };
        return Err(Error::NotBlockDevice {
            path: device.path.clone(),
            found,
        });
    }
    if meta.rdev() != device.rdev {
        return Err(Error::Changed {
            path: device.path.clone(),
            volume_id: device.volume_id.clone(),
            expected: device.rdev,
            found: meta.rdev(),
        });
    }
    Ok(())
}

/// Whether anything on the device is not zero: backup superblocks, both ends, a spread sample.
fn find_data(file: &File, device: &Device) -> Result<Option<Refusal>, Error> {
    let mut f = file;
    let size = f
        .seek(SeekFrom::End(0))
        .map_err(Error::io(&device.path, "seek"))?;
    let found = scan::find_data(file, size, &device.path.display().to_string())
        .map_err(Error::io(&device.path, "read"))?;
    Ok(found.map(|f| match f {
        scan::Found::Backup {
            fstype,
            offset,
            recover,
        } => Refusal::BackupSuperblock {
            fstype,
            offset,
            recover: recover.into_boxed_str(),
        },
        scan::Found::Data { offset } => Refusal::UnknownData { offset },
    }))
}

/// Types blkid reports with USAGE=filesystem that are members of a pool, not mountable alone.
const POOL_MEMBERS: [&str; 1] = ["zfs_member"];

fn classify(fields: &BTreeMap<String, String>) -> Probe {
    if let Some(pttype) = fields.get("PTTYPE") {
        return Probe::Refused(Refusal::PartitionTable {
            pttype: pttype.clone(),
        });
    }
    let kind = fields.get("TYPE").cloned();
    let usage = fields.get("USAGE").cloned().unwrap_or_default();
    match kind {
        // blkid files pool members under "filesystem", but there is nothing to mount on one.
        Some(kind) if POOL_MEMBERS.contains(&kind.as_str()) => Probe::Refused(Refusal::Signature {
            kind,
            usage: "a member of a storage pool".into(),
        }),
        Some(fstype) if usage == "filesystem" => Probe::Filesystem(Filesystem {
            fstype,
            uuid: fields.get("UUID").cloned(),
            label: fields.get("LABEL").cloned(),
        }),
        Some(kind) => Probe::Refused(Refusal::Signature { kind, usage }),
        // Exit 0 without TYPE or PTTYPE: a signature blkid could not name.
        None => Probe::Refused(Refusal::Signature {
            kind: "unnamed".into(),
            usage: fields
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
        }),
    }
}

/// `KEY=value` lines of `blkid -o export`; values may carry backslash escapes.
fn parse_export(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.to_owned(), unescape(v)))
        .collect()
}

fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) struct Output {
    pub(crate) command: String,
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Output {
    pub(crate) fn failure(&self) -> Error {
        Error::Tool {
            command: self.command.clone(),
            status: self
                .code
                .map(|c| format!("exit {c}"))
                .unwrap_or_else(|| "killed by a signal".into()),
            stderr: self.stderr.trim().to_owned(),
        }
    }
}

/// Runs a util-linux style tool on the device with a fixed locale and no stdin.
pub(crate) fn run(tool: &str, args: &[&str], device: &Device) -> Result<Output, Error> {
    let command = format!("{tool} {} {}", args.join(" "), device.path.display());
    let out = Command::new(tool)
        .args(args)
        .arg(&device.path)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::ToolMissing {
                    tool: tool.to_owned(),
                    hint: tool_hint(tool),
                }
            } else {
                Error::io(tool, "run")(e)
            }
        })?;
    Ok(Output {
        command,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

pub(crate) fn tool_hint(tool: &str) -> String {
    let package = match tool {
        "mkfs.xfs" | "xfs_growfs" => "xfsprogs",
        "mkfs.btrfs" | "btrfs" => "btrfs-progs",
        "mkfs.ext4" | "mkfs.ext3" | "mkfs.ext2" | "mke2fs" | "resize2fs" | "dumpe2fs" => {
            "e2fsprogs"
        }
        _ => "util-linux",
    };
    format!("install the {package} package")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> BTreeMap<String, String> {
        parse_export(text)
    }

    #[test]
    fn filesystems_are_kept_everything_else_refused() {
        let ext4 = classify(&fields(
            "DEVNAME=/dev/x\nUUID=u-1\nTYPE=ext4\nUSAGE=filesystem\n",
        ));
        assert_eq!(
            ext4,
            Probe::Filesystem(Filesystem {
                fstype: "ext4".into(),
                uuid: Some("u-1".into()),
                label: None
            })
        );
        let lvm = classify(&fields(
            "TYPE=LVM2_member\nUSAGE=raid\nVERSION=LVM2\\ 001\n",
        ));
        assert!(
            matches!(lvm, Probe::Refused(Refusal::Signature { ref kind, .. }) if kind == "LVM2_member")
        );
        let gpt = classify(&fields("PTUUID=x\nPTTYPE=gpt\n"));
        assert!(matches!(
            gpt,
            Probe::Refused(Refusal::PartitionTable { .. })
        ));
        let odd = classify(&fields("SOMETHING=1\n"));
        assert!(matches!(odd, Probe::Refused(_)));
    }

    #[test]
    fn export_values_are_unescaped() {
        assert_eq!(fields("LABEL=my\\ data\n")["LABEL"], "my data");
    }
}
