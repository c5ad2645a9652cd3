//! Finding the kernel device of an attached volume, and proving it is that volume's.
//!
//! On Nitro instances an EBS volume is an NVMe namespace whose controller serial is the volume
//! id without its dash; udev links it as `disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…`.
//! Links can be stale, so the serial behind the link is always read back from sysfs, together
//! with the device number, before the device is handed out. On Xen instances the requested name
//! `/dev/sdX` appears as `/dev/xvdX` and there is no serial to check; AWS refuses to attach two
//! volumes under one name, so the name identifies the volume there.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::{Device, Error};

/// How a device was tied to its volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    /// NVMe controller serial equals the volume id.
    NvmeSerial,
    /// Xen block device under the requested (or sd↔xvd translated) name.
    XenName,
}

/// The outcome of one look for a volume's device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(Device),
    /// Not there (yet); the reason says what was seen, for the timeout message.
    NotYet(String),
}

/// The udev by-id link name of an EBS volume's NVMe device.
pub fn nvme_link_name(volume_id: &str) -> String {
    format!(
        "nvme-Amazon_Elastic_Block_Store_{}",
        volume_id.replace('-', "")
    )
}

/// The volume being looked for.
#[derive(Clone, Copy, Debug)]
pub struct Wanted<'a> {
    pub volume_id: &'a str,
    /// The device name it was attached under (`/dev/xvdc`).
    pub requested: &'a str,
    pub size_gib: i32,
}

pub(crate) fn locate(
    device_root: &Path,
    sys_root: &Path,
    wanted: Wanted<'_>,
) -> Result<Lookup, Error> {
    let Wanted {
        volume_id,
        requested,
        ..
    } = wanted;
    let mut reasons = Vec::new();
    let link = device_root
        .join("disk/by-id")
        .join(nvme_link_name(volume_id));
    match candidate(&link, sys_root, wanted, true)? {
        Lookup::Found(device) => return Ok(Lookup::Found(device)),
        Lookup::NotYet(why) => reasons.push(why),
    }
    for name in xen_names(requested) {
        match candidate(&device_root.join(&name), sys_root, wanted, false)? {
            Lookup::Found(device) => return Ok(Lookup::Found(device)),
            Lookup::NotYet(why) => reasons.push(why),
        }
    }
    Ok(Lookup::NotYet(reasons.join("; ")))
}

/// The names a Xen instance may give a volume attached under `requested`, its own first:
/// `/dev/sdf` → [`xvdf`, `sdf`]; `/dev/xvdf` → [`xvdf`, `sdf`]; anything else → [its name].
pub fn xen_names(requested: &str) -> Vec<String> {
    let base = requested.rsplit('/').next().unwrap_or(requested);
    if let Some(rest) = base.strip_prefix("xvd") {
        vec![base.to_owned(), format!("sd{rest}")]
    } else if let Some(rest) = base.strip_prefix("sd") {
        vec![format!("xvd{rest}"), base.to_owned()]
    } else {
        vec![base.to_owned()]
    }
}

fn candidate(
    path: &Path,
    sys_root: &Path,
    wanted: Wanted<'_>,
    is_nvme_link: bool,
) -> Result<Lookup, Error> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(Lookup::NotYet(format!("no {}", path.display())));
    }
    let Ok(node) = fs::canonicalize(path) else {
        return Ok(Lookup::NotYet(format!(
            "{} is a dangling link",
            path.display()
        )));
    };
    // The node can vanish between the two looks (a detach racing with udev): look again later.
    let Ok(meta) = fs::metadata(&node) else {
        return Ok(Lookup::NotYet(format!("{} vanished", node.display())));
    };
    if !meta.file_type().is_block_device() {
        return Ok(Lookup::NotYet(format!(
            "{} leads to {}, which is not a block device",
            path.display(),
            node.display()
        )));
    }
    let name = node
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nvme = is_nvme_link || name.starts_with("nvme");
    let dir = sys_root.join("block").join(&name);
    // NVMe: the serial is the volume id. Xen has no serial; the name is unique per instance (EC2
    // refuses a busy name), and the size must match too, so a disk that was there before under
    // that name is not taken for the volume.
    let mismatch = if nvme {
        serial_mismatch(&dir, wanted.volume_id)
    } else {
        size_mismatch(&dir, wanted.size_gib)
    };
    if let Some(why) = mismatch.or_else(|| dev_mismatch(&dir, meta.rdev())) {
        return Ok(Lookup::NotYet(format!(
            "{} → {}: {why}",
            path.display(),
            node.display()
        )));
    }
    Ok(Lookup::Found(Device {
        path: node,
        rdev: meta.rdev(),
        volume_id: wanted.volume_id.to_owned(),
        verification: if nvme {
            Verification::NvmeSerial
        } else {
            Verification::XenName
        },
    }))
}

/// Checks again, from sysfs, that `device` is still its volume's: the serial (NVMe) and the
/// device number. Called right before anything writes to it.
pub(crate) fn reverify(sys_root: &Path, device: &Device) -> Result<(), Error> {
    let name = device
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = sys_root.join("block").join(&name);
    let serial = match device.verification {
        Verification::NvmeSerial => serial_mismatch(&dir, &device.volume_id),
        Verification::XenName => None,
    };
    match serial.or_else(|| dev_mismatch(&dir, device.rdev)) {
        None => Ok(()),
        Some(why) => Err(Error::NoLongerVerified {
            path: device.path.clone(),
            volume_id: device.volume_id.clone(),
            why,
        }),
    }
}

/// Why the device described by sysfs `dir` is not provably `volume_id`'s, if it is not.
fn serial_mismatch(dir: &Path, volume_id: &str) -> Option<String> {
    let expected = volume_id.replace('-', "");
    match fs::read_to_string(dir.join("device/serial")) {
        Ok(s) if s.trim() == expected => None,
        Ok(s) => Some(format!(
            "serial is {:?}, expected {expected:?} (stale link?)",
            s.trim()
        )),
        Err(e) => Some(format!(
            "cannot read its serial ({}: {e})",
            dir.join("device/serial").display()
        )),
    }
}

/// Why the device's size (sysfs counts 512-byte sectors) is not the volume's, if it is not.
fn size_mismatch(dir: &Path, size_gib: i32) -> Option<String> {
    let expected = u64::try_from(size_gib).unwrap_or(0) << 21;
    match fs::read_to_string(dir.join("size")).map(|s| s.trim().parse::<u64>()) {
        Ok(Ok(sectors)) if sectors == expected => None,
        Ok(Ok(sectors)) => Some(format!(
            "it has {sectors} sectors, the volume {size_gib} GiB ({expected})"
        )),
        _ => Some(format!("cannot read {}", dir.join("size").display())),
    }
}

/// Why sysfs `dir` does not describe the node with device number `rdev`, if it does not.
fn dev_mismatch(dir: &Path, rdev: u64) -> Option<String> {
    let expected = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    match fs::read_to_string(dir.join("dev")) {
        Ok(s) if s.trim() == expected => None,
        Ok(s) => Some(format!(
            "sysfs says device {} but the node is {expected}",
            s.trim()
        )),
        Err(e) => Some(format!("cannot read {}: {e}", dir.join("dev").display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WANTED: Wanted<'static> = Wanted {
        volume_id: "vol-1",
        requested: "/dev/xvdc",
        size_gib: 1,
    };

    #[test]
    fn link_name_drops_the_dash() {
        assert_eq!(
            nvme_link_name("vol-0123456789abcdef0"),
            "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"
        );
    }

    #[test]
    fn xen_names_translate_sd_and_xvd() {
        assert_eq!(xen_names("/dev/sdf"), ["xvdf", "sdf"]);
        assert_eq!(xen_names("/dev/xvdc"), ["xvdc", "sdc"]);
        assert_eq!(xen_names("/dev/nvme1n1"), ["nvme1n1"]);
    }

    #[test]
    fn nothing_there_is_not_yet_with_reasons() {
        let root = tempfile::tempdir().unwrap();
        let found = locate(root.path(), root.path(), WANTED).unwrap();
        let Lookup::NotYet(why) = found else {
            panic!("found something in an empty root")
        };
        assert!(
            why.contains("nvme-Amazon_Elastic_Block_Store_vol1"),
            "{why}"
        );
        assert!(why.contains("xvdc"), "{why}");
    }

    #[test]
    fn a_regular_file_is_not_a_device() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("disk/by-id")).unwrap();
        fs::write(root.path().join("plain"), b"").unwrap();
        std::os::unix::fs::symlink(
            root.path().join("plain"),
            root.path().join("disk/by-id").join(nvme_link_name("vol-1")),
        )
        .unwrap();
        let Lookup::NotYet(why) = locate(root.path(), root.path(), WANTED).unwrap() else {
            panic!("a regular file was accepted as a device")
        };
        assert!(why.contains("not a block device"), "{why}");
    }
}
