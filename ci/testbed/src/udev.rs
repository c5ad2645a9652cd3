//! A stand-in for udev and the Nitro NVMe driver.
//!
//! It watches the emulator; when a volume is attached to a simulated instance it backs the
//! volume with a loop device (a sparse file sized like the volume, kept across attachments so
//! data survives), and shows it to that instance only: the
//! `disk/by-id/nvme-Amazon_Elastic_Block_Store_vol…` link under the instance's device root, and
//! `block/<loopN>/{dev,device/serial}` under its sysfs root. When the volume leaves the instance
//! (detach, termination) it lazily unmounts whatever was mounted from it — the machine is gone —
//! and removes link, sysfs entry and loop device. Devices appear a little after the attachment,
//! as on EC2. When a volume is modified to a larger size, its device grows once the modification
//! reaches `optimizing` (as an EBS device does): the sparse file is extended and the loop driver
//! told (`losetup -c`), so the kernel sees the larger device; the sysfs `size` follows.
//!
//! Snapshots move real data. The stand-in tells the emulator where the images are; CreateSnapshot
//! there copies the source's image (holes kept) to `snap-….img` before it replies, so a snapshot
//! holds exactly what the volume held when it started. A volume created from a snapshot gets, when
//! it is first backed, an image that starts as a copy of the snapshot's, extended to the volume's
//! size. The image of a volume that is no longer listed (deleted) is removed.
//!
//! An instance played by a real guest (the VM tier, [`crate::vm`]) is added with
//! [`FakeUdev::add_vm`]: its volumes are hot-plugged into the guest as NVMe controllers (or a Xen
//! guest's disks) backed by the same image files, and grown under it when a modification takes
//! effect; its kernel and udev do the rest. The emulator is told the instance is a guest, so it
//! holds the instance's detaches in `detaching` and its termination in `shutting-down` until the
//! guest has let go: a detach is a hot-unplug request the stand-in completes in the emulator only
//! once QEMU reports the guest released the device (and at once for a device the guest never
//! had); a termination powers the guest off (ACPI, bounded), then lets the emulator finish it.
//!
//! Network interfaces likewise: a secondary ENI attached to an instance appears under its sysfs
//! root as `class/net/eth<index>/address` holding the ENI's MAC, and disappears on detach.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cps_blockdev::nvme_link_name;

use crate::vm::{Unplug, Vm};

/// Root devices moto creates inside RunInstances; they are not ours to back.
const ROOT_DEVICES: [&str; 2] = ["/dev/sda1", "/dev/xvda"];
const TICK: Duration = Duration::from_millis(50);

/// What one simulated instance sees of devices.
#[derive(Clone, Debug)]
pub struct Machine {
    pub dev_root: PathBuf,
    pub sys_root: PathBuf,
}

struct Backed {
    instance: String,
    loop_device: PathBuf,
    link: PathBuf,
    sys_dir: PathBuf,
    image: PathBuf,
    size_gib: i32,
}

#[derive(Default)]
struct State {
    machines: BTreeMap<String, Machine>,
    backed: BTreeMap<String, Backed>,
    /// Guests of the VM tier by instance id, and the volumes plugged into them (→ instance).
    vms: BTreeMap<String, Arc<Vm>>,
    plugged: BTreeMap<String, String>,
    /// The size each plugged volume's device has in its guest (GiB).
    plugged_sizes: BTreeMap<String, i32>,
    plugged_nics: BTreeMap<String, String>,
    /// Per volume, for the VM tier: a longer delay before its hot-plug, and a volume that must be
    /// plugged in before it is (to plug two in the opposite order of their attach calls).
    plug_delays: BTreeMap<String, Duration>,
    plug_after: BTreeMap<String, String>,
    /// ENI id → the sysfs directory shown for it.
    nics: BTreeMap<String, PathBuf>,
    /// First time an attachment was seen, for the appearance delay.
    seen: BTreeMap<(String, String), Instant>,
    /// Every volume the last look listed: one missing now was deleted, and so is its image.
    listed: BTreeSet<String>,
    errors: Vec<String>,
    events: Vec<String>,
}

pub struct FakeUdev {
    endpoint: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeUdev {
    /// Starts watching `endpoint`; volume images live in `storage`.
    pub fn start(endpoint: &str, storage: PathBuf, appear_after: Duration) -> io::Result<Self> {
        std::fs::create_dir_all(&storage)?;
        let storage = std::fs::canonicalize(&storage)?;
        // CreateSnapshot copies a volume's image here, at the moment it is asked for.
        let dir = storage
            .to_str()
            .ok_or_else(|| io::Error::other("the image directory is not UTF-8"))?;
        crate::emulator::control_at(
            endpoint,
            "POST",
            "/cps/settings",
            &serde_json::json!({ "image_dir": dir }).to_string(),
        )?;
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (state, stop, endpoint) = (state.clone(), stop.clone(), endpoint.to_owned());
            std::thread::Builder::new()
                .name("fake-udev".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    let ec2 = crate::emulator::client_for(&endpoint);
                    while !stop.load(Ordering::Relaxed) {
                        // Each half runs whatever the other ran into.
                        let off = rt.block_on(power_off_shutting_down(&ec2, &state, &endpoint));
                        let look =
                            rt.block_on(tick(&ec2, &state, &endpoint, &storage, appear_after));
                        for e in [off, look].into_iter().filter_map(Result::err) {
                            note_error(&mut lock(&state), e);
                        }
                        std::thread::sleep(TICK);
                    }
                })?
        };
        Ok(Self {
            endpoint: endpoint.to_owned(),
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// Makes devices attached to `instance_id` visible under `machine`'s roots.
    pub fn add_machine(&self, instance_id: &str, machine: Machine) {
        lock(&self.state)
            .machines
            .insert(instance_id.to_owned(), machine);
    }

    /// Plays `vm`'s attachments as hot-plug into the guest, and tells the emulator its detaches
    /// and termination wait for the guest.
    pub fn add_vm(&self, vm: Arc<Vm>) -> io::Result<()> {
        set_guest(&self.endpoint, &vm.instance_id, true)?;
        lock(&self.state).vms.insert(vm.instance_id.clone(), vm);
        Ok(())
    }

    /// Delays `volume_id`'s hot-plug into a guest to `delay` after its attachment (a device that
    /// shows up late), and holds it until `after` (if given) has been plugged.
    pub fn delay_plug(&self, volume_id: &str, delay: Duration, after: Option<&str>) {
        let mut st = lock(&self.state);
        st.plug_delays.insert(volume_id.to_owned(), delay);
        if let Some(a) = after {
            st.plug_after.insert(volume_id.to_owned(), a.to_owned());
        }
    }

    /// Takes a guest away from the stand-in before it is powered off: nothing is plugged into
    /// or unplugged from it any more. None if the stand-in took it first (it is powering the
    /// guest off for a termination) or it was never added.
    pub fn take_vm(&self, instance_id: &str) -> Option<Arc<Vm>> {
        forget_vm(&mut lock(&self.state), instance_id)
    }

    /// Tells the emulator a guest taken with [`FakeUdev::take_vm`] is gone (powered off): it
    /// completes whatever it held for the instance.
    pub fn guest_gone(&self, instance_id: &str) -> io::Result<()> {
        set_guest(&self.endpoint, instance_id, false)
    }

    /// Problems the watcher ran into (a test should see none).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.state).errors.clone()
    }

    /// What it did, in order ("backed vol-… for i-… as /dev/loop3", "removed …").
    pub fn events(&self) -> Vec<String> {
        lock(&self.state).events.clone()
    }

    /// The loop device currently backing `volume_id`, if any.
    pub fn device_of(&self, volume_id: &str) -> Option<PathBuf> {
        lock(&self.state)
            .backed
            .get(volume_id)
            .map(|b| b.loop_device.clone())
    }

    /// Waits (bounded) until `volume_id` is backed or not, as wanted.
    pub fn wait_backed(&self, volume_id: &str, backed: bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.device_of(volume_id).is_some() == backed {
                return true;
            }
            std::thread::sleep(TICK);
        }
        false
    }
}

/// Records a problem once: a look that keeps failing the same way says so once, not every tick.
fn note_error(st: &mut State, e: String) {
    if !st.errors.contains(&e) {
        st.errors.push(e);
    }
}

fn forget_vm(st: &mut State, instance_id: &str) -> Option<Arc<Vm>> {
    let vm = st.vms.remove(instance_id)?;
    let gone: Vec<String> = (st.plugged.iter().chain(&st.plugged_nics))
        .filter(|(_, i)| *i == instance_id)
        .map(|(id, _)| id.clone())
        .collect();
    for id in gone {
        st.plugged.remove(&id);
        st.plugged_sizes.remove(&id);
        st.plugged_nics.remove(&id);
    }
    Some(vm)
}

/// Tells the emulator whether `instance_id` is played by a guest (no longer: it completes what it
/// held for the instance).
fn set_guest(endpoint: &str, instance_id: &str, guest: bool) -> io::Result<()> {
    let body = serde_json::json!({ "instance_id": instance_id, "guest": guest });
    crate::emulator::control_at(endpoint, "POST", "/cps/guests", &body.to_string()).map(drop)
}

/// A guest whose instance the emulator shows `shutting-down` is powered off (as EC2 shuts an
/// instance's OS down before it terminates it), then forgotten, which lets the emulator end the
/// termination and detach its volumes — never unplugged from under its mounted filesystems.
async fn power_off_shutting_down(
    ec2: &aws_sdk_ec2::Client,
    state: &Mutex<State>,
    endpoint: &str,
) -> Result<(), String> {
    let guests: Vec<String> = lock(state).vms.keys().cloned().collect();
    if guests.is_empty() {
        return Ok(());
    }
    let reply = ec2
        .describe_instances()
        .set_instance_ids(Some(guests))
        .send()
        .await
        .map_err(sdk_error("DescribeInstances"))?;
    let going = reply
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) == Some("shutting-down"))
        .filter_map(|i| i.instance_id());
    for instance in going {
        // Forgotten first, so no tick plugs into or unplugs from the guest while it shuts down;
        // the lock is not held through the shutdown.
        let Some(vm) = forget_vm(&mut lock(state), instance) else {
            continue;
        };
        // Blocking is fine here: this runtime runs nothing but the stand-in's looks (other
        // guests' plugs wait meanwhile: seconds, 120 s at the most).
        let off = vm.power_off(Duration::from_secs(120));
        let told = set_guest(endpoint, instance, false);
        let mut st = lock(state);
        match off {
            Ok(()) => st
                .events
                .push(format!("powered off {instance} (shutting-down)")),
            Err(e) => st.errors.push(format!("powering off {instance}: {e}")),
        }
        if let Err(e) = told {
            st.errors
                .push(format!("letting the emulator terminate {instance}: {e}"));
        }
    }
    Ok(())
}

impl Drop for FakeUdev {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut state = lock(&self.state);
        for dir in std::mem::take(&mut state.nics).into_values() {
            let _ = std::fs::remove_dir_all(dir);
        }
        let all: Vec<String> = state.backed.keys().cloned().collect();
        for volume_id in all {
            if let Some(b) = state.backed.remove(&volume_id)
                && let Err(e) = unback(&b)
            {
                eprintln!("fake udev cleanup: {volume_id}: {e}");
            }
        }
    }
}

/// One look at the emulator and what it changes (longer than a screen: interfaces, then loop
/// devices torn down, backed and grown, then guests, each a short pass over the same listing).
async fn tick(
    ec2: &aws_sdk_ec2::Client,
    state: &Mutex<State>,
    endpoint: &str,
    storage: &Path,
    appear_after: Duration,
) -> Result<(), String> {
    // Volumes first, modifications second: a ModifyVolume landing between the two calls then
    // shows up as `modifying` (holding the device at its old size) instead of being missed while
    // the listing already carries the new size.
    let Listing {
        mut attached,
        all: listed,
        devices,
        detaching,
    } = list_volumes(ec2).await?;
    let modifying = modifying_volumes(ec2).await?;

    // The device keeps its old size while a modification is `modifying`.
    for (vol, (_, size_gib)) in attached.iter_mut() {
        if let Some(original) = modifying.get(vol) {
            *size_gib = (*size_gib).min(*original);
        }
    }
    let nics = attached_interfaces(ec2).await?;

    let mut st = lock(state);
    remove_deleted_images(&mut st, &listed, storage);
    // Interfaces: show the attached ones to their instance, hide the others.
    let wanted: BTreeMap<String, PathBuf> = nics
        .iter()
        .filter_map(|(eni, (instance, index, _))| {
            let machine = st.machines.get(instance)?;
            Some((
                eni.clone(),
                machine
                    .sys_root
                    .join("class/net")
                    .join(format!("eth{index}")),
            ))
        })
        .collect();
    let gone: Vec<String> = st
        .nics
        .iter()
        .filter(|(eni, dir)| wanted.get(*eni) != Some(*dir))
        .map(|(eni, _)| eni.clone())
        .collect();
    for eni in gone {
        if let Some(dir) = st.nics.remove(&eni) {
            let _ = std::fs::remove_dir_all(&dir);
            st.events.push(format!("removed interface {eni}"));
        }
    }
    for (eni, dir) in wanted {
        if st.nics.contains_key(&eni) {
            continue;
        }
        let mac = &nics[&eni].2;
        match std::fs::create_dir_all(&dir)
            .and_then(|()| write_sysfs(&dir.join("address"), &format!("{mac}\n")))
        {
            Ok(()) => {
                st.events
                    .push(format!("showed interface {eni} as {}", dir.display()));
                st.nics.insert(eni, dir);
            }
            Err(e) => st.errors.push(format!("showing interface {eni}: {e}")),
        }
    }

    // Gone or moved: tear down.
    let stale: Vec<String> = st
        .backed
        .iter()
        .filter(|(vol, b)| attached.get(*vol).is_none_or(|(i, _)| *i != b.instance))
        .map(|(vol, _)| vol.clone())
        .collect();
    for vol in stale {
        let b = st.backed.remove(&vol).expect("listed");
        match unback(&b) {
            Ok(()) => st.events.push(format!("removed {vol} from {}", b.instance)),
            Err(e) => st.errors.push(format!("removing {vol}: {e}")),
        }
    }
    let now = Instant::now();
    st.seen
        .retain(|(vol, inst), _| attached.get(vol).is_some_and(|(i, _)| i == inst));
    let attached_vms: BTreeMap<String, (String, i32)> = attached
        .iter()
        .filter(|(_, (i, _))| st.vms.contains_key(i))
        .map(|(v, a)| (v.clone(), a.clone()))
        .collect();
    // New: back them once they have been attached for a moment. Grown: grow the device.
    for (vol, (instance, size_gib)) in attached {
        if st.backed.contains_key(&vol) {
            grow_if_larger(&mut st, &vol, size_gib);
            continue;
        }
        let Some(machine) = st.machines.get(&instance).cloned() else {
            continue;
        };
        let first = *st
            .seen
            .entry((vol.clone(), instance.clone()))
            .or_insert(now);
        if now.duration_since(first) < appear_after {
            continue;
        }
        let snapshot = listed.get(&vol).cloned().flatten();
        match back(&vol, size_gib, snapshot.as_deref(), &machine, storage) {
            Ok((loop_device, link, sys_dir, image)) => {
                st.events.push(format!(
                    "backed {vol} for {instance} as {}",
                    loop_device.display()
                ));
                st.backed.insert(
                    vol,
                    Backed {
                        instance,
                        loop_device,
                        link,
                        sys_dir,
                        image,
                        size_gib,
                    },
                );
            }
            Err(e) => st.errors.push(format!("backing {vol}: {e}")),
        }
    }
    let guests = Listing {
        attached: attached_vms,
        all: listed,
        devices,
        detaching,
    };
    plug_into_guests(&mut st, &guests, storage, now, appear_after);
    release_detaches(&mut st, &guests.detaching, endpoint);
    plug_nics_into_guests(&mut st, &nics);
    Ok(())
}

/// The VM tier's half of a tick (`listing.attached`: the guests' volumes): a volume attached to a
/// guest is plugged into it once it has been attached for `appear_after`; one no longer attached
/// there (`detaching`, or gone) is unplugged — the guest is asked, and each look sees whether it
/// has let go; a plugged one whose modification took effect grows under the running guest.
fn plug_into_guests(
    st: &mut State,
    listing: &Listing,
    storage: &Path,
    now: Instant,
    appear_after: Duration,
) {
    let (attached, listed) = (&listing.attached, &listing.all);
    let stale: Vec<(String, String)> = st
        .plugged
        .iter()
        .filter(|(vol, inst)| attached.get(*vol).is_none_or(|(i, _)| i != *inst))
        .map(|(v, i)| (v.clone(), i.clone()))
        .collect();
    for (vol, instance) in stale {
        if let Some(vm) = st.vms.get(&instance).cloned()
            && !let_go(st, &vm, &vol, Vm::unplug)
        {
            continue;
        }
        st.plugged.remove(&vol);
        st.plugged_sizes.remove(&vol);
    }
    for (vol, (instance, size_gib)) in attached {
        let Some(vm) = st.vms.get(instance).cloned() else {
            continue;
        };
        if st.plugged.contains_key(vol) {
            grow_in_guest(st, &vm, vol, *size_gib, storage);
            continue;
        }
        let first = *st
            .seen
            .entry((vol.clone(), instance.clone()))
            .or_insert(now);
        let delay = st.plug_delays.get(vol).copied().unwrap_or(appear_after);
        let waits_for = st
            .plug_after
            .get(vol)
            .filter(|a| !st.plugged.contains_key(*a));
        if now.duration_since(first) < delay || waits_for.is_some() {
            continue;
        }
        let snapshot = listed.get(vol).cloned().flatten();
        let device = listing.devices.get(vol).map_or("", String::as_str);
        match volume_image(vol, *size_gib, snapshot.as_deref(), storage)
            .and_then(|image| vm.plug(vol, device, &image))
        {
            Ok(()) => {
                st.events.push(format!("plugged {vol} into {instance}"));
                st.plugged.insert(vol.clone(), instance.clone());
                st.plugged_sizes.insert(vol.clone(), *size_gib);
            }
            Err(e) => st
                .errors
                .push(format!("plugging {vol} into {instance}: {e}")),
        }
    }
}

/// Asks `vm` to let go of `id` (a volume, or with `Vm::unplug_nic` an interface) and looks,
/// briefly, whether it has: true once it has. Still plugged as far as both know otherwise: the
/// next tick looks again.
fn let_go(
    st: &mut State,
    vm: &Vm,
    id: &str,
    unplug: fn(&Vm, &str, Duration) -> io::Result<Unplug>,
) -> bool {
    let instance = &vm.instance_id;
    match unplug(vm, id, Duration::from_millis(20)) {
        Ok(Unplug::Gone) => {
            st.events.push(format!("unplugged {id} from {instance}"));
            true
        }
        Ok(Unplug::Asked) => {
            st.events
                .push(format!("asked {instance} to let go of {id}"));
            false
        }
        Ok(Unplug::Waiting) => false,
        Err(e) => {
            note_error(st, format!("unplugging {id} from {instance}: {e}"));
            false
        }
    }
}

/// A guest's detach the emulator holds is completed once the guest no longer has the device
/// (it let go, or it was never plugged in).
fn release_detaches(st: &mut State, detaching: &BTreeMap<String, String>, endpoint: &str) {
    for (vol, instance) in detaching {
        if !st.vms.contains_key(instance) || st.plugged.contains_key(vol) {
            continue;
        }
        let body = serde_json::json!({ "volume_id": vol });
        match crate::emulator::control_at(
            endpoint,
            "POST",
            "/cps/guests/release",
            &body.to_string(),
        ) {
            Ok(_) => st
                .events
                .push(format!("released {vol}'s detach from {instance}")),
            Err(e) => note_error(st, format!("releasing {vol}'s detach from {instance}: {e}")),
        }
    }
}

/// Grows a plugged volume's image and its device in the guest when the volume is now larger. The
/// size is recorded before QEMU is asked, so a refusal (an NVMe namespace) is reported once.
fn grow_in_guest(st: &mut State, vm: &Vm, vol: &str, size_gib: i32, storage: &Path) {
    let Some(from) = st.plugged_sizes.get(vol).copied() else {
        return;
    };
    if size_gib <= from {
        return;
    }
    st.plugged_sizes.insert(vol.to_owned(), size_gib);
    let image = storage.join(format!("{vol}.img"));
    match extend_image(&image, size_gib).and_then(|()| vm.resize(vol, bytes(size_gib))) {
        Ok(()) => st.events.push(format!(
            "grew {vol} in {} from {from} to {size_gib} GiB",
            vm.instance_id
        )),
        Err(e) => st
            .errors
            .push(format!("growing {vol} in {}: {e}", vm.instance_id)),
    }
}

/// Secondary interfaces of guests: plugged in as NICs with the interface's MAC while attached.
fn plug_nics_into_guests(st: &mut State, nics: &BTreeMap<String, (String, i32, String)>) {
    let stale: Vec<(String, String)> = st
        .plugged_nics
        .iter()
        .filter(|(eni, inst)| nics.get(*eni).is_none_or(|(i, _, _)| i != *inst))
        .map(|(e, i)| (e.clone(), i.clone()))
        .collect();
    for (eni, instance) in stale {
        if let Some(vm) = st.vms.get(&instance).cloned()
            && !let_go(st, &vm, &eni, Vm::unplug_nic)
        {
            continue;
        }
        st.plugged_nics.remove(&eni);
    }
    for (eni, (instance, _, mac)) in nics {
        let Some(vm) = st.vms.get(instance).cloned() else {
            continue;
        };
        if st.plugged_nics.contains_key(eni) {
            continue;
        }
        match vm.plug_nic(eni, mac) {
            Ok(()) => {
                st.events
                    .push(format!("plugged interface {eni} into {instance}"));
                st.plugged_nics.insert(eni.clone(), instance.clone());
            }
            Err(e) => st
                .errors
                .push(format!("plugging {eni} into {instance}: {e}")),
        }
    }
}

/// An SDK error as the stand-in records it: the operation, and AWS's words.
fn sdk_error<E: std::error::Error>(operation: &'static str) -> impl FnOnce(E) -> String {
    move |e| {
        format!(
            "{operation}: {}",
            aws_sdk_ec2::error::DisplayErrorContext(&e)
        )
    }
}

/// What one look at DescribeVolumes shows.
struct Listing {
    /// Attached volumes (root devices left out): volume → (instance, size in GiB).
    attached: BTreeMap<String, (String, i32)>,
    /// Every volume listed, with the snapshot it was created from.
    all: BTreeMap<String, Option<String>>,
    /// Attached volumes' device names (`/dev/sdf`).
    devices: BTreeMap<String, String>,
    /// Volumes being detached: volume → instance.
    detaching: BTreeMap<String, String>,
}

async fn list_volumes(ec2: &aws_sdk_ec2::Client) -> Result<Listing, String> {
    let mut listing = Listing {
        attached: BTreeMap::new(),
        all: BTreeMap::new(),
        devices: BTreeMap::new(),
        detaching: BTreeMap::new(),
    };
    let mut token = None;
    for _ in 0..1000 {
        let page = ec2
            .describe_volumes()
            .max_results(500)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(sdk_error("DescribeVolumes"))?;
        for v in page.volumes() {
            let id = v.volume_id().unwrap_or_default().to_owned();
            let snapshot = v.snapshot_id().filter(|s| !s.is_empty()).map(str::to_owned);
            listing.all.insert(id.clone(), snapshot);
            for a in v.attachments() {
                let device = a.device().unwrap_or_default();
                let state = a.state().map(|s| s.as_str());
                if state == Some("detaching") && !ROOT_DEVICES.contains(&device) {
                    let instance = a.instance_id().unwrap_or_default().to_owned();
                    listing.detaching.insert(id.clone(), instance);
                }
                let is_attached = state == Some("attached");
                if is_attached && !ROOT_DEVICES.contains(&device) {
                    listing.devices.insert(id.clone(), device.to_owned());
                    listing.attached.insert(
                        id.clone(),
                        (
                            a.instance_id().unwrap_or_default().to_owned(),
                            v.size().unwrap_or(1),
                        ),
                    );
                }
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => return Ok(listing),
        }
    }
    Err("DescribeVolumes: pagination did not end after 1000 pages".into())
}

/// A volume listed before and not now was deleted: its image goes (EBS frees its blocks).
fn remove_deleted_images(
    st: &mut State,
    listed: &BTreeMap<String, Option<String>>,
    storage: &Path,
) {
    let gone: Vec<String> = st
        .listed
        .iter()
        .filter(|v| {
            !listed.contains_key(*v) && !st.backed.contains_key(*v) && !st.plugged.contains_key(*v)
        })
        .cloned()
        .collect();
    for vol in gone {
        let image = storage.join(format!("{vol}.img"));
        match std::fs::remove_file(&image) {
            Ok(()) => st
                .events
                .push(format!("removed the image of deleted {vol}")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => st.errors.push(format!("removing {}: {e}", image.display())),
        }
    }
    st.listed = listed.keys().cloned().collect();
}

/// A volume created from a snapshot starts as the snapshot's image (holes kept); copied to a
/// temporary name and renamed, so a half copy is never taken for the volume. A snapshot without
/// an image (of a volume never backed) holds zeros: nothing to copy.
fn restore_image(snapshot_id: &str, image: &Path, storage: &Path) -> io::Result<()> {
    let source = storage.join(format!("{snapshot_id}.img"));
    if !source.exists() {
        return Ok(());
    }
    let partial = image.with_extension("img.partial");
    cps_fixtures::run(
        "cp",
        &[
            "--sparse=always",
            &source.to_string_lossy(),
            &partial.to_string_lossy(),
        ],
    )?;
    std::fs::rename(&partial, image)
}

/// Volumes whose latest modification is still `modifying`, with the size they had before: their
/// devices have not grown yet.
async fn modifying_volumes(ec2: &aws_sdk_ec2::Client) -> Result<BTreeMap<String, i32>, String> {
    let out = ec2
        .describe_volumes_modifications()
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("modification-state")
                .values("modifying")
                .build(),
        )
        .send()
        .await
        .map_err(sdk_error("DescribeVolumesModifications"))?;
    Ok(out
        .volumes_modifications()
        .iter()
        .filter_map(|m| Some((m.volume_id()?.to_owned(), m.original_size()?)))
        .collect())
}

/// Secondary interfaces attached to instances: ENI id → (instance, device index, MAC).
async fn attached_interfaces(
    ec2: &aws_sdk_ec2::Client,
) -> Result<BTreeMap<String, (String, i32, String)>, String> {
    let out = ec2
        .describe_network_interfaces()
        .send()
        .await
        .map_err(sdk_error("DescribeNetworkInterfaces"))?;
    Ok(out
        .network_interfaces()
        .iter()
        .filter_map(|e| {
            let a = e.attachment()?;
            let index = a.device_index()?;
            let attached = a.status().map(|s| s.as_str()) == Some("attached");
            (attached && index != 0).then(|| {
                (
                    e.network_interface_id().unwrap_or_default().to_owned(),
                    (
                        a.instance_id().unwrap_or_default().to_owned(),
                        index,
                        e.mac_address().unwrap_or_default().to_ascii_lowercase(),
                    ),
                )
            })
        })
        .collect())
}

fn bytes(size_gib: i32) -> u64 {
    u64::try_from(size_gib.max(1)).unwrap_or(1) << 30
}

/// Extends an image to `size_gib` (sparse); never shrinks one (EBS volumes only grow).
fn extend_image(image: &Path, size_gib: i32) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(image)?;
    if file.metadata()?.len() < bytes(size_gib) {
        file.set_len(bytes(size_gib))?;
    }
    Ok(())
}

/// Grows the device backing `vol` when the volume is now larger, and says so.
fn grow_if_larger(st: &mut State, vol: &str, size_gib: i32) {
    let Some(b) = st.backed.get_mut(vol) else {
        return;
    };
    if size_gib <= b.size_gib {
        return;
    }
    let from = b.size_gib;
    match grow(b, size_gib) {
        Ok(()) => st
            .events
            .push(format!("grew {vol} from {from} to {size_gib} GiB")),
        Err(e) => st.errors.push(format!("growing {vol}: {e}")),
    }
}

/// The device of a volume whose modification took effect grows: image, loop device (the
/// kernel re-reads the backing file's size), sysfs.
fn grow(b: &mut Backed, size_gib: i32) -> io::Result<()> {
    extend_image(&b.image, size_gib)?;
    cps_fixtures::run("losetup", &["-c", &b.loop_device.to_string_lossy()])?;
    write_sysfs(
        &b.sys_dir.join("size"),
        &format!("{}\n", bytes(size_gib) / 512),
    )?;
    b.size_gib = size_gib;
    Ok(())
}

/// A volume's image file: kept across attachments (a volume grown while detached comes back at
/// its new size), first made from its snapshot's when it has one.
fn volume_image(
    volume_id: &str,
    size_gib: i32,
    snapshot_id: Option<&str>,
    storage: &Path,
) -> io::Result<PathBuf> {
    let image = storage.join(format!("{volume_id}.img"));
    if let Some(snapshot_id) = snapshot_id
        && !image.exists()
    {
        restore_image(snapshot_id, &image, storage)?;
    }
    extend_image(&image, size_gib)?;
    Ok(image)
}

fn back(
    volume_id: &str,
    size_gib: i32,
    snapshot_id: Option<&str>,
    machine: &Machine,
    storage: &Path,
) -> io::Result<(PathBuf, PathBuf, PathBuf, PathBuf)> {
    let image = volume_image(volume_id, size_gib, snapshot_id, storage)?;
    let loop_device = cps_fixtures::losetup(&image)?;
    let name = loop_device
        .file_name()
        .expect("loop device name")
        .to_owned();
    let by_id = machine.dev_root.join("disk/by-id");
    std::fs::create_dir_all(&by_id)?;
    let link = by_id.join(nvme_link_name(volume_id));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&loop_device, &link)?;
    let sys_dir = machine.sys_root.join("block").join(&name);
    std::fs::create_dir_all(sys_dir.join("device"))?;
    // The NVMe controller pads its serial; the agent must trim it.
    write_sysfs(
        &sys_dir.join("device/serial"),
        &format!("{:<20}\n", volume_id.replace('-', "")),
    )?;
    let rdev = std::fs::metadata(&loop_device)?.rdev();
    write_sysfs(
        &sys_dir.join("dev"),
        &format!("{}:{}\n", libc::major(rdev), libc::minor(rdev)),
    )?;
    // 512-byte sectors, as the kernel counts them.
    write_sysfs(
        &sys_dir.join("size"),
        &format!("{}\n", bytes(size_gib) / 512),
    )?;
    Ok((loop_device, link, sys_dir, image))
}

/// Writes a stand-in sysfs attribute whole: a reader (the agent, a test) sees the old value or
/// the new one, never the empty file a plain write shows between its truncate and its write.
fn write_sysfs(path: &Path, contents: &str) -> io::Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, contents)?;
    std::fs::rename(&partial, path)
}

fn unback(b: &Backed) -> io::Result<()> {
    let _ = std::fs::remove_file(&b.link);
    let _ = std::fs::remove_dir_all(&b.sys_dir);
    cps_fixtures::release_loop(&b.loop_device)
}
