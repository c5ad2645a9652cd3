//! What the loop-device test files share.

use std::fs;
use std::os::unix::fs::MetadataExt;

use cps_blockdev::{Device, Verification};
use cps_fixtures::LoopDevice;

/// The loop device as a verified device of `volume_id`.
pub fn device_of(l: &LoopDevice, volume_id: &str) -> Device {
    Device {
        path: l.path().to_path_buf(),
        rdev: fs::metadata(l.path()).unwrap().rdev(),
        volume_id: volume_id.into(),
        // Loop devices have no serial; the kernel's sysfs still ties name and device number.
        verification: Verification::XenName,
    }
}

/// A fresh directory to mount under, removed on drop.
pub fn mount_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().unwrap()
}
