//! The node part of the configuration: identity mode, network interface, node files, hooks,
//! lifecycle hook, and where the identity environment file goes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine;
use cps_blockdev::Ownership;
use cps_provider::SecretRef;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{
    ConfigError, Int, Origin, Overrides, Source, TagMap, Val, absolute, duration, from_file,
    origin, ownership, pick, rules, shown, tag_map,
};

/// How this instance finds its identity (and with it, its volume and interface).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// Any volume with the tags (the original tool's behaviour); no identity beyond the volume.
    Pool,
    /// One node, named by an id: given here, or read from `source_tag` on the instance or its
    /// Auto Scaling group. The node's volume and interface carry `id_tag = id`.
    NodeId {
        id: Option<String>,
        source_tag: String,
        id_tag: String,
    },
    /// The lowest free slot of a pool of `max` (numbered 1..=max), claimed by attaching its
    /// volume; the number is the identity. Volumes carry `id_tag = slot`.
    Slot { max: u32, id_tag: String },
}

impl Identity {
    pub fn id_tag(&self) -> Option<&str> {
        match self {
            Self::Pool => None,
            Self::NodeId { id_tag, .. } | Self::Slot { id_tag, .. } => Some(id_tag),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceOptions {
    /// A fixed interface id, or `None` to find it by tags.
    pub id: Option<String>,
    /// Tags besides the node's own (cluster tags and id tag).
    pub extra_tags: BTreeMap<String, String>,
    pub device_index: i32,
    /// From attach to the OS showing the interface.
    pub timeout: Duration,
}

/// A node file; `content` may hold `${CPS_…}` placeholders, filled from the identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSpec {
    pub path: PathBuf,
    pub content: Vec<u8>,
    /// `content` came as text and placeholders are filled; base64 content is written as is.
    pub template: bool,
    /// `content-from`: the content is read at boot from the cloud's parameter store or secret
    /// manager (written as is; `content` is empty).
    pub secret: Option<SecretRef>,
    pub mode: u32,
    pub ownership: Ownership,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookOptions {
    pub configure: Option<Vec<String>>,
    pub health: Option<Vec<String>>,
    /// Longest a single run of either hook may take.
    pub run_timeout: Duration,
    /// How long health is retried before the node counts as failed.
    pub health_timeout: Duration,
    /// Pause between failed health runs.
    pub health_interval: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// CompleteLifecycleAction ABANDON: the group replaces the instance at once.
    Abandon,
    /// Leave the instance in Pending:Wait for an operator (the hook's timeout decides later).
    Leave,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleOptions {
    pub hook: String,
    /// `None`: the group the instance is in (DescribeAutoScalingInstances).
    pub group: Option<String>,
    pub on_failure: OnFailure,
    /// `None`: a third of the hook's heartbeat timeout.
    pub heartbeat_interval: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeOptions {
    pub identity: Identity,
    /// How long to wait for another instance to let go of this node's volume or interface.
    pub release_timeout: Duration,
    pub interface: Option<InterfaceOptions>,
    pub files: Vec<FileSpec>,
    pub hooks: HookOptions,
    pub lifecycle: Option<LifecycleOptions>,
    pub env_file: PathBuf,
    /// Where the once-per-boot marker of the configure hook lives.
    pub run_dir: PathBuf,
    /// Overall deadline for retrying one cloud request (throttling, transient failures).
    pub command_timeout: Duration,
}

// ---- the file format ------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct IdentitySection {
    mode: Option<Spanned<String>>,
    node_id: Option<Spanned<String>>,
    node_id_tag: Option<Spanned<String>>,
    id_tag: Option<Spanned<String>>,
    max_slots: Option<Spanned<Int>>,
    release_timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct InterfaceSection {
    id: Option<Spanned<String>>,
    tags: Option<Spanned<TagMap>>,
    device_index: Option<Spanned<Int>>,
    timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct FileEntry {
    path: Spanned<String>,
    content: Option<Spanned<String>>,
    content_base64: Option<Spanned<String>>,
    content_from: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    owner: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct HooksSection {
    configure: Option<Spanned<Vec<String>>>,
    health: Option<Spanned<Vec<String>>>,
    timeout: Option<Spanned<String>>,
    health_timeout: Option<Spanned<String>>,
    health_interval: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct LifecycleSection {
    hook: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    on_failure: Option<Spanned<String>>,
    heartbeat_interval: Option<Spanned<String>>,
}

/// The node sections of the file, as read.
#[derive(Debug, Default)]
pub(super) struct NodeSections {
    pub identity: Option<Spanned<IdentitySection>>,
    pub interface: Option<Spanned<InterfaceSection>>,
    pub files: Option<Spanned<Vec<FileEntry>>>,
    pub hooks: Option<Spanned<HooksSection>>,
    pub lifecycle: Option<Spanned<LifecycleSection>>,
    pub env_file: Option<Spanned<String>>,
    pub run_dir: Option<Spanned<String>>,
    pub command_timeout: Option<Spanned<String>>,
}

/// Whether `id` can be a node id, wherever it comes from (the configuration, or a tag read at
/// boot): it lands in tags, `${CPS_NODE_ID}` and the env file, so a blank one would give many
/// nodes one identity and a newline would add lines to the node's files.
pub fn check_node_id(id: &str) -> Result<(), &'static str> {
    if id.trim().is_empty() {
        Err("must not be empty or only whitespace")
    } else if id.chars().count() > 256 {
        Err("must be at most 256 characters")
    } else if id.chars().any(char::is_control) {
        Err("must not contain control characters (newlines, tabs)")
    } else {
        Ok(())
    }
}

fn tag_key(src: &Source<'_>, v: &Val<String>) -> Result<(), ConfigError> {
    match rules::tag_key_problem(&v.value) {
        Some(problem) => Err(src.at(v, format!("tag key {} {problem}", shown(&v.value)))),
        None => Ok(()),
    }
}

/// A lifecycle hook name as Auto Scaling accepts it: 1–255 of `[A-Za-z0-9-_/]`.
fn check_hook_name(src: &Source<'_>, v: &Val<String>) -> Result<(), ConfigError> {
    if let Some(problem) = rules::text_problem(&v.value, 1, 255) {
        return Err(src.at(v, format!("the lifecycle hook name {problem}")));
    }
    if !v
        .value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/'))
    {
        return Err(src.at(
            v,
            format!(
                "the lifecycle hook name {} may only have letters, digits, -, _ and / (Auto Scaling's rule)",
                shown(&v.value)
            ),
        ));
    }
    Ok(())
}

fn argv(src: &Source<'_>, v: Spanned<Vec<String>>, what: &str) -> Result<Vec<String>, ConfigError> {
    let v = from_file(v);
    if v.value.first().is_none_or(|p| p.trim().is_empty()) {
        return Err(src.at(
            &v,
            format!("{what} must be a command: a list whose first item is the program"),
        ));
    }
    if let Some(i) = v.value.iter().position(|a| a.contains('\0')) {
        return Err(src.at(
            &v,
            format!(
                "{what} argument {} contains a NUL character, which no command line can carry; \
                 remove it",
                i + 1
            ),
        ));
    }
    Ok(v.value)
}

/// The identity variables a boot provides, given the configuration.
pub fn identity_variables(identity: &Identity, interface: bool) -> Vec<&'static str> {
    let mut vars = vec![
        "CPS_INSTANCE_ID",
        "CPS_REGION",
        "CPS_AVAILABILITY_ZONE",
        "CPS_VOLUME_ID",
        "CPS_DEVICE",
        "CPS_MOUNT_PATH",
        "CPS_FILESYSTEM",
    ];
    match identity {
        Identity::Pool => {}
        Identity::NodeId { .. } => vars.push("CPS_NODE_ID"),
        Identity::Slot { .. } => vars.extend(["CPS_NODE_ID", "CPS_SLOT"]),
    }
    if interface {
        vars.extend([
            "CPS_ENI_ID",
            "CPS_ENI_IP",
            "CPS_ENI_MAC",
            "CPS_ENI_INTERFACE",
        ]);
    }
    vars
}

/// A `${CPS_…}` this boot cannot fill would land in the file as written: refuse it now.
fn check_placeholders(
    src: &Source<'_>,
    content: &Val<String>,
    identity: &Identity,
    interface: bool,
) -> Result<(), ConfigError> {
    let known = identity_variables(identity, interface);
    let mut rest = content.value.as_str();
    while let Some(start) = rest.find("${CPS_") {
        let after = &rest[start + 2..];
        let name = after.split('}').next().unwrap_or(after);
        if !known.contains(&name) {
            return Err(src.at(
                content,
                format!(
                    "the placeholder ${{{name}}} has no value in this configuration; available: {}",
                    known.join(", ")
                ),
            ));
        }
        rest = &after[name.len()..];
    }
    Ok(())
}

/// `content-from: ssm:NAME` (a parameter, by name or ARN) or `secretsmanager:ID` (a secret,
/// by name or ARN).
fn secret_ref(src: &Source<'_>, v: &Val<String>) -> Result<SecretRef, ConfigError> {
    let usage = "content-from takes ssm:PARAMETER-NAME-OR-ARN or secretsmanager:SECRET-NAME-OR-ARN";
    let Some((store, name)) = v.value.split_once(':') else {
        return Err(src.at(v, format!("{:?}: {usage}", v.value)));
    };
    let name = name.trim();
    let arn = name.starts_with("arn:");
    let (allowed, secret): (&str, fn(String) -> SecretRef) = match store {
        // Parameter names: letters, digits, `_.-`, `/` for hierarchies.
        "ssm" => ("_.-/", SecretRef::Parameter),
        // Secret names: letters, digits, `/_+=.@-`.
        "secretsmanager" => ("/_+=.@-", SecretRef::Secret),
        other => {
            return Err(src.at(v, format!("{other:?} is not a secret store: {usage}")));
        }
    };
    let bad = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || allowed.contains(*c) || (arn && *c == ':')));
    if name.is_empty() || name.len() > 2048 {
        return Err(src.at(
            v,
            format!("{store}: needs a name or ARN of 1 to 2048 characters"),
        ));
    }
    if let Some(c) = bad {
        return Err(src.at(
            v,
            format!(
                "{name:?} is not a usable {store} name: {c:?} is not allowed (ARNs start with arn:)"
            ),
        ));
    }
    if store == "ssm" && !arn && name.contains('/') && !name.starts_with('/') {
        return Err(src.at(
            v,
            format!("parameter {name:?}: a name with a hierarchy starts with / (/{name})"),
        ));
    }
    Ok(secret(name.to_owned()))
}

// Long on purpose, as the top-level `build`: a block per node setting in the reference's order.
pub(super) fn build(
    src: &Source<'_>,
    s: NodeSections,
    o: &Overrides,
) -> Result<NodeOptions, ConfigError> {
    let whole_file = Origin::File { line: 1, column: 1 };
    let (id_section, id_at) = match s.identity {
        Some(i) => {
            let at = origin(&i);
            (Some(i.value), at)
        }
        None => (None, whole_file),
    };
    let (mode, node_id, node_id_tag, id_tag, max_slots, release) = match id_section {
        Some(i) => (
            i.mode,
            i.node_id,
            i.node_id_tag,
            i.id_tag,
            i.max_slots,
            i.release_timeout,
        ),
        None => (None, None, None, None, None, None),
    };
    let mode = pick(o.identity_mode.clone(), "--identity (CPS_IDENTITY)", mode);
    let node_id = pick(
        o.node_id.clone(),
        "--node-id (CPS_IDENTITY_NODE_ID)",
        node_id,
    );
    let max_slots = src.pick_integer(o.max_slots, "--max-slots (CPS_MAX_SLOTS)", max_slots)?;
    let node_id_tag = node_id_tag.map(from_file);
    let id_tag = id_tag.map(from_file);
    for t in [&node_id_tag, &id_tag].into_iter().flatten() {
        tag_key(src, t)?;
    }
    let mode_name = mode
        .as_ref()
        .map(|m| m.value.as_str())
        .unwrap_or(if node_id.is_some() { "node-id" } else { "pool" });
    let identity = match mode_name {
        "pool" => {
            for (v, key) in [
                (node_id.as_ref().map(|v| &v.origin), "node-id"),
                (max_slots.as_ref().map(|v| &v.origin), "max-slots"),
            ] {
                if let Some(at) = v {
                    return Err(src.error(
                        at,
                        format!("identity.{key} needs identity.mode node-id or slot"),
                    ));
                }
            }
            Identity::Pool
        }
        "node-id" => {
            if let Some(v) = &max_slots {
                return Err(src.at(v, "identity.max-slots goes with mode slot, not node-id"));
            }
            if let Some(v) = &node_id
                && let Err(reason) = check_node_id(&v.value)
            {
                return Err(src.at(v, format!("identity.node-id {reason}")));
            }
            Identity::NodeId {
                id: node_id.map(|v| v.value),
                source_tag: node_id_tag
                    .map(|v| v.value)
                    .unwrap_or_else(|| "cps:node-id".into()),
                id_tag: id_tag
                    .map(|v| v.value)
                    .unwrap_or_else(|| "cps:node-id".into()),
            }
        }
        "slot" => {
            if let Some(v) = &node_id {
                return Err(src.at(v, "identity.node-id goes with mode node-id, not slot"));
            }
            let Some(max) = max_slots else {
                return Err(src.error(
                    &id_at,
                    "identity mode slot needs max-slots: how many slots (nodes) the pool has",
                ));
            };
            if !(1..=10_000).contains(&max.value) {
                return Err(src.at(&max, "identity.max-slots must be between 1 and 10000"));
            }
            Identity::Slot {
                max: max.value as u32,
                id_tag: id_tag.map(|v| v.value).unwrap_or_else(|| "cps:slot".into()),
            }
        }
        other => {
            let at = mode.as_ref().map(|m| m.origin.clone()).unwrap_or(id_at);
            return Err(src.error(
                &at,
                format!(
                    "identity mode {} is not one of pool, node-id, slot",
                    shown(other)
                ),
            ));
        }
    };
    let release_timeout = duration(src, release.map(from_file), Duration::from_secs(600))?;

    let interface = match s.interface {
        None => None,
        Some(section) => {
            let at = origin(&section);
            let i = section.value;
            let id = i.id.map(from_file);
            if id.is_none() && matches!(identity, Identity::Pool) {
                return Err(src.error(
                    &at,
                    "network-interface needs an id, or identity mode node-id or slot to find the node's interface by its tags",
                ));
            }
            if let Some(v) = &id
                && !v.value.starts_with("eni-")
            {
                return Err(src.at(
                    v,
                    format!("{} is not a network interface id (eni-…)", shown(&v.value)),
                ));
            }
            let index = i.device_index.map(|s| src.integer(s)).transpose()?;
            if let Some(v) = &index
                && !(1..=31).contains(&v.value)
            {
                return Err(src.at(v, "network-interface.device-index must be between 1 and 31 (0 is the primary interface)"));
            }
            let extra_tags = match i.tags {
                Some(t) => {
                    let at = origin(&t);
                    let entries = t
                        .value
                        .0
                        .into_iter()
                        .map(|(k, v)| (from_file(k), from_file(v)));
                    tag_map(src, at, entries.collect())?.value
                }
                None => BTreeMap::new(),
            };
            Some(InterfaceOptions {
                id: id.map(|v| v.value),
                extra_tags,
                device_index: index.map(|v| v.value as i32).unwrap_or(1),
                timeout: duration(src, i.timeout.map(from_file), Duration::from_secs(180))?,
            })
        }
    };

    let interface_configured = interface.is_some();
    let mut files = Vec::new();
    if let Some(list) = s.files {
        let mut seen = std::collections::BTreeSet::new();
        for entry in list.value {
            let path = from_file(entry.path);
            if let Some(problem) = rules::path_problem(&path.value) {
                return Err(src.at(&path, format!("file path {} {problem}", shown(&path.value))));
            }
            if path.value.ends_with('/') {
                return Err(src.at(
                    &path,
                    format!(
                        "file path {} must name a file, not a directory",
                        shown(&path.value)
                    ),
                ));
            }
            if !seen.insert(path.value.clone()) {
                return Err(src.at(&path, format!("{} is listed twice", path.value)));
            }
            let mut sources = [
                entry.content.map(|c| ("content", from_file(c))),
                entry
                    .content_base64
                    .map(|b| ("content-base64", from_file(b))),
                entry.content_from.map(|f| ("content-from", from_file(f))),
            ]
            .into_iter()
            .flatten();
            let (content, template, secret) = match (sources.next(), sources.next()) {
                (Some(("content", c)), None) => {
                    check_placeholders(src, &c, &identity, interface_configured)?;
                    (c.value.into_bytes(), true, None)
                }
                (Some(("content-base64", b)), None) => {
                    let compact: String = b.value.split_whitespace().collect();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(compact)
                        .map_err(|e| {
                            src.at(&b, format!("content-base64 is not valid base64: {e}"))
                        })?;
                    (bytes, false, None)
                }
                (Some((_, f)), None) => (Vec::new(), false, Some(secret_ref(src, &f)?)),
                (Some((first, _)), Some((second, v))) => {
                    return Err(src.at(
                        &v,
                        format!("give one of content, content-base64, content-from, not both {first} and {second}"),
                    ));
                }
                (None, _) => {
                    return Err(src.at(
                        &path,
                        "a file needs content, content-base64 or content-from",
                    ));
                }
            };
            let own = ownership(
                src,
                entry.owner.map(from_file),
                entry.group.map(from_file),
                entry.mode.map(from_file),
            )?;
            files.push(FileSpec {
                path: PathBuf::from(path.value),
                content,
                template,
                secret,
                mode: own.mode.unwrap_or(0o644),
                ownership: Ownership { mode: None, ..own },
            });
        }
    }

    let hooks = match s.hooks {
        None => HookOptions {
            configure: None,
            health: None,
            run_timeout: Duration::from_secs(300),
            health_timeout: Duration::from_secs(900),
            health_interval: Duration::from_secs(10),
        },
        Some(h) => {
            let h = h.value;
            HookOptions {
                configure: h
                    .configure
                    .map(|v| argv(src, v, "hooks.configure"))
                    .transpose()?,
                health: h.health.map(|v| argv(src, v, "hooks.health")).transpose()?,
                run_timeout: duration(src, h.timeout.map(from_file), Duration::from_secs(300))?,
                health_timeout: duration(
                    src,
                    h.health_timeout.map(from_file),
                    Duration::from_secs(900),
                )?,
                health_interval: duration(
                    src,
                    h.health_interval.map(from_file),
                    Duration::from_secs(10),
                )?,
            }
        }
    };

    let (hook, group, on_failure, heartbeat) = match s.lifecycle {
        Some(l) => {
            let at = origin(&l);
            let l = l.value;
            (
                Some((l.hook, at)),
                l.group,
                l.on_failure,
                l.heartbeat_interval,
            )
        }
        None => (None, None, None, None),
    };
    let hook_name = match (o.lifecycle_hook.clone(), hook) {
        (Some(name), _) => Some(Val {
            value: name,
            origin: Origin::Flag("--lifecycle-hook (CPS_LIFECYCLE_HOOK)"),
        }),
        (None, Some((Some(h), _))) => Some(from_file(h)),
        (None, Some((None, at))) => {
            return Err(src.error(
                &at,
                "lifecycle needs hook: the name of the group's launching lifecycle hook",
            ));
        }
        (None, None) => None,
    };
    let lifecycle = match hook_name {
        None => None,
        Some(h) => {
            check_hook_name(src, &h)?;
            let group = group.map(from_file);
            if let Some(g) = &group
                && let Some(problem) = rules::text_problem(&g.value, 1, 255)
            {
                return Err(src.at(g, format!("lifecycle.group {problem}")));
            }
            let on_failure = match on_failure.map(from_file) {
                None => OnFailure::Abandon,
                Some(v) if v.value == "abandon" => OnFailure::Abandon,
                Some(v) if v.value == "leave" => OnFailure::Leave,
                Some(v) => {
                    return Err(src.at(
                        &v,
                        format!(
                            "on-failure {} is not one of abandon, leave",
                            shown(&v.value)
                        ),
                    ));
                }
            };
            let heartbeat_interval = match heartbeat.map(from_file) {
                None => None,
                Some(v) => Some(duration(src, Some(v), Duration::ZERO)?),
            };
            Some(LifecycleOptions {
                hook: h.value,
                group: group.map(|g| g.value),
                on_failure,
                heartbeat_interval,
            })
        }
    };

    Ok(NodeOptions {
        identity,
        release_timeout,
        interface,
        files,
        hooks,
        lifecycle,
        env_file: absolute(
            src,
            pick(o.env_file.clone(), "--env-file (CPS_ENV_FILE)", s.env_file),
            "/run/cps/node.env",
        )?,
        run_dir: absolute(
            src,
            pick(o.run_dir.clone(), "--run-dir (CPS_RUN_DIR)", s.run_dir),
            "/run/cps",
        )?,
        command_timeout: duration(
            src,
            pick(
                o.command_timeout.clone(),
                "--command-timeout (CPS_COMMAND_TIMEOUT)",
                s.command_timeout,
            ),
            Duration::from_secs(600),
        )?,
    })
}
