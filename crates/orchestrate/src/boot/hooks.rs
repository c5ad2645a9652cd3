//! The user's hooks: `configure` once per boot, then `health` until it passes or its timeout
//! expires.

use std::path::PathBuf;
use std::time::Duration;

use cps_node::{Hook, HookExit};
use tokio::time::Instant;
use tracing::info;

use super::{Hosts, blocking};
use crate::config::AttachConfig;
use crate::error::Error;

/// Runs `configure` unless it already ran in this boot: `Some(true)` ran now, `Some(false)`
/// had run, `None` none configured.
pub(super) async fn configure(
    hosts: &Hosts,
    config: &AttachConfig,
    env: &[(String, String)],
) -> Result<Option<bool>, Error> {
    let hooks = &config.node.hooks;
    Ok(match &hooks.configure {
        None => None,
        Some(argv) => {
            let marker: PathBuf = config.node.run_dir.join("configure.done");
            let node = hosts.node.clone();
            let m = marker.clone();
            if blocking(move || node.ran_this_boot(&m)).await? {
                info!("configure already ran in this boot; not running it again");
                Some(false)
            } else {
                let hook = Hook {
                    name: "configure".into(),
                    argv: argv.clone(),
                };
                info!(command = %argv.join(" "), "running the configure hook");
                let exit = hosts
                    .node
                    .run_hook(&hook, env, hooks.run_timeout)
                    .await
                    .map_err(|source| Error::Node { source })?;
                if exit != HookExit::Success {
                    return Err(Error::Hook {
                        hook: "configure".into(),
                        detail: format!("`{}`: {exit}", argv.join(" ")),
                    });
                }
                let node = hosts.node.clone();
                blocking(move || node.mark_ran_this_boot(&marker)).await?;
                Some(true)
            }
        }
    })
}

/// Runs `health` until it passes; returns how many runs that took (0 without a health hook).
pub(super) async fn health(
    hosts: &Hosts,
    config: &AttachConfig,
    env: &[(String, String)],
) -> Result<u32, Error> {
    let hooks = &config.node.hooks;
    let mut health_runs = 0;
    if let Some(argv) = &hooks.health {
        let hook = Hook {
            name: "health".into(),
            argv: argv.clone(),
        };
        let started = Instant::now();
        loop {
            health_runs += 1;
            let remaining = hooks.health_timeout.saturating_sub(started.elapsed());
            let exit = hosts
                .node
                .run_hook(
                    &hook,
                    env,
                    hooks.run_timeout.min(remaining.max(Duration::from_secs(1))),
                )
                .await
                .map_err(|source| Error::Node { source })?;
            if exit == HookExit::Success {
                info!(runs = health_runs, "health check passed");
                break;
            }
            if started.elapsed() + hooks.health_interval >= hooks.health_timeout {
                return Err(Error::Hook {
                    hook: "health".into(),
                    detail: format!(
                        "`{}` did not pass within {}s ({health_runs} runs, last: {exit})",
                        argv.join(" "),
                        hooks.health_timeout.as_secs()
                    ),
                });
            }
            info!(run = health_runs, result = %exit, retry_in_s = hooks.health_interval.as_secs(), "health check not passing yet");
            tokio::time::sleep(hooks.health_interval).await;
        }
    }
    Ok(health_runs)
}
