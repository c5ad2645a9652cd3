//! Writing a file so that readers see the old content or the new, whole, never a mix.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{Error, Ownership, set_ownership};

/// Writes `bytes` to `path` through a temporary file in the same directory: permissions and
/// ownership are set and the data synced before the rename, so the file appears complete and
/// with its final owner. Creates missing parent directories (0755).
pub fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    ownership: &Ownership,
) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io {
            path: path.to_path_buf(),
            action: "write",
            source: std::io::Error::other("not a file path"),
        })?
        .to_string_lossy();
    fs::create_dir_all(dir).map_err(Error::io(dir, "create directory"))?;
    // A fresh name, created exclusively and never through a link: the directory may belong to
    // another user (a file on the data volume), who must not redirect this root-owned write.
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".{name}.cps-{}-{nonce:08x}", std::process::id()));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&tmp)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(bytes)?;
        file.sync_all()
    })()
    .map_err(Error::io(path, "write"))
    .and_then(|()| {
        let owned = Ownership {
            mode: None,
            ..ownership.clone()
        };
        set_ownership(&tmp, &owned)
    })
    .and_then(|()| {
        fs::rename(&tmp, path).map_err(Error::io(path, "rename into place"))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io(dir, "sync directory"))
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

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
    fn an_unknown_owner_fails_before_anything_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"old").unwrap();
        let err = write_atomically(
            &path,
            b"new",
            0o644,
            &Ownership {
                owner: Some("no-such-user-cps".into()),
                ..Ownership::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, Error::UnknownId { .. }), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
