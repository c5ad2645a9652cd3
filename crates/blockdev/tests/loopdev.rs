//! cps-blockdev on the real kernel: loop devices, real mkfs, blkid, wipefs and mount(2).
//!
//! Needs root and the filesystem tools (ci/setup installs them). Locally the tier skips with one
//! line when they are missing; in CI it fails instead.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cps_blockdev::{
    BlockHost, Device, Error, FormatGrant, FsType, FstabEntry, LinuxHost, Lookup, MkfsSpec,
    MountState, Ownership, Probe, Refusal, Verification, Wanted, nvme_link_name,
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
    common::device_of(l, "vol-0test")
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
    common::mount_dir("cps-mnt-")
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
        let made = host
            .make_filesystem(&dev, &spec, &FormatGrant::Empty)
            .unwrap();
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
        let err = host
            .make_filesystem(&dev, &spec, &FormatGrant::Empty)
            .unwrap_err();
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
        .make_filesystem(&dev, &MkfsSpec::default(), &FormatGrant::Empty)
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
            host.make_filesystem(&dev, &MkfsSpec::default(), &FormatGrant::Empty),
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
            .make_filesystem(&dev, &MkfsSpec::default(), &FormatGrant::Empty)
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
        host.make_filesystem(&dev, &MkfsSpec::default(), &FormatGrant::Empty),
        Err(Error::NotBlockDevice { .. })
    ));

    // A node that is not the one verified (device number differs) is refused too.
    let l = LoopDevice::new(SIZE).unwrap();
    let mut other = device_of(&l);
    other.rdev += 1;
    assert!(matches!(host.probe(&other), Err(Error::Changed { .. })));
    assert!(matches!(
        host.make_filesystem(&other, &MkfsSpec::default(), &FormatGrant::Empty),
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
    let fa = host
        .make_filesystem(&da, &spec, &FormatGrant::Empty)
        .unwrap();
    let fb = host
        .make_filesystem(&db, &spec, &FormatGrant::Empty)
        .unwrap();
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
            &FormatGrant::Empty,
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

/// Zeroes the first MiB through the device, as a stray `dd … count=1` or a failed
/// partitioning tool would.
fn zero_head(l: &LoopDevice) {
    let mut f = fs::OpenOptions::new().write(true).open(l.path()).unwrap();
    f.write_all(&vec![0u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();
}

/// Makes `fstype`'s filesystem with `args`, mounts it and writes files into it.
fn filesystem_with_files(l: &LoopDevice, program: &str, args: &[&str]) {
    let dev = l.path().to_string_lossy().into_owned();
    let mut all: Vec<&str> = args.to_vec();
    all.push(&dev);
    run(program, &all).unwrap();
    let dir = mount_dir();
    let target = dir.path().join("m");
    fs::create_dir_all(&target).unwrap();
    let guard = MountGuard(target.clone());
    run("mount", &[&dev, &target.to_string_lossy()]).unwrap();
    for i in 0..32 {
        fs::write(target.join(format!("file-{i}")), vec![b'x'; 256 << 10]).unwrap();
    }
    drop(guard);
}

/// An ext4, xfs or btrfs filesystem holding files, with only its first MiB zeroed, is damaged,
/// not empty: its backup superblocks (ext2/3/4 at the start of block groups 1, 3, 5…, xfs at the
/// start of every allocation group, btrfs's mirror at 64 MiB) say so, and `e2fsck -b`,
/// `xfs_repair` or `btrfs rescue` could bring it back. It is refused, never formatted.
#[test]
fn damaged_filesystems_are_refused_by_their_backup_superblocks() {
    if !ready() {
        return;
    }
    let host = LinuxHost::default();
    /// What, program, args, expected family, expected offset of the first backup (None: read it
    /// from the filesystem before the damage).
    type Case<'a> = (&'a str, &'a str, &'a [&'a str], &'a str, Option<u64>);
    let cases: [Case; 5] = [
        (
            "ext4, 1 KiB blocks",
            "mkfs.ext4",
            &["-q", "-F", "-b", "1024"],
            "ext2/3/4",
            Some(8193 * 1024),
        ),
        (
            "ext4, 2 KiB blocks",
            "mkfs.ext4",
            &["-q", "-F", "-b", "2048"],
            "ext2/3/4",
            Some(16384 * 2048),
        ),
        (
            "ext4, 4 KiB blocks",
            "mkfs.ext4",
            &["-q", "-F", "-b", "4096"],
            "ext2/3/4",
            Some(32768 * 4096),
        ),
        ("xfs", "mkfs.xfs", &["-q", "-f"], "xfs", None),
        (
            "btrfs",
            "mkfs.btrfs",
            &["-q", "-f"],
            "btrfs",
            Some(64 << 20),
        ),
    ];
    for (what, program, args, family, offset) in cases {
        let l = LoopDevice::new(SIZE).unwrap();
        filesystem_with_files(&l, program, args);
        let expected = offset.unwrap_or_else(|| xfs_ag1_offset(&l));
        zero_head(&l);
        let dev = device_of(&l);
        let before = fingerprint(&l);
        match host.probe(&dev).unwrap() {
            Probe::Refused(Refusal::BackupSuperblock { fstype, offset, .. }) => {
                assert_eq!((fstype, offset), (family, expected), "{what}");
            }
            other => panic!("{what}: a damaged filesystem probed as {other:?}"),
        }
        let err = host
            .make_filesystem(&dev, &MkfsSpec::default(), &FormatGrant::Empty)
            .unwrap_err();
        assert!(matches!(err, Error::Refused { .. }), "{what}: {err}");
        assert!(
            err.to_string().contains("damaged"),
            "{what}: says what it is: {err}"
        );
        assert_eq!(fingerprint(&l), before, "{what}: left byte for byte");
        if family == "ext2/3/4" {
            // The refusal is not theoretical: e2fsck opens the filesystem from that backup
            // (exit 1: errors found and corrected; 8 would mean it could not open it).
            let bs = args[3];
            let block = expected / bs.parse::<u64>().unwrap();
            let status = std::process::Command::new("e2fsck")
                .args(["-f", "-y", "-b", &block.to_string(), "-B", bs])
                .arg(l.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(
                matches!(status.code(), Some(0 | 1)),
                "{what}: e2fsck {status}"
            );
        }
    }
}

/// Where xfs put allocation group 1's superblock, read from the intact filesystem.
fn xfs_ag1_offset(l: &LoopDevice) -> u64 {
    let out = run(
        "xfs_db",
        &[
            "-r",
            "-c",
            "sb 0",
            "-c",
            "p agblocks blocksize",
            &l.path().to_string_lossy(),
        ],
    )
    .unwrap();
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} = ")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    field("agblocks") * field("blocksize")
}

/// Zeros at both ends prove nothing about the middle: 4 MiB of data at 100 MiB of a 1 GiB
/// volume, first and last MiB zero, is refused.
#[test]
fn data_in_the_middle_of_a_blank_looking_volume_is_refused() {
    if !ready() {
        return;
    }
    let l = LoopDevice::new(1 << 30).unwrap();
    {
        let mut f = fs::OpenOptions::new().write(true).open(l.path()).unwrap();
        f.seek(SeekFrom::Start(100 << 20)).unwrap();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let data: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let dev = device_of(&l);
    let before = fingerprint(&l);
    let host = LinuxHost::default();
    match host.probe(&dev).unwrap() {
        Probe::Refused(Refusal::UnknownData { offset }) => {
            assert!(
                ((100 << 20)..(104 << 20)).contains(&offset),
                "found at {offset}"
            );
        }
        other => panic!("probed as {other:?}"),
    }
    assert!(matches!(
        host.make_filesystem(&dev, &MkfsSpec::default(), &FormatGrant::Empty),
        Err(Error::Refused { .. })
    ));
    assert_eq!(fingerprint(&l), before, "left byte for byte");
}

/// mkfs must not discard: a discard makes a mistake unrecoverable, and a fresh EBS volume needs
/// none. On a loop device a discard punches holes into the backing file, so it shows.
#[test]
fn mkfs_never_discards() {
    if !ready() {
        return;
    }
    let host = LinuxHost::default();
    let specs = [
        MkfsSpec::default(),
        MkfsSpec::Raw {
            args: ["-t", "ext4", "-E", "lazy_itable_init=1"]
                .map(String::from)
                .to_vec(),
        },
        MkfsSpec::Typed {
            fstype: FsType::Ext4,
            label: None,
            options: vec!["-E".into(), "lazy_journal_init=1".into()],
        },
        MkfsSpec::Typed {
            fstype: FsType::Xfs,
            label: None,
            options: vec![],
        },
        MkfsSpec::Typed {
            fstype: FsType::Btrfs,
            label: None,
            options: vec![],
        },
    ];
    for spec in specs {
        let l = LoopDevice::allocated(SIZE).unwrap();
        let before = l.allocated_bytes().unwrap();
        assert!(before >= SIZE, "the backing file is allocated");
        host.make_filesystem(&device_of(&l), &spec, &FormatGrant::Empty)
            .unwrap();
        let after = l.allocated_bytes().unwrap();
        assert!(
            after >= before,
            "{spec:?}: mkfs discarded {} MiB",
            (before - after) >> 20
        );
    }
}

/// A ZFS pool member is not a filesystem to mount: refused, named, untouched.
#[test]
fn a_zfs_pool_member_is_refused() {
    if !ready() {
        return;
    }
    let l = LoopDevice::new(SMALL).unwrap();
    {
        // What blkid recognises as a ZFS label: uberblocks (magic 0x00bab10c) in labels 0 and 1.
        let mut f = fs::OpenOptions::new().write(true).open(l.path()).unwrap();
        for label in [0u64, 256 << 10] {
            for i in 0..8u64 {
                f.seek(SeekFrom::Start(label + (128 << 10) + i * 1024))
                    .unwrap();
                f.write_all(&0x00ba_b10c_u64.to_le_bytes()).unwrap();
                f.write_all(&5000u64.to_le_bytes()).unwrap();
            }
        }
        f.sync_all().unwrap();
    }
    let dev = device_of(&l);
    let before = fingerprint(&l);
    let host = LinuxHost::default();
    match host.probe(&dev).unwrap() {
        Probe::Refused(Refusal::Signature { kind, .. }) => assert_eq!(kind, "zfs_member"),
        other => panic!("a ZFS member probed as {other:?}"),
    }
    assert!(matches!(
        host.make_filesystem(&dev, &MkfsSpec::default(), &FormatGrant::Empty),
        Err(Error::Refused { .. })
    ));
    assert_eq!(fingerprint(&l), before);
}

/// Device numbers are reused after a detach and a new attach; the serial is not. mkfs re-reads
/// the serial right before it starts, so a node that now belongs to another volume is refused.
#[test]
fn mkfs_rechecks_the_serial_before_it_starts() {
    if !ready() {
        return;
    }
    let l = LoopDevice::new(SIZE).unwrap();
    let roots = FakeRoots::new();
    roots.link_nvme("vol-0abc", &l, "vol0abc");
    let host = LinuxHost::new(roots.dev(), roots.sys());
    let Lookup::Found(dev) = host.locate(wanted("/dev/xvdc")).unwrap() else {
        panic!("a verified link was not found")
    };
    assert_eq!(host.probe(&dev).unwrap(), Probe::Empty);
    // Same node, same device number, but now the serial of another volume.
    roots.link_nvme("vol-0abc", &l, "vol0def");
    let err = host
        .make_filesystem(&dev, &MkfsSpec::default(), &FormatGrant::Empty)
        .unwrap_err();
    assert!(err.to_string().contains("vol0def"), "{err}");
    assert_eq!(host.probe(&dev).unwrap(), Probe::Empty, "nothing written");
}

/// mkfs as cps runs it (no discard, the UUID chosen beforehand), with its `n`-th pwrite64
/// replaced by SIGKILL: what a first boot killed inside mkfs leaves on the volume. `n = 0`
/// counts the writes of a whole run instead.
fn mkfs_killed_at(fstype: FsType, uuid: &str, device: &Path, n: usize) -> usize {
    let dev = device.to_string_lossy().into_owned();
    let xfs_uuid = format!("uuid={uuid}");
    let args: Vec<&str> = match fstype {
        FsType::Ext4 => vec!["-q", "-U", uuid, "-E", "nodiscard"],
        FsType::Xfs => vec!["-q", "-m", &xfs_uuid, "-K"],
        FsType::Btrfs => vec!["-q", "-U", uuid, "--nodiscard"],
    };
    let mkfs = format!("mkfs.{}", fstype.name());
    let trace = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=pwrite64", "-o"])
        .arg(trace.path());
    if n > 0 {
        cmd.args(["-e", &format!("inject=pwrite64:signal=KILL:when={n}")]);
    }
    let status = cmd
        .arg(&mkfs)
        .args(&args)
        .arg(&dev)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    // The last point may not be reached: the number of writes varies a little between runs.
    assert!(
        n == 0 || !status.success() || n + 2 >= count_hint(fstype),
        "{mkfs} was not killed at write {n}: {status}"
    );
    if n == 0 {
        assert!(status.success(), "{mkfs}: {status}");
    }
    fs::read_to_string(trace.path())
        .unwrap()
        .lines()
        .filter(|l| l.contains("pwrite64("))
        .count()
}

/// The kill points of a run of `total` writes: the first few (signatures erased, the first
/// metadata), then five spread to the last.
fn kill_points(total: usize) -> Vec<usize> {
    let mut points = vec![1, 2, 3, 5, 8];
    points.extend((1..=5).map(|i| 8 + (total - 8) * i / 5));
    points.retain(|&p| p <= total);
    points.dedup();
    points
}

static WRITES: std::sync::Mutex<BTreeMap<&'static str, usize>> =
    std::sync::Mutex::new(BTreeMap::new());

fn count_hint(fstype: FsType) -> usize {
    WRITES
        .lock()
        .unwrap()
        .get(fstype.name())
        .copied()
        .unwrap_or(0)
}

/// mkfs killed at write 1, 2, 3, 5, 8, … and at its last: with the format journal's grant
/// (the volume says that mkfs started and never finished), the leftovers are recognised as
/// mkfs's own and the filesystem is made; without it, they are refused and left byte for byte.
#[test]
fn leftovers_of_a_killed_mkfs_are_remade_only_under_the_journal() {
    let mut needs = cps_fixtures::kernel_needs();
    needs.extend([
        Need::Tool("mkfs.btrfs", "btrfs-progs"),
        Need::Tool("strace", "strace"),
    ]);
    if !require("blockdev on loop devices: mkfs killed", &needs) {
        return;
    }
    let host = LinuxHost::default();
    for fstype in FsType::ALL {
        let total = {
            let l = LoopDevice::new(SIZE).unwrap();
            mkfs_killed_at(fstype, &cps_blockdev::new_uuid().unwrap(), l.path(), 0)
        };
        WRITES.lock().unwrap().insert(fstype.name(), total);
        assert!(total > 10, "{fstype}: {total} writes");
        let mut refused = 0;
        for n in kill_points(total) {
            let l = LoopDevice::new(SIZE).unwrap();
            let uuid = cps_blockdev::new_uuid().unwrap();
            mkfs_killed_at(fstype, &uuid, l.path(), n);
            let dev = device_of(&l);
            let what = format!("{fstype} killed at write {n} of {total}");
            let spec = MkfsSpec::Typed {
                fstype,
                label: None,
                options: vec![],
            }
            .with_uuid(&uuid);
            // mkfs's first writes are zeros (it erases old signatures): still blank, nothing
            // to prove then.
            if host.probe(&dev).unwrap() == Probe::Empty {
                continue;
            }
            let before = fingerprint(&l);
            match host.make_filesystem(&dev, &spec, &FormatGrant::Empty) {
                Err(e) if e.is_refusal() => refused += 1,
                Err(e) => panic!("{what}: without the journal: {e}"),
                Ok(_) => panic!("{what}: formatted without the journal"),
            }
            assert_eq!(fingerprint(&l), before, "{what}: refused byte for byte");
            let grant = FormatGrant::Unfinished {
                fstype: fstype.name().into(),
                uuid: Some(uuid.clone()),
            };
            let made = host
                .make_filesystem(&dev, &spec, &grant)
                .unwrap_or_else(|e| panic!("{what}: under the journal: {e}"));
            assert_eq!(
                (made.fstype.as_str(), made.uuid.as_deref()),
                (fstype.name(), Some(uuid.as_str())),
                "{what}"
            );
            let dir = mount_dir();
            let target = dir.path().join("m");
            let _guard = MountGuard(target.clone());
            host.mount(&dev, &made, &target, &[])
                .unwrap_or_else(|e| panic!("{what}: the new filesystem mounts: {e}"));
        }
        assert!(refused > 0, "{fstype}: some kill left something to refuse");
    }
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

/// The mount point under a directory the service account owns: that account replaced it with
/// a link to a directory of root's. Mounting through the link would lay the volume over root's
/// directory (over `/etc`, say); the link is refused and nothing is mounted anywhere.
#[test]
fn a_mount_point_replaced_by_a_link_is_refused() {
    if !ready()
        || !require(
            "blockdev mount (real user)",
            &[Need::Tool("useradd", "passwd")],
        )
    {
        return;
    }
    let user = cps_fixtures::ServiceUser::create("mntpt").unwrap();
    let base = mount_dir();
    fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let svc = base.path().join("svc");
    fs::create_dir(&svc).unwrap();
    user.own(&svc).unwrap();
    let root_dir = base.path().join("root-only");
    fs::create_dir(&root_dir).unwrap();
    let (_g1, _g2) = (MountGuard(root_dir.clone()), MountGuard(svc.join("data")));
    let target = svc.join("data");
    user.symlink(&root_dir, &target).unwrap();

    let host = LinuxHost::default();
    let l = LoopDevice::new(SIZE).unwrap();
    let dev = device_of(&l);
    let made = host
        .make_filesystem(&dev, &MkfsSpec::default(), &FormatGrant::Empty)
        .unwrap();
    let err = host.mount(&dev, &made, &target, &[]).unwrap_err();
    assert!(
        err.is_refusal() && err.to_string().contains("symbolic link"),
        "{err}"
    );
    assert!(
        !cps_fixtures::is_mountpoint(&root_dir),
        "mounted over root's directory"
    );
    assert_eq!(
        host.mount_state(&dev, &root_dir).unwrap(),
        MountState::NotMounted
    );

    // A real directory in its place (or none: it is made) gets the mount.
    fs::remove_file(&target).unwrap();
    host.mount(&dev, &made, &target, &[]).unwrap();
    assert!(matches!(
        host.mount_state(&dev, &target).unwrap(),
        MountState::Mounted { .. }
    ));
}
