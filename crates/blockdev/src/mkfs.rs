//! Making a filesystem — only ever on a device a probe proved empty just before.

use std::fmt;
use std::process::{Command, Stdio};

use crate::probe::{self, Probe};
use crate::{Device, Error, Filesystem};

/// Filesystems cps-attach can make by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    pub const ALL: [FsType; 3] = [FsType::Ext4, FsType::Xfs, FsType::Btrfs];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Xfs => "xfs",
            Self::Btrfs => "btrfs",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The longest label the filesystem accepts, in bytes.
    pub fn max_label_len(self) -> usize {
        match self {
            Self::Ext4 => 16,
            Self::Xfs => 12,
            Self::Btrfs => 255,
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How to make the filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MkfsSpec {
    /// `mkfs.<type> [-L label] [options…] DEVICE`.
    Typed {
        fstype: FsType,
        label: Option<String>,
        options: Vec<String>,
    },
    /// `mkfs ARGS… DEVICE`, the arguments exactly as configured (the original config format).
    Raw { args: Vec<String> },
}

impl Default for MkfsSpec {
    /// ext4 without reserved blocks, as the original tool did.
    fn default() -> Self {
        Self::Raw {
            args: ["-t", "ext4", "-m", "0"].map(String::from).to_vec(),
        }
    }
}

impl MkfsSpec {
    /// The filesystem type this spec makes (`mkfs` without `-t` makes ext2).
    pub fn fstype(&self) -> String {
        match self {
            Self::Typed { fstype, .. } => fstype.name().to_owned(),
            Self::Raw { args } => raw_type(args).unwrap_or_else(|| "ext2".into()),
        }
    }

    fn command(&self) -> (String, Vec<String>) {
        match self {
            Self::Typed {
                fstype,
                label,
                options,
            } => {
                let mut args = Vec::new();
                if let Some(label) = label {
                    args.push("-L".to_owned());
                    args.push(label.clone());
                }
                args.extend(options.iter().cloned());
                (format!("mkfs.{}", fstype.name()), args)
            }
            Self::Raw { args } => ("mkfs".to_owned(), args.clone()),
        }
    }
}

/// The `-t TYPE` / `-tTYPE` / `--type TYPE` / `--type=TYPE` of raw mkfs arguments.
fn raw_type(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "-t" || arg == "--type" {
            return it.next().cloned();
        }
        if let Some(t) = arg.strip_prefix("--type=") {
            return Some(t.to_owned());
        }
        if let Some(t) = arg.strip_prefix("-t").filter(|t| !t.is_empty()) {
            return Some(t.to_owned());
        }
    }
    None
}

pub(crate) fn make_filesystem(device: &Device, spec: &MkfsSpec) -> Result<Filesystem, Error> {
    match probe::probe(device)? {
        Probe::Empty => {}
        Probe::Filesystem(fs) => {
            return Err(Error::AlreadyFormatted {
                path: device.path.clone(),
                volume_id: device.volume_id.clone(),
                fstype: fs.fstype,
            });
        }
        Probe::Refused(refusal) => {
            return Err(Error::Refused {
                path: device.path.clone(),
                volume_id: device.volume_id.clone(),
                refusal,
            });
        }
    }

    let (program, args) = spec.command();
    tracing::info!(volume_id = %device.volume_id, device = %device.path.display(), command = %format!("{program} {}", args.join(" ")), "making filesystem");
    let out = Command::new(&program)
        .args(&args)
        .arg(&device.path)
        .env("LC_ALL", "C")
        // mke2fs asks before overwriting; with no stdin it declines rather than proceeding.
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::ToolMissing {
                    tool: program.clone(),
                    hint: probe::tool_hint(&program),
                }
            } else {
                Error::io(&program, "run")(e)
            }
        })?;
    if !out.status.success() {
        return Err(Error::Tool {
            command: format!("{program} {} {}", args.join(" "), device.path.display()),
            status: out
                .status
                .code()
                .map(|c| format!("exit {c}"))
                .unwrap_or_else(|| "killed by a signal".into()),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }

    let expected = spec.fstype();
    match probe::probe(device)? {
        Probe::Filesystem(fs) if fs.fstype == expected => Ok(fs),
        other => Err(Error::MkfsUnverified {
            path: device.path.clone(),
            expected,
            found: format!("{other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(args: &[&str]) -> MkfsSpec {
        MkfsSpec::Raw {
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn raw_type_is_read_in_every_spelling() {
        assert_eq!(raw(&["-t", "xfs"]).fstype(), "xfs");
        assert_eq!(raw(&["-txfs"]).fstype(), "xfs");
        assert_eq!(raw(&["--type", "btrfs"]).fstype(), "btrfs");
        assert_eq!(raw(&["--type=ext3", "-m", "0"]).fstype(), "ext3");
        assert_eq!(raw(&["-m", "0"]).fstype(), "ext2");
        assert_eq!(MkfsSpec::default().fstype(), "ext4");
    }

    #[test]
    fn typed_command_puts_label_then_options() {
        let spec = MkfsSpec::Typed {
            fstype: FsType::Xfs,
            label: Some("data".into()),
            options: vec!["-K".into()],
        };
        assert_eq!(
            spec.command(),
            (
                "mkfs.xfs".to_owned(),
                vec!["-L".into(), "data".into(), "-K".into()]
            )
        );
    }
}
