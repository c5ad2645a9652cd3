//! Fakes shared by the flow and boot tests: a host whose devices appear when the in-memory
//! cloud says a volume is attached, with the data living with the volume. A snapshot captures
//! its volume's content and sizes as the cloud creates it; a volume created from the snapshot
//! starts with them (when a host first looks at it), whatever the source holds by then.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cps_blockdev::{
    BlockHost, Device, Error as HostError, Filesystem, FormatGrant, FstabEntry, Grown, Lookup,
    MkfsSpec, MountState, Ownership, Probe, Refusal, Sizes, Verification, Wanted, left_by_mkfs,
};
use cps_provider::memory::MemoryCloud;
use cps_provider::{AttachmentState, Snapshot};

#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    Blank,
    Fs(Filesystem),
    /// A filesystem the user has written data to: formatting it is the one unforgivable bug,
    /// so the fake mkfs panics on it.
    Data(Filesystem),
    /// What mkfs.xfs leaves when killed after its first superblock write: blkid names it, but
    /// it does not mount.
    HalfMade(Filesystem),
    Foreign(Refusal),
}

/// Where the next mkfs dies (the process killed, the machine powered off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MkfsDeath {
    /// Before its first write.
    BeforeWriting,
    /// After some metadata, before any superblock: no signature, not blank.
    Metadata,
    /// After the primary superblock, before the rest.
    Superblock,
    /// After its last write, before it exited.
    Finished,
}

/// What is on each volume, shared by every fake host (the data lives with the volume): its
/// content (what `lock()` reaches) and its sizes.
#[derive(Clone, Default)]
pub struct Disks {
    content: Arc<Mutex<BTreeMap<String, Content>>>,
    sizes: Arc<Mutex<BTreeMap<String, DiskSize>>>,
    /// Snapshot id → what its volume held when the snapshot was created.
    snapshots: Arc<Mutex<BTreeMap<String, (Content, DiskSize)>>>,
    /// Snapshot id → the volume it was taken of, when no host had read that volume yet (one
    /// made from a snapshot, never attached): it holds what its own snapshot held.
    inherited: Arc<Mutex<BTreeMap<String, String>>>,
    /// The cloud tells these disks of its snapshots (set up once, by the first host).
    watching: Arc<AtomicBool>,
}

impl Disks {
    /// Called by the cloud inside CreateSnapshot: the volume's content and filesystem size now.
    /// The device size is not kept: a volume made from the snapshot has its own.
    fn capture(&self, snapshot: &Snapshot) {
        let Some(content) = self
            .content
            .lock()
            .unwrap()
            .get(&snapshot.volume_id)
            .cloned()
        else {
            // Resolved when a volume is made from this snapshot (the cloud cannot be asked
            // from inside CreateSnapshot).
            self.inherited
                .lock()
                .unwrap()
                .insert(snapshot.id.clone(), snapshot.volume_id.clone());
            return;
        };
        let source = self
            .sizes
            .lock()
            .unwrap()
            .get(&snapshot.volume_id)
            .copied()
            .unwrap_or_default();
        let has_fs = matches!(content, Content::Fs(_) | Content::Data(_));
        let device = source
            .device_bytes
            .unwrap_or(u64::try_from(snapshot.size_gib).unwrap_or(0) << 30);
        let size = DiskSize {
            device_bytes: None,
            filesystem_bytes: source.filesystem_bytes.or(has_fs.then_some(device)),
            mounted_since_check: source.mounted_since_check,
        };
        self.snapshots
            .lock()
            .unwrap()
            .insert(snapshot.id.clone(), (content, size));
    }

    /// What a snapshot captured, if the cloud made it while these disks watched.
    pub fn captured(&self, snapshot_id: &str) -> Option<Content> {
        let snapshots = self.snapshots.lock().unwrap();
        snapshots.get(snapshot_id).map(|(c, _)| c.clone())
    }
}

impl Deref for Disks {
    type Target = Mutex<BTreeMap<String, Content>>;

    fn deref(&self) -> &Self::Target {
        &self.content
    }
}

/// A volume's sizes as the fake host sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskSize {
    /// The device's size when a test set it; otherwise the cloud's size of the volume.
    pub device_bytes: Option<u64>,
    /// Set by mkfs and grow; a filesystem nobody sized is as large as its device when first
    /// seen (mkfs, mount, a size read, a device change).
    pub filesystem_bytes: Option<u64>,
    /// Mounted since its last check: like resize2fs, the fake grows it unmounted only after
    /// [`FakeHost::fsck`].
    pub mounted_since_check: bool,
}

#[derive(Default)]
pub struct HostState {
    pub mounts: BTreeMap<PathBuf, String>,
    pub fstab: BTreeMap<PathBuf, FstabEntry>,
    pub mkfs_runs: u32,
    pub ownership_runs: u32,
    /// Operations that fail once, in order of arming.
    pub fail_next: Vec<&'static str>,
    /// The next mkfs dies there.
    pub mkfs_dies: Option<MkfsDeath>,
    /// Filesystems grown (online or not).
    pub grow_runs: u32,
    /// The kernel refuses to grow a mounted ext filesystem (no CAP_SYS_RESOURCE).
    pub online_ext_grow_refused: bool,
}

/// One instance's view of the machine: the device appears when the cloud says attached.
pub struct FakeHost {
    pub cloud: MemoryCloud,
    pub instance: String,
    pub disks: Disks,
    pub state: Mutex<HostState>,
}

impl FakeHost {
    pub fn new(cloud: &MemoryCloud, instance: &str, disks: &Disks) -> Arc<Self> {
        if !disks.watching.swap(true, Ordering::SeqCst) {
            let watcher = disks.clone();
            cloud.with(|w| w.on_snapshot(move |s| watcher.capture(s)));
        }
        Arc::new(Self {
            cloud: cloud.clone(),
            instance: instance.into(),
            disks: disks.clone(),
            state: Mutex::new(HostState::default()),
        })
    }

    pub fn st(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.state.lock().unwrap()
    }

    pub fn fail(&self, op: &'static str) -> Result<(), HostError> {
        let mut st = self.st();
        if let Some(i) = st.fail_next.iter().position(|o| *o == op) {
            st.fail_next.remove(i);
            return Err(HostError::Io {
                path: PathBuf::from("/dev/fake"),
                action: op,
                source: std::io::Error::other("injected host failure"),
            });
        }
        Ok(())
    }

    pub fn content(&self, volume_id: &str) -> Content {
        self.restore_if_new(volume_id);
        self.disks
            .lock()
            .unwrap()
            .get(volume_id)
            .cloned()
            .unwrap_or(Content::Blank)
    }

    pub fn unmount_all(&self) {
        self.st().mounts.clear();
    }

    /// The volume's device, as the kernel would report it: what a test set, else the cloud's
    /// size of the volume (so a modification in the cloud reaches the device).
    pub fn device_bytes(&self, volume_id: &str) -> u64 {
        let set = self.disks.sizes.lock().unwrap().get(volume_id).copied();
        set.and_then(|s| s.device_bytes).unwrap_or_else(|| {
            let gib = self
                .cloud
                .volumes()
                .iter()
                .find(|v| v.id == volume_id)
                .map_or(0, |v| v.size_gib);
            u64::try_from(gib).unwrap_or(0) << 30
        })
    }

    /// A volume created from a snapshot, seen for the first time, starts with what the snapshot
    /// captured (content and filesystem size). Looks up the cloud before taking the disks' locks.
    fn restore_if_new(&self, volume_id: &str) {
        if self.disks.content.lock().unwrap().contains_key(volume_id) {
            return;
        }
        let Some((content, size)) = self.content_from_snapshot(volume_id) else {
            return;
        };
        let mut all = self.disks.content.lock().unwrap();
        if all.contains_key(volume_id) {
            return;
        }
        all.insert(volume_id.to_owned(), content);
        self.disks
            .sizes
            .lock()
            .unwrap()
            .insert(volume_id.to_owned(), size);
    }

    /// What a volume made from a snapshot starts with: its snapshot's capture, or (a snapshot
    /// of a volume no host had read) what that volume's own snapshot held. Bounded.
    fn content_from_snapshot(&self, volume_id: &str) -> Option<(Content, DiskSize)> {
        let volumes = self.cloud.volumes();
        let mut volume = volume_id.to_owned();
        for _ in 0..8 {
            let snapshot_id = volumes
                .iter()
                .find(|v| v.id == volume)?
                .snapshot_id
                .clone()?;
            if let Some(found) = self.disks.snapshots.lock().unwrap().get(&snapshot_id) {
                return Some(found.clone());
            }
            volume = self
                .disks
                .inherited
                .lock()
                .unwrap()
                .get(&snapshot_id)?
                .clone();
        }
        None
    }

    /// The volume's sizes; a filesystem not sized yet is pinned at the device's size now.
    pub fn disk_sizes(&self, volume_id: &str) -> Sizes {
        self.restore_if_new(volume_id);
        let device_bytes = self.device_bytes(volume_id);
        let mut sizes = self.disks.sizes.lock().unwrap();
        let entry = sizes.entry(volume_id.to_owned()).or_default();
        Sizes {
            device_bytes,
            filesystem_bytes: *entry.filesystem_bytes.get_or_insert(device_bytes),
        }
    }

    /// The device now has `bytes` (larger to enlarge it, smaller to test the refusal); the
    /// filesystem on it keeps its size.
    pub fn set_device_bytes(&self, volume_id: &str, bytes: u64) {
        if self.fs_of(volume_id).is_some() {
            self.disk_sizes(volume_id);
        }
        let mut sizes = self.disks.sizes.lock().unwrap();
        sizes.entry(volume_id.to_owned()).or_default().device_bytes = Some(bytes);
    }

    /// The device grows by `bytes`, as after ModifyVolume (or Terraform, or an operator).
    pub fn enlarge_device(&self, volume_id: &str, bytes: u64) {
        let now = self.device_bytes(volume_id);
        self.set_device_bytes(volume_id, now + bytes);
    }

    /// `e2fsck -f` by hand: the filesystem counts as checked since its last mount.
    pub fn fsck(&self, volume_id: &str) {
        let mut sizes = self.disks.sizes.lock().unwrap();
        sizes
            .entry(volume_id.to_owned())
            .or_default()
            .mounted_since_check = false;
    }

    fn fs_of(&self, volume_id: &str) -> Option<Filesystem> {
        match self.content(volume_id) {
            Content::Fs(fs) | Content::Data(fs) => Some(fs),
            _ => None,
        }
    }

    /// The service writes to the mounted volume: from now on it holds user data.
    pub fn write_user_data(&self, volume_id: &str) {
        let mut disks = self.disks.lock().unwrap();
        let Some(Content::Fs(fs)) = disks.get(volume_id).cloned() else {
            panic!("{volume_id} holds no mountable filesystem to write to");
        };
        disks.insert(volume_id.to_owned(), Content::Data(fs));
    }
}

impl BlockHost for FakeHost {
    fn locate(&self, wanted: Wanted<'_>) -> Result<Lookup, HostError> {
        let volume_id = wanted.volume_id;
        self.fail("locate")?;
        let attached = self.cloud.volumes().iter().any(|v| {
            v.id == volume_id
                && v.attachment_to(&self.instance)
                    .is_some_and(|a| a.state == AttachmentState::Attached)
        });
        if attached {
            self.restore_if_new(volume_id);
        }
        Ok(if attached {
            Lookup::Found(Device {
                path: PathBuf::from(format!("/dev/fake/{volume_id}")),
                rdev: volume_id.len() as u64,
                volume_id: volume_id.into(),
                verification: Verification::NvmeSerial,
            })
        } else {
            Lookup::NotYet("no device yet".into())
        })
    }

    fn mount_state(&self, device: &Device, target: &Path) -> Result<MountState, HostError> {
        let st = self.st();
        if let Some(v) = st.mounts.get(target) {
            return Ok(if *v == device.volume_id {
                MountState::Mounted {
                    fstype: "ext4".into(),
                }
            } else {
                MountState::TargetBusy {
                    source: v.clone(),
                    fstype: "ext4".into(),
                }
            });
        }
        Ok(
            match st.mounts.iter().find(|(_, v)| **v == device.volume_id) {
                Some((t, _)) => MountState::MountedElsewhere {
                    mountpoint: t.clone(),
                },
                None => MountState::NotMounted,
            },
        )
    }

    fn probe(&self, device: &Device) -> Result<Probe, HostError> {
        self.fail("probe")?;
        Ok(match self.content(&device.volume_id) {
            Content::Blank => Probe::Empty,
            Content::Fs(fs) | Content::Data(fs) | Content::HalfMade(fs) => Probe::Filesystem(fs),
            Content::Foreign(r) => Probe::Refused(r),
        })
    }

    fn identify(&self, device: &Device) -> Result<Probe, HostError> {
        self.probe(device)
    }

    fn make_filesystem(
        &self,
        device: &Device,
        spec: &MkfsSpec,
        grant: &FormatGrant,
    ) -> Result<Filesystem, HostError> {
        let content = self.content(&device.volume_id);
        assert!(
            !matches!(content, Content::Data(_)),
            "mkfs on {}, which holds user data",
            device.volume_id
        );
        // The real host re-probes and refuses; so does the fake, so the flow cannot rely on less.
        let found = self.probe(device)?;
        let permitted = match grant {
            FormatGrant::Empty => found == Probe::Empty,
            FormatGrant::Unfinished { fstype, uuid } => {
                left_by_mkfs(&found, fstype, uuid.as_deref())
            }
        };
        if !permitted {
            return Err(match found {
                Probe::Refused(refusal) => HostError::Refused {
                    path: device.path.clone(),
                    volume_id: device.volume_id.clone(),
                    refusal,
                },
                _ => HostError::AlreadyFormatted {
                    path: device.path.clone(),
                    volume_id: device.volume_id.clone(),
                    fstype: "something".into(),
                },
            });
        }
        self.fail("mkfs")?;
        let fs = Filesystem {
            fstype: spec.fstype(),
            uuid: Some(
                spec.uuid()
                    .unwrap_or_else(|| format!("uuid-{}", device.volume_id)),
            ),
            label: None,
        };
        let death = self.st().mkfs_dies.take();
        if matches!(death, None | Some(MkfsDeath::Finished)) {
            let bytes = self.device_bytes(&device.volume_id);
            let mut sizes = self.disks.sizes.lock().unwrap();
            let entry = sizes.entry(device.volume_id.clone()).or_default();
            entry.filesystem_bytes = Some(bytes);
            entry.mounted_since_check = false;
        }
        let left = match death {
            None => {
                self.st().mkfs_runs += 1;
                Content::Fs(fs.clone())
            }
            Some(MkfsDeath::BeforeWriting) => content,
            Some(MkfsDeath::Metadata) => Content::Foreign(Refusal::UnknownData { offset: 4096 }),
            Some(MkfsDeath::Superblock) => Content::HalfMade(fs.clone()),
            Some(MkfsDeath::Finished) => Content::Fs(fs.clone()),
        };
        self.disks
            .lock()
            .unwrap()
            .insert(device.volume_id.clone(), left);
        match death {
            None => Ok(fs),
            Some(_) => Err(HostError::Tool {
                command: "mkfs".into(),
                status: "killed by a signal".into(),
                stderr: String::new(),
            }),
        }
    }

    fn mount(
        &self,
        device: &Device,
        _fs: &Filesystem,
        target: &Path,
        _options: &[String],
    ) -> Result<(), HostError> {
        self.fail("mount")?;
        if let Content::HalfMade(fs) = self.content(&device.volume_id) {
            return Err(HostError::Mount {
                device: device.path.clone(),
                target: target.to_path_buf(),
                fstype: fs.fstype,
                source: std::io::Error::from_raw_os_error(libc_einval()),
            });
        }
        if self.fs_of(&device.volume_id).is_some() {
            self.disk_sizes(&device.volume_id);
            let mut sizes = self.disks.sizes.lock().unwrap();
            sizes
                .entry(device.volume_id.clone())
                .or_default()
                .mounted_since_check = true;
        }
        self.st()
            .mounts
            .insert(target.to_path_buf(), device.volume_id.clone());
        Ok(())
    }

    fn set_ownership(&self, _target: &Path, _ownership: &Ownership) -> Result<(), HostError> {
        self.fail("ownership")?;
        self.st().ownership_runs += 1;
        Ok(())
    }

    fn persist(&self, _fstab: &Path, entry: &FstabEntry) -> Result<bool, HostError> {
        self.fail("persist")?;
        let old = self.st().fstab.insert(entry.target.clone(), entry.clone());
        Ok(old.as_ref() != Some(entry))
    }

    fn sizes(&self, device: &Device, fs: &Filesystem, target: &Path) -> Result<Sizes, HostError> {
        self.fail("sizes")?;
        // Like the real host: ext is read from the device, mounted or not; others via the mount.
        let ext = fs.fstype.starts_with("ext");
        let mounted_anywhere = self.st().mounts.values().any(|v| *v == device.volume_id);
        if !ext || mounted_anywhere {
            self.mounted_at(device, target)?;
        }
        self.filesystem_here(device)?;
        Ok(self.disk_sizes(&device.volume_id))
    }

    fn grow_filesystem(
        &self,
        device: &Device,
        fs: &Filesystem,
        target: &Path,
    ) -> Result<Grown, HostError> {
        self.fail("grow")?;
        self.mounted_at(device, target)?;
        let found = self.filesystem_here(device)?;
        if found.fstype.starts_with("ext") && self.st().online_ext_grow_refused {
            let sizes = self.disk_sizes(&device.volume_id);
            if sizes.device_bytes > sizes.filesystem_bytes {
                return Err(cannot_grow(
                    device,
                    fs,
                    "the kernel refused to grow it while mounted",
                ));
            }
        }
        self.grow(device, fs)
    }

    fn grow_unmounted(&self, device: &Device, fs: &Filesystem) -> Result<Grown, HostError> {
        self.fail("grow")?;
        let found = self.filesystem_here(device)?;
        if !found.fstype.starts_with("ext") {
            return Err(cannot_grow(device, fs, "it grows only while mounted"));
        }
        if self.st().mounts.values().any(|v| *v == device.volume_id) {
            return Err(cannot_grow(device, fs, "it is mounted"));
        }
        let unchecked = self
            .disks
            .sizes
            .lock()
            .unwrap()
            .get(&device.volume_id)
            .is_some_and(|s| s.mounted_since_check);
        let sizes = self.disk_sizes(&device.volume_id);
        if unchecked && sizes.device_bytes > sizes.filesystem_bytes {
            return Err(cannot_grow(device, fs, "resize2fs wants `e2fsck -f` first"));
        }
        self.grow(device, fs)
    }
}

impl FakeHost {
    /// Growing is only through the device's own mount at the target.
    fn mounted_at(&self, device: &Device, target: &Path) -> Result<(), HostError> {
        match self.st().mounts.get(target) {
            Some(v) if *v == device.volume_id => Ok(()),
            other => Err(HostError::NotMountedThere {
                device: device.path.clone(),
                volume_id: device.volume_id.clone(),
                target: target.to_path_buf(),
                found: format!("{other:?}"),
            }),
        }
    }

    fn filesystem_here(&self, device: &Device) -> Result<Filesystem, HostError> {
        self.fs_of(&device.volume_id)
            .ok_or_else(|| HostError::CannotGrow {
                path: device.path.clone(),
                volume_id: device.volume_id.clone(),
                fstype: "none".into(),
                found: format!("it holds {:?}", self.content(&device.volume_id)),
                remedy: String::new(),
            })
    }

    /// The size rules of the real host, to the byte: never smaller, full is full.
    fn grow(&self, device: &Device, fs: &Filesystem) -> Result<Grown, HostError> {
        let before = self.disk_sizes(&device.volume_id);
        if before.device_bytes < before.filesystem_bytes {
            return Err(HostError::DeviceSmaller {
                path: device.path.clone(),
                volume_id: device.volume_id.clone(),
                fstype: fs.fstype.clone(),
                device_bytes: before.device_bytes,
                filesystem_bytes: before.filesystem_bytes,
            });
        }
        if before.device_bytes == before.filesystem_bytes {
            return Ok(Grown::AlreadyFull(before));
        }
        let mut sizes = self.disks.sizes.lock().unwrap();
        sizes
            .entry(device.volume_id.clone())
            .or_default()
            .filesystem_bytes = Some(before.device_bytes);
        drop(sizes);
        self.st().grow_runs += 1;
        Ok(Grown::Grown {
            before,
            after: self.disk_sizes(&device.volume_id),
        })
    }
}

fn cannot_grow(device: &Device, fs: &Filesystem, found: &str) -> HostError {
    HostError::CannotGrow {
        path: device.path.clone(),
        volume_id: device.volume_id.clone(),
        fstype: fs.fstype.clone(),
        found: found.into(),
        remedy: "grow it offline".into(),
    }
}

/// mount(2)'s "invalid argument": what a half-made filesystem gets.
fn libc_einval() -> i32 {
    22
}
