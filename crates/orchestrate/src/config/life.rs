//! The volume's life beyond one boot: where a missing volume is restored from (a snapshot),
//! and whether a node's volume in another zone is moved here (`relocation`).

use std::time::Duration;

use cps_provider::Tags;
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::node::Identity;
use super::{ConfigError, Int, Source, TagMap, Val, duration, from_file, origin, shown, tag_map};

/// Where a volume cps-attach creates gets its content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotSource {
    /// `snapshot-id`: this snapshot.
    Id(String),
    /// `snapshot: latest` (or `restore-if-missing`): the newest completed snapshot carrying
    /// `tags` (the volume's own tags when `None`). With `or_empty`, none found means a new,
    /// empty volume; without, a refusal.
    Latest { tags: Option<Tags>, or_empty: bool },
}

/// Restoring a missing volume from a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restore {
    pub source: Option<SnapshotSource>,
    /// MiB/s at which a restored volume is filled from its snapshot (CreateVolume's
    /// VolumeInitializationRate); `None` leaves it to EBS.
    pub initialization_rate: Option<i32>,
}

/// What happens to a node's volume found only in another zone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelocationMode {
    /// Refuse (exit 9), as EBS attaches within a zone only.
    #[default]
    Never,
    /// Snapshot it, make a copy here from the snapshot, retire the source.
    Snapshot,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relocation {
    pub mode: RelocationMode,
    /// The DynamoDB table holding the relocation lock.
    pub lock_table: Option<String>,
    /// Delete the source once the copy is attached here and its filesystem verified.
    pub delete_source: bool,
    /// How long the lock is held between renewals.
    pub lease: Duration,
    /// How long the snapshot of the source may take to complete.
    pub snapshot_timeout: Duration,
    /// Slot mode: how long a slot free in another zone is left to that zone's own booting
    /// servers before one here moves it.
    pub grace: Duration,
}

impl Default for Relocation {
    fn default() -> Self {
        Self {
            mode: RelocationMode::Never,
            lock_table: None,
            delete_source: false,
            lease: Duration::from_secs(60),
            snapshot_timeout: Duration::from_secs(3600),
            grace: Duration::from_secs(120),
        }
    }
}

/// The restore keys of `block-provider.aws-ebs`, as written.
#[derive(Debug, Default)]
pub(super) struct RestoreKeys {
    pub(super) snapshot_id: Option<Spanned<String>>,
    pub(super) snapshot: Option<Spanned<String>>,
    pub(super) snapshot_tags: Option<Spanned<TagMap>>,
    pub(super) restore_if_missing: Option<Spanned<bool>>,
    pub(super) initialization_rate: Option<Spanned<Int>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RelocationSection {
    mode: Option<Spanned<String>>,
    lock_table: Option<Spanned<String>>,
    delete_source: Option<Spanned<bool>>,
    lease: Option<Spanned<String>>,
    snapshot_timeout: Option<Spanned<String>>,
    grace: Option<Spanned<String>>,
}

/// A snapshot id as EC2 writes them.
fn is_snapshot_id(id: &str) -> bool {
    id.strip_prefix("snap-").is_some_and(|hex| {
        (8..=17).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

pub(super) fn build_restore(
    src: &Source<'_>,
    keys: RestoreKeys,
    identity: &Identity,
) -> Result<Restore, ConfigError> {
    let id = keys.snapshot_id.map(from_file);
    let latest = keys.snapshot.map(from_file);
    let or_empty = keys.restore_if_missing.map(from_file);
    if let Some(id) = &id
        && !is_snapshot_id(&id.value)
    {
        return Err(src.at(
            id,
            format!(
                "snapshot-id {} is not a snapshot id (snap- and 8 or 17 hex digits)",
                shown(&id.value)
            ),
        ));
    }
    if let Some(l) = &latest
        && l.value != "latest"
    {
        return Err(src.at(
            l,
            format!(
                "snapshot is {}; the one value is `latest` (for a given snapshot, use snapshot-id)",
                shown(&l.value)
            ),
        ));
    }
    if let (Some(_), Some(l)) = (&id, &latest) {
        return Err(src.at(l, "snapshot-id and snapshot: latest are both set; keep one"));
    }
    let or_empty = match or_empty {
        Some(v) if v.value && latest.is_some() => {
            return Err(src.at(
                &v,
                "snapshot: latest restores every volume cps-attach creates, and refuses when no snapshot is found; \
                 restore-if-missing is the same but starts empty then: keep one of them",
            ));
        }
        Some(v) if v.value && id.is_some() => {
            return Err(src.at(
                &v,
                "restore-if-missing restores from the newest snapshot of the node; with snapshot-id set, remove one of them",
            ));
        }
        Some(v) if v.value && *identity == Identity::Pool => {
            return Err(src.at(
                &v,
                "restore-if-missing needs a node identity (identity.mode node-id or slot): a pool volume has no node to restore",
            ));
        }
        Some(v) => v.value,
        None => false,
    };
    let tags = snapshot_tags(src, keys.snapshot_tags, latest.is_some() || or_empty)?;
    let source = match (id, latest.is_some() || or_empty) {
        (Some(id), _) => Some(SnapshotSource::Id(id.value)),
        (None, true) => Some(SnapshotSource::Latest { tags, or_empty }),
        (None, false) => None,
    };
    let initialization_rate = initialization_rate(src, keys.initialization_rate, source.is_some())?;
    Ok(Restore {
        source,
        initialization_rate,
    })
}

/// `snapshot-tags`, which only `snapshot: latest` and `restore-if-missing` read.
fn snapshot_tags(
    src: &Source<'_>,
    tags: Option<Spanned<TagMap>>,
    chosen_by_latest: bool,
) -> Result<Option<Tags>, ConfigError> {
    Ok(match tags {
        None => None,
        Some(t) if !chosen_by_latest => {
            return Err(src.error(
                &origin(&t),
                "snapshot-tags choose the snapshot for `snapshot: latest` or restore-if-missing; set one of them, or remove snapshot-tags",
            ));
        }
        Some(t) => {
            let at = origin(&t);
            let entries = t
                .value
                .0
                .into_iter()
                .map(|(k, v)| (from_file(k), from_file(v)))
                .collect();
            let tags = tag_map(src, at, entries)?;
            if tags.value.is_empty() {
                return Err(src.at(
                    &tags,
                    "snapshot-tags is empty; it would match every snapshot of the account",
                ));
            }
            Some(tags.value)
        }
    })
}

/// `initialization-rate`: MiB/s within EBS's range, and only for a restored volume.
fn initialization_rate(
    src: &Source<'_>,
    rate: Option<Spanned<Int>>,
    restoring: bool,
) -> Result<Option<i32>, ConfigError> {
    Ok(match rate {
        None => None,
        Some(r) => {
            let r = src.integer(r)?;
            if !restoring {
                return Err(src.at(&r, "initialization-rate applies to a volume restored from a snapshot; set snapshot-id, snapshot or restore-if-missing"));
            }
            if !(100..=300).contains(&r.value) {
                return Err(src.at(
                    &r,
                    format!(
                        "initialization-rate {} MiB/s is outside what EBS allows (100–300)",
                        r.value
                    ),
                ));
            }
            Some(r.value as i32)
        }
    })
}

/// The `relocation` section (a node's, a slot's or a pool's volume in another zone is moved).
pub(super) fn build_relocation(
    src: &Source<'_>,
    section: Option<Spanned<RelocationSection>>,
) -> Result<Relocation, ConfigError> {
    let defaults = Relocation::default();
    let Some(section) = section else {
        return Ok(defaults);
    };
    let at = origin(&section);
    let s = section.value;
    let mode = match s.mode.map(from_file) {
        None => RelocationMode::Never,
        Some(m) if m.value == "never" => RelocationMode::Never,
        Some(m) if m.value == "snapshot" => RelocationMode::Snapshot,
        Some(m) => {
            return Err(src.at(
                &m,
                format!(
                    "relocation.mode is {}; one of never, snapshot",
                    shown(&m.value)
                ),
            ));
        }
    };
    let lock_table = s.lock_table.map(from_file);
    if let Some(t) = &lock_table
        && !is_table_name(&t.value)
    {
        return Err(src.at(
            t,
            format!(
                "lock-table {} is not a DynamoDB table name (3–255 of a-z, A-Z, 0-9, _ - .)",
                shown(&t.value)
            ),
        ));
    }
    if mode == RelocationMode::Snapshot && lock_table.is_none() {
        return Err(src.error(
            &at,
            "relocation.mode snapshot needs relocation.lock-table: the DynamoDB table whose lock makes sure one agent moves a volume",
        ));
    }
    let delete_source: Option<Val<bool>> = s.delete_source.map(from_file);
    Ok(Relocation {
        mode,
        lock_table: lock_table.map(|t| t.value),
        delete_source: delete_source.is_some_and(|d| d.value),
        lease: duration(src, s.lease.map(from_file), defaults.lease)?,
        snapshot_timeout: duration(
            src,
            s.snapshot_timeout.map(from_file),
            defaults.snapshot_timeout,
        )?,
        grace: duration(src, s.grace.map(from_file), defaults.grace)?,
    })
}

fn is_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}
