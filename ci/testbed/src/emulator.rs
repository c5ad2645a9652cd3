//! The AWS emulator process (moto plus the patch layer in `ci/emulator/cps_emulator.py`).

use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};

/// Region every bench instance lives in.
pub const REGION: &str = "us-east-1";

/// The repository root (the bench runs from a checkout).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The venv ci/setup creates: `CPS_EMULATOR_VENV`, else `~/.cache/cps-bench/moto-5.2.5`.
pub fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("CPS_EMULATOR_VENV") {
        return PathBuf::from(v);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(".cache")
        });
    cache.join("cps-bench/moto-5.2.5")
}

pub fn python() -> PathBuf {
    venv().join("bin/python")
}

/// Simulated durations of EC2 state changes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Delays {
    pub attach: Duration,
    pub create: Duration,
    /// Detaching, also when an instance terminates.
    pub detach: Duration,
    /// A terminated instance stays `shutting-down`, volumes attached, this long.
    pub shutdown: Duration,
}

/// A running emulator on 127.0.0.1; stopped (SIGINT, then SIGKILL) on drop.
pub struct Emulator {
    child: Child,
    endpoint: String,
    log: PathBuf,
}

impl Emulator {
    pub fn start(delays: Delays, log: PathBuf) -> io::Result<Self> {
        let script = repo_root().join("ci/emulator/cps_emulator.py");
        let log_file = std::fs::File::create(&log)?;
        let mut child = Command::new(python())
            .arg(&script)
            .args(["--port", "0"])
            .arg("--attach-delay")
            .arg(delays.attach.as_secs_f64().to_string())
            .arg("--create-delay")
            .arg(delays.create.as_secs_f64().to_string())
            .arg("--detach-delay")
            .arg(delays.detach.as_secs_f64().to_string())
            .arg("--shutdown-delay")
            .arg(delays.shutdown.as_secs_f64().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .map_err(|e| {
                io::Error::other(format!(
                    "starting {}: {e} (run ci/setup)",
                    python().display()
                ))
            })?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(addr) = line.trim().strip_prefix("cps-emulator listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            return Err(io::Error::other(format!(
                "the emulator did not start (got {line:?}); its log ends:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )));
        };
        Ok(Self {
            endpoint: format!("http://{addr}"),
            child,
            log,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn log(&self) -> &PathBuf {
        &self.log
    }

    /// An EC2 client for the emulator, as the bench's own tooling uses it.
    pub fn ec2(&self) -> aws_sdk_ec2::Client {
        client_for(&self.endpoint)
    }

    /// From now on, volume modifications stay `modifying` for `modifying`, then `optimizing`
    /// for `optimizing`, before they are `completed`.
    pub fn set_modification_delays(
        &self,
        modifying: Duration,
        optimizing: Duration,
    ) -> io::Result<()> {
        let body = format!(
            r#"{{"modifying_delay": {}, "optimizing_delay": {}}}"#,
            modifying.as_secs_f64(),
            optimizing.as_secs_f64()
        );
        self.control("POST", "/cps/settings", &body).map(drop)
    }

    /// Moves the start of every modification of `volume_id` `by` into the past, so the 6-hour
    /// rule can be tested without waiting. Fails when the volume has none.
    pub fn age_modifications(&self, volume_id: &str, by: Duration) -> io::Result<()> {
        self.shift_modifications(volume_id, by, false)
    }

    /// Moves every modification of `volume_id` `by` on — its start and its states, as if that
    /// time had passed — so a test steps through `modifying`, `optimizing` and `completed` in
    /// order rather than racing the delays. Fails when the volume has none.
    pub fn advance_modifications(&self, volume_id: &str, by: Duration) -> io::Result<()> {
        self.shift_modifications(volume_id, by, true)
    }

    fn shift_modifications(&self, volume_id: &str, by: Duration, states: bool) -> io::Result<()> {
        let body = format!(
            r#"{{"volume_id": "{volume_id}", "seconds": {}, "states": {states}}}"#,
            by.as_secs_f64()
        );
        self.control("POST", "/cps/modifications/age", &body)
            .map(drop)
    }

    /// Makes the modification of `volume_id` under way fail, as EBS may. Fails when none is.
    pub fn fail_modification(&self, volume_id: &str) -> io::Result<()> {
        let body = format!(r#"{{"volume_id": "{volume_id}"}}"#);
        self.control("POST", "/cps/modifications/fail", &body)
            .map(drop)
    }

    /// From now on, snapshots stay `pending` for `delay` (after their data was copied).
    pub fn set_snapshot_delay(&self, delay: Duration) -> io::Result<()> {
        let body = format!(r#"{{"snapshot_delay": {}}}"#, delay.as_secs_f64());
        self.control("POST", "/cps/settings", &body).map(drop)
    }

    /// Makes a snapshot fail (`error`), as EBS may. Fails when there is no such snapshot.
    pub fn fail_snapshot(&self, snapshot_id: &str) -> io::Result<()> {
        let body = format!(r#"{{"snapshot_id": "{snapshot_id}"}}"#);
        self.control("POST", "/cps/snapshots/fail", &body).map(drop)
    }

    /// One request to one of the emulator's control paths (`/cps/...`); the reply's body when
    /// its status is 2xx.
    pub fn control(&self, method: &str, path: &str, body: &str) -> io::Result<String> {
        control_at(self.endpoint(), method, path, body)
    }
}

/// One HTTP/1.1 exchange with the emulator at `endpoint`: `head` (the request line and headers,
/// without `Host` and the end of the headers) and `body` sent, the whole reply read. Bounded: a
/// reply may take a while on a loaded machine (moto loads a service's backend on its first
/// request), never for ever.
fn exchange(endpoint: &str, head: &str, body: &str) -> io::Result<String> {
    use std::io::{Read, Write};
    let addr = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = std::net::TcpStream::connect(&addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "{head}\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).map_err(|e| {
        let request = head.lines().next().unwrap_or(head);
        io::Error::new(
            e.kind(),
            format!("{request} to the emulator: no whole reply in 60 s ({e})"),
        )
    })?;
    Ok(reply)
}

/// [`Emulator::control`] for an endpoint (the udev stand-in knows only that).
pub fn control_at(endpoint: &str, method: &str, path: &str, body: &str) -> io::Result<String> {
    let reply = exchange(
        endpoint,
        &format!("{method} {path} HTTP/1.1\r\nContent-Type: application/json"),
        body,
    )?;
    let status = reply.lines().next().unwrap_or("");
    if status.split(' ').nth(1).is_some_and(|c| c.starts_with('2')) {
        Ok(reply
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    } else {
        Err(io::Error::other(format!("{method} {path}: {status}")))
    }
}

/// One request of an AWS JSON protocol (`X-Amz-Target`, JSON `version` 1.0 or 1.1) to the
/// emulator, in the form of a signed request with the bench's own unrestricted key; the
/// emulator does not check signatures of that key.
pub(crate) fn json_call(
    endpoint: &str,
    service: &str,
    version: &str,
    target: &str,
    body: &serde_json::Value,
) -> io::Result<()> {
    let head = format!(
        "POST / HTTP/1.1\r\nContent-Type: application/x-amz-json-{version}\r\n\
         X-Amz-Target: {target}\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/{REGION}/{service}/aws4_request, SignedHeaders=host, Signature=0"
    );
    let reply = exchange(endpoint, &head, &body.to_string())?;
    if reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{target} on the emulator failed: {}",
            reply.lines().last().unwrap_or("")
        )))
    }
}

/// SDK configuration for an emulator endpoint: its region, static test credentials.
fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    // Every request of the bench is bounded: one the emulator never answers must not hang a
    // test (the fake udev's thread, joined on drop, once waited for ever).
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(30))
        .operation_timeout(Duration::from_secs(90))
        .build();
    aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .timeout_config(timeouts)
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
            Credentials::new("testing", "testing", None, None, "cps-bench"),
        ))
        .build()
}

/// An Auto Scaling client for an emulator endpoint.
pub fn autoscaling_for(endpoint: &str) -> aws_sdk_autoscaling::Client {
    aws_sdk_autoscaling::Client::new(&sdk_config(endpoint))
}

/// An EC2 client for an emulator endpoint.
pub fn client_for(endpoint: &str) -> aws_sdk_ec2::Client {
    aws_sdk_ec2::Client::new(&sdk_config(endpoint))
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
