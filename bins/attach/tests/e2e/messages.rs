//! What cps-attach says when it cannot do its job: a permanent AWS failure (no credentials, a
//! malformed endpoint) ends the boot at once with a sentence saying what to set, instead of
//! being retried for the command timeout; log colour only for a person at a terminal.

use std::process::{Command, Stdio};
use std::time::Duration;

use cps_fixtures::finish;

use crate::{BIN, bench_with_instance, write_config};

/// The JSON log's error lines.
fn errors(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["level"] == "ERROR")
        .filter_map(|l| l["message"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_the_boot_fails_at_once_saying_what_to_set() {
    let Some((bench, a)) = bench_with_instance().await else {
        return;
    };
    let config = write_config(
        &a,
        "block-provider:\n  aws-ebs:\n    ebs-tags: {cluster: nocreds}\n    size: 1\n",
    );
    // An instance without an IAM role: no keys in the environment, and the SDK's own IMDS
    // lookup (pointed at this instance's metadata service) finds no role there.
    let mut cmd = bench.attach_command(BIN.as_ref(), &a, &config);
    cmd.env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", a.imds.endpoint())
        .env("CPS_LOG_FORMAT", "json")
        .env("CPS_COMMAND_TIMEOUT", "10m");
    let (code, stderr) = finish(&mut cmd, Duration::from_secs(90));
    assert_eq!(code, 4, "the cloud error code:\n{stderr}");
    assert!(!stderr.contains("retrying"), "retried:\n{stderr}");
    let errors = errors(&stderr);
    let message = errors.last().expect("an error line");
    for words in [
        "no usable AWS credentials",
        "instance profile",
        "AWS_ACCESS_KEY_ID",
    ] {
        assert!(message.contains(words), "{words:?} in: {message}");
    }
    assert!(
        message.len() < 1500 && !message.contains("ProviderAttempt {"),
        "no Debug dump: {message}"
    );
    assert!(
        bench
            .volumes_tagged(&crate::tags(&[("cluster", "nocreds")]))
            .await
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_endpoint_fails_the_boot_at_once() {
    let Some((bench, a)) = bench_with_instance().await else {
        return;
    };
    let config = write_config(
        &a,
        "block-provider:\n  aws-ebs:\n    ebs-tags: {cluster: badurl}\n    size: 1\n",
    );
    for endpoint in ["http://[::1", "ftp://127.0.0.1:9"] {
        let mut cmd = bench.attach_command(BIN.as_ref(), &a, &config);
        cmd.env("CPS_AWS_ENDPOINT", endpoint)
            .env("CPS_LOG_FORMAT", "json")
            .env("CPS_COMMAND_TIMEOUT", "10m");
        let (code, stderr) = finish(&mut cmd, Duration::from_secs(90));
        assert_eq!(code, 4, "{endpoint}:\n{stderr}");
        assert!(
            !stderr.contains("retrying"),
            "{endpoint} retried:\n{stderr}"
        );
        let errors = errors(&stderr);
        let message = errors.last().expect("an error line");
        assert!(
            message.contains("cannot reach AWS as configured")
                && message.contains("CPS_AWS_ENDPOINT"),
            "{endpoint}: {message}"
        );
        assert!(
            message.len() < 1500 && !message.contains("headers:"),
            "{endpoint}: no Debug dump: {message}"
        );
    }
}

/// `--log-format text` colours its output only for a terminal, and never with NO_COLOR.
#[test]
fn log_colour_only_on_a_terminal() {
    // A configuration error is logged (not printed) outside `validate`.
    let args = ["--log-format", "text", "-c", "/nonexistent/cps/attach.yml"];
    let plain = Command::new(BIN)
        .args(args)
        .env_remove("NO_COLOR")
        .env_remove("CPS_LOG_FORMAT")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(3), "{text}");
    assert!(
        text.contains("ERROR") && text.contains("cannot read"),
        "{text}"
    );
    assert!(!text.contains('\u{1b}'), "escapes in a pipe: {text:?}");

    let on_terminal = |no_color: Option<&str>| -> String {
        let mut cmd = Command::new("script");
        // script(1) runs the command on a new pseudo-terminal and copies what it writes.
        cmd.args(["-q", "-e", "-c"])
            .arg(format!("{BIN} {}", args.join(" ")))
            .arg("/dev/null")
            .env_remove("CPS_LOG_FORMAT")
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let out = cmd.output().expect("script(1) from util-linux");
        assert_eq!(out.status.code(), Some(3));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_terminal(None);
    assert!(coloured.contains("cannot read"), "{coloured:?}");
    assert!(
        coloured.contains('\u{1b}'),
        "a terminal gets colour: {coloured:?}"
    );
    assert!(!on_terminal(Some("1")).contains('\u{1b}'), "NO_COLOR=1");
    // An empty NO_COLOR does not count (no-color.org).
    assert!(on_terminal(Some("")).contains('\u{1b}'));
}

/// A log reader that went away (`cps-attach … 2>&1 | head`, a restarted journal) costs the
/// log, not the exit code: no panic (101) in place of the documented code.
#[test]
fn a_closed_stderr_keeps_the_exit_code() {
    for args in [
        &["-c", "/nonexistent/cps/attach.yml", "--log-format", "text"][..],
        &["-c", "/nonexistent/cps/attach.yml", "--log-format", "json"],
        &["validate", "-c", "/nonexistent/cps/attach.yml"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let status = Command::new(BIN)
            .args(args)
            .env_remove("CPS_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(writer)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(3), "{args:?}");
    }
}

/// `--version` names version, commit and build date, and every run's first log line says the
/// same, so a boot log names the build that wrote it.
#[test]
fn the_version_names_commit_and_date_and_opens_the_log() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    let version = String::from_utf8(out.stdout).unwrap();
    let rest = version
        .trim_end()
        .strip_prefix(concat!(
            "cps-attach ",
            env!("CARGO_PKG_VERSION"),
            " (commit "
        ))
        .unwrap_or_else(|| panic!("{version:?}"));
    let (commit, date) = rest
        .strip_suffix(')')
        .and_then(|r| r.split_once(", built "))
        .unwrap_or_else(|| panic!("{version:?}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{version:?}"
    );
    assert!(date == "unknown" || date.len() == 10, "{version:?}");

    let run = Command::new(BIN)
        .args(["-c", "/nonexistent/cps/attach.yml", "--log-format", "json"])
        .env_remove("CPS_LOG_FORMAT")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    let first: serde_json::Value = serde_json::from_str(log.lines().next().unwrap_or("")).unwrap();
    let shown = version.trim_end().strip_prefix("cps-attach ").unwrap();
    assert_eq!(first["version"], shown, "{log}");
    assert_eq!(first["message"], version.trim_end(), "{log}");
}
