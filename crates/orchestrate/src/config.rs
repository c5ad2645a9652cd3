//! The cps-attach configuration: the original tool's YAML format, extended in the same style,
//! with command-line / environment overrides.
//!
//! Parsing is strict (unknown keys, wrong types and duplicate keys are errors) and every error
//! names where the bad value came from: `file:line:column` with the offending line, or the flag
//! and environment variable that set it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cps_blockdev::{FsType, MkfsSpec, Ownership};
use cps_provider::Tags;
use serde::Deserialize;
use serde_saphyr::Spanned;

/// Where the agent looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/cps/attach.yml";

/// Volume types EBS offers, with their size limits in GiB.
const VOLUME_TYPES: [(&str, i64, i64); 7] = [
    ("gp3", 1, 65_536),
    ("gp2", 1, 16_384),
    ("io2", 4, 65_536),
    ("io1", 4, 16_384),
    ("st1", 125, 16_384),
    ("sc1", 125, 16_384),
    ("standard", 1, 1_024),
];

/// A validated configuration, defaults applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachConfig {
    /// The device name requested from EC2 (`/dev/xvdc`).
    pub block_device: String,
    /// Every volume carrying all these tags is the node's (or the pool's); new ones get them.
    pub tags: Tags,
    pub volume: VolumeOptions,
    pub mkfs: MkfsSpec,
    pub mount: MountOptions,
    pub timeouts: Timeouts,
    /// Where device nodes and `disk/by-id` links live (`/dev`).
    pub device_root: PathBuf,
    /// Where sysfs is mounted (`/sys`); serials are read from `block/<dev>/device/serial`.
    pub sysfs_root: PathBuf,
    /// Identity, interface, files, hooks and lifecycle.
    pub node: NodeOptions,
    /// Where a volume cps-attach creates gets its content.
    pub restore: Restore,
    /// What happens to a node's volume found only in another zone.
    pub relocation: Relocation,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeOptions {
    pub volume_type: String,
    /// The type was set (in the file or an override), not defaulted: only then is an existing
    /// volume of another type converted.
    pub type_configured: bool,
    pub size_gib: i32,
    pub iops: Option<i32>,
    pub throughput: Option<i32>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub target: PathBuf,
    pub options: Vec<String>,
    pub ownership: Ownership,
    /// `Some(path)`: keep an fstab entry in that file.
    pub fstab: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From CreateVolume until the volume is available.
    pub create: Duration,
    /// From AttachVolume until EC2 reports the attachment attached.
    pub attach: Duration,
    /// From attached until the kernel device appears and verifies; also from a volume's
    /// modification until the device shows its new size.
    pub device: Duration,
    /// From ModifyVolume until the modification is `optimizing` (the new size usable).
    pub modify: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            create: Duration::from_secs(300),
            attach: Duration::from_secs(180),
            device: Duration::from_secs(120),
            modify: Duration::from_secs(300),
        }
    }
}

/// Values given on the command line or in `CPS_*` variables; each wins over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub block_device: Option<String>,
    /// Replaces the file's tags entirely when not empty.
    pub tags: Vec<(String, String)>,
    pub volume_type: Option<String>,
    pub size: Option<i64>,
    pub iops: Option<i64>,
    pub throughput: Option<i64>,
    pub encrypted: Option<bool>,
    pub kms_key_id: Option<String>,
    /// Raw `mkfs` arguments; replace the whole file-system section.
    pub mkfs_args: Option<Vec<String>>,
    pub fs_type: Option<String>,
    pub fs_label: Option<String>,
    pub fs_options: Option<Vec<String>>,
    pub mount_target: Option<String>,
    pub mount_options: Option<Vec<String>>,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub mode: Option<String>,
    pub persist: Option<String>,
    pub fstab: Option<String>,
    pub create_timeout: Option<String>,
    pub attach_timeout: Option<String>,
    pub device_timeout: Option<String>,
    pub modify_timeout: Option<String>,
    pub device_root: Option<String>,
    pub sysfs_root: Option<String>,
    /// `pool`, `node-id` or `slot`.
    pub identity_mode: Option<String>,
    pub node_id: Option<String>,
    pub max_slots: Option<i64>,
    pub lifecycle_hook: Option<String>,
    pub env_file: Option<String>,
    pub run_dir: Option<String>,
    pub command_timeout: Option<String>,
}

/// A configuration that cannot be used, and where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the configuration: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `at` is `file:line:column` or `--flag (CPS_VAR)`; `snippet` shows the line.
    #[error("{at}: {message}{}", snippet.as_deref().map(|s| format!("\n{s}")).unwrap_or_default())]
    Invalid {
        at: String,
        message: String,
        snippet: Option<String>,
    },
}

// ---- the file format ------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    block_device: Option<Spanned<String>>,
    block_provider: Option<Spanned<BlockProvider>>,
    file_system: Option<Spanned<FileSystem>>,
    mount: Option<Spanned<Mount>>,
    timeouts: Option<TimeoutsSection>,
    device_root: Option<Spanned<String>>,
    sysfs_root: Option<Spanned<String>>,
    identity: Option<Spanned<node::IdentitySection>>,
    network_interface: Option<Spanned<node::InterfaceSection>>,
    files: Option<Spanned<Vec<node::FileEntry>>>,
    hooks: Option<Spanned<node::HooksSection>>,
    lifecycle: Option<Spanned<node::LifecycleSection>>,
    env_file: Option<Spanned<String>>,
    run_dir: Option<Spanned<String>>,
    command_timeout: Option<Spanned<String>>,
    relocation: Option<Spanned<life::RelocationSection>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct BlockProvider {
    aws_ebs: Option<Spanned<AwsEbs>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct AwsEbs {
    ebs_tags: Option<Spanned<TagMap>>,
    #[serde(rename = "type")]
    volume_type: Option<Spanned<String>>,
    size: Option<Spanned<Int>>,
    iops: Option<Spanned<Int>>,
    throughput: Option<Spanned<Int>>,
    encrypted: Option<Spanned<bool>>,
    kms_key_id: Option<Spanned<String>>,
    snapshot_id: Option<Spanned<String>>,
    snapshot: Option<Spanned<String>>,
    snapshot_tags: Option<Spanned<TagMap>>,
    restore_if_missing: Option<Spanned<bool>>,
    initialization_rate: Option<Spanned<Int>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileSystem {
    mkfs: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(rename = "type")]
    fs_type: Option<Spanned<String>>,
    label: Option<Spanned<String>>,
    options: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Mount {
    target: Option<Spanned<String>>,
    options: Option<Spanned<OptionList>>,
    owner: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    persist: Option<Spanned<String>>,
    fstab: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct TimeoutsSection {
    create: Option<Spanned<String>>,
    attach: Option<Spanned<String>>,
    device: Option<Spanned<String>>,
    modify: Option<Spanned<String>>,
}

/// Mount options as a list (`[noatime, discard]`) or one comma-separated string.
#[derive(Debug)]
struct OptionList(Vec<String>);

impl<'de> Deserialize<'de> for OptionList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OptionList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of mount options or a comma-separated string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OptionList, E> {
                Ok(OptionList(split_commas(v)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OptionList, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    out.extend(split_commas(&item));
                }
                Ok(OptionList(out))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// An integer as written: read as text, so that the one integer rule (`rules::integer`) can
/// judge its spelling rather than the YAML parser's wider reading.
#[derive(Debug)]
struct Int(String);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Int, E> {
                Ok(Int(v.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.to_string()))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// A tag map as written, each key and value with its position (a plain map would lose them).
#[derive(Debug, Default)]
struct TagMap(Vec<(Spanned<String>, Spanned<String>)>);

impl<'de> Deserialize<'de> for TagMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TagMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of tag keys to values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<TagMap, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(TagMap(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

fn split_commas(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(String::from)
        .collect()
}

// ---- origins: where a value came from, for error messages -----------------------------------

#[derive(Clone, Debug)]
enum Origin {
    File { line: u64, column: u64 },
    Flag(&'static str),
}

struct Val<T> {
    value: T,
    origin: Origin,
}

fn origin<T>(s: &Spanned<T>) -> Origin {
    Origin::File {
        line: s.referenced.line(),
        column: s.referenced.column(),
    }
}

fn from_file<T>(s: Spanned<T>) -> Val<T> {
    Val {
        origin: origin(&s),
        value: s.value,
    }
}

/// The override if given, else the file's value.
fn pick<T>(flag: Option<T>, name: &'static str, file: Option<Spanned<T>>) -> Option<Val<T>> {
    match flag {
        Some(value) => Some(Val {
            value,
            origin: Origin::Flag(name),
        }),
        None => file.map(from_file),
    }
}

struct Source<'a> {
    name: String,
    text: &'a str,
    /// No file was there: settings come from flags and variables alone.
    missing: bool,
}

impl Source<'_> {
    fn error(&self, origin: &Origin, message: impl Into<String>) -> ConfigError {
        match *origin {
            Origin::File { .. } if self.missing => ConfigError::Invalid {
                at: format!(
                    "{} (no such file; settings from flags and CPS_* only)",
                    self.name
                ),
                message: capped(message.into()),
                snippet: None,
            },
            Origin::File { line, column } => ConfigError::Invalid {
                at: format!("{}:{line}:{column}", self.name),
                message: capped(message.into()),
                snippet: snippet(self.text, line, column),
            },
            Origin::Flag(flag) => ConfigError::Invalid {
                at: flag.to_owned(),
                message: capped(message.into()),
                snippet: None,
            },
        }
    }

    /// A file's integer, held to the one integer rule (`rules::integer`) as it is written
    /// where it is defined (an alias's anchor), quotes included.
    fn integer(&self, s: Spanned<Int>) -> Result<Val<i64>, ConfigError> {
        let span = s.defined.span();
        let raw = span
            .byte_offset()
            .zip(span.byte_len())
            .and_then(|(at, len)| {
                let at = usize::try_from(at).ok()?;
                self.text
                    .get(at..at.checked_add(usize::try_from(len).ok()?)?)
            });
        match rules::integer(raw.unwrap_or(&s.value.0)) {
            Ok(value) => Ok(Val {
                value,
                origin: origin(&s),
            }),
            Err(problem) => Err(self.error(&origin(&s), problem)),
        }
    }

    /// The override if given, else the file's integer (checked).
    fn pick_integer(
        &self,
        flag: Option<i64>,
        name: &'static str,
        file: Option<Spanned<Int>>,
    ) -> Result<Option<Val<i64>>, ConfigError> {
        match flag {
            Some(value) => Ok(Some(Val {
                value,
                origin: Origin::Flag(name),
            })),
            None => file.map(|s| self.integer(s)).transpose(),
        }
    }

    fn at<T>(&self, val: &Val<T>, message: impl Into<String>) -> ConfigError {
        self.error(&val.origin, message)
    }
}

/// The longest message shown; longer ones (a huge value quoted by the YAML parser) lose their
/// middle, keeping the start (what is wrong) and the end (what to do).
const MAX_MESSAGE: usize = 600;

fn capped(message: String) -> String {
    let count = message.chars().count();
    if count <= MAX_MESSAGE {
        return message;
    }
    let head: String = message.chars().take(MAX_MESSAGE / 2).collect();
    let tail: String = message.chars().skip(count - MAX_MESSAGE / 3).collect();
    format!(
        "{head}… ({} characters left out) …{tail}",
        count - MAX_MESSAGE / 2 - MAX_MESSAGE / 3
    )
}

/// The parser quotes what it found (`unknown field `…``, `invalid type: string "…"`); a quoted
/// part longer than a line is cut, so the rest of the message (what was expected) survives.
fn shorten_quoted(message: &str) -> String {
    const LONGEST: usize = 80;
    let mut out = String::with_capacity(message.len().min(4 * MAX_MESSAGE));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = &rest[open..=open];
        let Some(len) = rest[open + 1..].find(quote) else {
            break;
        };
        let inner = &rest[open + 1..open + 1 + len];
        out.push_str(&rest[..=open]);
        let count = inner.chars().count();
        if count > LONGEST {
            out.extend(inner.chars().take(LONGEST - 20));
            out.push_str(&format!("… ({count} characters)"));
        } else {
            out.push_str(inner);
        }
        out.push_str(quote);
        rest = &rest[open + 2 + len..];
    }
    out.push_str(rest);
    out
}

/// Characters of the source line shown before and after the column.
const SNIPPET_BEFORE: usize = 40;
const SNIPPET_AFTER: usize = 60;

/// The source line with a caret under the column: a window around the column when the line is
/// long, control characters shown as `?` (one character each, so the caret stays in place).
fn snippet(text: &str, line: u64, column: u64) -> Option<String> {
    let source_line = text
        .lines()
        .nth(usize::try_from(line).ok()?.checked_sub(1)?)?;
    let col = usize::try_from(column.saturating_sub(1)).ok()?;
    let start = col.saturating_sub(SNIPPET_BEFORE);
    let mut shown: String = source_line
        .chars()
        .skip(start)
        .take(SNIPPET_BEFORE + SNIPPET_AFTER)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    let mut pad = col - start;
    if start > 0 {
        shown.insert(0, '…');
        pad += 1;
    }
    if source_line
        .chars()
        .nth(start + SNIPPET_BEFORE + SNIPPET_AFTER)
        .is_some()
    {
        shown.push('…');
    }
    let width = line.to_string().len();
    Some(format!(
        "{:width$} |\n{line} | {shown}\n{:width$} | {}^",
        "",
        "",
        " ".repeat(pad)
    ))
}

/// The file's bytes as text, or where they stop being UTF-8 (byte offset, line and column),
/// with a hint when they look like UTF-16 (what some Windows editors save).
fn decode(name: &str, bytes: Vec<u8>) -> Result<String, ConfigError> {
    let looks_utf16 = bytes.starts_with(&[0xff, 0xfe])
        || bytes.starts_with(&[0xfe, 0xff])
        || bytes.iter().take(64).filter(|&&b| b == 0).count() >= 4;
    let bytes = match String::from_utf8(bytes) {
        Ok(text) if !looks_utf16 && !text.contains('\0') => return Ok(text),
        Ok(text) => text.into_bytes(),
        Err(e) => e.into_bytes(),
    };
    let offset = match std::str::from_utf8(&bytes) {
        Err(e) => e.valid_up_to(),
        Ok(text) => text.find('\0').unwrap_or(0),
    };
    let prefix = String::from_utf8_lossy(&bytes[..offset]);
    let line = prefix.matches('\n').count() as u64 + 1;
    let column = prefix.rsplit('\n').next().unwrap_or("").chars().count() as u64 + 1;
    let what = match bytes.get(offset) {
        _ if looks_utf16 => "the file is UTF-16 text, not UTF-8".to_owned(),
        Some(0) => format!("the file is not text: it has a NUL byte at offset {offset}"),
        Some(b) => format!(
            "the file is not UTF-8 text: byte 0x{b:02x} at offset {offset} is not valid UTF-8"
        ),
        None => "the file is not UTF-8 text".to_owned(),
    };
    let lossy = String::from_utf8_lossy(&bytes);
    Err(ConfigError::Invalid {
        at: format!("{name}:{line}:{column}"),
        message: format!("{what}; save it as UTF-8"),
        snippet: snippet(&lossy, line, column),
    })
}

/// The YAML parser's messages, with its resource limits said in words rather than as the
/// parser's internal names.
struct Words;

impl serde_saphyr::MessageFormatter for Words {
    fn format_message<'a>(&self, err: &'a serde_saphyr::Error) -> std::borrow::Cow<'a, str> {
        use serde_saphyr::budget::BudgetBreach as B;
        if let serde_saphyr::Error::DuplicateMappingKey { key, .. } = err {
            // YAML would keep one of the two silently; which one the user meant is theirs to say.
            return std::borrow::Cow::Owned(match key {
                Some(k) => format!("`{k}` is given twice in the same section; keep one"),
                None => "a key is given twice in the same section; keep one".to_owned(),
            });
        }
        let serde_saphyr::Error::Budget { breach, .. } = err else {
            return serde_saphyr::DefaultMessageFormatter.format_message(err);
        };
        let what = match breach {
            B::ScalarBytes { .. } | B::InputBytes { .. } | B::RecordedAnchorBytes { .. } => {
                "it holds more text than the parser allows (an alias counts each time it is used)"
            }
            B::Aliases { .. } | B::AliasAnchorRatio { .. } | B::RecordedAnchorEvents { .. } => {
                "it uses aliases (*name) more often than the parser allows"
            }
            B::Depth { .. } => "it nests deeper than the parser allows",
            B::Documents { .. } => "it holds more documents than the parser allows",
            _ => "it has more values than the parser allows",
        };
        std::borrow::Cow::Owned(format!(
            "the YAML document is too large: {what}; a configuration is a few kilobytes, so look \
             for an alias repeated by mistake or a file pasted into a value"
        ))
    }
}

// ---- loading --------------------------------------------------------------------------------

impl AttachConfig {
    /// Reads `path` and applies `overrides`. A missing file is an error when `required`;
    /// otherwise the configuration comes from the overrides alone.
    pub fn load(path: &Path, required: bool, overrides: &Overrides) -> Result<Self, ConfigError> {
        let (text, missing) = match std::fs::read(path) {
            Ok(bytes) => (decode(&path.display().to_string(), bytes)?, false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                (String::new(), true)
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let source = Source {
            name: path.display().to_string(),
            text: &text,
            missing,
        };
        source.parse(overrides)
    }

    /// Parses `text` (named `name` in errors) and applies `overrides`.
    pub fn parse(name: &str, text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        Source {
            name: name.to_owned(),
            text,
            missing: false,
        }
        .parse(overrides)
    }
}

impl Source<'_> {
    fn parse(&self, overrides: &Overrides) -> Result<AttachConfig, ConfigError> {
        let (source, text) = (self, self.text);
        let file: FileConfig = if text.trim().is_empty() {
            FileConfig::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| {
                let (line, column) = e
                    .location()
                    .map(|l| (l.line(), l.column()))
                    .unwrap_or((1, 1));
                let plain = e.render_with_options(serde_saphyr::render_options! {
                    formatter: &Words,
                    snippets: serde_saphyr::SnippetMode::Off,
                });
                let suffix = format!(" at line {line}, column {column}");
                let message = shorten_quoted(plain.strip_suffix(&suffix).unwrap_or(&plain));
                source.error(&Origin::File { line, column }, message)
            })?
        };
        build(source, file, overrides)
    }
}

/// The file's values (with command-line overrides) checked and turned into the settings.
// Long on purpose: one straight pass, a block per setting in the order of the reference
// (docs/configuration.md), each with its rule and its error position; split, the reader would
// lose that order.
fn build(src: &Source<'_>, file: FileConfig, o: &Overrides) -> Result<AttachConfig, ConfigError> {
    let whole_file = Origin::File { line: 1, column: 1 };

    let block_device = match pick(
        o.block_device.clone(),
        "--block-device (CPS_BLOCK_DEVICE)",
        file.block_device,
    ) {
        Some(v) => {
            if !is_data_device_name(&v.value) {
                return Err(src.at(&v, format!(
                    "block-device {} is not an EC2 name for a data volume; use /dev/sd[b-z], /dev/xvd[b-z] \
                     or /dev/xvd[b-c][a-z] (like /dev/xvdc or /dev/sdf; sda and xvda are the root disk)",
                    shown(&v.value)
                )));
            }
            v.value
        }
        None => "/dev/xvdc".to_owned(),
    };

    // block-provider.aws-ebs
    let (ebs, ebs_origin) = match file.block_provider {
        Some(bp) => {
            let at = origin(&bp);
            match bp.value.aws_ebs {
                Some(ebs) => {
                    let at = origin(&ebs);
                    (Some(ebs.value), at)
                }
                None => {
                    return Err(src.error(
                        &at,
                        "block-provider needs an aws-ebs section (the only provider)",
                    ));
                }
            }
        }
        None => (None, whole_file.clone()),
    };
    let mut ebs = ebs.unwrap_or(AwsEbs {
        ebs_tags: None,
        volume_type: None,
        size: None,
        iops: None,
        throughput: None,
        encrypted: None,
        kms_key_id: None,
        snapshot_id: None,
        snapshot: None,
        snapshot_tags: None,
        restore_if_missing: None,
        initialization_rate: None,
    });
    let restore_keys = life::RestoreKeys {
        snapshot_id: ebs.snapshot_id.take(),
        snapshot: ebs.snapshot.take(),
        snapshot_tags: ebs.snapshot_tags.take(),
        restore_if_missing: ebs.restore_if_missing.take(),
        initialization_rate: ebs.initialization_rate.take(),
    };

    let tags = match ebs.ebs_tags.take() {
        _ if !o.tags.is_empty() => {
            let flag = Origin::Flag("--tag (CPS_TAGS)");
            let entries = o.tags.iter().map(|(k, v)| {
                let val = |value: &String| Val {
                    value: value.clone(),
                    origin: flag.clone(),
                };
                (val(k), val(v))
            });
            tag_map(src, flag.clone(), entries.collect())?
        }
        Some(t) => {
            let at = origin(&t);
            let entries = t
                .value
                .0
                .into_iter()
                .map(|(k, v)| (from_file(k), from_file(v)));
            tag_map(src, at, entries.collect())?
        }
        None => {
            return Err(src.error(
                &ebs_origin,
                "block-provider.aws-ebs.ebs-tags is required: the tags that identify this node's volume \
                 (or --tag KEY=VALUE / CPS_TAGS)",
            ));
        }
    };
    if tags.value.is_empty() {
        return Err(src.at(
            &tags,
            "ebs-tags must name at least one tag, or every volume in the account would match",
        ));
    }

    let volume_type = pick(
        o.volume_type.clone(),
        "--volume-type (CPS_VOLUME_TYPE)",
        ebs.volume_type.take(),
    );
    let (type_name, min_size, max_size) = match &volume_type {
        Some(v) => *VOLUME_TYPES
            .iter()
            .find(|(t, _, _)| *t == v.value)
            .ok_or_else(|| {
                src.at(
                    v,
                    format!(
                        "unknown volume type {}; one of {}",
                        shown(&v.value),
                        VOLUME_TYPES.map(|t| t.0).join(", ")
                    ),
                )
            })?,
        None => VOLUME_TYPES[0],
    };
    let size = src.pick_integer(o.size, "--size (CPS_SIZE)", ebs.size.take())?.ok_or_else(|| {
        src.error(
            &ebs_origin,
            "block-provider.aws-ebs.size is required: the size in GiB of a volume created when none can be claimed \
             (or --size / CPS_SIZE)",
        )
    })?;
    if !(min_size..=max_size).contains(&size.value) {
        return Err(src.at(
            &size,
            format!(
                "size {} GiB is outside what {type_name} allows ({min_size}–{max_size} GiB)",
                size.value
            ),
        ));
    }
    let iops = src.pick_integer(o.iops, "--iops (CPS_IOPS)", ebs.iops.take())?;
    match (&iops, type_name) {
        (None, "io1" | "io2") => {
            return Err(src.error(
                volume_type
                    .as_ref()
                    .map(|v| &v.origin)
                    .unwrap_or(&ebs_origin),
                format!("{type_name} volumes need iops"),
            ));
        }
        (Some(v), "gp3") if !(3_000..=80_000).contains(&v.value) => {
            return Err(src.at(v, "gp3 iops must be between 3000 and 80000"));
        }
        (Some(v), "io1" | "io2") if !(100..=256_000).contains(&v.value) => {
            return Err(src.at(
                v,
                format!("{type_name} iops must be between 100 and 256000"),
            ));
        }
        (Some(v), t) if !matches!(t, "gp3" | "io1" | "io2") => {
            return Err(src.at(
                v,
                format!("iops can only be set for gp3, io1 and io2 volumes, not {t}"),
            ));
        }
        _ => {}
    }
    let throughput = src.pick_integer(
        o.throughput,
        "--throughput (CPS_THROUGHPUT)",
        ebs.throughput.take(),
    )?;
    if let Some(v) = &throughput {
        if type_name != "gp3" {
            return Err(src.at(
                v,
                format!("throughput can only be set for gp3 volumes, not {type_name}"),
            ));
        }
        if !(125..=2_000).contains(&v.value) {
            return Err(src.at(v, "gp3 throughput must be between 125 and 2000 MiB/s"));
        }
    }
    let encrypted = pick(
        o.encrypted,
        "--encrypted (CPS_ENCRYPTED)",
        ebs.encrypted.take(),
    );
    let kms_key_id = pick(
        o.kms_key_id.clone(),
        "--kms-key-id (CPS_KMS_KEY_ID)",
        ebs.kms_key_id.take(),
    );
    if let (Some(enc), Some(kms)) = (&encrypted, &kms_key_id)
        && !enc.value
    {
        return Err(src.at(
            kms,
            "kms-key-id is set but encrypted is false; remove one of them",
        ));
    }
    if let Some(kms) = &kms_key_id
        && let Some(problem) = rules::kms_key_problem(&kms.value)
    {
        return Err(src.at(kms, format!("kms-key-id {problem}")));
    }

    let volume = VolumeOptions {
        volume_type: type_name.to_owned(),
        type_configured: volume_type.is_some(),
        size_gib: i32::try_from(size.value).map_err(|_| src.at(&size, "size is too large"))?,
        iops: iops.map(|v| v.value as i32),
        throughput: throughput.map(|v| v.value as i32),
        encrypted: encrypted.map(|v| v.value).unwrap_or(true),
        kms_key_id: kms_key_id.map(|v| v.value),
    };

    let mkfs = build_mkfs(src, file.file_system, o)?;
    let mount = build_mount(src, file.mount, o)?;

    let t = file.timeouts;
    let (t_create, t_attach, t_device, t_modify) = match t {
        Some(t) => (t.create, t.attach, t.device, t.modify),
        None => (None, None, None, None),
    };
    let defaults = Timeouts::default();
    let timeouts = Timeouts {
        create: duration(
            src,
            pick(
                o.create_timeout.clone(),
                "--create-timeout (CPS_CREATE_TIMEOUT)",
                t_create,
            ),
            defaults.create,
        )?,
        attach: duration(
            src,
            pick(
                o.attach_timeout.clone(),
                "--attach-timeout (CPS_ATTACH_TIMEOUT)",
                t_attach,
            ),
            defaults.attach,
        )?,
        device: duration(
            src,
            pick(
                o.device_timeout.clone(),
                "--device-timeout (CPS_DEVICE_TIMEOUT)",
                t_device,
            ),
            defaults.device,
        )?,
        modify: duration(
            src,
            pick(
                o.modify_timeout.clone(),
                "--modify-timeout (CPS_MODIFY_TIMEOUT)",
                t_modify,
            ),
            defaults.modify,
        )?,
    };

    let device_root = absolute(
        src,
        pick(
            o.device_root.clone(),
            "--device-root (CPS_DEVICE_ROOT)",
            file.device_root,
        ),
        "/dev",
    )?;
    let sysfs_root = absolute(
        src,
        pick(
            o.sysfs_root.clone(),
            "--sysfs-root (CPS_SYSFS_ROOT)",
            file.sysfs_root,
        ),
        "/sys",
    )?;

    let node = node::build(
        src,
        node::NodeSections {
            identity: file.identity,
            interface: file.network_interface,
            files: file.files,
            hooks: file.hooks,
            lifecycle: file.lifecycle,
            env_file: file.env_file,
            run_dir: file.run_dir,
            command_timeout: file.command_timeout,
        },
        o,
    )?;
    if let Some(key) = node.identity.id_tag() {
        if tags.value.contains_key(key) {
            return Err(src.at(
                &tags,
                format!(
                    "ebs-tags must not contain the identity tag {}: cps-attach sets it per node",
                    shown(key)
                ),
            ));
        }
        if tags.value.len() >= rules::MAX_TAGS {
            return Err(src.at(
                &tags,
                format!(
                    "ebs-tags has {} tags plus the identity tag {} that cps-attach adds; AWS allows \
                     {} on a volume: remove {}",
                    tags.value.len(),
                    shown(key),
                    rules::MAX_TAGS,
                    tags.value.len() + 1 - rules::MAX_TAGS
                ),
            ));
        }
    }

    let restore = life::build_restore(src, restore_keys, &node.identity)?;
    let relocation = life::build_relocation(src, file.relocation)?;

    Ok(AttachConfig {
        block_device,
        tags: tags.value,
        volume,
        mkfs,
        mount,
        timeouts,
        device_root,
        sysfs_root,
        node,
        restore,
        relocation,
    })
}

/// The names EC2 accepts for an EBS data volume on Linux (not the root disk's `a`).
pub(crate) fn is_data_device_name(name: &str) -> bool {
    let letter = |c: u8| (b'b'..=b'z').contains(&c);
    match name.strip_prefix("/dev/").map(str::as_bytes) {
        Some([b's', b'd', l]) => letter(*l),
        Some([b'x', b'v', b'd', l]) => letter(*l),
        Some([b'x', b'v', b'd', l1, l2]) => matches!(l1, b'b' | b'c') && l2.is_ascii_lowercase(),
        _ => false,
    }
}

/// Tags as given (a file's map or `--tag` flags), each key and value held to AWS's rules, at
/// most 50 of them, no key twice.
fn tag_map(
    src: &Source<'_>,
    at: Origin,
    entries: Vec<(Val<String>, Val<String>)>,
) -> Result<Val<Tags>, ConfigError> {
    let mut tags = Tags::new();
    let count = entries.len();
    for (key, value) in entries {
        if let Some(problem) = rules::tag_key_problem(&key.value) {
            return Err(src.at(&key, format!("tag key {} {problem}", shown(&key.value))));
        }
        if let Some(problem) = rules::tag_value_problem(&value.value) {
            return Err(src.at(
                &value,
                format!("the value of tag {} {problem}", shown(&key.value)),
            ));
        }
        if tags.insert(key.value.clone(), value.value).is_some() {
            return Err(src.at(
                &key,
                format!("tag key {} is given twice", shown(&key.value)),
            ));
        }
    }
    if count > rules::MAX_TAGS {
        return Err(src.error(
            &at,
            format!(
                "{count} tags; AWS allows {} on a resource: remove {}",
                rules::MAX_TAGS,
                count - rules::MAX_TAGS
            ),
        ));
    }
    Ok(Val {
        value: tags,
        origin: at,
    })
}

/// mkfs arguments as given, each with where it came from.
struct Args {
    origin: Origin,
    items: Vec<Val<String>>,
}

impl Args {
    fn from_flag(values: &[String], flag: &'static str) -> Self {
        Self {
            origin: Origin::Flag(flag),
            items: values
                .iter()
                .map(|v| Val {
                    value: v.clone(),
                    origin: Origin::Flag(flag),
                })
                .collect(),
        }
    }

    fn from_file(list: Spanned<Vec<Spanned<String>>>) -> Self {
        Self {
            origin: origin(&list),
            items: list.value.into_iter().map(from_file).collect(),
        }
    }

    fn values(&self) -> Vec<String> {
        self.items.iter().map(|v| v.value.clone()).collect()
    }

    /// The error of `mkfs::check`, at the argument it is about.
    fn refuse(&self, src: &Source<'_>, p: mkfs_args::Problem) -> ConfigError {
        let at = self.items.get(p.index).map_or(&self.origin, |v| &v.origin);
        src.error(at, p.message)
    }
}

/// The `filesystem` section as the mkfs to run, its arguments checked.
// Long on purpose: one block per way of writing the filesystem (type and options, or raw
// arguments), each with its own refusals next to it.
fn build_mkfs(
    src: &Source<'_>,
    fs: Option<Spanned<FileSystem>>,
    o: &Overrides,
) -> Result<MkfsSpec, ConfigError> {
    let (file_raw, file_type, file_label, file_options) = match fs.map(|s| s.value) {
        Some(s) => (s.mkfs, s.fs_type, s.label, s.options),
        None => (None, None, None, None),
    };
    let typed_flags = o.fs_type.is_some() || o.fs_label.is_some() || o.fs_options.is_some();
    // Flags replace the file's file-system section: raw arguments replace it all, typed flags
    // replace the file's raw arguments.
    if let Some(args) = &o.mkfs_args {
        let raw = Args::from_flag(args, "--mkfs-arg (CPS_MKFS_ARGS)");
        if typed_flags {
            return Err(src.error(
                &raw.origin,
                "raw mkfs arguments and --fs-type/--fs-label/--fs-option are alternatives; give one",
            ));
        }
        return raw_spec(src, raw);
    }
    let fs_type = pick(o.fs_type.clone(), "--fs-type (CPS_FS_TYPE)", file_type);
    let label = pick(o.fs_label.clone(), "--fs-label (CPS_FS_LABEL)", file_label);
    let options = match &o.fs_options {
        Some(values) => Some(Args::from_flag(values, "--fs-option (CPS_FS_OPTIONS)")),
        None => file_options.map(Args::from_file),
    };

    if let Some(raw) = file_raw
        && !typed_flags
    {
        if let Some(v) = &fs_type {
            return Err(src.at(
                v,
                "file-system.mkfs and file-system.type are alternatives; keep one",
            ));
        }
        if let Some(v) = &label {
            return Err(src.at(v, "file-system.label goes with file-system.type, not with mkfs; put -L in the mkfs list"));
        }
        if let Some(v) = &options {
            return Err(src.error(
                &v.origin,
                "file-system.options goes with file-system.type, not with mkfs",
            ));
        }
        return raw_spec(src, Args::from_file(raw));
    }

    let Some(fs_type) = fs_type else {
        if let Some(l) = &label {
            return Err(src.at(l, "a label needs file-system.type (ext4, xfs or btrfs)"));
        }
        if let Some(v) = &options {
            return Err(src.error(&v.origin, "file-system.options needs file-system.type"));
        }
        return Ok(MkfsSpec::default());
    };
    let parsed = FsType::parse(&fs_type.value).ok_or_else(|| {
        src.at(
            &fs_type,
            format!(
                "unknown filesystem type {}; one of ext4, xfs, btrfs (or give raw mkfs arguments)",
                shown(&fs_type.value)
            ),
        )
    })?;
    if let Some(l) = &label {
        if let Some(problem) = rules::text_problem(&l.value, 1, usize::MAX) {
            return Err(src.at(l, format!("the label {problem}")));
        }
        if l.value.len() > parsed.max_label_len() {
            return Err(src.at(
                l,
                format!(
                    "a {parsed} label must be 1 to {} bytes (it has {})",
                    parsed.max_label_len(),
                    l.value.len()
                ),
            ));
        }
    }
    let options = match options {
        Some(args) => {
            if let Some(family) = mkfs_args::Family::of(parsed.name()) {
                let indexed: Vec<(usize, &str)> = args
                    .items
                    .iter()
                    .map(|v| v.value.as_str())
                    .enumerate()
                    .collect();
                mkfs_args::check(family, &indexed).map_err(|p| args.refuse(src, p))?;
            }
            args.values()
        }
        None => Vec::new(),
    };
    Ok(MkfsSpec::Typed {
        fstype: parsed,
        label: label.map(|l| l.value),
        options,
    })
}

/// Raw `mkfs` arguments, as the original format has them.
fn raw_spec(src: &Source<'_>, raw: Args) -> Result<MkfsSpec, ConfigError> {
    if raw.items.is_empty() {
        return Err(src.error(
            &raw.origin,
            "the mkfs argument list is empty; remove it to get the default (-t ext4 -m 0)",
        ));
    }
    let spec = MkfsSpec::Raw { args: raw.values() };
    mkfs_args::check_raw(&raw.values(), &spec.fstype()).map_err(|p| raw.refuse(src, p))?;
    Ok(spec)
}

/// The `mount` section: target, options, owner, fstab.
// A block per setting, as in `build`.
fn build_mount(
    src: &Source<'_>,
    mount: Option<Spanned<Mount>>,
    o: &Overrides,
) -> Result<MountOptions, ConfigError> {
    let m = mount.map(|m| m.value);
    let (target, options, owner, group, mode, persist, fstab) = match m {
        Some(m) => (
            m.target, m.options, m.owner, m.group, m.mode, m.persist, m.fstab,
        ),
        None => (None, None, None, None, None, None, None),
    };
    let target = match pick(
        o.mount_target.clone(),
        "--mount-target (CPS_MOUNT_TARGET)",
        target,
    ) {
        Some(v) => {
            if let Some(problem) = rules::path_problem(&v.value) {
                return Err(src.at(&v, format!("mount.target {} {problem}", shown(&v.value))));
            }
            let path = PathBuf::from(&v.value);
            if path == Path::new("/") {
                return Err(src.at(
                    &v,
                    "mount.target must be a directory other than /: the volume is mounted there",
                ));
            }
            path
        }
        None => PathBuf::from("/mnt"),
    };
    let options = match (o.mount_options.clone(), options) {
        (Some(list), _) => Val {
            value: list.iter().flat_map(|s| split_commas(s)).collect(),
            origin: Origin::Flag("--mount-option (CPS_MOUNT_OPTIONS)"),
        },
        (None, Some(list)) => Val {
            origin: origin(&list),
            value: list.value.0,
        },
        (None, None) => Val {
            value: Vec::new(),
            origin: Origin::File { line: 1, column: 1 },
        },
    };
    for option in &options.value {
        if let Some(problem) = rules::mount_option_problem(option) {
            return Err(src.at(
                &options,
                format!("mount option {} {problem}", shown(option)),
            ));
        }
    }
    let options = options.value;
    let ownership = ownership(
        src,
        pick(o.owner.clone(), "--owner (CPS_OWNER)", owner),
        pick(o.group.clone(), "--group (CPS_GROUP)", group),
        pick(o.mode.clone(), "--mode (CPS_MODE)", mode),
    )?;
    let persist = pick(o.persist.clone(), "--persist (CPS_PERSIST)", persist);
    let fstab_path = pick(o.fstab.clone(), "--fstab (CPS_FSTAB)", fstab);
    let fstab = match persist.as_ref().map(|v| v.value.as_str()) {
        Some("fstab") => Some(match fstab_path {
            Some(v) => match rules::path_problem(&v.value) {
                None => PathBuf::from(v.value),
                Some(problem) => {
                    return Err(src.at(&v, format!("mount.fstab {} {problem}", shown(&v.value))));
                }
            },
            None => PathBuf::from("/etc/fstab"),
        }),
        Some("none") | None => {
            if let Some(v) = fstab_path {
                return Err(src.at(&v, "mount.fstab is only used with persist: fstab"));
            }
            None
        }
        Some(other) => {
            let v = persist.as_ref().expect("matched Some");
            return Err(src.at(
                v,
                format!("persist {} is not one of fstab, none", shown(other)),
            ));
        }
    };
    Ok(MountOptions {
        target,
        options,
        ownership,
        fstab,
    })
}

/// Owner and group (names or numbers) and an octal mode, checked.
fn ownership(
    src: &Source<'_>,
    owner: Option<Val<String>>,
    group: Option<Val<String>>,
    mode: Option<Val<String>>,
) -> Result<Ownership, ConfigError> {
    for v in [&owner, &group].into_iter().flatten() {
        if let Some(problem) = rules::text_problem(&v.value, 1, 256) {
            return Err(src.at(v, format!("the user or group name {problem}")));
        }
        if v.value.trim().is_empty() || v.value.contains([':', ' ']) {
            return Err(src.at(
                v,
                format!("{} is not a user or group name or number", shown(&v.value)),
            ));
        }
    }
    let mode = match mode {
        Some(v) => {
            let digits = v.value.trim_start_matches("0o");
            match u32::from_str_radix(digits, 8) {
                Ok(m) if m <= 0o7777 && !digits.is_empty() => Some(m),
                _ => {
                    return Err(src.at(
                        &v,
                        format!(
                            "mode {} is not an octal permission like \"0750\"",
                            shown(&v.value)
                        ),
                    ));
                }
            }
        }
        None => None,
    };
    Ok(Ownership {
        owner: owner.map(|v| v.value),
        group: group.map(|v| v.value),
        mode,
    })
}

fn duration(
    src: &Source<'_>,
    v: Option<Val<String>>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    const HOW: &str = "write it like 90s, 3m or 1m30s (a bare number is seconds)";
    let Some(v) = v else {
        return Ok(default);
    };
    match rules::parse_duration(&v.value) {
        Ok(d) if (rules::MIN_DURATION..=rules::MAX_DURATION).contains(&d) => Ok(d),
        Ok(_) => Err(src.at(
            &v,
            format!(
                "{} is not a duration between 1s and 24h; {HOW}",
                shown(&v.value)
            ),
        )),
        Err(e) => Err(src.at(
            &v,
            format!(
                "{} is not a duration: {}; {HOW}, between 1s and 24h",
                shown(&v.value),
                e.hint()
            ),
        )),
    }
}

/// `90` (seconds), `90s`, `1500ms`, `3m`, `1h`, `1m30s`: the one duration syntax of cps (units
/// largest first, each once). Range checks are the caller's.
pub fn parse_duration(text: &str) -> Option<Duration> {
    rules::parse_duration(text).ok()
}

fn absolute(
    src: &Source<'_>,
    v: Option<Val<String>>,
    default: &str,
) -> Result<PathBuf, ConfigError> {
    match v {
        None => Ok(PathBuf::from(default)),
        Some(v) => match rules::path_problem(&v.value) {
            None => Ok(PathBuf::from(v.value)),
            Some(problem) => Err(src.at(&v, format!("{} {problem}", shown(&v.value)))),
        },
    }
}

mod life;
mod mkfs_args;
mod node;
mod rules;
mod summary;

pub(crate) use rules::shown;
pub(crate) use summary::duration_text;

pub use life::{Relocation, RelocationMode, Restore, SnapshotSource};
pub use node::{
    FileSpec, HookOptions, Identity, InterfaceOptions, LifecycleOptions, NodeOptions, OnFailure,
    check_node_id,
};

#[cfg(test)]
mod tests;
