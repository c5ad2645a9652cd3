//! Running a user's hook: no shell, its own process group, output streamed line by line into
//! the log, killed with everything it started when its time is up.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tracing::{info, warn};

use crate::{Error, Hook, HookExit};

/// Runs `hook.argv` with `env` added, streaming stdout (info) and stderr (warn) to the log.
pub async fn run_command(
    hook: &Hook,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<HookExit, Error> {
    let Some((program, args)) = hook.argv.split_first() else {
        return Err(Error::HookStart {
            hook: hook.name.clone(),
            program: String::new(),
            source: std::io::Error::other("empty command"),
        });
    };
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills whatever the hook started too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::HookStart {
            hook: hook.name.clone(),
            program: program.clone(),
            source,
        })?;
    let pid = child.id();
    let out = tokio::spawn(stream(hook.name.clone(), "stdout", child.stdout.take()));
    let err = tokio::spawn(stream(hook.name.clone(), "stderr", child.stderr.take()));
    let exit = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => HookExit::Success,
        Ok(Ok(status)) => HookExit::Failed {
            code: status.code(),
        },
        Ok(Err(source)) => {
            return Err(Error::Io {
                path: program.into(),
                action: "wait for hook",
                source,
            });
        }
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: signals the process group this function created.
                unsafe {
                    libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
                }
            }
            let _ = child.wait().await;
            HookExit::TimedOut
        }
    };
    // The pipes close when the group is gone; bounded anyway, in case a grandchild kept them.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = out.await;
        let _ = err.await;
    })
    .await;
    Ok(exit)
}

async fn stream(hook: String, which: &'static str, pipe: Option<impl AsyncRead + Unpin>) {
    let Some(pipe) = pipe else { return };
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if which == "stderr" {
            warn!(hook = %hook, stream = which, "{line}");
        } else {
            info!(hook = %hook, stream = which, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(argv: &[&str]) -> Hook {
        Hook {
            name: "test".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn exit_codes_environment_and_no_shell() {
        let env = [("CPS_NODE_ID".to_string(), "7".to_string())];
        let ok = run_command(
            &hook(&["sh", "-c", "test \"$CPS_NODE_ID\" = 7"]),
            &env,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(ok.unwrap(), HookExit::Success);
        let failed =
            run_command(&hook(&["sh", "-c", "exit 3"]), &[], Duration::from_secs(10)).await;
        assert_eq!(failed.unwrap(), HookExit::Failed { code: Some(3) });
        // Without a shell, `$HOME` is a literal argument, not an expansion.
        let literal = run_command(
            &hook(&["test", "$HOME", "=", "$HOME"]),
            &[],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(literal.unwrap(), HookExit::Success);
        let missing =
            run_command(&hook(&["/nonexistent/hook"]), &[], Duration::from_secs(10)).await;
        assert!(matches!(missing, Err(Error::HookStart { .. })));
    }

    #[tokio::test]
    async fn a_timeout_kills_the_hook_and_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let exit = run_command(
            &hook(&["sh", "-c", &script]),
            &[],
            Duration::from_millis(500),
        )
        .await;
        assert_eq!(exit.unwrap(), HookExit::TimedOut);
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild is gone too: no process, or a zombie nobody reaped yet (state Z).
        let running = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(") ").next().map(|rest| !rest.starts_with('Z')))
                .unwrap_or(false)
        };
        let mut alive = true;
        for _ in 0..50 {
            alive = running();
            if !alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive, "the hook's background child survived the timeout");
    }
}
