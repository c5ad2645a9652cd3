//! The node side of cps on the host, after the volume is mounted: the node's files, the
//! identity environment file, finding the OS interface of an attached ENI by its MAC, and
//! running the user's hooks.
//!
//! [`LinuxNode`] is the real implementation; the orchestration uses the [`NodeHost`] trait, so
//! its tests can run hooks that take simulated time.

mod hooks;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use cps_blockdev::{Ownership, write_atomically, write_if_changed};

pub use hooks::run_command;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing node file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: Box<cps_blockdev::Error>,
    },

    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("hook {hook}: cannot start `{program}`: {source}")]
    HookStart {
        hook: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether this error means "found something that must not be used" (a link or file
    /// another user planted) rather than a failure of the host.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::File { source, .. } if source.is_refusal())
    }
}

/// A file the node needs, written after the volume is mounted (it may live on the volume, in
/// a directory the service's account owns: see [`cps_blockdev::write_if_changed`]).
#[derive(Clone, PartialEq, Eq)]
pub struct NodeFile {
    pub path: PathBuf,
    pub content: Vec<u8>,
    pub mode: u32,
    pub ownership: Ownership,
}

/// The content may be a secret: its length only.
impl std::fmt::Debug for NodeFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeFile")
            .field("path", &self.path)
            .field("content", &format_args!("{} bytes", self.content.len()))
            .field("mode", &format_args!("{:o}", self.mode))
            .field("ownership", &self.ownership)
            .finish()
    }
}

/// One of the user's commands: an argv, run without a shell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    /// `configure` or `health`, for logs.
    pub name: String,
    pub argv: Vec<String>,
}

/// How one run of a hook ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookExit {
    Success,
    Failed { code: Option<i32> },
    TimedOut,
}

impl std::fmt::Display for HookExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Success => f.write_str("exit 0"),
            Self::Failed { code: Some(c) } => write!(f, "exit {c}"),
            Self::Failed { code: None } => f.write_str("killed by a signal"),
            Self::TimedOut => f.write_str("timed out (killed)"),
        }
    }
}

#[async_trait]
pub trait NodeHost: Send + Sync {
    /// The name of the OS network interface with this MAC address, if there is one yet.
    fn interface_by_mac(&self, mac: &str) -> Result<Option<String>, Error>;

    /// Writes a node file atomically; `false` when it already had this content, mode and owner.
    fn write_file(&self, file: &NodeFile) -> Result<bool, Error>;

    /// Writes the identity environment file (`KEY=value` lines, readable by shells and systemd).
    fn write_env_file(&self, path: &Path, vars: &[(String, String)]) -> Result<(), Error>;

    /// Whether `marker` says the configure hook already ran in this boot.
    fn ran_this_boot(&self, marker: &Path) -> Result<bool, Error>;

    /// Records in `marker` that the configure hook ran in this boot.
    fn mark_ran_this_boot(&self, marker: &Path) -> Result<(), Error>;

    /// Runs a hook with `env` added to the environment, its output streamed into the log,
    /// killed (with its process group) after `timeout`.
    async fn run_hook(
        &self,
        hook: &Hook,
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<HookExit, Error>;
}

/// The real node: sysfs under `sys_root` (normally `/sys`).
#[derive(Clone, Debug)]
pub struct LinuxNode {
    sys_root: PathBuf,
}

impl LinuxNode {
    pub fn new(sys_root: impl Into<PathBuf>) -> Self {
        Self {
            sys_root: sys_root.into(),
        }
    }
}

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

fn boot_id() -> Result<String, Error> {
    std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_owned())
        .map_err(|source| Error::Io {
            path: BOOT_ID.into(),
            action: "read",
            source,
        })
}

/// `KEY=value`, single-quoted when the value has anything beyond a safe set.
pub fn env_line(key: &str, value: &str) -> String {
    let safe = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-./:@,+=".contains(c));
    if safe {
        format!("{key}={value}")
    } else {
        format!("{key}='{}'", value.replace('\'', r"'\''"))
    }
}

#[async_trait]
impl NodeHost for LinuxNode {
    fn interface_by_mac(&self, mac: &str) -> Result<Option<String>, Error> {
        let dir = self.sys_root.join("class/net");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    path: dir,
                    action: "list",
                    source,
                });
            }
        };
        let wanted = mac.trim().to_ascii_lowercase();
        for entry in entries.flatten() {
            let Ok(address) = std::fs::read_to_string(entry.path().join("address")) else {
                continue;
            };
            if address.trim().eq_ignore_ascii_case(&wanted) {
                return Ok(Some(entry.file_name().to_string_lossy().into_owned()));
            }
        }
        Ok(None)
    }

    fn write_file(&self, file: &NodeFile) -> Result<bool, Error> {
        write_if_changed(&file.path, &file.content, file.mode, &file.ownership).map_err(|source| {
            Error::File {
                path: file.path.clone(),
                source: Box::new(source),
            }
        })
    }

    fn write_env_file(&self, path: &Path, vars: &[(String, String)]) -> Result<(), Error> {
        let mut text = String::from("# Written by cps-attach: this node's identity.\n");
        for (k, v) in vars {
            text.push_str(&env_line(k, v));
            text.push('\n');
        }
        write_atomically(path, text.as_bytes(), 0o644, &Ownership::default()).map_err(|source| {
            Error::File {
                path: path.to_path_buf(),
                source: Box::new(source),
            }
        })
    }

    fn ran_this_boot(&self, marker: &Path) -> Result<bool, Error> {
        match std::fs::read_to_string(marker) {
            Ok(s) => Ok(s.trim() == boot_id()?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::Io {
                path: marker.to_path_buf(),
                action: "read",
                source,
            }),
        }
    }

    fn mark_ran_this_boot(&self, marker: &Path) -> Result<(), Error> {
        write_atomically(
            marker,
            format!("{}\n", boot_id()?).as_bytes(),
            0o644,
            &Ownership::default(),
        )
        .map_err(|source| Error::File {
            path: marker.to_path_buf(),
            source: Box::new(source),
        })
    }

    async fn run_hook(
        &self,
        hook: &Hook,
        env: &[(String, String)],
        timeout: Duration,
    ) -> Result<HookExit, Error> {
        run_command(hook, env, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_lines_quote_only_when_needed() {
        assert_eq!(env_line("CPS_NODE_ID", "2"), "CPS_NODE_ID=2");
        assert_eq!(
            env_line("CPS_MOUNT_PATH", "/var/lib/kafka"),
            "CPS_MOUNT_PATH=/var/lib/kafka"
        );
        assert_eq!(env_line("X", "a b"), "X='a b'");
        assert_eq!(env_line("X", "it's"), r"X='it'\''s'");
    }

    #[test]
    fn interfaces_are_found_by_mac_in_sysfs() {
        let sys = tempfile::tempdir().unwrap();
        for (name, mac) in [
            ("lo", "00:00:00:00:00:00"),
            ("eth0", "0a:aa:bb:cc:dd:01"),
            ("eth1", "0e:00:00:00:00:2a"),
        ] {
            std::fs::create_dir_all(sys.path().join("class/net").join(name)).unwrap();
            std::fs::write(
                sys.path().join("class/net").join(name).join("address"),
                format!("{mac}\n"),
            )
            .unwrap();
        }
        let node = LinuxNode::new(sys.path());
        assert_eq!(
            node.interface_by_mac("0E:00:00:00:00:2A")
                .unwrap()
                .as_deref(),
            Some("eth1")
        );
        assert_eq!(node.interface_by_mac("0e:00:00:00:00:99").unwrap(), None);
        assert_eq!(
            LinuxNode::new("/nonexistent")
                .interface_by_mac("x")
                .unwrap(),
            None
        );
    }

    #[test]
    fn node_files_are_written_once_and_then_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let node = LinuxNode::new("/sys");
        let file = NodeFile {
            path: dir.path().join("etc/app/node.conf"),
            content: b"id=2\n".to_vec(),
            mode: 0o640,
            ownership: Ownership::default(),
        };
        assert!(node.write_file(&file).unwrap());
        assert!(
            !node.write_file(&file).unwrap(),
            "same content, mode: no rewrite"
        );
        let changed = NodeFile {
            content: b"id=3\n".to_vec(),
            ..file.clone()
        };
        assert!(node.write_file(&changed).unwrap());
        assert_eq!(std::fs::read(&file.path).unwrap(), b"id=3\n");
    }

    #[test]
    fn the_boot_marker_remembers_this_boot_only() {
        let dir = tempfile::tempdir().unwrap();
        let node = LinuxNode::new("/sys");
        let marker = dir.path().join("run/configure.done");
        assert!(!node.ran_this_boot(&marker).unwrap());
        node.mark_ran_this_boot(&marker).unwrap();
        assert!(node.ran_this_boot(&marker).unwrap());
        std::fs::write(&marker, "an-earlier-boot\n").unwrap();
        assert!(!node.ran_this_boot(&marker).unwrap());
    }
}
