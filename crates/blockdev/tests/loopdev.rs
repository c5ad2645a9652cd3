//! cps-blockdev on the real kernel: loop devices, real mkfs, blkid, wipefs and mount(2).
//!
//! Needs root and the filesystem tools (ci/setup installs them). Locally the tier skips with one
//! line when they are missing; in CI it fails instead.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cps_blockdev::{
    BlockHost, Device, Error, FsType, FstabEntry, LinuxHost, Lookup, MkfsSpec, MountState,
    Ownership, Probe, Refusal, Verification, Wanted, nvme_link_name,
};
use cps_fixtures::{LoopDevice, MountGuard, Need, require, run};

/// Large enough for every filesystem (mkfs.xfs wants 300 MB); sparse, so cheap to create.
const SIZE: u64 = 320 << 20;
/// For content that is not xfs: smaller is faster to fingerprint.
const SMALL: u64 = 128 << 20;

fn ready() -> bool {
    let mut needs = cps_fixtures::kernel_needs();
    needs.extend([
        Need::Tool("mkfs.btrfs", "btrfs-progs"),
        Need::Tool("mkfs.vfat", "dosfstools"),
        Need::Tool("mkswap", "util-linux"),
        Need::Tool("cryptsetup", "cryptsetup-bin"),
        Need::Tool("pvcreate", "lvm2"),
        Need::Tool("sfdisk", "fdisk"),
    ]);
    require("blockdev on loop devices", &needs)
}

fn device_of(l: &LoopDevice) -> Device {
    Device {
        path: l.path().to_path_buf(),
        rdev: fs::metadata(l.path()).unwrap().rdev(),
        volume_id: "vol-0test".into(),
        verification: Verification::NvmeSerial,
    }
}

fn fingerprint(l: &LoopDevice) -> u64 {
    cps_fixtures::fingerprint(l.backing_file()).unwrap()
}

fn kernel_has(fstype: &str) -> bool {
    fs::read_to_string("/proc/filesystems")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().last() == Some(fstype))
}

fn mount_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("cps-mnt-")
        .tempdir()
        .unwrap()
}

#[test]
fn makes_mounts_and_never_remakes_each_filesystem() {
    if !ready() {
        return;
    }
    let host = LinuxHost::default();
    for fstype in FsType::ALL {
        let l = LoopDevice::new(SIZE).unwrap();
        let dev = device_of(&l);
        assert_eq!(
            host.probe(&dev).unwrap(),
            Probe::Empty,
            "{fstype}: a new device is empty"
        );
        let spec = MkfsSpec::Typed {
            fstype,
            label: Some("cpsdata".into()),
            options: vec![],
        };
        let made = host.make_filesystem(&dev, &spec).unwrap();
        assert_eq!(made.fstype, fstype.name());
        assert_eq!(made.label.as_deref(), Some("cpsdata"));
        assert!(made.uuid.is_some());

        let dir = mount_dir();
        let target = dir.path().join("data");
        let _guard = MountGuard(target.clone());
        host.mount(&dev, &made, &target, &["noatime".into()])
            .unwrap();
        assert_eq!(
            host.mount_state(&dev, &target).unwrap(),
            MountState::Mounted {
                fstype: fstype.name().into()
            }
        );
        let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = table
            .lines()
            .find(|l| l.contains(&*target.to_string_lossy()))
            .unwrap();
        assert!(
            line.contains("noatime"),
            "{fstype}: options applied: {line}"
        );
        host.set_ownership(
            &target,
            &Ownership {
                owner: Some("4321".into()),
                group: Some("4322".into()),
                mode: Some(0o750),
            },
        )
        .unwrap();
        let meta = fs::metadata(&target).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777),
            (4321, 4322, 0o750)
        );
        fs::write(target.join("keep"), b"data").unwrap();

        // Mounted: the exclusive probe refuses, identify still reads it, a second mount is a no-op.
        assert!(
            matches!(host.probe(&dev), Err(Error::Busy { .. })),
            "{fstype}"
        );
        assert!(
            matches!(host.identify(&dev).unwrap(), Probe::Filesystem(ref f) if f.uuid == made.uuid)
        );
        host.mount(&dev, &made, &target, &[]).unwrap();

        cps_fixtures::unmount(&target);
        let again = host.probe(&dev).unwrap();
        assert_eq!(
            again,
            Probe::Filesystem(made.clone()),
            "{fstype}: probed back identically"
        );
        let before = fingerprint(&l);
        let err = host.make_filesystem(&dev, &spec).unwrap_err();
        assert!(
            matches!(err, Error::AlreadyFormatted { .. }),
            "{fstype}: {err}"
        );
        assert_eq!(fingerprint(&l), before, "{fstype}: not one byte changed");
        host.mount(&dev, &made, &target, &[]).unwrap();
        assert_eq!(fs::read(target.join("keep")).unwrap(), b"data");
    }
}

#[test]
fn raw_mkfs_arguments_work_as_in_the_original_format() {
    if !ready() {
        return;
    }
    let l = LoopDevice::new(SIZE).unwrap();
    let dev = device_of(&l);
    let made = LinuxHost::default()
        .make_filesystem(&dev, &MkfsSpec::default())
        .unwrap();
    assert_eq!(made.fstype, "ext4");
    let reserved = run("tune2fs", &["-l", &l.path().to_string_lossy()]).unwrap();
    let line = reserved
        .lines()
        .find(|l| l.starts_with("Reserved block count:"))
        .unwrap();
    assert!(line.ends_with(" 0"), "-m 0 was passed: {line}");
}

/// Every kind of content a volume can hold: filesystems are kept (and mounted), everything else
/// is refused; nothing is ever formatted, and refused devices are left byte for byte.
#[test]
fn refusal_matrix() {
    if !ready() {
        return;
    }
    let host = LinuxHost::default();
    let p = |l: &LoopDevice| l.path().to_string_lossy().into_owned();
    type Maker = Box<dyn Fn(&LoopDevice)>;
    let filesystems: Vec<(&str, Maker)> = vec![
        (
            "ext2",
            Box::new(move |l| {
                run("mkfs.ext2", &["-q", "-F", &p(l)]).unwrap();
            }),
        ),
        (
            "ext3",
            Box::new(move |l| {
                run("mkfs.ext3", &["-q", "-F", &p(l)]).unwrap();
            }),
        ),
        (
            "ext4",
            Box::new(move |l| {
                run("mkfs.ext4", &["-q", "-F", &p(l)]).unwrap();
            }),
        ),
        (
            "xfs",
            Box::new(move |l| {
                run("mkfs.xfs", &["-q", "-f", &p(l)]).unwrap();
            }),
        ),
        (
            "btrfs",
            Box::new(move |l| {
                run("mkfs.btrfs", &["-q", "-f", &p(l)]).unwrap();
            }),
        ),
        (
            "vfat",
            Box::new(move |l| {
                run("mkfs.vfat", &[&p(l)]).unwrap();
            }),
        ),
    ];
    for (fstype, make) in filesystems {
        let l = LoopDevice::new(if fstype == "xfs" { SIZE } else { SMALL }).unwrap();
        make(&l);
        let dev = device_of(&l);
        let found = match host.probe(&dev).unwrap() {
            Probe::Filesystem(fs) => fs,
            other => panic!("{fstype}: probed as {other:?}"),
        };
        assert_eq!(found.fstype, fstype);
        let before = fingerprint(&l);
        assert!(matches!(
            host.make_filesystem(&dev, &MkfsSpec::default()),
            Err(Error::AlreadyFormatted { .. })
        ));
        assert_eq!(fingerprint(&l), before, "{fstype}: never formatted");

        let dir = mount_dir();
        let target = dir.path().join("m");
        let _guard = MountGuard(target.clone());
        match host.mount(&dev, &found, &target, &[]) {
            Ok(()) => assert!(matches!(
                host.mount_state(&dev, &target).unwrap(),
                MountState::Mounted { .. }
            )),
            // This kernel may lack a driver (vfat is a module here): a clear error, data intact.
            Err(Error::Mount { source, .. }) if !kernel_has(fstype) => {
                assert_eq!(
                    source.raw_os_error(),
                    Some(libc::ENODEV),
                    "{fstype}: {source}"
                );
                eprintln!(
                    "note: this kernel has no {fstype} driver; checked the refusal to format and the mount error"
                );
            }
            Err(e) => panic!("{fstype}: {e}"),
        }
    }

    type Expect = fn(&Refusal) -> bool;
    let refused: Vec<(&str, Maker, Expect)> = vec![
        (
            "swap",
            Box::new(move |l| {
                run("mkswap", &[&p(l)]).unwrap();
            }),
            |r| matches!(r, Refusal::Signature { kind, .. } if kind == "swap"),
        ),
        (
            "LUKS",
            Box::new(move |l| {
                let key = tempfile::NamedTempFile::new().unwrap();
                fs::write(key.path(), b"secret").unwrap();
                run(
                    "cryptsetup",
                    &[
                        "luksFormat",
                        "--batch-mode",
                        "--type",
                        "luks2",
                        "--pbkdf",
                        "pbkdf2",
                        "--pbkdf-force-iterations",
                        "1000",
                        &p(l),
                        &key.path().to_string_lossy(),
                    ],
                )
                .unwrap();
            }),
            |r| matches!(r, Refusal::Signature { kind, usage } if kind == "crypto_LUKS" && usage == "crypto"),
        ),
        (
            "LVM PV",
            Box::new(move |l| {
                run("pvcreate", &["-q", "-ff", "-y", &p(l)]).unwrap();
            }),
            |r| matches!(r, Refusal::Signature { kind, .. } if kind == "LVM2_member"),
        ),
        (
            "GPT",
            Box::new(move |l| sfdisk(l, "label: gpt\n,64M\n")),
            |r| matches!(r, Refusal::PartitionTable { pttype } if pttype == "gpt"),
        ),
        (
            "MBR",
            Box::new(move |l| sfdisk(l, "label: dos\n,64M\n")),
            |r| matches!(r, Refusal::PartitionTable { pttype } if pttype == "dos"),
        ),
        (
            "unnamed data",
            Box::new(|l| scribble(l.path(), 8192)),
            |r| matches!(r, Refusal::UnknownData { offset: 8192 }),
        ),
        (
            "data at the end",
            Box::new(|l| scribble(l.path(), SMALL - 100)),
            |r| matches!(r, Refusal::UnknownData { .. }),
        ),
    ];
    for (what, make, expected) in refused {
        let l = LoopDevice::new(SMALL).unwrap();
        make(&l);
        let dev = device_of(&l);
        let before = fingerprint(&l);
        match host.probe(&dev).unwrap() {
            Probe::Refused(r) => {
                assert!(expected(&r), "{what}: refused for the wrong reason: {r:?}");
                assert!(!r.to_string().is_empty());
            }
            other => panic!("{what}: probed as {other:?}"),
        }
        let err = host
            .make_filesystem(&dev, &MkfsSpec::default())
            .unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{what}: {err}");
        assert!(err.is_refusal());
        assert_eq!(fingerprint(&l), before, "{what}: left byte for byte");
    }
}

fn sfdisk(l: &LoopDevice, script: &str) {
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", "--no-reread", &l.path().to_string_lossy()])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk {script:?}");
}

fn scribble(path: &Path, offset: u64) {
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(b"\x01not a signature").unwrap();
    f.sync_all().unwrap();
}

#[test]
fn what_is_not_the_verified_block_device_is_an_error_not_empty() {
    if !ready() {
        return;
    }
    let host = LinuxHost::default();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("regular");
    fs::write(&file, vec![0u8; 4096]).unwrap();
    let mut dev = Device {
        path: dir.path().join("missing"),
        rdev: 0,
        volume_id: "vol-x".into(),
        verification: Verification::NvmeSerial,
    };
    assert!(matches!(host.probe(&dev), Err(Error::Missing { .. })));
    dev.path = file;
    assert!(matches!(
        host.probe(&dev),
        Err(Error::NotBlockDevice {
            found: "a regular file",
            ..
        })
    ));
    dev.path = dir.path().to_path_buf();
    assert!(matches!(
        host.probe(&dev),
        Err(Error::NotBlockDevice {
            found: "a directory",
            ..
        })
    ));
    assert!(matches!(
        host.make_filesystem(&dev, &MkfsSpec::default()),
        Err(Error::NotBlockDevice { .. })
    ));

    // A node that is not the one verified (device number differs) is refused too.
    let l = LoopDevice::new(SIZE).unwrap();
    let mut other = device_of(&l);
    other.rdev += 1;
    assert!(matches!(host.probe(&other), Err(Error::Changed { .. })));
    assert!(matches!(
        host.make_filesystem(&other, &MkfsSpec::default()),
        Err(Error::Changed { .. })
    ));
    assert_eq!(
        host.probe(&device_of(&l)).unwrap(),
        Probe::Empty,
        "and nothing was written"
    );
}

fn wanted(requested: &str) -> Wanted<'_> {
    Wanted {
        volume_id: "vol-0abc",
        requested,
        size_gib: 1,
    }
}

/// A device root and sysfs as udev and the kernel would show an EBS volume, built by hand.
struct FakeRoots {
    dir: tempfile::TempDir,
}

impl FakeRoots {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn dev(&self) -> PathBuf {
        self.dir.path().join("dev")
    }
    fn sys(&self) -> PathBuf {
        self.dir.path().join("sys")
    }
    fn link_nvme(&self, volume_id: &str, l: &LoopDevice, serial: &str) {
        let by_id = self.dev().join("disk/by-id");
        fs::create_dir_all(&by_id).unwrap();
        let link = by_id.join(nvme_link_name(volume_id));
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(l.path(), link).unwrap();
        let name = l.path().file_name().unwrap();
        let block = self.sys().join("block").join(name);
        fs::create_dir_all(block.join("device")).unwrap();
        fs::write(block.join("device/serial"), format!("{serial}  \n")).unwrap();
        let rdev = fs::metadata(l.path()).unwrap().rdev();
        fs::write(
            block.join("dev"),
            format!("{}:{}\n", libc::major(rdev), libc::minor(rdev)),
        )
        .unwrap();
    }
}

#[test]
fn nvme_links_are_trusted_only_when_the_serial_matches() {
    if !ready() {
        return;
    }
    let l = LoopDevice::new(SIZE).unwrap();
    let roots = FakeRoots::new();
    let host = LinuxHost::new(roots.dev(), roots.sys());
    assert!(matches!(
        host.locate(wanted("/dev/xvdc")).unwrap(),
        Lookup::NotYet(_)
    ));

    // A stale link: the node behind it reports another volume's serial.
    roots.link_nvme("vol-0abc", &l, "vol0def");
    let Lookup::NotYet(why) = host.locate(wanted("/dev/xvdc")).unwrap() else {
        panic!("a link with the wrong serial was trusted")
    };
    assert!(
        why.contains("serial is \"vol0def\", expected \"vol0abc\""),
        "{why}"
    );

    roots.link_nvme("vol-0abc", &l, "vol0abc");
    let Lookup::Found(dev) = host.locate(wanted("/dev/xvdc")).unwrap() else {
        panic!("a verified link was not found")
    };
    assert_eq!(dev.path, l.path());
    assert_eq!(dev.verification, Verification::NvmeSerial);

    // sysfs describing another device number than the node's is not trusted either.
    let name = l.path().file_name().unwrap().to_owned();
    fs::write(roots.sys().join("block").join(&name).join("dev"), "7:999\n").unwrap();
    assert!(
        matches!(host.locate(wanted("/dev/xvdc")).unwrap(), Lookup::NotYet(w) if w.contains("sysfs says device 7:999"))
    );
}

#[test]
fn xen_names_are_found_under_the_translated_name() {
    if !ready() {
        return;
    }
    // Xen has no serial to check: the name and the size must both match. The kernel's own
    // sysfs describes loop devices, so it is used as it is here.
    let right = LoopDevice::new(1 << 30).unwrap();
    let wrong = LoopDevice::new(SIZE).unwrap();
    let roots = FakeRoots::new();
    fs::create_dir_all(roots.dev()).unwrap();
    std::os::unix::fs::symlink(wrong.path(), roots.dev().join("xvdg")).unwrap();
    std::os::unix::fs::symlink(right.path(), roots.dev().join("xvdf")).unwrap();
    let host = LinuxHost::new(roots.dev(), "/sys");
    let Lookup::Found(dev) = host.locate(wanted("/dev/sdf")).unwrap() else {
        panic!("/dev/sdf should appear as xvdf on Xen")
    };
    assert_eq!(dev.verification, Verification::XenName);
    assert_eq!(dev.path, right.path());
    let Lookup::NotYet(why) = host.locate(wanted("/dev/sdg")).unwrap() else {
        panic!("a 320 MiB disk was taken for a 1 GiB volume")
    };
    assert!(why.contains("655360 sectors, the volume 1 GiB"), "{why}");
}

#[test]
fn mount_table_states_and_refusals() {
    if !ready() {
        return;
    }
    let host = LinuxHost::default();
    let (a, b) = (
        LoopDevice::new(SIZE).unwrap(),
        LoopDevice::new(SIZE).unwrap(),
    );
    let (da, db) = (device_of(&a), device_of(&b));
    let spec = MkfsSpec::Typed {
        fstype: FsType::Ext4,
        label: None,
        options: vec![],
    };
    let fa = host.make_filesystem(&da, &spec).unwrap();
    let fb = host.make_filesystem(&db, &spec).unwrap();
    let dir = mount_dir();
    let (t1, t2) = (dir.path().join("one"), dir.path().join("two"));
    let (_g1, _g2) = (MountGuard(t1.clone()), MountGuard(t2.clone()));

    assert_eq!(host.mount_state(&da, &t1).unwrap(), MountState::NotMounted);
    host.mount(&da, &fa, &t1, &[]).unwrap();
    assert!(matches!(
        host.mount_state(&db, &t1).unwrap(),
        MountState::TargetBusy { .. }
    ));
    let err = host.mount(&db, &fb, &t1, &[]).unwrap_err();
    assert!(
        matches!(err, Error::TargetBusy { .. }) && err.is_refusal(),
        "{err}"
    );
    assert!(
        matches!(host.mount_state(&da, &t2).unwrap(), MountState::MountedElsewhere { ref mountpoint } if *mountpoint == t1)
    );
    let err = host.mount(&da, &fa, &t2, &[]).unwrap_err();
    assert!(matches!(err, Error::MountedElsewhere { .. }), "{err}");
    assert!(
        err.to_string().contains("set mount.target to"),
        "says what to do: {err}"
    );
}

#[test]
fn fstab_entry_uses_the_real_uuid_and_is_idempotent() {
    if !ready() {
        return;
    }
    let host = LinuxHost::default();
    let l = LoopDevice::new(SIZE).unwrap();
    let dev = device_of(&l);
    let fs_made = host
        .make_filesystem(
            &dev,
            &MkfsSpec::Typed {
                fstype: FsType::Xfs,
                label: None,
                options: vec![],
            },
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fstab = dir.path().join("fstab");
    fs::write(
        &fstab,
        "# static file system information\nUUID=root / ext4 defaults 0 1\n",
    )
    .unwrap();
    let entry = FstabEntry {
        uuid: fs_made.uuid.clone().unwrap(),
        target: "/var/lib/data".into(),
        fstype: fs_made.fstype.clone(),
        options: vec!["noatime".into()],
        volume_id: "vol-0test".into(),
    };
    assert!(host.persist(&fstab, &entry).unwrap());
    let text = fs::read_to_string(&fstab).unwrap();
    assert!(
        text.contains(&format!(
            "UUID={} /var/lib/data xfs noatime,nofail 0 0",
            entry.uuid
        )),
        "{text}"
    );
    let mtime = fs::metadata(&fstab).unwrap().modified().unwrap();
    assert!(!host.persist(&fstab, &entry).unwrap());
    assert_eq!(
        fs::metadata(&fstab).unwrap().modified().unwrap(),
        mtime,
        "unchanged file is not rewritten"
    );
    // The UUID resolves to the device, as mount would resolve it at boot.
    let resolved = run("blkid", &["-U", &entry.uuid]).unwrap_or_default();
    assert!(
        resolved.is_empty() || Path::new(&resolved) == l.path(),
        "{resolved}"
    );
}

/// `mount.owner` on a path the service account controls: that account replaced the mount point
/// with a link to a directory of root's. Applying owner and mode through the link would hand
/// root's directory to the account; the planted link is refused and nothing outside changes.
#[test]
fn mount_ownership_is_never_applied_through_a_planted_link() {
    if !require(
        "blockdev ownership (real user)",
        &[Need::Root, Need::Tool("useradd", "passwd")],
    ) {
        return;
    }
    let user = cps_fixtures::ServiceUser::create("mntown").unwrap();
    let base = mount_dir();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let svc = base.path().join("svc");
    fs::create_dir(&svc).unwrap();
    user.own(&svc).unwrap();
    let root_dir = base.path().join("root-only");
    fs::create_dir(&root_dir).unwrap();
    fs::set_permissions(&root_dir, fs::Permissions::from_mode(0o700)).unwrap();
    let target = svc.join("data");
    user.symlink(&root_dir, &target).unwrap();

    let ownership = Ownership {
        owner: Some(user.name.clone()),
        group: Some(user.name.clone()),
        mode: Some(0o777),
    };
    let err = LinuxHost::default()
        .set_ownership(&target, &ownership)
        .unwrap_err();
    assert!(
        err.is_refusal() && err.to_string().contains("symbolic link"),
        "{err}"
    );
    let meta = fs::metadata(&root_dir).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777),
        (0, 0, 0o700),
        "root's directory was chowned or chmodded through the link"
    );

    // The real directory in its place gets owner and mode, through its descriptor.
    fs::remove_file(&target).unwrap();
    fs::create_dir(&target).unwrap();
    LinuxHost::default()
        .set_ownership(&target, &ownership)
        .unwrap();
    let meta = fs::metadata(&target).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.permissions().mode() & 0o7777),
        (user.uid, user.gid, 0o777)
    );
}
