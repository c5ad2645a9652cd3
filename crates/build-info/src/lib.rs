//! Called from the binaries' build scripts: sets `CPS_GIT_COMMIT` and `CPS_BUILD_DATE` for
//! `env!`, so `--version` and the first log line name what was built; the binaries' code reads
//! them through [`version!`].
//!
//! - commit: `$CPS_GIT_COMMIT` if set (a build from a tarball that knows its commit), else
//!   `git rev-parse` of the source tree, else `unknown` (no `.git`, no git).
//! - date: `$SOURCE_DATE_EPOCH` if set (reproducible builds), else the commit's date, else
//!   `unknown` — never the clock, so two builds of one commit are byte for byte the same.

use std::path::Path;
use std::process::Command;

/// The version line (`0.1.0 (commit 0123abcd4567, built 2026-12-01)`) of the package that
/// expands it: `env!` reads that package's version and what its build script set with [`emit`].
#[macro_export]
macro_rules! version {
    () => {
        concat!(
            env!("CARGO_PKG_VERSION"),
            " (commit ",
            env!("CPS_GIT_COMMIT"),
            ", built ",
            env!("CPS_BUILD_DATE"),
            ")"
        )
    };
}

/// Prints the `cargo:` lines for the package whose build script calls it.
pub fn emit() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let dir = Path::new(&dir);
    println!("cargo:rerun-if-env-changed=CPS_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    if let Some(git_dir) = git(dir, &["rev-parse", "--absolute-git-dir"]) {
        // A new commit moves HEAD or the branch it names (loose or packed).
        for f in ["HEAD", "packed-refs"] {
            println!("cargo:rerun-if-changed={git_dir}/{f}");
        }
        if let Some(reference) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
            let common = git(dir, &["rev-parse", "--git-common-dir"]).unwrap_or(git_dir.clone());
            let common = dir.join(common);
            println!(
                "cargo:rerun-if-changed={}",
                common.join(reference).display()
            );
        }
    }
    let commit = std::env::var("CPS_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(dir, &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| git(dir, &["log", "-1", "--format=%ct"]))
        .and_then(|s| s.trim().parse::<i64>().ok());
    let date = epoch.map_or_else(|| "unknown".into(), utc_date);
    println!("cargo:rustc-env=CPS_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=CPS_BUILD_DATE={date}");
}

/// A git command's trimmed output, if git is there and it succeeded.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// `YYYY-MM-DD` (UTC) of a Unix time; the civil-from-days algorithm, to need no crate.
pub fn utc_date(epoch: i64) -> String {
    let z = epoch.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::utc_date;

    #[test]
    fn dates_from_unix_time() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_796_169_599), "2026-12-01");
        assert_eq!(utc_date(1_796_169_600), "2026-12-02");
        assert_eq!(utc_date(4_107_542_400), "2100-03-01");
    }
}
