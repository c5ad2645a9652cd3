//! Real guests for the VM tier: an EC2 instance of the emulator played by a QEMU virtual machine
//! booted from the guest image (ci/vm/image), with its EBS attachments played as NVMe hot-plug.
//!
//! Each guest gets a copy-on-write overlay of the image, SMBIOS strings that say Amazon EC2 (so
//! cloud-init picks its EC2 data source), and user networking with `restrict=on`: the guest
//! reaches nothing but three link-local addresses the host forwards to servers on 127.0.0.1 —
//! the instance metadata service (169.254.169.254:80), the AWS emulator (169.254.170.2:5000) and
//! a file server for downloads (169.254.170.3:80). An attached volume becomes an NVMe controller
//! whose serial is the volume id without its dash, plugged through QMP into a free PCIe root
//! port, backed by the volume's image file (the same file the host tier's loop devices use, so
//! its bytes outlive the guest); a detach is `device_del`, done when the guest's pciehp has let
//! go (QEMU's `DEVICE_DELETED` event).
//!
//! A guest may play a Xen instance's disks instead ([`Disks::Xen`]): QEMU cannot resize an NVMe
//! namespace, and a virtio disk it can, so the grow scenario's volumes are virtio disks whose
//! serial is the attachment's `xvd…` name (the image's udev rule links `/dev/xvdf` to it, as
//! Xen's blkfront would name it). A modification that took effect grows the disk under the
//! running guest (`block_resize`). The bench runs commands in a guest through QEMU's guest agent
//! ([`Vm::exec`]), as an operator would through SSM Run Command.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Guest-side addresses of what the host forwards.
pub const GUEST_IMDS: &str = "169.254.169.254:80";
pub const GUEST_EMULATOR: &str = "169.254.170.2:5000";
pub const GUEST_FILES: &str = "169.254.170.3:80";
/// Free PCIe root ports for hot-plugged volumes and interfaces (the scenarios need three).
const ROOT_PORTS: usize = 6;
/// An unanswered `device_del` is sent again only after this long: a second press of a slot's
/// attention button inside the guest's 5 s window would cancel the first.
const ASK_AGAIN: Duration = Duration::from_secs(60);

/// The guest image: kernel, initrd and root filesystem, built from Debian's packages.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub dir: PathBuf,
}

impl GuestImage {
    /// Builds the image, or finds it in the bench cache when its recipe has not changed
    /// (`ci/vm/image`, run from the workspace root).
    pub fn build() -> io::Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new(root.join("ci/vm/image"))
            .current_dir(&root)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "ci/vm/image failed ({})",
                out.status
            )));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        for f in ["vmlinuz", "initrd.img", "rootfs.raw"] {
            if !dir.join(f).is_file() {
                return Err(io::Error::other(format!(
                    "the guest image at {} has no {f}",
                    dir.display()
                )));
            }
        }
        Ok(Self { dir })
    }
}

/// The QEMU the tier runs, and whether this machine's KVM boots its guests: the nested KVM of
/// some hosts hangs the guest kernel before its first line, so software emulation (TCG) is the
/// default and `CPS_VM_ACCEL=kvm` opts in.
pub fn accelerator() -> String {
    std::env::var("CPS_VM_ACCEL").unwrap_or_else(|_| "tcg".into())
}

/// What the host serves the guest, as 127.0.0.1 ports.
#[derive(Clone, Copy, Debug)]
pub struct Forwards {
    pub imds: u16,
    pub emulator: u16,
    pub files: u16,
}

/// How a guest's volumes appear to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disks {
    /// As on a Nitro instance: an NVMe controller whose serial is the volume id.
    Nvme,
    /// As on a Xen instance: a disk named after the attachment's device (`/dev/xvdf`), with no
    /// serial to check. Played by virtio disks, which QEMU can grow under a running guest.
    Xen,
}

/// What a command run in a guest did.
#[derive(Clone, Debug)]
pub struct Exec {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

/// Where a hot-unplug stands after one look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unplug {
    /// The guest let go (or never had the device).
    Gone,
    /// The guest was asked (`device_del`) by this call and has not let go yet.
    Asked,
    /// Asked before; not let go yet.
    Waiting,
}

/// One running guest.
pub struct Vm {
    pub instance_id: String,
    disks: Disks,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
    qmp: Mutex<Qmp>,
    /// Device id (volume or interface) → the root port it is plugged into.
    plugged: Mutex<BTreeMap<String, usize>>,
    /// Devices the guest was asked to let go of (→ when), until it has.
    unplugging: Mutex<BTreeMap<String, Instant>>,
}

impl Vm {
    /// Boots `instance_id` from `image`, in `dir` (its overlay, console log and QMP socket).
    /// Longer than a screen: QEMU's command line, one option per line.
    pub fn boot(
        image: &GuestImage,
        instance_id: &str,
        dir: &Path,
        forwards: Forwards,
        disks: Disks,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let overlay = dir.join("root.qcow2");
        cps_fixtures::run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                &image.dir.join("rootfs.raw").to_string_lossy(),
                &overlay.to_string_lossy(),
            ],
        )?;
        let qmp_path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let qga_path = dir.join("qga.sock");
        let _ = std::fs::remove_file(&qga_path);
        let console = dir.join("console.log");
        let fwd = |guest: &str, port: u16| {
            format!("guestfwd=tcp:{guest}-cmd:socat - TCP:127.0.0.1:{port}")
        };
        let netdev = [
            "user,id=net0,restrict=on,net=169.254.0.0/16,host=169.254.0.1,dhcpstart=169.254.0.15"
                .to_owned(),
            fwd(GUEST_IMDS, forwards.imds),
            fwd(GUEST_EMULATOR, forwards.emulator),
            fwd(GUEST_FILES, forwards.files),
        ]
        .join(",");
        let (uuid, serial) = smbios_ids(instance_id);
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-name", instance_id, "-nodefaults", "-no-user-config"])
            .args(["-machine", &format!("q35,accel={}", accelerator())])
            .args(["-cpu", "max", "-smp", "1", "-m", "1024", "-display", "none"])
            .arg("-kernel")
            .arg(image.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(image.dir.join("initrd.img"))
            .args([
                "-append",
                "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=1 net.ifnames=0",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2",
                overlay.to_string_lossy()
            ))
            .args([
                "-smbios",
                &format!(
                    "type=1,manufacturer=Amazon EC2,product=m6i.large,uuid={uuid},serial={serial}"
                ),
            ])
            .args(["-netdev", &netdev])
            .args([
                "-device",
                &format!("virtio-net-pci,netdev=net0,mac={}", mac_of(instance_id)),
            ]);
        for port in 1..=ROOT_PORTS {
            cmd.args([
                "-device",
                &format!("pcie-root-port,id=rp{port},bus=pcie.0,chassis={port},slot={port}"),
            ]);
        }
        // QEMU's guest agent, on its well-known virtio port.
        cmd.args(["-device", "virtio-serial-pci,id=serial0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=qga0,path={},server=on,wait=off",
                qga_path.to_string_lossy()
            ))
            .args([
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]);
        cmd.arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                qmp_path.to_string_lossy()
            ))
            .arg("-serial")
            .arg(format!("file:{}", console.to_string_lossy()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.stderr"))?);
        let mut child = cmd.spawn()?;
        let qmp = match Qmp::connect(&qmp_path, Duration::from_secs(20)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = std::fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default();
                return Err(io::Error::other(format!(
                    "QEMU did not start: {e}; {stderr}"
                )));
            }
        };
        Ok(Self {
            instance_id: instance_id.to_owned(),
            disks,
            dir: dir.to_owned(),
            child: Mutex::new(Some(child)),
            qmp: Mutex::new(qmp),
            plugged: Mutex::new(BTreeMap::new()),
            unplugging: Mutex::new(BTreeMap::new()),
        })
    }

    /// What the guest has printed on its serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.join("console.log")).unwrap_or_default())
            .into_owned()
    }

    /// Waits (bounded) until the console shows `needle` `count` times; the console on timeout.
    pub fn wait_console(
        &self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console();
            if text.matches(needle).count() >= count {
                return Ok(());
            }
            if !self.running() {
                return Err(format!(
                    "the guest stopped before {needle:?}:\n{}",
                    tail(&text)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("no {needle:?} after {timeout:?}:\n{}", tail(&text)));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether QEMU is still running.
    pub fn running(&self) -> bool {
        lock(&self.child)
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Volumes and interfaces plugged in.
    pub fn plugged(&self) -> Vec<String> {
        lock(&self.plugged).keys().cloned().collect()
    }

    fn free_port(plugged: &BTreeMap<String, usize>) -> io::Result<usize> {
        (1..=ROOT_PORTS)
            .find(|p| !plugged.values().any(|q| q == p))
            .ok_or_else(|| io::Error::other("every PCIe root port is taken"))
    }

    /// Hot-plugs the interface `eni_id` as a virtio NIC with its MAC, on a network of its own
    /// that reaches nothing (the tier proves the interface appears where cps-attach looks; its
    /// traffic stays on the host tier).
    pub fn plug_nic(&self, eni_id: &str, mac: &str) -> io::Result<()> {
        let id = node_name(eni_id);
        self.hotplug(
            eni_id,
            (
                "netdev_add",
                json!({"type": "user", "id": id, "restrict": true}),
            ),
            ("netdev_del", json!({"id": id})),
            json!({"driver": "virtio-net-pci", "netdev": id, "mac": mac}),
        )
    }

    /// Unplugs the interface `eni_id`, as [`Vm::unplug`] does a volume.
    pub fn unplug_nic(&self, eni_id: &str, wait: Duration) -> io::Result<Unplug> {
        let undo = ("netdev_del", json!({"id": node_name(eni_id)}));
        self.hot_unplug(eni_id, undo, wait)
    }

    /// Hot-plugs `volume_id`, attached under `device` (`/dev/sdf`), backed by `image`: an NVMe
    /// controller whose serial is the volume id without its dash, or (a Xen guest) a virtio disk
    /// whose serial is the `xvd…` name Xen would give it.
    pub fn plug(&self, volume_id: &str, device: &str, image: &Path) -> io::Result<()> {
        let node = node_name(volume_id);
        let disk = match self.disks {
            Disks::Nvme => {
                json!({"driver": "nvme", "drive": node, "serial": volume_id.replace('-', "")})
            }
            Disks::Xen => json!({"driver": "virtio-blk-pci", "drive": node,
                                 "serial": cps_blockdev::xen_names(device)[0]}),
        };
        self.hotplug(
            volume_id,
            (
                "blockdev-add",
                json!({"driver": "raw", "node-name": node,
                       "file": {"driver": "file", "filename": image.to_string_lossy()}}),
            ),
            ("blockdev-del", json!({"node-name": node})),
            disk,
        )
    }

    /// Grows `volume_id`'s device under the running guest to `bytes`, as EBS does once a
    /// modification takes effect. QEMU refuses for an NVMe namespace ([`Disks::Xen`] can).
    pub fn resize(&self, volume_id: &str, bytes: u64) -> io::Result<()> {
        lock(&self.qmp)
            .execute(
                "block_resize",
                json!({"node-name": node_name(volume_id), "size": bytes}),
            )
            .map(drop)
    }

    /// Runs `argv` in the guest through its agent, with the agent's environment (systemd's
    /// default one), and waits (bounded) for it to exit.
    pub fn exec(&self, argv: &[&str], timeout: Duration) -> io::Result<Exec> {
        let (path, args) = argv
            .split_first()
            .ok_or_else(|| io::Error::other("nothing to run"))?;
        let deadline = Instant::now() + timeout;
        let mut qga = Qga::connect(&self.dir.join("qga.sock"), deadline)?;
        let pid = qga.execute(
            "guest-exec",
            json!({"path": path, "arg": args, "capture-output": true}),
            deadline,
        )?["pid"]
            .as_i64()
            .ok_or_else(|| io::Error::other("guest-exec gave no pid"))?;
        loop {
            let status = qga.execute("guest-exec-status", json!({ "pid": pid }), deadline)?;
            if status["exited"] == true {
                let text = |key: &str| {
                    use base64::Engine as _;
                    let data = status[key].as_str().unwrap_or_default();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .unwrap_or_default();
                    String::from_utf8_lossy(&bytes).into_owned()
                };
                return Ok(Exec {
                    code: status["exitcode"].as_i64().unwrap_or(-1),
                    stdout: text("out-data"),
                    stderr: text("err-data"),
                });
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "{argv:?} still running in {} after {timeout:?}",
                    self.instance_id
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Unplugs `volume_id`: asks the guest to let the controller go (again only after
    /// [`ASK_AGAIN`] without an answer) and waits up to
    /// `wait` until it has, then drops the backing file. Where it stands; until it is gone, a
    /// later call looks again.
    pub fn unplug(&self, volume_id: &str, wait: Duration) -> io::Result<Unplug> {
        let undo = ("blockdev-del", json!({"node-name": node_name(volume_id)}));
        self.hot_unplug(volume_id, undo, wait)
    }

    /// Plugs `aws_id`'s device into a free root port: its backend first (a QMP command), then
    /// the device (`device`, given its id and port here); the backend goes again if the device
    /// is refused. Nothing happens when it is plugged in already.
    fn hotplug(
        &self,
        aws_id: &str,
        backend: (&str, Value),
        undo: (&str, Value),
        mut device: Value,
    ) -> io::Result<()> {
        let mut plugged = lock(&self.plugged);
        if plugged.contains_key(aws_id) {
            return Ok(());
        }
        let port = Self::free_port(&plugged)?;
        let id = node_name(aws_id);
        device["id"] = json!(id);
        device["bus"] = json!(format!("rp{port}"));
        let mut qmp = lock(&self.qmp);
        // An event about an earlier device of this id says nothing about the new one.
        qmp.events
            .retain(|e| !(e["event"] == "DEVICE_DELETED" && e["data"]["device"] == id.as_str()));
        qmp.execute(backend.0, backend.1)?;
        if let Err(e) = qmp.execute("device_add", device) {
            let _ = qmp.execute(undo.0, undo.1);
            return Err(e);
        }
        plugged.insert(aws_id.to_owned(), port);
        Ok(())
    }

    /// Removes `aws_id`'s device: `device_del` (sent again only after [`ASK_AGAIN`]), then up to
    /// `wait` for QEMU's `DEVICE_DELETED` (the guest has let go), then its backend (`undo`).
    /// The device stays recorded as plugged until it is gone.
    fn hot_unplug(&self, aws_id: &str, undo: (&str, Value), wait: Duration) -> io::Result<Unplug> {
        let mut plugged = lock(&self.plugged);
        if !plugged.contains_key(aws_id) {
            return Ok(Unplug::Gone);
        }
        let mut now = Unplug::Waiting;
        let id = node_name(aws_id);
        let mut qmp = lock(&self.qmp);
        let mut asked = lock(&self.unplugging);
        if asked.get(aws_id).is_none_or(|at| at.elapsed() >= ASK_AGAIN) {
            // If asked before, the guest may still be letting go (the request stands), or have
            // let go since (QEMU has forgotten the device, or its event is kept).
            match qmp.execute("device_del", json!({"id": id})) {
                Err(e) if e.to_string().contains("in the process of unplug") => {}
                Err(e) if e.to_string().contains("not found") => {
                    qmp.events.retain(|e| {
                        !(e["event"] == "DEVICE_DELETED" && e["data"]["device"] == id.as_str())
                    });
                    qmp.execute(undo.0, undo.1)?;
                    plugged.remove(aws_id);
                    asked.remove(aws_id);
                    return Ok(Unplug::Gone);
                }
                r => {
                    r?;
                }
            }
            asked.insert(aws_id.to_owned(), Instant::now());
            now = Unplug::Asked;
        }
        if qmp
            .wait_event("DEVICE_DELETED", |d| d["device"] == id.as_str(), wait)?
            .is_none()
        {
            return Ok(now);
        }
        qmp.execute(undo.0, undo.1)?;
        plugged.remove(aws_id);
        asked.remove(aws_id);
        Ok(Unplug::Gone)
    }

    /// Pauses the guest's CPUs (QMP `stop`): it answers nothing, a hot-unplug request included,
    /// until [`Vm::resume`].
    pub fn pause(&self) -> io::Result<()> {
        lock(&self.qmp).execute("stop", json!({})).map(drop)
    }

    pub fn resume(&self) -> io::Result<()> {
        lock(&self.qmp).execute("cont", json!({})).map(drop)
    }

    /// Limits writes to `volume_id`'s device to `bytes_per_second` (0 lifts the limit): a slow
    /// volume, so that a reset can land inside a long write such as mkfs.
    pub fn throttle(&self, volume_id: &str, bytes_per_second: u64) -> io::Result<()> {
        let id = node_name(volume_id);
        lock(&self.qmp)
            .execute(
                "block_set_io_throttle",
                json!({"id": id, "bps": 0, "bps_rd": 0, "bps_wr": bytes_per_second,
                       "iops": 0, "iops_rd": 0, "iops_wr": 0}),
            )
            .map(drop)
    }

    /// A hard reset, as a host failure or `reboot -f` at the wrong moment: no shutdown.
    pub fn reset(&self) -> io::Result<()> {
        lock(&self.qmp).execute("system_reset", json!({})).map(drop)
    }

    /// A clean reboot, asked of the guest as an operator would at its console (Ctrl-Alt-Del,
    /// which systemd turns into `reboot.target`).
    pub fn reboot(&self) -> io::Result<()> {
        lock(&self.qmp)
            .execute(
                "send-key",
                json!({"keys": [{"type": "qcode", "data": "ctrl"},
                                {"type": "qcode", "data": "alt"},
                                {"type": "qcode", "data": "delete"}]}),
            )
            .map(drop)
    }

    /// A clean power-off (ACPI, as EC2 stops an instance), waited for (bounded); then off by force.
    pub fn power_off(&self, timeout: Duration) -> io::Result<()> {
        let _ = lock(&self.qmp).execute("system_powerdown", json!({}));
        let deadline = Instant::now() + timeout;
        while self.running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let clean = !self.running();
        self.kill();
        lock(&self.plugged).clear();
        lock(&self.unplugging).clear();
        if clean {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "{} did not power off within {timeout:?}",
                self.instance_id
            )))
        }
    }

    fn kill(&self) {
        if let Some(mut c) = lock(&self.child).take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(self.dir.join("root.qcow2"));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// QEMU's id for a volume's or an interface's device (ids may not hold every character).
fn node_name(aws_id: &str) -> String {
    format!("cps-{}", aws_id.replace('-', ""))
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// SMBIOS system UUID and serial as EC2's: both start with "ec2", which cloud-init's
/// ds-identify reads as Amazon. Derived from the instance id, so stable per instance.
fn smbios_ids(instance_id: &str) -> (String, String) {
    let hex: String = instance_id
        .trim_start_matches("i-")
        .chars()
        .filter(char::is_ascii_hexdigit)
        .chain(std::iter::repeat('0'))
        .take(29)
        .collect();
    let uuid = format!(
        "ec2{}-{}-{}-{}-{}",
        &hex[0..5],
        &hex[5..9],
        &hex[9..13],
        &hex[13..17],
        &hex[17..29]
    );
    (uuid.clone(), uuid)
}

/// A locally administered MAC derived from the instance id.
pub fn mac_of(instance_id: &str) -> String {
    let h = instance_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let b = h.to_be_bytes();
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3], b[4]
    )
}

/// A QMP connection: commands and their replies, with the events that arrive between them kept.
struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// A line a read timeout cut short: the rest follows.
    partial: String,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> io::Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut qmp = Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            partial: String::new(),
            events: Vec::new(),
        };
        qmp.read()?; // the greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> io::Result<Value> {
        // On a timeout `read_line` keeps in `partial` what it had read.
        if self.reader.read_line(&mut self.partial)? == 0 {
            return Err(io::Error::other("QMP closed"));
        }
        let line = std::mem::take(&mut self.partial);
        serde_json::from_str(&line).map_err(|e| io::Error::other(format!("QMP: {e}: {line}")))
    }

    fn execute(&mut self, command: &str, arguments: Value) -> io::Result<Value> {
        let msg = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}")?;
        // Bounded in time: each read is (by the socket's read timeout), and so is the whole.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(io::Error::other(format!("QMP {command}: {}", e["desc"])));
            }
            self.events.push(v);
        }
        Err(io::Error::other(format!(
            "QMP {command}: no reply within 60 s"
        )))
    }

    /// The first event `name` whose data `matches`, waited for up to `timeout`; None if none came.
    fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> io::Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && matches(&e["data"]))
            {
                return Ok(Some(self.events.remove(i)));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
            let read = self.read();
            self.reader
                .get_ref()
                .set_read_timeout(Some(Duration::from_secs(30)))?;
            match read {
                Ok(v) => self.events.push(v),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connection to QEMU's guest agent. The agent may not be running yet (the guest is booting)
/// or may hold replies to an earlier client, so each connection first syncs: `guest-sync` with a
/// fresh id, repeated until that id comes back.
struct Qga {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qga {
    fn connect(path: &Path, deadline: Instant) -> io::Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut qga = Self {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        };
        // Fresh per connection, so a reply left over from an earlier client is never taken.
        static SYNCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = SYNCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        while Instant::now() < deadline {
            writeln!(
                qga.writer,
                "{}",
                json!({"execute": "guest-sync", "arguments": {"id": id}})
            )?;
            match qga.read_until(deadline.min(Instant::now() + Duration::from_secs(5))) {
                Ok(v) if v["return"] == id => return Ok(qga),
                Ok(_) | Err(_) => continue,
            }
        }
        Err(io::Error::other(format!(
            "the guest agent at {} never answered",
            path.display()
        )))
    }

    /// The next reply (a line with `return` or `error`), read until `until`.
    fn read_until(&mut self, until: Instant) -> io::Result<Value> {
        let mut line = String::new();
        while Instant::now() < until {
            line.clear();
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(io::Error::other("the guest agent closed")),
                Ok(_) => {
                    if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                        return Ok(v);
                    }
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("no reply from the guest agent"))
    }

    fn execute(&mut self, command: &str, arguments: Value, deadline: Instant) -> io::Result<Value> {
        writeln!(
            self.writer,
            "{}",
            json!({"execute": command, "arguments": arguments})
        )?;
        let v = self.read_until(deadline)?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        Err(io::Error::other(format!(
            "guest agent {command}: {}",
            v["error"]
        )))
    }
}

/// Serves files to the guests over plain HTTP on 127.0.0.1 (forwarded to [`GUEST_FILES`]): what
/// user data downloads, as it would from a release.
pub struct FileServer {
    port: u16,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl FileServer {
    /// Serves each `(url path, file)`.
    pub fn start(files: BTreeMap<String, PathBuf>) -> io::Result<Self> {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").map_err(io::Error::other)?);
        let port = server
            .server_addr()
            .to_ip()
            .map(|a| a.port())
            .unwrap_or_default();
        let thread = {
            let server = server.clone();
            std::thread::spawn(move || {
                for req in server.incoming_requests() {
                    let resp = match files.get(req.url()).map(std::fs::File::open) {
                        Some(Ok(f)) => req.respond(tiny_http::Response::from_file(f)),
                        _ => req.respond(tiny_http::Response::empty(404)),
                    };
                    let _ = resp;
                }
            })
        };
        Ok(Self {
            port,
            server,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An instance of the emulator played by a guest: its metadata service, its VM, what it can
/// download.
pub struct Guest {
    pub id: String,
    pub availability_zone: String,
    pub imds: crate::FakeImds,
    pub vm: Arc<Vm>,
    _files: FileServer,
}

impl Guest {
    /// cps-attach's JSON log lines on the guest's console (cloud-init's output goes there).
    pub fn attach_log(&self) -> Vec<Value> {
        self.vm
            .console()
            .lines()
            .filter_map(|l| l.find("{\"").map(|i| l[i..].to_owned()))
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .filter(|v| v.get("message").is_some())
            .collect()
    }

    /// cps-attach's "volume ready" line, if it has printed it.
    pub fn ready(&self) -> Option<Value> {
        self.attach_log()
            .into_iter()
            .find(|l| l["message"] == "volume ready")
    }

    /// cps-attach's log lines with the guest's uptime (seconds) at each: the copies of
    /// cloud-init's output in the kernel log carry its timestamp.
    pub fn attach_uptimes(&self) -> Vec<(f64, Value)> {
        self.vm
            .console()
            .lines()
            .filter_map(|line| {
                let (secs, rest) = line.strip_prefix('[')?.split_once(']')?;
                let json = &rest[rest.find("{\"timestamp\"")?..];
                Some((secs.trim().parse().ok()?, serde_json::from_str(json).ok()?))
            })
            .collect()
    }

    /// The guest's uptime at cps-attach's first line with `message`.
    pub fn uptime_of(&self, message: &str) -> Option<f64> {
        self.attach_uptimes()
            .into_iter()
            .find(|(_, l)| l["message"] == message)
            .map(|(t, _)| t)
    }

    /// The data service's lines ("cps-bench-app: wrote …") on the console.
    pub fn app_lines(&self) -> Vec<String> {
        self.vm
            .console()
            .lines()
            .filter(|l| l.contains("cps-bench-app: wrote"))
            .map(str::to_owned)
            .collect()
    }
}

impl crate::Bench {
    /// Boots a guest for the emulator's instance `id`, with `user_data` served by its metadata
    /// service and `files` (url path → file) by the file server.
    pub async fn boot_guest(
        &self,
        image: &GuestImage,
        id: &str,
        user_data: Option<Vec<u8>>,
        files: BTreeMap<String, PathBuf>,
        disks: Disks,
    ) -> io::Result<Guest> {
        let zone = self.zone_of(id).await?;
        let imds = crate::FakeImds::start_with(
            cps_provider::InstanceIdentity {
                instance_id: id.to_owned(),
                region: crate::REGION.into(),
                availability_zone: zone.clone(),
            },
            user_data,
            Some(mac_of(id)),
        )?;
        let files = FileServer::start(files)?;
        let emulator = self
            .endpoint()
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches('/').parse().ok())
            .ok_or_else(|| io::Error::other("the emulator's endpoint has no port"))?;
        let forwards = Forwards {
            imds: imds.port(),
            emulator,
            files: files.port(),
        };
        let dir = self.dir().join("guests").join(id);
        let vm = Arc::new(tokio::task::block_in_place(|| {
            Vm::boot(image, id, &dir, forwards, disks)
        })?);
        self.udev().add_vm(vm.clone())?;
        Ok(Guest {
            id: id.to_owned(),
            availability_zone: zone,
            imds,
            vm,
            _files: files,
        })
    }

    /// Waits (bounded) until the udev stand-in has powered `guest` off for its instance's
    /// termination (the emulator shows it `shutting-down` meanwhile).
    pub fn wait_shut_down(&self, guest: &Guest, timeout: Duration) -> io::Result<()> {
        let done = format!("powered off {} (shutting-down)", guest.id);
        let deadline = Instant::now() + timeout;
        loop {
            if self.udev().events().contains(&done) && !guest.vm.running() {
                return Ok(());
            }
            let failed = [
                format!("powering off {}", guest.id),
                format!("letting the emulator terminate {}", guest.id),
            ];
            let errors = self.udev().errors();
            if let Some(e) = errors
                .iter()
                .find(|e| failed.iter().any(|f| e.starts_with(f)))
            {
                return Err(io::Error::other(e.clone()));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "{} was not shut down within {timeout:?}",
                    guest.id
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Shuts a guest down as EC2 does before it stops an instance: a clean ACPI power-off
    /// (bounded, then by force), its volumes and interfaces going with it, not unplugged from
    /// under its mounted filesystem; only then is the emulator told it is gone. (A termination
    /// needs no call: the udev stand-in powers off a guest whose instance is `shutting-down`,
    /// however that came about. If it is doing so now, this waits for it.)
    pub fn power_off_guest(&self, guest: &Guest) -> io::Result<()> {
        let Some(vm) = self.udev().take_vm(&guest.id) else {
            return tokio::task::block_in_place(|| {
                let deadline = Instant::now() + Duration::from_secs(180);
                while guest.vm.running() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(200));
                }
                if guest.vm.running() {
                    Err(io::Error::other(format!("{} is still running", guest.id)))
                } else {
                    Ok(())
                }
            });
        };
        let off = tokio::task::block_in_place(|| vm.power_off(Duration::from_secs(120)));
        self.udev().guest_gone(&guest.id)?;
        off
    }
}
