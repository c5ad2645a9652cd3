//! Node files on the real kernel, written by root into a directory a real unprivileged account
//! owns — a service's directory on the data volume (`owner: kafka`). That account plants links,
//! FIFOs and swapped temporary files; root must create, chown, chmod and read nothing outside.
//!
//! Needs root and `useradd`; locally the tier skips with one line, in CI it fails instead.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cps_blockdev::Ownership;
use cps_fixtures::{Need, ServiceUser, require};
use cps_node::{LinuxNode, NodeFile, NodeHost};

const TIER: &str = "node files on the kernel (real user)";

fn ready() -> bool {
    require(
        TIER,
        &[
            Need::Root,
            Need::Tool("useradd", "passwd"),
            Need::Tool("userdel", "passwd"),
            Need::Tool("mkfifo", "coreutils"),
        ],
    )
}

const VICTIM: &[u8] = b"root's file, outside the service's directory\n";

/// `base` (root, 0755) holds `svc` (the service user's, like its directory on the volume) and
/// `outside` (root's, with one root-owned file): what the user must not reach through root.
struct Scene {
    user: ServiceUser,
    _base: tempfile::TempDir,
    svc: PathBuf,
    outside: PathBuf,
}

impl Scene {
    fn new(tag: &str) -> Self {
        let user = ServiceUser::create(tag).unwrap();
        let base = tempfile::Builder::new()
            .prefix("cps-node-")
            .tempdir()
            .unwrap();
        fs::set_permissions(base.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let svc = base.path().join("svc");
        fs::create_dir(&svc).unwrap();
        user.own(&svc).unwrap();
        let outside = base.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), VICTIM).unwrap();
        fs::set_permissions(outside.join("victim"), fs::Permissions::from_mode(0o644)).unwrap();
        Self {
            user,
            _base: base,
            svc,
            outside,
        }
    }

    fn victim(&self) -> PathBuf {
        self.outside.join("victim")
    }

    /// A node file in the service's directory, owned by the service user.
    fn file(&self, relative: &str, content: &[u8]) -> NodeFile {
        NodeFile {
            path: self.svc.join(relative),
            content: content.to_vec(),
            mode: 0o640,
            ownership: Ownership {
                owner: Some(self.user.name.clone()),
                group: Some(self.user.name.clone()),
                mode: None,
            },
        }
    }

    /// Nothing was created in `outside`, and its file has root's owner, mode and content.
    fn assert_outside_untouched(&self) {
        let names: Vec<String> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["victim"], "root created something outside");
        let meta = fs::symlink_metadata(self.victim()).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (0, 0, 0o644),
            "root's file outside was chowned or chmodded"
        );
        assert_eq!(fs::read(self.victim()).unwrap(), VICTIM);
    }
}

fn node() -> LinuxNode {
    LinuxNode::new("/sys")
}

fn owner_mode(path: &Path) -> (u32, u32, u32) {
    let m = fs::symlink_metadata(path).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

#[test]
fn files_get_owner_and_mode_and_are_left_alone_when_unchanged() {
    if !ready() {
        return;
    }
    let s = Scene::new("plain");
    let file = s.file("conf/app.properties", b"broker.id=2\n");
    assert!(node().write_file(&file).unwrap());
    assert_eq!(fs::read(&file.path).unwrap(), b"broker.id=2\n");
    assert_eq!(owner_mode(&file.path), (s.user.uid, s.user.gid, 0o640));
    // The missing directory is made root's, 0755: the user cannot swap what root writes into.
    assert_eq!(owner_mode(&s.svc.join("conf")).0, 0);
    assert!(!node().write_file(&file).unwrap(), "unchanged: no rewrite");
    fs::set_permissions(&file.path, fs::Permissions::from_mode(0o666)).unwrap();
    assert!(
        node().write_file(&file).unwrap(),
        "a changed mode is rewritten"
    );
    assert_eq!(owner_mode(&file.path), (s.user.uid, s.user.gid, 0o640));
    let names: Vec<_> = fs::read_dir(s.svc.join("conf")).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file left behind");
}

/// The user replaces a directory of the path with a link to a directory of root's: root would
/// create a file there and hand it to the user.
#[test]
fn a_directory_link_planted_by_the_service_user_is_not_followed() {
    if !ready() {
        return;
    }
    let s = Scene::new("dirlink");
    s.user.symlink(&s.outside, &s.svc.join("conf")).unwrap();
    let err = node()
        .write_file(&s.file("conf/app.properties", b"id=1\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&*s.svc.join("conf").to_string_lossy()) && err.contains("symbolic link"),
        "the error names the link: {err}"
    );
    s.assert_outside_untouched();
    // The same link deeper in the path, under a directory that does not exist yet.
    let err = node()
        .write_file(&s.file("conf/deeper/app.properties", b"id=1\n"))
        .unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    s.assert_outside_untouched();
}

/// A link root made itself is no proof of anything when it sits in the user's directory: the
/// user can rename entries there.
#[test]
fn a_root_owned_link_in_the_users_directory_is_not_followed() {
    if !ready() {
        return;
    }
    let s = Scene::new("rootlink");
    std::os::unix::fs::symlink(&s.outside, s.svc.join("conf")).unwrap();
    assert!(
        node()
            .write_file(&s.file("conf/app.properties", b"id=1\n"))
            .is_err()
    );
    s.assert_outside_untouched();
}

/// Links only root can have made, in directories only root can write (`/var/run` → `/run`), are
/// followed: the rule is about who controls the path, not about links as such.
#[test]
fn a_link_root_made_in_a_root_only_directory_is_followed() {
    if !ready() {
        return;
    }
    let s = Scene::new("trusted");
    let base = s.svc.parent().unwrap();
    let real = base.join("real");
    fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink("real", base.join("alias")).unwrap();
    let file = NodeFile {
        path: base.join("alias/node.conf"),
        content: b"id=3\n".to_vec(),
        mode: 0o600,
        ownership: Ownership::default(),
    };
    assert!(node().write_file(&file).unwrap());
    assert_eq!(fs::read(real.join("node.conf")).unwrap(), b"id=3\n");
    assert!(
        fs::symlink_metadata(base.join("alias"))
            .unwrap()
            .is_symlink()
    );
}

/// A link at the file itself is replaced by the file; its target is neither read nor written.
#[test]
fn a_link_at_the_file_is_replaced_and_its_target_untouched() {
    if !ready() {
        return;
    }
    let s = Scene::new("filelink");
    let file = s.file("app.properties", b"id=1\n");
    s.user.symlink(&s.victim(), &file.path).unwrap();
    assert!(node().write_file(&file).unwrap());
    let meta = fs::symlink_metadata(&file.path).unwrap();
    assert!(meta.is_file(), "the link was replaced by a file");
    assert_eq!(owner_mode(&file.path), (s.user.uid, s.user.gid, 0o640));
    assert_eq!(fs::read(&file.path).unwrap(), b"id=1\n");
    s.assert_outside_untouched();
}

/// The writer's temporary name is fixed (`.NAME.cps-tmp`), so a trap can be set there before
/// the run: a link at that name is never opened or chowned through.
#[test]
fn a_link_at_the_temporary_name_is_not_followed() {
    if !ready() {
        return;
    }
    let s = Scene::new("tmplink");
    let file = s.file("app.properties", b"id=1\n");
    s.user
        .symlink(&s.victim(), &s.svc.join(".app.properties.cps-tmp"))
        .unwrap();
    assert!(node().write_file(&file).unwrap());
    assert_eq!(owner_mode(&file.path), (s.user.uid, s.user.gid, 0o640));
    assert_eq!(fs::read(&file.path).unwrap(), b"id=1\n");
    s.assert_outside_untouched();
    assert!(!s.svc.join(".app.properties.cps-tmp").exists());
}

/// A FIFO in place of the old file: reading it to compare would wait forever for a writer.
#[test]
fn a_fifo_at_the_file_neither_blocks_nor_is_read() {
    const TEST: &str = "a_fifo_at_the_file_neither_blocks_nor_is_read";
    if in_bounded_child(TEST) || !ready() {
        return;
    }
    let s = Scene::new("fifo");
    let file = s.file("app.properties", BOUNDED_CONTENT);
    s.user
        .run("mkfifo", &[&file.path.to_string_lossy()])
        .unwrap();
    run_bounded(TEST, &file);
    assert!(fs::symlink_metadata(&file.path).unwrap().is_file());
    assert_eq!(fs::read(&file.path).unwrap(), BOUNDED_CONTENT);
}

/// A link to /dev/zero in place of the old file: reading it to compare would never end, and
/// take all the memory there is.
#[test]
fn a_link_to_dev_zero_at_the_file_is_not_read() {
    const TEST: &str = "a_link_to_dev_zero_at_the_file_is_not_read";
    if in_bounded_child(TEST) || !ready() {
        return;
    }
    let s = Scene::new("zero");
    let file = s.file("app.properties", BOUNDED_CONTENT);
    s.user.symlink(Path::new("/dev/zero"), &file.path).unwrap();
    run_bounded(TEST, &file);
    assert!(fs::symlink_metadata(&file.path).unwrap().is_file());
    assert_eq!(fs::read(&file.path).unwrap(), BOUNDED_CONTENT);
}

/// The create→chown window: the user watches its directory (inotify) and, the moment root's
/// temporary file appears, moves it aside and puts a link to root's file in its place. A
/// writer that chowns or chmods by path then changes root's file; one that works on its open
/// descriptor changes only its own inode, whenever the swap lands.
#[test]
fn a_temporary_file_swapped_for_a_link_mid_write_redirects_nothing() {
    if !ready() {
        return;
    }
    let s = Scene::new("race");
    // Large enough that the write gives the attacker time to get in.
    let file = s.file("app.properties", &vec![b'x'; 64 << 20]);
    let mut won = 0;
    for _ in 0..5 {
        for entry in fs::read_dir(&s.svc).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        let attacker = Attacker::start(&s.user, &s.svc, ".app.properties.cps", &s.victim());
        let result = node().write_file(&file);
        let swapped = attacker.finish();
        s.assert_outside_untouched();
        if swapped {
            won += 1;
            let err = result.expect_err("a swapped file must not count as written");
            assert!(err.to_string().contains("replaced"), "{err}");
        }
        if won >= 2 {
            break;
        }
    }
    assert!(
        won > 0,
        "the attacker never got in; the test proved nothing"
    );
}

// ---- helpers ---------------------------------------------------------------------------------

const BOUNDED_CONTENT: &[u8] = b"id=1\n";
const BOUNDED_TEST: &str = "CPS_NODE_BOUNDED_TEST";
const BOUNDED_FILE: &str = "CPS_NODE_BOUNDED_FILE";
const BOUNDED_OWNER: &str = "CPS_NODE_BOUNDED_OWNER";
/// More than a test process needs, far less than reading /dev/zero takes.
const BOUNDED_PEAK: u64 = 256 << 20;

/// In the child [`run_bounded`] starts: writes the file the parent prepared and checks that
/// it took neither long nor much memory. `false` in the parent.
fn in_bounded_child(test: &str) -> bool {
    if std::env::var(BOUNDED_TEST).as_deref() != Ok(test) {
        return false;
    }
    let owner = std::env::var(BOUNDED_OWNER).unwrap();
    let file = NodeFile {
        path: std::env::var(BOUNDED_FILE).unwrap().into(),
        content: BOUNDED_CONTENT.to_vec(),
        mode: 0o640,
        ownership: Ownership {
            owner: Some(owner.clone()),
            group: Some(owner),
            mode: None,
        },
    };
    assert!(node().write_file(&file).unwrap());
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kib * 1024 < BOUNDED_PEAK,
        "peak memory {peak_kib} KiB: the old file was read beyond the new content's length"
    );
    true
}

/// Runs `test` again in a child process that writes `file` with 1 GiB of address space and
/// 30 s, so that a regression (reading /dev/zero, blocking on a FIFO) fails the test, not the
/// machine. Setup and cleanup stay in this process, which outlives a killed child.
fn run_bounded(test: &str, file: &NodeFile) {
    let log = tempfile::NamedTempFile::new().unwrap();
    // One open file for both streams, so they share an offset.
    let out = log.reopen().unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--test-threads=1", "--nocapture"])
        .env(BOUNDED_TEST, test)
        .env(BOUNDED_FILE, &file.path)
        .env(BOUNDED_OWNER, file.ownership.owner.as_deref().unwrap())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = String::new();
    log.reopen().unwrap().read_to_string(&mut output).unwrap();
    match status {
        Some(s) if s.success() && output.contains("1 passed") => {}
        Some(s) => panic!("{test} failed in its bounded child ({s}):\n{output}"),
        None => panic!("{test} did not finish within 30 s (blocked?):\n{output}"),
    }
}

/// A forked child that becomes the service user and plays the swap of the temporary file.
struct Attacker {
    pid: libc::pid_t,
}

impl Attacker {
    /// Returns once the child watches `dir`.
    fn start(user: &ServiceUser, dir: &Path, prefix: &str, victim: &Path) -> Self {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let dir_c = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let victim_c = CString::new(victim.as_os_str().as_bytes()).unwrap();
        let prefix = prefix.as_bytes().to_vec();
        let (uid, gid) = (user.uid, user.gid);
        let mut pipe = [0; 2];
        // SAFETY: plain pipe(2) into a local array.
        assert_eq!(
            unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) },
            0
        );
        // SAFETY: the child only makes system calls on memory prepared before the fork (no
        // allocation, no locks, no unwinding) and ends with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = unsafe { attack(uid, gid, &dir_c, &victim_c, &prefix, pipe[1]) };
            unsafe { libc::_exit(code) };
        }
        // SAFETY: our end of the pipe; the child writes one byte when it is watching.
        unsafe { libc::close(pipe[1]) };
        let mut poll = libc::pollfd {
            fd: pipe[0],
            events: libc::POLLIN,
            revents: 0,
        };
        let mut byte = 0u8;
        let ready = unsafe {
            libc::poll(&mut poll, 1, 10_000) == 1
                && libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1) == 1
        };
        unsafe { libc::close(pipe[0]) };
        let attacker = Self { pid };
        assert!(ready, "the attacker did not start watching");
        attacker
    }

    /// Waits for the child (bounded); `true` when it swapped the file.
    fn finish(mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            let done = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if done == self.pid {
                self.pid = 0;
                return libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            }
            assert!(Instant::now() < deadline, "the attacker did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: our own child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// The attacker's body, in the forked child: 0 swapped, 2 too late, 3 nothing appeared, 4 setup.
///
/// # Safety
/// Only async-signal-safe calls on memory that exists before the fork.
unsafe fn attack(
    uid: u32,
    gid: u32,
    dir: &std::ffi::CStr,
    victim: &std::ffi::CStr,
    prefix: &[u8],
    ready: libc::c_int,
) -> libc::c_int {
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return 4;
        }
        let dirfd = libc::open(dir.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
        let watch = libc::inotify_init1(0);
        if dirfd < 0
            || watch < 0
            || libc::inotify_add_watch(watch, dir.as_ptr(), libc::IN_CREATE) < 0
        {
            return 4;
        }
        libc::write(ready, b"r".as_ptr().cast(), 1);
        let mut buf = [0u8; 4096];
        let mut moved = [0u8; 512];
        for _ in 0..64 {
            let mut poll = libc::pollfd {
                fd: watch,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut poll, 1, 10_000) != 1 {
                return 3;
            }
            let n = libc::read(watch, buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                return 3;
            }
            let n = n as usize;
            let header = std::mem::size_of::<libc::inotify_event>();
            let mut at = 0;
            while at + header <= n {
                let event =
                    std::ptr::read_unaligned(buf.as_ptr().add(at).cast::<libc::inotify_event>());
                let name_at = at + header;
                let len = event.len as usize;
                at = name_at + len;
                if at > n || len == 0 {
                    continue;
                }
                let name = &buf[name_at..name_at + len];
                let name_len = name.iter().position(|b| *b == 0).unwrap_or(len);
                let name = &name[..name_len];
                if !name.starts_with(prefix) || name_len + 8 > moved.len() {
                    continue;
                }
                moved[..name_len].copy_from_slice(name);
                moved[name_len..name_len + 7].copy_from_slice(b".moved\0");
                let name_ptr = buf.as_ptr().add(name_at).cast::<libc::c_char>();
                if libc::renameat(dirfd, name_ptr, dirfd, moved.as_ptr().cast()) != 0 {
                    return 2;
                }
                if libc::symlinkat(victim.as_ptr(), dirfd, name_ptr) != 0 {
                    return 2;
                }
                return 0;
            }
        }
        3
    }
}
