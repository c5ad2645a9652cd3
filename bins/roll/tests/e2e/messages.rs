//! What cps-roll says when it cannot work: no credentials, a malformed endpoint, a region that
//! does not exist end the command at once with a sentence saying what to set (exit 5) instead
//! of being retried for minutes; log colour only for a person at a terminal.

use std::process::{Command, Stdio};
use std::time::Duration;

use cps_fixtures::finish;
use cps_testbed::{Bench, BenchOptions};

use super::{BIN, TIER};

/// The last ERROR line's text.
fn error_line(stderr: &str) -> String {
    stderr
        .lines()
        .rfind(|l| l.contains("ERROR"))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn without_credentials_the_roll_fails_at_once_saying_what_to_set() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).expect("bench");
    for args in [
        &["plan", "--cluster", "nocreds"][..],
        &["run", "--cluster", "nocreds", "--timeout", "10m"],
        &["abandon", "--asg", "nocreds-node-1"],
    ] {
        // An operator's machine with no keys, no profile and no instance metadata.
        let mut cmd = bench.roll_command(BIN.as_ref());
        cmd.args(args)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("NO_COLOR", "1");
        let (code, stderr) = finish(&mut cmd, Duration::from_secs(90));
        assert_eq!(code, 5, "{args:?}: the AWS error code:\n{stderr}");
        assert!(!stderr.contains("retrying"), "{args:?} retried:\n{stderr}");
        let line = error_line(&stderr);
        for words in [
            "no usable AWS credentials",
            "AWS_ACCESS_KEY_ID",
            "AWS_PROFILE",
        ] {
            assert!(line.contains(words), "{args:?}: {words:?} in: {line}");
        }
        assert!(
            line.len() < 1500 && !line.contains("ProviderAttempt {"),
            "{args:?}: no Debug dump: {line}"
        );
    }
}

#[test]
fn a_bad_endpoint_or_region_fails_the_roll_at_once() {
    if !cps_testbed::ready(TIER) {
        return;
    }
    let bench = Bench::start(BenchOptions::default()).expect("bench");
    for (flag, value) in [
        ("--aws-endpoint", "http://[::1"),
        ("--aws-endpoint", "ftp://127.0.0.1:9"),
        ("--region", "not a region"),
        // No such region: its host name does not exist (no request is sent anywhere).
        ("--region", "us-nowhere-1"),
    ] {
        let mut cmd = bench.roll_command(BIN.as_ref());
        if flag == "--region" {
            cmd.env_remove("CPS_AWS_ENDPOINT");
        }
        cmd.args(["plan", "--cluster", "badurl", flag, value])
            .env("NO_COLOR", "1");
        let (code, stderr) = finish(&mut cmd, Duration::from_secs(90));
        assert_eq!(code, 5, "{flag} {value}:\n{stderr}");
        assert!(
            !stderr.contains("retrying"),
            "{flag} {value} retried:\n{stderr}"
        );
        let line = error_line(&stderr);
        assert!(
            line.contains("cannot reach AWS as configured") && line.contains("--region"),
            "{flag} {value}: {line}"
        );
        assert!(
            line.len() < 1500 && !line.contains("headers:"),
            "{flag} {value}: no Debug dump: {line}"
        );
    }
}

/// `--log-format text` colours its output only for a terminal, and never with NO_COLOR.
#[test]
fn log_colour_only_on_a_terminal() {
    // Without a region the command stops before any request, with an error line.
    let args = ["plan", "--asg", "x", "--log-format", "text"];
    let plain = Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(2), "{text}");
    assert!(text.contains("no region"), "{text}");
    assert!(!text.contains('\u{1b}'), "escapes in a pipe: {text:?}");

    let on_terminal = |no_color: Option<&str>| -> String {
        let mut cmd = Command::new("script");
        // script(1) runs the command on a new pseudo-terminal and copies what it writes.
        cmd.args(["-q", "-e", "-c"])
            .arg(format!("{BIN} {}", args.join(" ")))
            .arg("/dev/null")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let out = cmd.output().expect("script(1) from util-linux");
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_terminal(None);
    assert!(coloured.contains("no region"), "{coloured:?}");
    assert!(
        coloured.contains('\u{1b}'),
        "a terminal gets colour: {coloured:?}"
    );
    assert!(!on_terminal(Some("1")).contains('\u{1b}'), "NO_COLOR=1");
    assert!(
        on_terminal(Some("")).contains('\u{1b}'),
        "an empty NO_COLOR does not count"
    );
}

/// A log reader that went away (`cps-roll … 2>&1 | head`) costs the log, not the exit code: no
/// panic (101) in place of the documented code.
#[test]
fn a_closed_stderr_keeps_the_exit_code() {
    for format in ["text", "json"] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let status = Command::new(BIN)
            .args(["plan", "--asg", "x", "--log-format", format])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdout(Stdio::null())
            .stderr(writer)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(2), "{format}: the usage error's code");
    }
}
