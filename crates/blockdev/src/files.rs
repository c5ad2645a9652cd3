//! Writing files as root into directories that another user may control, so that readers see
//! the old content or the new, whole, never a mix.
//!
//! A node file may live on the data volume in a directory the service account owns
//! (`owner: kafka`). That account can replace any entry there at any moment — a directory with
//! a link to `/etc`, the old file with a FIFO or a link to `/dev/zero`, root's temporary file
//! with a link to a file of root's — and the trap stays on the volume for the next server. So:
//! - paths are resolved one component at a time on directory descriptors (`openat` with
//!   `O_NOFOLLOW`); a link is followed only when nobody but root (or the caller) can have made
//!   it: owned by root or the caller, in a directory only they can write (`/var/run` → `/run`);
//! - the old content is read through a descriptor opened without following links or blocking,
//!   only if it is a regular file, and at most as many bytes as the new content;
//! - the temporary file is created exclusively in the directory descriptor, and owner and mode
//!   are set on its open descriptor (`fchown`, `fchmod`) — there is no path to swap between
//!   create and chown — then renamed within the directory descriptor.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, Permissions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::{Error, Ownership, resolve_ownership};

/// Links followed in one resolution, as the kernel allows.
const MAX_LINKS: u32 = 40;

/// A directory reached without following a link another user could have planted.
pub(crate) struct Dir {
    fd: OwnedFd,
    /// The path it was reached by (links resolved), for messages.
    path: PathBuf,
}

impl Dir {
    pub(crate) fn into_file(self) -> File {
        File::from(self.fd)
    }

    fn stat(&self) -> io::Result<libc::stat> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: a valid descriptor and a buffer of the right type.
        cvt(unsafe { libc::fstat(self.fd.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstat succeeded and filled it.
        Ok(unsafe { st.assume_init() })
    }

    /// `openat` relative to this directory (`O_CLOEXEC` always).
    fn open(&self, name: &OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
        let name = c_name(name)?;
        // SAFETY: a valid descriptor and a NUL-terminated name.
        let fd = cvt(unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        })?;
        // SAFETY: openat returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The entry itself, not what a link points to.
    fn lstat(&self, name: &OsStr) -> io::Result<libc::stat> {
        let name = c_name(name)?;
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: as above.
        cvt(unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        // SAFETY: fstatat succeeded and filled it.
        Ok(unsafe { st.assume_init() })
    }

    fn readlink(&self, name: &OsStr) -> io::Result<PathBuf> {
        let name = c_name(name)?;
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: the buffer is as long as we say.
        let n = unsafe {
            libc::readlinkat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        buf.truncate(n);
        Ok(PathBuf::from(OsString::from_vec(buf)))
    }

    fn mkdir(&self, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
        let name = c_name(name)?;
        // SAFETY: as above.
        cvt(unsafe { libc::mkdirat(self.fd.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
    }

    fn unlink(&self, name: &OsStr) -> io::Result<()> {
        let name = c_name(name)?;
        // SAFETY: as above; removes the entry only (a link, never its target).
        cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), 0) }).map(drop)
    }

    fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        let (from, to) = (c_name(from)?, c_name(to)?);
        let fd = self.fd.as_raw_fd();
        // SAFETY: as above; both names are in this directory.
        cvt(unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) }).map(drop)
    }

    fn sync(&self) -> io::Result<()> {
        // SAFETY: a valid descriptor.
        cvt(unsafe { libc::fsync(self.fd.as_raw_fd()) }).map(drop)
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn is_link(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

/// Why a link in `parent` may be someone else's doing, or `None` when only root or this
/// process can have made it.
fn distrust(parent: &Dir, link: &libc::stat) -> io::Result<Option<String>> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let ours = |uid: u32| uid == 0 || uid == me;
    if !ours(link.st_uid) {
        return Ok(Some(format!("it belongs to uid {}", link.st_uid)));
    }
    let dir = parent.stat()?;
    if !ours(dir.st_uid) {
        return Ok(Some(format!(
            "{} belongs to uid {}, who can replace it",
            parent.path.display(),
            dir.st_uid
        )));
    }
    if dir.st_mode & 0o022 != 0 {
        return Ok(Some(format!(
            "{} is writable by others (mode {:o}), who can replace it",
            parent.path.display(),
            dir.st_mode & 0o7777
        )));
    }
    Ok(None)
}

fn absolute(path: &Path) -> Result<PathBuf, Error> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    std::env::current_dir()
        .map(|cwd| cwd.join(path))
        .map_err(Error::io(path, "resolve"))
}

/// Pushes a path's components onto `pending` so that they pop in order.
fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::Normal(n) => pending.push(n.to_owned()),
            Component::ParentDir => pending.push("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// Opens the directory `path`, one component at a time without following untrusted links;
/// with `create`, missing directories are made (0755, root's), each opened the same way.
pub(crate) fn open_dir(path: &Path, create: bool) -> Result<Dir, Error> {
    let path = absolute(path)?;
    let root = File::open("/").map_err(Error::io("/", "open directory"))?;
    // The chain of real directories walked so far: `..` is the one before.
    let mut chain = vec![Dir {
        fd: root.into(),
        path: PathBuf::from("/"),
    }];
    let mut pending = Vec::new();
    push_components(&mut pending, &path);
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            if chain.len() > 1 {
                chain.pop();
            }
            continue;
        }
        let parent = chain.last().expect("the chain starts at /");
        let shown = parent.path.join(&name);
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let opened = match parent.open(&name, flags, 0) {
            Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
                match parent.mkdir(&name, 0o755) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    Err(e) => return Err(Error::io(shown, "create directory")(e)),
                }
                parent.open(&name, flags, 0)
            }
            other => other,
        };
        match opened {
            Ok(fd) => chain.push(Dir { fd, path: shown }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                let st = parent.lstat(&name).map_err(Error::io(&shown, "inspect"))?;
                if !is_link(&st) {
                    return Err(Error::UnsafePath {
                        path: shown,
                        reason: "is not a directory".into(),
                    });
                }
                let target = parent
                    .readlink(&name)
                    .map_err(Error::io(&shown, "read link"))?;
                if let Some(why) = distrust(parent, &st).map_err(Error::io(&shown, "inspect"))? {
                    return Err(Error::UnsafePath {
                        reason: format!(
                            "is a symbolic link (to {}) that another user may have planted: {why}. \
                             cps-attach does not write or change ownership through it (it could point \
                             anywhere); replace it with a real directory, or configure the real path",
                            target.display()
                        ),
                        path: shown,
                    });
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(Error::io(shown, "resolve")(io::Error::from_raw_os_error(
                        libc::ELOOP,
                    )));
                }
                if target.is_absolute() {
                    chain.truncate(1);
                }
                push_components(&mut pending, &target);
            }
            Err(e) => return Err(Error::io(shown, "open directory")(e)),
        }
    }
    Ok(chain.pop().expect("the chain starts at /"))
}

/// The directory of `path` (created if missing) and the file's name in it.
fn open_parent(path: &Path) -> Result<(Dir, OsString), Error> {
    let not_a_file = || Error::Io {
        path: path.to_path_buf(),
        action: "write",
        source: io::Error::other("not a file path"),
    };
    let name = path.file_name().ok_or_else(not_a_file)?.to_owned();
    let parent = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok((open_dir(parent, true)?, name))
}

/// Whether `name` in `dir` is a regular file with exactly this content, mode and owner. Opened
/// without following a link and without blocking (a FIFO); read only as far as `bytes` goes.
fn unchanged(
    dir: &Dir,
    name: &OsStr,
    bytes: &[u8],
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> bool {
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY;
    let Ok(fd) = dir.open(name, flags, 0) else {
        return false;
    };
    let file = File::from(fd);
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if !meta.is_file()
        || meta.len() != bytes.len() as u64
        || meta.mode() & 0o7777 != mode
        || uid.is_some_and(|u| u != meta.uid())
        || gid.is_some_and(|g| g != meta.gid())
    {
        return false;
    }
    let mut old = Vec::with_capacity(bytes.len());
    file.take(bytes.len() as u64 + 1)
        .read_to_end(&mut old)
        .is_ok_and(|_| old == bytes)
}

/// Puts `bytes` at `name` in `dir` through a temporary file, owner and mode set on its
/// descriptor, data synced before the rename.
fn replace(
    dir: &Dir,
    name: &OsStr,
    path: &Path,
    bytes: &[u8],
    mode: u32,
    (uid, gid): (Option<u32>, Option<u32>),
) -> Result<(), Error> {
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(".cps-tmp");
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
    // The name is this writer's: whatever sits there (a crash's leftover, a planted link) is
    // removed — the entry, never what a link points to — and the create stays exclusive.
    let fd = match dir.open(&tmp, flags, 0o600) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            dir.unlink(&tmp)
                .map_err(Error::io(dir.path.join(&tmp), "remove"))?;
            dir.open(&tmp, flags, 0o600)
        }
        other => other,
    }
    .map_err(Error::io(dir.path.join(&tmp), "create"))?;
    let mut file = File::from(fd);
    let written = (|| {
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&file, uid, gid)?;
        }
        // After the chown, which clears set-id bits.
        file.set_permissions(Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()
    })()
    .map_err(Error::io(path, "write"))
    .and_then(|()| {
        dir.rename(&tmp, name)
            .map_err(Error::io(path, "rename into place"))
    });
    let ours = file.metadata().map_err(Error::io(path, "inspect"))?;
    let is_ours = |st: &libc::stat| st.st_dev == ours.dev() && st.st_ino == ours.ino();
    if let Err(e) = written {
        if dir.lstat(&tmp).is_ok_and(|st| is_ours(&st)) {
            let _ = dir.unlink(&tmp);
        }
        return Err(e);
    }
    // Someone who can write the directory may have swapped the temporary file meanwhile; what
    // got renamed is then theirs. Nothing outside was touched, but the file is not written.
    if !dir.lstat(name).is_ok_and(|st| is_ours(&st)) {
        let owner = dir.stat().map(|s| s.st_uid).unwrap_or(u32::MAX);
        return Err(Error::UnsafePath {
            path: path.to_path_buf(),
            reason: format!(
                "was replaced by another process while cps-attach wrote it ({} belongs to uid {owner}); \
                 nothing outside the directory was changed, but the file is not what cps-attach wrote",
                dir.path.display()
            ),
        });
    }
    dir.sync().map_err(Error::io(&dir.path, "sync directory"))
}

/// Writes `bytes` to `path` atomically (see the module's rules): readers see the old file or
/// the new one, which appears complete, with its owner and mode. Creates missing parent
/// directories (0755).
pub fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    ownership: &Ownership,
) -> Result<(), Error> {
    let ids = resolve_ownership(ownership)?;
    let (dir, name) = open_parent(path)?;
    replace(&dir, &name, path, bytes, mode, ids)
}

/// As [`write_atomically`], unless `path` already is a regular file with this content, mode
/// and owner: then nothing is written and the result is `false`.
pub fn write_if_changed(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    ownership: &Ownership,
) -> Result<bool, Error> {
    let ids = resolve_ownership(ownership)?;
    let (dir, name) = open_parent(path)?;
    if unchanged(&dir, &name, bytes, mode, ids.0, ids.1) {
        return Ok(false);
    }
    replace(&dir, &name, path, bytes, mode, ids)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn writes_whole_with_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/file.conf");
        write_atomically(&path, b"one", 0o640, &Ownership::default()).unwrap();
        write_atomically(&path, b"two", 0o600, &Ownership::default()).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn an_unknown_owner_fails_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"old").unwrap();
        let unknown = Ownership {
            owner: Some("no-such-user-cps".into()),
            ..Ownership::default()
        };
        let err = write_atomically(&path, b"new", 0o644, &unknown).unwrap_err();
        assert!(matches!(err, Error::UnknownId { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let err = write_if_changed(&dir.path().join("new/f"), b"x", 0o644, &unknown).unwrap_err();
        assert!(matches!(err, Error::UnknownId { .. }), "{err}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn unchanged_files_are_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let none = Ownership::default();
        assert!(write_if_changed(&path, b"a", 0o640, &none).unwrap());
        assert!(!write_if_changed(&path, b"a", 0o640, &none).unwrap());
        assert!(write_if_changed(&path, b"a", 0o600, &none).unwrap(), "mode");
        assert!(
            write_if_changed(&path, b"ab", 0o600, &none).unwrap(),
            "content"
        );
        assert!(
            write_if_changed(&path, b"a", 0o600, &none).unwrap(),
            "shorter"
        );
    }

    #[test]
    fn relative_paths_and_dot_dot_resolve_like_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("a")).unwrap();
        let path = dir.path().join("a/../b/./f");
        write_atomically(&path, b"x", 0o644, &Ownership::default()).unwrap();
        assert_eq!(fs::read(dir.path().join("b/f")).unwrap(), b"x");
    }

    #[test]
    fn a_file_where_a_directory_should_be_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"").unwrap();
        let err = write_atomically(&dir.path().join("a/f"), b"x", 0o644, &Ownership::default())
            .unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }
}
