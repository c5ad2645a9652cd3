//! Making a filesystem — only ever on a device a probe proved empty just before, or on one
//! whose bytes the volume's format journal proves are an interrupted cps mkfs's own.

use std::fmt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::probe::{self, Probe, Refusal};
use crate::{Device, Error, Filesystem, locate};

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

    /// The UUID the arguments give the new filesystem, if they give one (ext `-U`, xfs
    /// `-m uuid=`, btrfs `-U`/`--uuid`).
    pub fn uuid(&self) -> Option<String> {
        let fstype = self.fstype();
        let args = match self {
            Self::Typed { options, .. } => options,
            Self::Raw { args } => args,
        };
        let mut it = args.iter().peekable();
        while let Some(arg) = it.next() {
            if fstype == "xfs" {
                let list = match arg.strip_prefix("-m") {
                    Some("") => it.peek().map(|s| s.as_str()),
                    other => other,
                };
                if let Some(u) = list
                    .into_iter()
                    .flat_map(|l| l.split(','))
                    .find_map(|o| o.strip_prefix("uuid="))
                {
                    return Some(u.to_owned());
                }
            } else if fstype.starts_with("ext") || fstype == "btrfs" {
                if arg == "-U" || arg == "--uuid" {
                    return it.peek().map(|s| s.to_string());
                }
                if let Some(u) = arg
                    .strip_prefix("--uuid=")
                    .or_else(|| arg.strip_prefix("-U").filter(|u| !u.is_empty()))
                {
                    return Some(u.to_owned());
                }
            }
        }
        None
    }

    /// This spec with `uuid` for the new filesystem, so that a half-made one can be told from
    /// one somebody else made. Unchanged when the arguments set a UUID already, or the type
    /// has no option for it.
    pub fn with_uuid(&self, uuid: &str) -> Self {
        let fstype = self.fstype();
        let extra: Vec<String> = if self.uuid().is_some() {
            Vec::new()
        } else if fstype.starts_with("ext") || fstype == "btrfs" {
            vec!["-U".into(), uuid.into()]
        } else if fstype == "xfs" {
            vec!["-m".into(), format!("uuid={uuid}")]
        } else {
            Vec::new()
        };
        let mut spec = self.clone();
        match &mut spec {
            Self::Typed { options, .. } => options.extend(extra),
            Self::Raw { args } => args.extend(extra),
        }
        spec
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
                (
                    format!("mkfs.{}", fstype.name()),
                    without_discard(fstype.name(), args),
                )
            }
            Self::Raw { args } => (
                "mkfs".to_owned(),
                without_discard(&self.fstype(), args.clone()),
            ),
        }
    }
}

/// Adds the option that stops mkfs discarding (TRIM) the whole device first, unless the
/// arguments already say either way. A fresh EBS volume needs no discard, and a discard turns
/// any mistake into a loss: what it erased cannot be read back.
fn without_discard(fstype: &str, mut args: Vec<String>) -> Vec<String> {
    if fstype.starts_with("ext") {
        // mke2fs takes only the last -E, so an existing list is extended, never shadowed.
        let lists: Vec<usize> = (0..args.len())
            .filter(|&i| {
                args[i] == "-E" && i + 1 < args.len()
                    || args[i].starts_with("-E") && args[i].len() > 2
            })
            .collect();
        let value = |i: usize| -> &str {
            if args[i] == "-E" {
                &args[i + 1]
            } else {
                &args[i][2..]
            }
        };
        let says = lists.iter().any(|&i| {
            value(i)
                .split(',')
                .any(|o| o == "discard" || o == "nodiscard")
        });
        match lists.last() {
            _ if says => {}
            Some(&i) if args[i] == "-E" => args[i + 1].push_str(",nodiscard"),
            Some(&i) => args[i].push_str(",nodiscard"),
            None => args.extend(["-E".to_owned(), "nodiscard".to_owned()]),
        }
    } else if fstype == "xfs" {
        if !args.iter().any(|a| a == "-K") {
            args.push("-K".to_owned());
        }
    } else if fstype == "btrfs" && !args.iter().any(|a| a == "-K" || a == "--nodiscard") {
        args.push("--nodiscard".to_owned());
    }
    args
}

/// Why mkfs may write to a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatGrant {
    /// The probe must prove the device empty. The only grant there is without a journal.
    Empty,
    /// The volume's format journal says a cps mkfs of `fstype` started on it and never
    /// finished, and nothing can have written to it since (it is mounted only after the
    /// journal says done): its bytes are that mkfs's own. The probe must find nothing but what
    /// such an mkfs writes — zeros, unnamed data, or `fstype`'s own superblocks.
    Unfinished {
        fstype: String,
        /// The UUID that mkfs was giving the filesystem, when the journal knows it: a complete
        /// filesystem counts as its leftover only with that UUID.
        uuid: Option<String>,
    },
}

/// A random (version 4) UUID for a new filesystem.
pub fn new_uuid() -> Result<String, Error> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(Error::io("/dev/urandom", "read"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// ext2, ext3 and ext4 are one family: a half-made ext4 can look like any of them.
fn family(fstype: &str) -> &str {
    if fstype.starts_with("ext") {
        "ext"
    } else {
        fstype
    }
}

/// Whether what the probe found is something an interrupted mkfs of `fstype` (giving the
/// filesystem `uuid`) leaves behind.
pub fn left_by_mkfs(probe: &Probe, fstype: &str, uuid: Option<&str>) -> bool {
    let same = |t: &str| family(t) == family(fstype);
    match probe {
        Probe::Empty => true,
        Probe::Filesystem(fs) => same(&fs.fstype) && uuid.is_some() && fs.uuid.as_deref() == uuid,
        Probe::Refused(Refusal::UnknownData { .. }) => true,
        Probe::Refused(Refusal::BackupSuperblock { fstype: t, .. }) => same(t),
        Probe::Refused(Refusal::HiddenSignature { kind, .. }) => same(kind),
        Probe::Refused(_) => false,
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

/// Probes, checks the grant, re-verifies the device, runs mkfs, verifies the result.
pub(crate) fn make_filesystem(
    device: &Device,
    sys_root: &Path,
    spec: &MkfsSpec,
    grant: &FormatGrant,
) -> Result<Filesystem, Error> {
    check_grant(device, grant)?;
    // The probe's exclusive handle is closed now (mkfs opens the device exclusively itself).
    // Device numbers are reused after a detach and another attach; the serial is not, so it
    // is read again right before mkfs starts.
    probe::check_node(device)?;
    locate::reverify(sys_root, device)?;
    run_mkfs(device, spec)?;

    let expected = spec.fstype();
    let uuid = spec.uuid();
    match probe::probe(device)? {
        Probe::Filesystem(fs) if fs.fstype == expected && (uuid.is_none() || fs.uuid == uuid) => {
            Ok(fs)
        }
        other => Err(Error::MkfsUnverified {
            path: device.path.clone(),
            expected,
            found: describe(&other),
        }),
    }
}

/// Lets mkfs go ahead only on a device the probe proves empty, or on one holding exactly the
/// leftovers of the unfinished mkfs the grant names (whose signatures are erased first).
fn check_grant(device: &Device, grant: &FormatGrant) -> Result<(), Error> {
    match (grant, probe::probe(device)?) {
        (_, Probe::Empty) => Ok(()),
        (FormatGrant::Unfinished { fstype, uuid }, found)
            if left_by_mkfs(&found, fstype, uuid.as_deref()) =>
        {
            tracing::warn!(volume_id = %device.volume_id, device = %device.path.display(), found = %describe(&found), journal = %fstype,
                "the format journal says an earlier mkfs.{fstype} never finished on this volume; its leftovers are mkfs's own, making the filesystem again");
            if !matches!(found, Probe::Refused(Refusal::UnknownData { .. })) {
                // mkfs.xfs and mkfs.btrfs refuse a device with a signature unless forced;
                // erasing the half-made one's signatures is narrower than forcing.
                let out = probe::run("wipefs", &["--all", "--quiet"], device)?;
                if out.code != Some(0) {
                    return Err(out.failure());
                }
            }
            Ok(())
        }
        (_, Probe::Filesystem(fs)) => Err(Error::AlreadyFormatted {
            path: device.path.clone(),
            volume_id: device.volume_id.clone(),
            fstype: fs.fstype,
        }),
        (_, Probe::Refused(refusal)) => Err(Error::Refused {
            path: device.path.clone(),
            volume_id: device.volume_id.clone(),
            refusal,
        }),
    }
}

/// Runs the mkfs command on the device; a non-zero exit is an error carrying its stderr.
fn run_mkfs(device: &Device, spec: &MkfsSpec) -> Result<(), Error> {
    let (program, args) = spec.command();
    tracing::info!(volume_id = %device.volume_id, device = %device.path.display(), command = %format!("{program} {}", args.join(" ")), "making filesystem");
    let out = Command::new(&program)
        .args(&args)
        .arg(&device.path)
        .env("LC_ALL", "C")
        // mke2fs asks before overwriting an existing filesystem only when stdin and stdout
        // are terminals; here they are not, so it would go ahead. The probe above is what
        // protects data, not mkfs (see check_grant).
        .stdin(Stdio::null())
        // Its own process group: a Ctrl-C meant for cps-attach (which stops at its next wait)
        // does not cut mkfs short half-way through the device.
        .process_group(0)
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
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Tool {
        command: format!("{program} {} {}", args.join(" "), device.path.display()),
        status: out
            .status
            .code()
            .map(|c| format!("exit {c}"))
            .unwrap_or_else(|| "killed by a signal".into()),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// A probe result in words, for messages.
pub(crate) fn describe(probe: &Probe) -> String {
    match probe {
        Probe::Empty => "nothing (the device is blank)".to_owned(),
        Probe::Filesystem(fs) => format!(
            "a {} filesystem{}",
            fs.fstype,
            fs.uuid
                .as_deref()
                .map(|u| format!(" (UUID {u})"))
                .unwrap_or_default()
        ),
        Probe::Refused(r) => format!("a device that {r}"),
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

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn mkfs_is_told_not_to_discard_without_shadowing_the_users_options() {
        let cases: [(&str, &[&str], &[&str]); 9] = [
            ("ext4", &["-m", "0"], &["-m", "0", "-E", "nodiscard"]),
            ("ext4", &["-E", "stride=8"], &["-E", "stride=8,nodiscard"]),
            ("ext4", &["-Estride=8"], &["-Estride=8,nodiscard"]),
            ("ext3", &["-E", "discard"], &["-E", "discard"]),
            (
                "ext4",
                &["-E", "a=1", "-E", "nodiscard"],
                &["-E", "a=1", "-E", "nodiscard"],
            ),
            ("xfs", &[], &["-K"]),
            ("xfs", &["-K"], &["-K"]),
            ("btrfs", &["-K"], &["-K"]),
            ("btrfs", &[], &["--nodiscard"]),
        ];
        for (fstype, given, expected) in cases {
            assert_eq!(
                without_discard(fstype, args(given)),
                args(expected),
                "{fstype} {given:?}"
            );
        }
        assert_eq!(
            without_discard("vfat", args(&["-F", "32"])),
            args(&["-F", "32"])
        );
        assert_eq!(
            MkfsSpec::default().command().1,
            args(&["-t", "ext4", "-m", "0", "-E", "nodiscard"])
        );
    }

    #[test]
    fn the_journal_only_explains_what_that_mkfs_writes() {
        let fs = |t: &str, u: &str| {
            Probe::Filesystem(Filesystem {
                fstype: t.into(),
                uuid: Some(u.into()),
                label: None,
            })
        };
        let ours = Some("u-1");
        assert!(left_by_mkfs(&fs("ext2", "u-1"), "ext4", ours));
        assert!(left_by_mkfs(&fs("xfs", "u-1"), "xfs", ours));
        assert!(
            !left_by_mkfs(&fs("xfs", "u-2"), "xfs", ours),
            "somebody else's"
        );
        assert!(
            !left_by_mkfs(&fs("xfs", "u-1"), "xfs", None),
            "unknown: not ours"
        );
        assert!(!left_by_mkfs(&fs("xfs", "u-1"), "ext4", ours));
        let data = Probe::Refused(Refusal::UnknownData { offset: 5 });
        assert!(left_by_mkfs(&data, "xfs", ours));
        let backup = |t: &'static str| {
            Probe::Refused(Refusal::BackupSuperblock {
                fstype: t,
                offset: 0,
                recover: Box::default(),
            })
        };
        assert!(left_by_mkfs(&backup("ext2/3/4"), "ext4", ours));
        assert!(!left_by_mkfs(&backup("btrfs"), "xfs", ours));
        let gpt = Probe::Refused(Refusal::PartitionTable {
            pttype: "gpt".into(),
        });
        assert!(!left_by_mkfs(&gpt, "ext4", ours));
        let luks = Probe::Refused(Refusal::Signature {
            kind: "crypto_LUKS".into(),
            usage: "crypto".into(),
        });
        assert!(!left_by_mkfs(&luks, "xfs", ours));
    }

    #[test]
    fn the_uuid_goes_where_each_mkfs_takes_it_and_the_users_wins() {
        let typed = |t: FsType, options: &[&str]| MkfsSpec::Typed {
            fstype: t,
            label: None,
            options: args(options),
        };
        let u = "0b3c5d0e-1111-4222-8333-444455556666";
        assert_eq!(
            typed(FsType::Ext4, &[]).with_uuid(u).uuid().as_deref(),
            Some(u)
        );
        assert_eq!(
            typed(FsType::Xfs, &["-m", "crc=1"])
                .with_uuid(u)
                .uuid()
                .as_deref(),
            Some(u)
        );
        assert_eq!(
            typed(FsType::Btrfs, &[]).with_uuid(u).uuid().as_deref(),
            Some(u)
        );
        assert_eq!(MkfsSpec::default().with_uuid(u).uuid().as_deref(), Some(u));
        let mine = typed(FsType::Xfs, &["-m", "crc=1,uuid=mine"]);
        assert_eq!(mine.with_uuid(u), mine, "the configured UUID wins");
        assert_eq!(
            typed(FsType::Ext4, &["-Umine"]).uuid().as_deref(),
            Some("mine")
        );
        let vfat = MkfsSpec::Raw {
            args: args(&["-t", "vfat"]),
        };
        assert_eq!(vfat.with_uuid(u), vfat);
        assert_eq!(vfat.uuid(), None);
        let fresh = new_uuid().unwrap();
        assert_eq!((fresh.len(), &fresh[14..15]), (36, "4"));
        assert_ne!(fresh, new_uuid().unwrap());
    }
}
