//! The effective settings in words, as `cps-attach validate` prints them: the same vocabulary
//! as the configuration file, never the program's internal names.

use std::fmt::Write as _;
use std::time::Duration;

use cps_blockdev::{MkfsSpec, Ownership};

use super::{AttachConfig, Identity, NodeOptions, OnFailure, RelocationMode, SnapshotSource};

/// A duration as the configuration writes it (`5m`, `1m30s`, `1500ms`).
pub(crate) fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    let (hours, minutes, rest) = (ms / 3_600_000, ms / 60_000 % 60, ms % 60_000);
    let mut out = String::new();
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    if rest % 1_000 == 0 && rest > 0 {
        let _ = write!(out, "{}s", rest / 1_000);
    } else if rest > 0 {
        let _ = write!(out, "{rest}ms");
    }
    out
}

/// The mkfs command a spec runs, the device left out.
fn mkfs_text(spec: &MkfsSpec) -> String {
    match spec {
        MkfsSpec::Typed {
            fstype,
            label,
            options,
        } => {
            let mut words = vec![format!("mkfs.{fstype}")];
            if let Some(label) = label {
                words.extend(["-L".to_owned(), label.clone()]);
            }
            words.extend(options.iter().cloned());
            words.join(" ")
        }
        MkfsSpec::Raw { args } => format!("mkfs {}", args.join(" ")),
    }
}

fn ownership_text(o: &Ownership) -> String {
    let mut parts = Vec::new();
    if let Some(owner) = &o.owner {
        parts.push(format!("owner {owner}"));
    }
    if let Some(group) = &o.group {
        parts.push(format!("group {group}"));
    }
    if let Some(mode) = o.mode {
        parts.push(format!("mode {mode:04o}"));
    }
    parts.join(", ")
}

impl AttachConfig {
    /// The effective settings, one line each, indented for printing under a heading.
    pub fn summary(&self) -> String {
        let mut lines = Vec::new();
        self.storage_lines(&mut lines);
        node_lines(&self.node, &mut lines);
        lines.iter().map(|l| format!("  {l}\n")).collect()
    }

    /// The volume, its filesystem and mount, and the timeouts.
    fn storage_lines(&self, out: &mut Vec<String>) {
        let mut line = |text: String| out.push(text);
        line(format!("block-device: {}", self.block_device));
        let tags: Vec<String> = self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line(format!("tags: {}", tags.join(", ")));
        let v = &self.volume;
        let mut volume = format!("volume: {} {} GiB", v.volume_type, v.size_gib);
        if let Some(iops) = v.iops {
            let _ = write!(volume, ", {iops} iops");
        }
        if let Some(t) = v.throughput {
            let _ = write!(volume, ", {t} MiB/s");
        }
        match (&v.kms_key_id, v.encrypted) {
            (Some(key), _) => {
                let _ = write!(volume, ", encrypted with KMS key {key}");
            }
            (None, true) => volume.push_str(", encrypted with the AWS-managed key"),
            (None, false) => volume.push_str(", not encrypted"),
        }
        line(format!(
            "{volume} (when one is created; an existing volume is grown to it, never shrunk)"
        ));
        if let Some(source) = &self.restore.source {
            let mut restore = match source {
                SnapshotSource::Id(id) => format!("restore: a created volume starts from {id}"),
                SnapshotSource::Latest { tags, or_empty } => {
                    let of = tags.as_ref().map_or_else(
                        || "the volume's own tags".to_owned(),
                        |t| {
                            t.iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                    );
                    format!(
                        "restore: a created volume starts from the newest completed snapshot tagged {of}{}",
                        if *or_empty {
                            " (empty when there is none)"
                        } else {
                            " (refused when there is none)"
                        }
                    )
                }
            };
            if let Some(rate) = self.restore.initialization_rate {
                let _ = write!(restore, ", filled at {rate} MiB/s");
            }
            line(restore);
        }
        let r = &self.relocation;
        line(match (r.mode, &r.lock_table) {
            (RelocationMode::Snapshot, Some(table)) => format!(
                "relocation: {} is moved here by snapshot, under the lock in DynamoDB table {table} (lease {}); the source is {}",
                match self.node.identity {
                    Identity::NodeId { .. } => "a node's volume only in another zone",
                    Identity::Slot { .. } =>
                        "with no slot to take here, a free slot's volume in another zone",
                    Identity::Pool =>
                        "with no pool volume to take here, a free one in another zone",
                },
                duration_text(r.lease),
                if r.delete_source {
                    "deleted once the copy is attached and verified"
                } else {
                    "retired (tagged cps:retired-by), not deleted"
                }
            ),
            _ => "relocation: never (a volume in another zone is refused or skipped, never moved)"
                .to_owned(),
        });
        line(format!(
            "filesystem: {}, made with `{} DEVICE` (and cps's no-discard and UUID options unless \
             these set them) on an empty device only",
            self.mkfs.fstype(),
            mkfs_text(&self.mkfs)
        ));
        let m = &self.mount;
        let mut mount = format!("mount: {}", m.target.display());
        if !m.options.is_empty() {
            let _ = write!(mount, " with {}", m.options.join(","));
        }
        let own = ownership_text(&m.ownership);
        if !own.is_empty() {
            let _ = write!(mount, "; {own}");
        }
        line(mount);
        if let Some(fstab) = &m.fstab {
            line(format!("persist: an entry in {}", fstab.display()));
        }
        let t = &self.timeouts;
        line(format!(
            "timeouts: create {}, attach {}, device {}, modify {}",
            duration_text(t.create),
            duration_text(t.attach),
            duration_text(t.device),
            duration_text(t.modify)
        ));
    }
}

/// Identity, interface, files, hooks and lifecycle.
// A line per node setting, in the reference's order; splitting it would only scatter them.
fn node_lines(n: &NodeOptions, out: &mut Vec<String>) {
    let mut line = |text: String| out.push(text);
    line(match &n.identity {
        Identity::Pool => "identity: pool (any volume with the tags)".into(),
        Identity::NodeId {
            id: Some(id),
            id_tag,
            ..
        } => format!("identity: node-id {id} ({id_tag}={id} on volume and interface)"),
        Identity::NodeId {
            id: None,
            source_tag,
            id_tag,
        } => format!(
            "identity: node-id from the {source_tag} tag of the instance or its group ({id_tag} on volume and interface)"
        ),
        Identity::Slot { max, id_tag } => {
            format!("identity: slot 1 to {max} ({id_tag} on the volume)")
        }
    });
    if !matches!(n.identity, Identity::Pool) {
        line(format!(
            "release-timeout: {}",
            duration_text(n.release_timeout)
        ));
    }
    if let Some(i) = &n.interface {
        let which = i.id.as_deref().unwrap_or("found by the node's tags");
        line(format!(
            "network interface: {which} at device index {}, within {}",
            i.device_index,
            duration_text(i.timeout)
        ));
    }
    for f in &n.files {
        let own = ownership_text(&f.ownership);
        let content = match &f.secret {
            Some(secret) => format!("read at boot from {secret}"),
            None => format!("{} bytes", f.content.len()),
        };
        line(format!(
            "file: {} ({content}, mode {:04o}{}{})",
            f.path.display(),
            f.mode,
            if own.is_empty() { "" } else { ", " },
            own
        ));
    }
    let h = &n.hooks;
    if let Some(argv) = &h.configure {
        line(format!(
            "hook configure: {} (each run within {})",
            argv.join(" "),
            duration_text(h.run_timeout)
        ));
    }
    if let Some(argv) = &h.health {
        line(format!(
            "hook health: {} (every {} until it passes, for up to {})",
            argv.join(" "),
            duration_text(h.health_interval),
            duration_text(h.health_timeout)
        ));
    }
    if let Some(l) = &n.lifecycle {
        let on_failure = match l.on_failure {
            OnFailure::Abandon => "abandon",
            OnFailure::Leave => "leave",
        };
        let group = l.group.as_deref().unwrap_or("the instance's group");
        line(format!(
            "lifecycle hook: {} of {group} (on failure: {on_failure})",
            l.hook
        ));
    }
    line(format!("env file: {}", n.env_file.display()));
    line(format!(
        "command-timeout: {}",
        duration_text(n.command_timeout)
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_the_file_writes_them() {
        for (ms, text) in [
            (300_000, "5m"),
            (90_000, "1m30s"),
            (1_500, "1500ms"),
            (5_400_000, "1h30m"),
            (3_601_000, "1h1s"),
            (86_400_000, "24h"),
            (61_500, "1m1500ms"),
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(duration_text(d), text);
            assert_eq!(
                super::super::parse_duration(text),
                Some(d),
                "{text} reads back"
            );
        }
    }
}
