//! The format journal: one tag on the volume that says whether cps's mkfs on it finished.
//!
//! A first boot can be killed anywhere inside mkfs (kill -9, power loss, the group terminating
//! the instance). What mkfs has written by then is not a filesystem and not empty: without a
//! record, every later run must refuse it, and the node never boots again. So the record lives
//! with the volume, in AWS, where it survives the instance:
//!
//! - `cps:filesystem = formatting:<type>:<uuid>` — written before mkfs starts, on a device the
//!   probe proved empty. mkfs may be running or have died; nothing has been mounted, so nothing
//!   but that mkfs wrote to the device.
//! - `cps:filesystem = <type>:<uuid>` — written after the new filesystem is verified, and
//!   before it is mounted. From here on the volume may hold data.
//!
//! A run that finds "formatting" and, on the device, only what that mkfs writes (zeros, unnamed
//! data, that type's backup superblocks, or a filesystem of that type with that UUID) makes the
//! filesystem again. Anything else — no mark, a "made" mark, another UUID, another kind of
//! signature — gets the probe's verdict as before. Because the mark "formatting" is only set on
//! a proven-empty device and the mount only follows the mark "made", the journal never permits
//! formatting a volume that can hold data. The UUID is chosen before mkfs (and given to it), so
//! a filesystem somebody else made by hand on a half-made volume is never mistaken for mkfs's.

use cps_blockdev::{FormatGrant, MkfsSpec, Probe, left_by_mkfs};
use cps_provider::Volume;

/// The tag key of the journal.
pub const TAG: &str = "cps:filesystem";

/// What the journal says about a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Journal {
    /// No mark: the volume predates the journal or was never formatted by cps.
    Blank,
    /// mkfs of `fstype` started and may not have finished.
    Formatting {
        fstype: String,
        uuid: Option<String>,
    },
    /// cps made this filesystem and verified it.
    Made {
        fstype: String,
        uuid: Option<String>,
    },
    /// A value cps did not write. It permits nothing.
    Unreadable(String),
}

impl Journal {
    pub fn of(volume: &Volume) -> Self {
        match volume.tags.get(TAG) {
            None => Self::Blank,
            Some(value) => Self::parse(value),
        }
    }

    pub fn parse(value: &str) -> Self {
        let (formatting, rest) = match value.strip_prefix("formatting:") {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        let mut parts = rest.splitn(2, ':');
        let fstype = parts.next().unwrap_or_default();
        let uuid = parts.next();
        let word = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !word(fstype) || uuid.is_some_and(|u| !word(u)) {
            return Self::Unreadable(value.to_owned());
        }
        let (fstype, uuid) = (fstype.to_owned(), uuid.map(str::to_owned));
        if formatting {
            Self::Formatting { fstype, uuid }
        } else {
            Self::Made { fstype, uuid }
        }
    }

    /// The tag value of this journal entry.
    pub fn value(&self) -> Option<String> {
        let join = |fstype: &str, uuid: &Option<String>| match uuid {
            Some(u) => format!("{fstype}:{u}"),
            None => fstype.to_owned(),
        };
        match self {
            Self::Blank => None,
            Self::Formatting { fstype, uuid } => Some(format!("formatting:{}", join(fstype, uuid))),
            Self::Made { fstype, uuid } => Some(join(fstype, uuid)),
            Self::Unreadable(v) => Some(v.clone()),
        }
    }
}

/// What to do with the device, given what the probe found and what the journal says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A filesystem is there: keep it.
    Keep,
    /// Make the filesystem (the device is blank, or holds an interrupted cps mkfs's leftovers),
    /// giving it `uuid`, under `grant`.
    Make {
        uuid: Option<String>,
        grant: FormatGrant,
    },
    /// Leave the device alone: the journal contradicts the device; the message says how.
    Refuse(String),
    /// Leave the device alone: the probe refused it, and the journal explains nothing.
    ProbeRefused,
}

/// The decision table of the journal (see the module documentation). `spec` is the configured
/// mkfs; `uuid` a fresh UUID for a new filesystem.
pub fn decide(probe: &Probe, journal: &Journal, spec: &MkfsSpec, fresh_uuid: &str) -> Decision {
    let configured = spec.fstype();
    let unfinished = match journal {
        Journal::Formatting { fstype, uuid } if left_by_mkfs(probe, fstype, uuid.as_deref()) => {
            Some((fstype, uuid))
        }
        _ => None,
    };
    match (probe, unfinished) {
        // mkfs started but wrote nothing yet: make it, under the UUID already recorded.
        (Probe::Empty, Some((fstype, uuid))) if *fstype == configured => Decision::Make {
            uuid: uuid.clone().or_else(|| spec.uuid()),
            grant: FormatGrant::Empty,
        },
        (Probe::Empty, _) => match journal {
            Journal::Made { fstype, uuid } => Decision::Refuse(format!(
                "the volume's format journal (tag {TAG}) says cps made a{} {fstype} filesystem on it{}, but the device now reads \
                 blank: its data was erased or it is another volume's copy. cps will not format a volume that held data; \
                 if starting empty is what you want, delete the tag {TAG} from the volume and run cps-attach again",
                if fstype.starts_with(['a', 'e', 'i', 'o', 'u', 'x']) {
                    "n"
                } else {
                    ""
                },
                uuid.as_deref()
                    .map(|u| format!(" (UUID {u})"))
                    .unwrap_or_default(),
            )),
            _ => Decision::Make {
                uuid: spec.uuid().or_else(|| Some(fresh_uuid.to_owned())),
                grant: FormatGrant::Empty,
            },
        },
        (_, Some((fstype, _))) if *fstype != configured => Decision::Refuse(format!(
            "an interrupted mkfs.{fstype} left this volume half-made (tag {TAG} = {}), but the configuration now makes \
             {configured}; set the file-system type back to {fstype} so cps-attach can finish it, or, as nothing was ever \
             mounted from it, delete the tag {TAG} and zero the volume",
            journal.value().unwrap_or_default()
        )),
        (_, Some((fstype, uuid))) => Decision::Make {
            uuid: uuid.clone(),
            grant: FormatGrant::Unfinished {
                fstype: fstype.clone(),
                uuid: uuid.clone(),
            },
        },
        (Probe::Filesystem(_), None) => Decision::Keep,
        (Probe::Refused(_), None) => Decision::ProbeRefused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cps_blockdev::{Filesystem, FsType, Refusal};

    fn xfs() -> MkfsSpec {
        MkfsSpec::Typed {
            fstype: FsType::Xfs,
            label: None,
            options: vec![],
        }
    }

    fn fs(t: &str, u: &str) -> Probe {
        Probe::Filesystem(Filesystem {
            fstype: t.into(),
            uuid: Some(u.into()),
            label: None,
        })
    }

    fn formatting(t: &str, u: &str) -> Journal {
        Journal::Formatting {
            fstype: t.into(),
            uuid: Some(u.into()),
        }
    }

    #[test]
    fn values_round_trip_and_strangers_permit_nothing() {
        for j in [
            formatting("xfs", "0b3c"),
            Journal::Made {
                fstype: "ext4".into(),
                uuid: Some("ab-12".into()),
            },
            Journal::Formatting {
                fstype: "vfat".into(),
                uuid: None,
            },
        ] {
            assert_eq!(Journal::parse(&j.value().unwrap()), j);
        }
        for odd in ["", "formatting:", "xfs:a b", "formatting:x:y:z", "ext4:\n"] {
            assert!(
                matches!(Journal::parse(odd), Journal::Unreadable(_)),
                "{odd:?}"
            );
        }
        let data = Probe::Refused(Refusal::UnknownData { offset: 1 });
        let odd = Journal::Unreadable("formatting".into());
        assert_eq!(decide(&data, &odd, &xfs(), "u"), Decision::ProbeRefused);
    }

    #[test]
    fn the_decision_table() {
        let data = Probe::Refused(Refusal::UnknownData { offset: 1 });
        let gpt = Probe::Refused(Refusal::PartitionTable {
            pttype: "gpt".into(),
        });
        let made = Journal::Made {
            fstype: "xfs".into(),
            uuid: Some("u1".into()),
        };
        let remake = |u: &str| Decision::Make {
            uuid: Some(u.into()),
            grant: FormatGrant::Unfinished {
                fstype: "xfs".into(),
                uuid: Some(u.into()),
            },
        };
        let fresh = Decision::Make {
            uuid: Some("new".into()),
            grant: FormatGrant::Empty,
        };
        // (probe, journal, expected)
        let table: Vec<(Probe, Journal, Decision)> = vec![
            (Probe::Empty, Journal::Blank, fresh.clone()),
            (
                Probe::Empty,
                formatting("xfs", "u1"),
                Decision::Make {
                    uuid: Some("u1".into()),
                    grant: FormatGrant::Empty,
                },
            ),
            (data.clone(), formatting("xfs", "u1"), remake("u1")),
            (fs("xfs", "u1"), formatting("xfs", "u1"), remake("u1")),
            // Somebody made a filesystem by hand on the half-made volume: it is theirs.
            (fs("xfs", "u2"), formatting("xfs", "u1"), Decision::Keep),
            (fs("ext4", "u1"), formatting("xfs", "u1"), Decision::Keep),
            (fs("xfs", "u1"), made.clone(), Decision::Keep),
            (fs("xfs", "u1"), Journal::Blank, Decision::Keep),
            (data.clone(), Journal::Blank, Decision::ProbeRefused),
            (data.clone(), made.clone(), Decision::ProbeRefused),
            (gpt.clone(), formatting("xfs", "u1"), Decision::ProbeRefused),
        ];
        for (probe, journal, expected) in table {
            assert_eq!(
                decide(&probe, &journal, &xfs(), "new"),
                expected,
                "{probe:?} {journal:?}"
            );
        }
        assert!(
            matches!(decide(&Probe::Empty, &made, &xfs(), "new"), Decision::Refuse(m) if m.contains("delete the tag"))
        );
        let ext4 = MkfsSpec::default();
        assert!(
            matches!(decide(&data, &formatting("xfs", "u1"), &ext4, "new"), Decision::Refuse(m) if m.contains("back to xfs"))
        );
    }
}
