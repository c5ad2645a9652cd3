//! Fakes shared by the flow and boot tests: a host whose devices appear when the in-memory
//! cloud says a volume is attached, with the data living with the volume.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cps_blockdev::{
    BlockHost, Device, Error as HostError, Filesystem, FstabEntry, Lookup, MkfsSpec, MountState,
    Ownership, Probe, Refusal, Verification, Wanted,
};
use cps_provider::AttachmentState;
use cps_provider::memory::MemoryCloud;

#[derive(Clone, Debug, PartialEq)]
pub enum Content {
    Blank,
    Fs(Filesystem),
    Foreign(Refusal),
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
    /// mkfs dies half-way, leaving unnamed data behind.
    pub mkfs_interrupted: bool,
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
            Content::Fs(fs) => Probe::Filesystem(fs),
            Content::Foreign(r) => Probe::Refused(r),
        })
    }

    fn identify(&self, device: &Device) -> Result<Probe, HostError> {
        self.probe(device)
    }

    fn make_filesystem(&self, device: &Device, spec: &MkfsSpec) -> Result<Filesystem, HostError> {
        // The real host re-probes and refuses; so does the fake, so the flow cannot rely on less.
        if self.content(&device.volume_id) != Content::Blank {
            return Err(HostError::AlreadyFormatted {
                path: device.path.clone(),
                volume_id: device.volume_id.clone(),
                fstype: "something".into(),
            });
        }
        if std::mem::take(&mut self.st().mkfs_interrupted) {
            self.disks.lock().unwrap().insert(
                device.volume_id.clone(),
                Content::Foreign(Refusal::UnknownData { offset: 4096 }),
            );
            return Err(HostError::Tool {
                command: "mkfs".into(),
                status: "killed by a signal".into(),
                stderr: String::new(),
            });
        }
        self.fail("mkfs")?;
        let fs = Filesystem {
            fstype: spec.fstype(),
            uuid: Some(format!("uuid-{}", device.volume_id)),
            label: None,
        };
        self.st().mkfs_runs += 1;
        self.disks
            .lock()
            .unwrap()
            .insert(device.volume_id.clone(), Content::Fs(fs.clone()));
        Ok(fs)
    }

    fn mount(
        &self,
        device: &Device,
        _fs: &Filesystem,
        target: &Path,
        _options: &[String],
    ) -> Result<(), HostError> {
        self.fail("mount")?;
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
