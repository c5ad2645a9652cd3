//! Keeping one fstab entry for the mount point, rewritten idempotently.
//!
//! The entry names the filesystem by `UUID=` (kernel names change across boots and instance
//! types) and carries `nofail`, so a boot without the volume (it is attached by cps-attach,
//! after fstab is read) does not drop the machine into emergency mode. Other lines are kept
//! byte for byte; a line for the same mount point or the same UUID is replaced in place.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::Error;

const MARKER: &str = "# cps-attach:";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FstabEntry {
    pub uuid: String,
    pub target: PathBuf,
    pub fstype: String,
    pub options: Vec<String>,
    /// Written in the marker comment so an operator knows where the line came from.
    pub volume_id: String,
}

impl FstabEntry {
    pub fn line(&self) -> String {
        let mut options: Vec<&str> = self
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .filter(|o| !o.is_empty() && *o != "defaults")
            .collect();
        if !options.contains(&"nofail") {
            options.push("nofail");
        }
        let pass = if self.fstype.starts_with("ext") { 2 } else { 0 };
        format!(
            "UUID={} {} {} {} 0 {pass}",
            self.uuid,
            escape(&self.target.to_string_lossy()),
            self.fstype,
            options.join(",")
        )
    }
}

/// fstab fields escape blanks and backslashes as octal.
fn escape(field: &str) -> String {
    field
        .chars()
        .map(|c| match c {
            ' ' => "\\040".to_owned(),
            '\t' => "\\011".to_owned(),
            '\n' => "\\012".to_owned(),
            '\\' => "\\134".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// The fstab text with `entry` in place of any line for its mount point or UUID.
pub(crate) fn rewrite(existing: &str, entry: &FstabEntry) -> String {
    let ours = [format!("{MARKER} {}", entry.volume_id), entry.line()];
    let target = escape(&entry.target.to_string_lossy());
    let uuid = format!("UUID={}", entry.uuid);
    let mut out: Vec<String> = Vec::new();
    let mut placed = false;
    for line in existing.lines() {
        let trimmed = line.trim_start();
        // This volume's marker goes with the entry; another volume's stays with its own line.
        if trimmed == ours[0] {
            continue;
        }
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        let replaced = !trimmed.starts_with('#')
            && fields.len() >= 2
            && (fields[1] == target || fields[0] == uuid);
        if replaced {
            // A marker right above a replaced line belonged to it.
            if out
                .last()
                .is_some_and(|l| l.trim_start().starts_with(MARKER))
            {
                out.pop();
            }
            if !placed {
                out.extend(ours.iter().cloned());
                placed = true;
            }
            continue;
        }
        out.push(line.to_owned());
    }
    if !placed {
        out.extend(ours.iter().cloned());
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

pub(crate) fn ensure_entry(path: &Path, entry: &FstabEntry) -> Result<bool, Error> {
    let existing = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, "read")(e)),
    };
    let wanted = rewrite(&existing, entry);
    if wanted == existing {
        return Ok(false);
    }
    let mode = fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    crate::write_atomically(path, wanted.as_bytes(), mode, &crate::Ownership::default())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> FstabEntry {
        FstabEntry {
            uuid: "1111-2222".into(),
            target: "/var/lib/kafka".into(),
            fstype: "xfs".into(),
            options: vec!["noatime".into()],
            volume_id: "vol-1".into(),
        }
    }

    #[test]
    fn line_has_uuid_nofail_and_pass() {
        assert_eq!(
            entry().line(),
            "UUID=1111-2222 /var/lib/kafka xfs noatime,nofail 0 0"
        );
        let mut e = entry();
        e.fstype = "ext4".into();
        e.options.clear();
        e.target = "/mnt/my data".into();
        assert_eq!(e.line(), "UUID=1111-2222 /mnt/my\\040data ext4 nofail 0 2");
    }

    #[test]
    fn rewrite_is_idempotent_and_keeps_other_lines() {
        let base = "# /etc/fstab\nUUID=root / ext4 defaults 0 1\n";
        let once = rewrite(base, &entry());
        assert!(once.starts_with(base));
        assert_eq!(rewrite(&once, &entry()), once);
    }

    #[test]
    fn an_old_line_for_the_mount_point_is_replaced_in_place() {
        let base = "UUID=root / ext4 defaults 0 1\n/dev/xvdc /var/lib/kafka ext4 defaults 0 2\nUUID=swap none swap sw 0 0\n";
        let out = rewrite(base, &entry());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "UUID=root / ext4 defaults 0 1");
        assert_eq!(lines[1], "# cps-attach: vol-1");
        assert_eq!(lines[2], entry().line());
        assert_eq!(lines[3], "UUID=swap none swap sw 0 0");
        assert_eq!(lines.len(), 4);
    }

    #[test]
    fn two_volumes_keep_their_own_entries_and_markers() {
        let mut logs = entry();
        logs.volume_id = "vol-2".into();
        logs.uuid = "5555".into();
        logs.target = "/var/log/kafka".into();
        let once = rewrite(&rewrite("", &entry()), &logs);
        let twice = rewrite(&rewrite(&once, &entry()), &logs);
        assert_eq!(once, twice, "stable: no rewrite on every boot");
        assert_eq!(once.matches("# cps-attach:").count(), 2, "{once}");
        assert!(
            once.contains("# cps-attach: vol-1\nUUID=1111-2222 "),
            "{once}"
        );
        assert!(once.contains("# cps-attach: vol-2\nUUID=5555 "), "{once}");
    }

    #[test]
    fn ensure_entry_writes_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fstab");
        fs::write(&path, "UUID=root / ext4 defaults 0 1\n").unwrap();
        assert!(ensure_entry(&path, &entry()).unwrap());
        let after = fs::read_to_string(&path).unwrap();
        assert!(!ensure_entry(&path, &entry()).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), after);
        let mut moved = entry();
        moved.uuid = "3333".into();
        assert!(ensure_entry(&path, &moved).unwrap());
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("UUID=3333 ") && !text.contains("UUID=1111-2222"),
            "{text}"
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left behind"
        );
    }
}
