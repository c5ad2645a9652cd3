//! Fakes shared by the flow and boot tests: a host whose devices appear when the in-memory
//! cloud says a volume is attached, with the data living with the volume.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cps_blockdev::{
    BlockHost, Device, Error as HostError, Filesystem, FormatGrant, FstabEntry, Lookup, MkfsSpec,
    MountState, Ownership, Probe, Refusal, Verification, Wanted, left_by_mkfs,
};
use cps_provider::AttachmentState;
use cps_provider::memory::MemoryCloud;

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

/// What is on each volume, shared by every fake host (the data lives with the volume).
pub type Disks = Arc<Mutex<BTreeMap<String, Content>>>;

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
}

/// mount(2)'s "invalid argument": what a half-made filesystem gets.
fn libc_einval() -> i32 {
    22
}
