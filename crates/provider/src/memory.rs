//! An in-process cloud for logic tests and benchmarks.
//!
//! It keeps the rules the attach flow relies on (AttachVolume succeeds for one caller only,
//! volumes and instances must share a zone, client tokens are idempotent, volumes are
//! `creating` and attachments `attaching` for a while) and adds what a real cloud cannot give a
//! test: simulated latency, injected faults (before or after the request took effect), hooks that
//! change the world at a chosen moment, and exact call counts. Time is tokio time, so tests can
//! run with a paused clock.
//!
//! It is not a substitute for the emulator tier: it proves the logic, not the wire protocol.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{
    Attachment, AttachmentState, CallLog, Error, InstanceState, Modification, Snapshot, Tags,
    Volume, VolumeChange, VolumeService, VolumeSpec, VolumeState,
};

pub const DESCRIBE_VOLUMES: &str = "DescribeVolumes";
pub const CREATE_VOLUME: &str = "CreateVolume";
pub const ATTACH_VOLUME: &str = "AttachVolume";
pub const DESCRIBE_INSTANCES: &str = "DescribeInstances";
pub const DESCRIBE_TAGS: &str = "DescribeTags";
pub const CREATE_TAGS: &str = "CreateTags";

mod asg;
mod eni;
mod lock;
mod modify;
mod secrets;
mod snapshot;

pub use asg::{
    Boot, COMPLETE_LIFECYCLE_ACTION, DESCRIBE_AUTO_SCALING_GROUPS, DESCRIBE_AUTO_SCALING_INSTANCES,
    DESCRIBE_INSTANCE_REFRESHES, DESCRIBE_LAUNCH_TEMPLATES, DESCRIBE_LIFECYCLE_HOOKS,
    LifecycleEvent, RECORD_LIFECYCLE_ACTION_HEARTBEAT, RESUME_PROCESSES, SUSPEND_PROCESSES, Sample,
    TERMINATE_INSTANCE_IN_AUTO_SCALING_GROUP,
};
pub use eni::{ATTACH_NETWORK_INTERFACE, DESCRIBE_NETWORK_INTERFACES};
pub use lock::{GET_ITEM, UPDATE_ITEM};
pub use modify::{
    DESCRIBE_VOLUMES_MODIFICATIONS, MODIFICATION_COOLDOWN, MODIFY_VOLUME, ModificationDelays,
};
pub use secrets::{GET_PARAMETER, GET_SECRET_VALUE};
pub use snapshot::{CREATE_SNAPSHOT, DELETE_TAGS, DELETE_VOLUME, DESCRIBE_SNAPSHOTS};

/// How long simulated things take.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timing {
    /// Round trip of every API request; its effect happens half-way through.
    pub latency: Duration,
    /// From CreateVolume until the volume is `available`.
    pub create_delay: Duration,
    /// From AttachVolume until the attachment is `attached`.
    pub attach_delay: Duration,
}

/// An injected failure of one operation.
#[derive(Clone, Debug)]
pub struct Fault {
    operation: &'static str,
    error: Error,
    after_effect: bool,
    remaining: u32,
    /// Requests of `operation` that pass before the fault strikes.
    skip: u32,
}

impl Fault {
    /// The next request of `operation` fails with `error` and has no effect.
    pub fn fail(operation: &'static str, error: Error) -> Self {
        Self {
            operation,
            error,
            after_effect: false,
            remaining: 1,
            skip: 0,
        }
    }

    /// The agent dies at the next request of `operation`: it fails with an error nothing
    /// retries (code `Crash`), so the run stops there and a test can run the agent again.
    pub fn crash(operation: &'static str) -> Self {
        Self::fail(
            operation,
            Error::Api {
                operation,
                code: Some("Crash".into()),
                message: "the agent died here".into(),
            },
        )
    }

    /// The next `times` requests of `operation` are throttled.
    pub fn throttle(operation: &'static str, times: u32) -> Self {
        Self::fail(
            operation,
            Error::Throttled {
                operation,
                message: "Rate exceeded (injected)".into(),
            },
        )
        .times(times)
    }

    /// The request takes effect, then its reply is lost (a timeout, or the caller crashing).
    pub fn after_effect(mut self) -> Self {
        self.after_effect = true;
        self
    }

    pub fn times(mut self, times: u32) -> Self {
        self.remaining = times;
        self
    }

    /// The first `requests` requests of `operation` pass; the fault strikes after them.
    pub fn after(mut self, requests: u32) -> Self {
        self.skip = requests;
        self
    }
}

type Hook = Box<dyn FnOnce(&mut World) + Send>;

struct StoredVolume {
    volume: Volume,
    available_at: Instant,
    attached_at: Option<Instant>,
    /// A detach in progress completes at this time.
    detached_at: Option<Instant>,
}

impl StoredVolume {
    /// Applies a detach whose time has come.
    fn settle(&mut self, now: Instant) {
        if self.detached_at.is_some_and(|at| now >= at) {
            self.volume.attachments.clear();
            self.attached_at = None;
            self.detached_at = None;
        }
    }
}

#[derive(Clone, Debug)]
struct Instance {
    availability_zone: String,
    state: InstanceState,
    /// A termination in progress: `shutting-down` until then, its volumes still attached.
    terminates_at: Option<Instant>,
    tags: Tags,
}

/// The state of the simulated cloud. Hooks receive it to change the world mid-flow.
pub struct World {
    volumes: BTreeMap<String, StoredVolume>,
    instances: BTreeMap<String, Instance>,
    interfaces: BTreeMap<String, eni::StoredInterface>,
    groups: BTreeMap<String, asg::Group>,
    /// Launch templates, the boot simulator and the availability samples of rolling updates.
    fleet: asg::Fleet,
    /// Every lifecycle call, in order, for tests to check cadence and outcome.
    lifecycle_log: Vec<asg::LifecycleEvent>,
    /// Client token → the volume it made, its spec and the first reply (AWS answers a used
    /// token with that reply for hours, even after the volume was deleted).
    tokens: HashMap<String, (String, VolumeSpec, Volume)>,
    /// Parameters and secrets (node file contents).
    secrets: BTreeMap<crate::SecretRef, Vec<u8>>,
    /// Lock items by key (the coordination table).
    locks: BTreeMap<String, crate::LockItem>,
    /// Every modification of each volume, oldest first.
    modifications: BTreeMap<String, Vec<modify::StoredModification>>,
    modification_delays: ModificationDelays,
    /// Snapshots by id, and how long new ones stay `pending`.
    snapshots: BTreeMap<String, snapshot::StoredSnapshot>,
    snapshot_delay: Duration,
    /// Told of every snapshot as it is created (a fake host captures the volume's content).
    snapshot_observers: Vec<snapshot::Observer>,
    /// A virtual instant and the date it stands for (modification start times are dates).
    epoch: (Instant, SystemTime),
    next_id: u64,
    faults: Vec<Fault>,
    hooks: Vec<(&'static str, Hook)>,
    /// Changes that happen by themselves at a time (see [`World::at`]).
    scheduled: Vec<(Instant, Hook)>,
    timing: Timing,
    page_size: usize,
}

impl World {
    fn new_volume_id(&mut self) -> String {
        self.next_id += 1;
        format!("vol-{:017x}", 0x0a11_0000_0000u64 + self.next_id)
    }

    /// Adds a running instance.
    pub fn add_instance(&mut self, instance_id: &str, availability_zone: &str) {
        self.instances.insert(
            instance_id.to_owned(),
            Instance {
                availability_zone: availability_zone.to_owned(),
                state: InstanceState::Running,
                terminates_at: None,
                tags: Tags::new(),
            },
        );
    }

    /// Starts terminating an instance: `shutting-down` for `takes` with its volumes still
    /// attached (as EC2 shows a server being replaced), then terminated and detached.
    pub fn begin_terminate(&mut self, instance_id: &str, takes: Duration) {
        if let Some(instance) = self.instances.get_mut(instance_id) {
            instance.state = InstanceState::ShuttingDown;
            instance.terminates_at = Some(Instant::now() + takes);
        }
    }

    /// Completes terminations whose time has come.
    fn settle(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, i)| i.terminates_at.is_some_and(|at| now >= at))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.terminate_instance(&id);
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.scheduled)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.scheduled = later;
        for (_, change) in due {
            change(self);
        }
        self.expire_lifecycle_actions(now);
        self.run_boots(now);
    }

    /// Makes `change` happen by itself at `when` (seen by the first request from then on).
    pub fn at(&mut self, when: Instant, change: impl FnOnce(&mut World) + Send + 'static) {
        self.scheduled.push((when, Box::new(change)));
    }

    /// Sets a tag on an instance.
    pub fn tag_instance(&mut self, instance_id: &str, key: &str, value: &str) {
        if let Some(i) = self.instances.get_mut(instance_id) {
            i.tags.insert(key.to_owned(), value.to_owned());
        }
    }

    /// Terminates an instance: its volumes detach at once.
    pub fn terminate_instance(&mut self, instance_id: &str) {
        if let Some(instance) = self.instances.get_mut(instance_id) {
            instance.state = InstanceState::Terminated;
            instance.terminates_at = None;
        }
        self.release_interfaces_of(instance_id);
        self.leave_groups(instance_id);
        for stored in self.volumes.values_mut() {
            if stored.volume.attachment_to(instance_id).is_some() {
                stored.volume.attachments.clear();
                stored.attached_at = None;
                stored.detached_at = None;
            }
        }
    }

    /// Adds an available volume (as if created long ago) and returns its id.
    /// Removes a tag from a volume (an operator's `aws ec2 delete-tags`).
    pub fn remove_volume_tag(&mut self, volume_id: &str, key: &str) {
        if let Some(stored) = self.volumes.get_mut(volume_id) {
            stored.volume.tags.remove(key);
        }
    }

    pub fn add_volume(&mut self, availability_zone: &str, size_gib: i32, tags: &Tags) -> String {
        let id = self.new_volume_id();
        let volume = Volume {
            id: id.clone(),
            availability_zone: availability_zone.to_owned(),
            size_gib,
            volume_type: "gp3".into(),
            // gp3's baseline, as EBS reports it.
            iops: Some(3000),
            throughput: Some(125),
            encrypted: true,
            state: VolumeState::Available,
            attachments: Vec::new(),
            tags: tags.clone(),
            snapshot_id: None,
        };
        self.volumes.insert(
            id.clone(),
            StoredVolume {
                volume,
                available_at: Instant::now(),
                attached_at: None,
                detached_at: None,
            },
        );
        id
    }

    /// Attaches `volume_id` to `instance_id` with AWS's rules; used by the API and by hooks that
    /// play a competing agent.
    pub fn attach(
        &mut self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
    ) -> Result<(), Error> {
        let now = Instant::now();
        let instance = self
            .instances
            .get(instance_id)
            .cloned()
            .ok_or_else(|| Error::NotFound {
                operation: ATTACH_VOLUME,
                resource: instance_id.to_owned(),
                message: format!("The instance ID '{instance_id}' does not exist"),
            })?;
        if instance.state != InstanceState::Running {
            return Err(Error::Api {
                operation: ATTACH_VOLUME,
                code: Some("IncorrectInstanceState".into()),
                message: format!("The instance '{instance_id}' is not in the 'running' state."),
            });
        }
        let device_busy = self.volumes.values().any(|s| {
            s.volume
                .attachments
                .iter()
                .any(|a| a.instance_id == instance_id && a.device == device)
        });
        let stored = self
            .volumes
            .get_mut(volume_id)
            .ok_or_else(|| Error::NotFound {
                operation: ATTACH_VOLUME,
                resource: volume_id.to_owned(),
                message: format!("The volume '{volume_id}' does not exist."),
            })?;
        stored.settle(now);
        if !stored.volume.attachments.is_empty() {
            return Err(Error::VolumeInUse {
                volume_id: volume_id.to_owned(),
                message: format!("{volume_id} is already attached to an instance"),
            });
        }
        if now < stored.available_at {
            return Err(Error::IncorrectState {
                operation: ATTACH_VOLUME,
                resource: volume_id.to_owned(),
                message: format!("vol '{volume_id}' is not 'available'. Current state: 'creating'"),
            });
        }
        if stored.volume.availability_zone != instance.availability_zone {
            return Err(Error::ZoneMismatch {
                resource: volume_id.to_owned(),
                instance_id: instance_id.to_owned(),
                message: "The volume is not in the same availability zone as the instance".into(),
            });
        }
        if device_busy {
            return Err(Error::DeviceNameInUse {
                device: device.to_owned(),
                instance_id: instance_id.to_owned(),
                message: format!("Attachment point {device} is already in use"),
            });
        }
        stored.volume.attachments.push(Attachment {
            instance_id: instance_id.to_owned(),
            device: device.to_owned(),
            state: AttachmentState::Attaching,
            delete_on_termination: false,
        });
        stored.attached_at = Some(now + self.timing.attach_delay);
        Ok(())
    }

    /// Deletes a volume (an operator's DeleteVolume): it is gone from every listing, but a
    /// CreateVolume with the token that made it still answers with it, as AWS does for hours.
    pub fn delete_volume(&mut self, volume_id: &str) {
        self.volumes.remove(volume_id);
        self.modifications.remove(volume_id);
    }

    /// One volume as it is now, or `NotFound` for `operation`.
    fn volume_now(&self, volume_id: &str, operation: &'static str) -> Result<Volume, Error> {
        let stored = self.volumes.get(volume_id).ok_or_else(|| Error::NotFound {
            operation,
            resource: volume_id.to_owned(),
            message: format!("The volume '{volume_id}' does not exist."),
        })?;
        Ok(Self::observe(stored, Instant::now()))
    }

    /// Detaches a volume from whatever holds it.
    pub fn detach(&mut self, volume_id: &str) {
        if let Some(stored) = self.volumes.get_mut(volume_id) {
            stored.volume.attachments.clear();
            stored.attached_at = None;
            stored.detached_at = None;
        }
    }

    /// Starts detaching a volume: `detaching` for `takes`, then available (an old instance
    /// shutting down).
    pub fn begin_detach(&mut self, volume_id: &str, takes: Duration) {
        if let Some(stored) = self.volumes.get_mut(volume_id)
            && !stored.volume.attachments.is_empty()
        {
            stored.detached_at = Some(Instant::now() + takes);
        }
    }

    /// The volume as an observer sees it now.
    fn observe(stored: &StoredVolume, now: Instant) -> Volume {
        let mut volume = stored.volume.clone();
        let detaching = match stored.detached_at {
            Some(at) if now >= at => {
                volume.attachments.clear();
                false
            }
            Some(_) => true,
            None => false,
        };
        volume.state = if !volume.attachments.is_empty() {
            VolumeState::InUse
        } else if now < stored.available_at {
            VolumeState::Creating
        } else {
            VolumeState::Available
        };
        if let Some(at) = stored.attached_at {
            for a in &mut volume.attachments {
                a.state = if detaching {
                    AttachmentState::Detaching
                } else if now >= at {
                    AttachmentState::Attached
                } else {
                    AttachmentState::Attaching
                };
            }
        }
        volume
    }

    /// All volumes as they are now.
    pub fn volumes(&self) -> Vec<Volume> {
        let now = Instant::now();
        self.volumes
            .values()
            .map(|s| Self::observe(s, now))
            .collect()
    }

    fn create(&mut self, spec: &VolumeSpec, token: &str) -> Result<Volume, Error> {
        if let Some((id, known, first_reply)) = self.tokens.get(token) {
            if known != spec {
                return Err(Error::IdempotencyMismatch {
                    operation: CREATE_VOLUME,
                    token: token.to_owned(),
                    message: "The client token was used with different parameters".into(),
                });
            }
            return Ok(match self.volumes.get(id) {
                Some(stored) => Self::observe(stored, Instant::now()),
                None => first_reply.clone(),
            });
        }
        let from_encrypted_snapshot = self.check_restore(spec)?;
        let id = self.new_volume_id();
        let now = Instant::now();
        let stored = StoredVolume {
            volume: Volume {
                id: id.clone(),
                availability_zone: spec.availability_zone.clone(),
                size_gib: spec.size_gib,
                volume_type: spec.volume_type.clone(),
                iops: spec
                    .iops
                    .or(baseline_iops(&spec.volume_type, spec.size_gib)),
                throughput: spec
                    .throughput
                    .or((spec.volume_type == "gp3").then_some(125)),
                // A volume made from an encrypted snapshot is encrypted, whatever was asked.
                encrypted: spec.encrypted || from_encrypted_snapshot,
                state: VolumeState::Creating,
                attachments: Vec::new(),
                tags: spec.tags.clone(),
                snapshot_id: spec.snapshot_id.clone(),
            },
            available_at: now + self.timing.create_delay,
            attached_at: None,
            detached_at: None,
        };
        let observed = Self::observe(&stored, now);
        self.volumes.insert(id.clone(), stored);
        self.tokens
            .insert(token.to_owned(), (id, spec.clone(), observed.clone()));
        Ok(observed)
    }
}

/// The IOPS EBS reports for a volume created without any: gp3's baseline, gp2's 3 per GiB.
fn baseline_iops(volume_type: &str, size_gib: i32) -> Option<i32> {
    match volume_type {
        "gp3" => Some(3000),
        "gp2" => Some(size_gib.saturating_mul(3).clamp(100, 16_000)),
        _ => None,
    }
}

/// The in-memory cloud. Cheap to clone; clones share one world.
#[derive(Clone)]
pub struct MemoryCloud {
    world: Arc<Mutex<World>>,
    calls: Arc<CallLog>,
}

impl Default for MemoryCloud {
    fn default() -> Self {
        Self::new(Timing::default())
    }
}

impl MemoryCloud {
    pub fn new(timing: Timing) -> Self {
        Self {
            world: Arc::new(Mutex::new(World {
                volumes: BTreeMap::new(),
                instances: BTreeMap::new(),
                interfaces: BTreeMap::new(),
                groups: BTreeMap::new(),
                fleet: asg::Fleet::default(),
                lifecycle_log: Vec::new(),
                tokens: HashMap::new(),
                secrets: BTreeMap::new(),
                locks: BTreeMap::new(),
                modifications: BTreeMap::new(),
                modification_delays: ModificationDelays::default(),
                snapshots: BTreeMap::new(),
                snapshot_delay: Duration::ZERO,
                snapshot_observers: Vec::new(),
                epoch: (Instant::now(), SystemTime::now()),
                next_id: 0,
                faults: Vec::new(),
                hooks: Vec::new(),
                scheduled: Vec::new(),
                timing,
                page_size: 500,
            })),
            calls: Arc::new(CallLog::default()),
        }
    }

    /// Runs `f` on the world directly (test setup and inspection; not counted as API calls).
    pub fn with<R>(&self, f: impl FnOnce(&mut World) -> R) -> R {
        f(&mut self.world())
    }

    /// Volumes per DescribeVolumes page, so pagination is exercised.
    pub fn set_page_size(&self, page_size: usize) {
        self.world().page_size = page_size.max(1);
    }

    pub fn inject(&self, fault: Fault) {
        self.world().faults.push(fault);
    }

    /// Runs `hook` right before the next request of `operation` takes effect.
    pub fn before_next(
        &self,
        operation: &'static str,
        hook: impl FnOnce(&mut World) + Send + 'static,
    ) {
        self.world().hooks.push((operation, Box::new(hook)));
    }

    pub fn calls(&self) -> &CallLog {
        &self.calls
    }

    pub fn volumes(&self) -> Vec<Volume> {
        let mut world = self.world();
        world.settle();
        world.volumes()
    }

    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One simulated request: latency, hooks, faults, then `effect` half-way through.
    pub(crate) async fn request<T>(
        &self,
        operation: &'static str,
        effect: impl FnOnce(&mut World) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.calls.record(operation);
        let half = self.world().timing.latency / 2;
        tokio::time::sleep(half).await;
        let result = {
            let mut world = self.world();
            world.settle();
            let hooks: Vec<Hook> = {
                let (due, keep) = std::mem::take(&mut world.hooks)
                    .into_iter()
                    .partition(|(op, _)| *op == operation);
                world.hooks = keep;
                due.into_iter().map(|(_, h)| h).collect()
            };
            for hook in hooks {
                hook(&mut world);
            }
            let fault = world
                .faults
                .iter_mut()
                .find(|f| f.operation == operation && f.remaining > 0)
                .and_then(|f| {
                    if f.skip > 0 {
                        f.skip -= 1;
                        return None;
                    }
                    f.remaining -= 1;
                    Some((f.error.clone(), f.after_effect))
                });
            world.faults.retain(|f| f.remaining > 0);
            let result = match fault {
                Some((error, false)) => Err(error),
                Some((error, true)) => effect(&mut world).and(Err(error)),
                None => effect(&mut world),
            };
            world.sample();
            result
        };
        tokio::time::sleep(half).await;
        result
    }
}

#[async_trait]
impl VolumeService for MemoryCloud {
    async fn volumes_tagged(&self, tags: &Tags) -> Result<Vec<Volume>, Error> {
        let matching = |world: &mut World| {
            world
                .volumes()
                .into_iter()
                .filter(|v| tags.iter().all(|(k, val)| v.tags.get(k) == Some(val)))
                .collect::<Vec<_>>()
        };
        // Page the way the real API does; every page is a request.
        let mut found = Vec::new();
        let mut offset = 0;
        loop {
            let page = self
                .request(DESCRIBE_VOLUMES, |world| {
                    let all = matching(world);
                    let size = world.page_size;
                    Ok((
                        all.iter()
                            .skip(offset)
                            .take(size)
                            .cloned()
                            .collect::<Vec<_>>(),
                        all.len(),
                    ))
                })
                .await?;
            let page_len = page.0.len();
            offset += page_len;
            found.extend(page.0);
            if offset >= page.1 || page_len == 0 {
                return Ok(found);
            }
        }
    }

    async fn volume(&self, volume_id: &str) -> Result<Volume, Error> {
        self.request(DESCRIBE_VOLUMES, |world| {
            world
                .volumes()
                .into_iter()
                .find(|v| v.id == volume_id)
                .ok_or_else(|| Error::NotFound {
                    operation: DESCRIBE_VOLUMES,
                    resource: volume_id.to_owned(),
                    message: format!("The volume '{volume_id}' does not exist."),
                })
        })
        .await
    }

    async fn create_volume(&self, spec: &VolumeSpec, client_token: &str) -> Result<Volume, Error> {
        self.request(CREATE_VOLUME, |world| world.create(spec, client_token))
            .await
    }

    async fn tag_volume(&self, volume_id: &str, tags: &Tags) -> Result<(), Error> {
        self.request(CREATE_TAGS, |world| {
            match world.volumes.get_mut(volume_id) {
                Some(stored) => {
                    stored.volume.tags.extend(tags.clone());
                    Ok(())
                }
                None => Err(Error::NotFound {
                    operation: CREATE_TAGS,
                    resource: volume_id.to_owned(),
                    message: format!("The volume '{volume_id}' does not exist."),
                }),
            }
        })
        .await
    }

    async fn attach_volume(
        &self,
        volume_id: &str,
        instance_id: &str,
        device: &str,
    ) -> Result<AttachmentState, Error> {
        self.request(ATTACH_VOLUME, |world| {
            world
                .attach(volume_id, instance_id, device)
                .map(|()| AttachmentState::Attaching)
        })
        .await
    }

    async fn instance_tags(&self, instance_id: &str) -> Result<Tags, Error> {
        self.request(DESCRIBE_TAGS, |world| {
            Ok(world
                .instances
                .get(instance_id)
                .map(|i| i.tags.clone())
                .unwrap_or_default())
        })
        .await
    }

    async fn modify_volume(
        &self,
        volume_id: &str,
        change: &VolumeChange,
    ) -> Result<Modification, Error> {
        self.request(MODIFY_VOLUME, |world| world.modify(volume_id, change))
            .await
    }

    async fn latest_modification(&self, volume_id: &str) -> Result<Option<Modification>, Error> {
        self.request(DESCRIBE_VOLUMES_MODIFICATIONS, |world| {
            world.volume_now(volume_id, DESCRIBE_VOLUMES_MODIFICATIONS)?;
            Ok(world.latest_modification_of(volume_id, Instant::now()))
        })
        .await
    }

    async fn create_snapshot(
        &self,
        volume_id: &str,
        description: &str,
        tags: &Tags,
    ) -> Result<Snapshot, Error> {
        self.request(CREATE_SNAPSHOT, |world| {
            world.create_snapshot(volume_id, description, tags)
        })
        .await
    }

    async fn snapshot(&self, snapshot_id: &str) -> Result<Snapshot, Error> {
        self.request(DESCRIBE_SNAPSHOTS, |world| world.snapshot_now(snapshot_id))
            .await
    }

    async fn snapshots_tagged(&self, tags: &Tags) -> Result<Vec<Snapshot>, Error> {
        self.request(DESCRIBE_SNAPSHOTS, |world| Ok(world.snapshots_tagged(tags)))
            .await
    }

    async fn untag_volume(&self, volume_id: &str, keys: &[String]) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        self.request(DELETE_TAGS, |world| world.untag_volume(volume_id, keys))
            .await
    }

    async fn delete_volume(&self, volume_id: &str) -> Result<(), Error> {
        self.request(DELETE_VOLUME, |world| {
            world.delete_volume_checked(volume_id)
        })
        .await
    }

    async fn instance_states(
        &self,
        instance_ids: &[String],
    ) -> Result<BTreeMap<String, InstanceState>, Error> {
        self.request(DESCRIBE_INSTANCES, |world| {
            Ok(instance_ids
                .iter()
                .map(|id| {
                    let state = world
                        .instances
                        .get(id)
                        .map(|i| i.state.clone())
                        .unwrap_or(InstanceState::Terminated);
                    (id.clone(), state)
                })
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags() -> Tags {
        [("role".to_string(), "db".to_string())].into()
    }

    #[tokio::test(start_paused = true)]
    async fn attach_succeeds_for_one_caller_only() {
        let cloud = MemoryCloud::default();
        let vol = cloud.with(|w| {
            w.add_instance("i-1", "az-a");
            w.add_instance("i-2", "az-a");
            w.add_volume("az-a", 1, &tags())
        });
        cloud.attach_volume(&vol, "i-1", "/dev/xvdc").await.unwrap();
        let err = cloud
            .attach_volume(&vol, "i-2", "/dev/xvdc")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::VolumeInUse { .. }), "{err}");
        assert_eq!(cloud.calls().count(ATTACH_VOLUME), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn zone_and_device_rules_hold() {
        let cloud = MemoryCloud::default();
        let (a, b, c) = cloud.with(|w| {
            w.add_instance("i-1", "az-a");
            (
                w.add_volume("az-b", 1, &tags()),
                w.add_volume("az-a", 1, &tags()),
                w.add_volume("az-a", 1, &tags()),
            )
        });
        let err = cloud
            .attach_volume(&a, "i-1", "/dev/xvdc")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::ZoneMismatch { .. }), "{err}");
        cloud.attach_volume(&b, "i-1", "/dev/xvdc").await.unwrap();
        let err = cloud
            .attach_volume(&c, "i-1", "/dev/xvdc")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DeviceNameInUse { .. }), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn client_token_is_idempotent_and_states_advance_with_time() {
        let cloud = MemoryCloud::new(Timing {
            create_delay: Duration::from_secs(2),
            attach_delay: Duration::from_secs(3),
            ..Timing::default()
        });
        cloud.with(|w| w.add_instance("i-1", "az-a"));
        let spec = VolumeSpec::gp3("az-a", 1, &tags());
        let first = cloud.create_volume(&spec, "tok").await.unwrap();
        let again = cloud.create_volume(&spec, "tok").await.unwrap();
        assert_eq!(first.id, again.id);
        assert_eq!(first.state, VolumeState::Creating);
        let mut other = spec.clone();
        other.size_gib = 2;
        let err = cloud.create_volume(&other, "tok").await.unwrap_err();
        assert!(matches!(err, Error::IdempotencyMismatch { .. }), "{err}");

        let err = cloud
            .attach_volume(&first.id, "i-1", "/dev/xvdc")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::IncorrectState { .. }), "{err}");
        tokio::time::advance(Duration::from_secs(2)).await;
        cloud
            .attach_volume(&first.id, "i-1", "/dev/xvdc")
            .await
            .unwrap();
        let seen = cloud.volume(&first.id).await.unwrap();
        assert_eq!(seen.attachments[0].state, AttachmentState::Attaching);
        tokio::time::advance(Duration::from_secs(3)).await;
        let seen = cloud.volume(&first.id).await.unwrap();
        assert_eq!(seen.attachments[0].state, AttachmentState::Attached);
        assert_eq!(cloud.volumes().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_used_token_names_its_volume_even_after_it_was_deleted() {
        let cloud = MemoryCloud::default();
        let spec = VolumeSpec::gp3("az-a", 1, &tags());
        let first = cloud.create_volume(&spec, "tok").await.unwrap();
        cloud.with(|w| w.delete_volume(&first.id));
        let again = cloud.create_volume(&spec, "tok").await.unwrap();
        assert_eq!(
            again.id, first.id,
            "the deleted volume's id, as AWS answers"
        );
        let err = cloud.volume(&first.id).await.unwrap_err();
        assert!(matches!(err, Error::NotFound { .. }), "{err}");
        assert!(cloud.volumes().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn faults_fire_before_or_after_the_effect() {
        let cloud = MemoryCloud::default();
        cloud.with(|w| w.add_instance("i-1", "az-a"));
        let vol = cloud.with(|w| w.add_volume("az-a", 1, &tags()));
        cloud.inject(Fault::throttle(ATTACH_VOLUME, 2));
        for _ in 0..2 {
            let err = cloud
                .attach_volume(&vol, "i-1", "/dev/xvdc")
                .await
                .unwrap_err();
            assert!(err.is_retryable());
        }
        assert!(
            cloud.volumes()[0].attachments.is_empty(),
            "a failed request has no effect"
        );
        cloud.inject(
            Fault::fail(
                ATTACH_VOLUME,
                Error::Transient {
                    operation: ATTACH_VOLUME,
                    message: "reply lost".into(),
                },
            )
            .after_effect(),
        );
        assert!(cloud.attach_volume(&vol, "i-1", "/dev/xvdc").await.is_err());
        assert_eq!(
            cloud.volumes()[0].attachments.len(),
            1,
            "the effect happened"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pagination_counts_every_page() {
        let cloud = MemoryCloud::default();
        cloud.set_page_size(5);
        cloud.with(|w| {
            for _ in 0..12 {
                w.add_volume("az-a", 1, &tags());
            }
            w.add_volume("az-a", 1, &Tags::new());
        });
        let found = cloud.volumes_tagged(&tags()).await.unwrap();
        assert_eq!(found.len(), 12);
        assert_eq!(cloud.calls().count(DESCRIBE_VOLUMES), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn hooks_run_before_the_next_request() {
        let cloud = MemoryCloud::default();
        let vol = cloud.with(|w| {
            w.add_instance("i-1", "az-a");
            w.add_instance("i-rival", "az-a");
            w.add_volume("az-a", 1, &tags())
        });
        let stolen = vol.clone();
        cloud.before_next(ATTACH_VOLUME, move |w| {
            w.attach(&stolen, "i-rival", "/dev/xvdc").unwrap();
        });
        let err = cloud
            .attach_volume(&vol, "i-1", "/dev/xvdc")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::VolumeInUse { .. }));
    }
}
