//! The launch lifecycle hook around a boot: the instance's group, the hook as Auto Scaling
//! has it, heartbeats while the steps run, and the completion (CONTINUE, or ABANDON on failure).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cps_provider::{Error as CloudError, GroupMember, LifecycleResult, LifecycleService};
use tracing::{info, warn};

use super::LifecycleOutcome;
use crate::backoff::{self, Poll, RetryPolicy, Schedule};
use crate::config::{AttachConfig, Identity, LifecycleOptions, OnFailure};
use crate::error::Error;

pub(super) struct LifecycleContext {
    pub(super) group: String,
    pub(super) hook: String,
    pub(super) interval: Duration,
    /// The instance was in Pending:Wait when the boot began.
    waiting_at_start: bool,
    /// The action was seen waiting: at the start, or by an accepted heartbeat. Only then does
    /// "no active lifecycle action" mean it ended (before, the instance may still be `Pending`).
    seen_waiting: AtomicBool,
}

impl LifecycleContext {
    fn seen_waiting(&self) -> bool {
        self.waiting_at_start || self.seen_waiting.load(Ordering::Relaxed)
    }
}

/// How long an empty membership lookup is looked at again while a lifecycle hook is configured
/// (early in a boot Auto Scaling may not show the instance yet); the command timeout if shorter.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(120);

/// The instance's group and lifecycle state. With a lifecycle hook configured, an empty answer
/// is asked again (bounded), then — unless the group is configured — an error: going on would
/// leave the instance to the hook's timeout and its default result.
async fn find_membership(
    lifecycle: &dyn LifecycleService,
    me: &str,
    config: &AttachConfig,
    policy: RetryPolicy,
    seed: u64,
) -> Result<Option<GroupMember>, Error> {
    let lookup = || async {
        backoff::retry(policy, "DescribeAutoScalingInstances", seed, || {
            lifecycle.membership(me)
        })
        .await
        .map_err(Error::cloud("finding the instance's Auto Scaling group"))
    };
    let Some(opts) = &config.node.lifecycle else {
        return lookup().await;
    };
    let bound = MEMBERSHIP_WAIT.min(config.node.command_timeout);
    let found = backoff::poll(Schedule::CLOUD_STATE, bound, || async {
        Ok::<_, Error>(match lookup().await? {
            Some(m) => Poll::Ready(m),
            None => Poll::Pending(format!(
                "DescribeAutoScalingInstances shows no group for {me}"
            )),
        })
    })
    .await?;
    match found {
        Ok(m) => Ok(Some(m)),
        Err(t) if opts.group.is_some() => {
            warn!(
                instance_id = me,
                waited_s = t.waited.as_secs(),
                "Auto Scaling does not show this instance in a group; using the configured lifecycle.group"
            );
            Ok(None)
        }
        Err(t) => Err(Error::Timeout {
            what: format!(
                "{me} to show up in an Auto Scaling group (lifecycle.hook {} is configured)",
                opts.hook
            ),
            waited: t.waited,
            last: t.last,
        }),
    }
}

/// What the boot knows of its group before the steps.
pub(super) struct LifecycleSetup {
    pub(super) group_name: Option<String>,
    /// Already InService: a re-run or a reboot.
    pub(super) in_service: bool,
    /// The action to keep alive and complete; `Err` when the hook could not be read (with a
    /// context under its configured name, to abandon).
    pub(super) lifecycle: Result<Option<LifecycleContext>, (LifecycleContext, Error)>,
}

/// The group lookup (once, if anything needs it) and the lifecycle hook.
pub(super) async fn lifecycle_setup(
    lifecycle: &dyn LifecycleService,
    me: &str,
    config: &AttachConfig,
    policy: RetryPolicy,
    seed: u64,
) -> Result<LifecycleSetup, Error> {
    let needs_membership = config.node.lifecycle.is_some()
        || matches!(config.node.identity, Identity::Slot { .. })
        || matches!(config.node.identity, Identity::NodeId { id: None, .. });
    let membership = if needs_membership {
        find_membership(lifecycle, me, config, policy, seed).await?
    } else {
        None
    };
    let configured_group = config.node.lifecycle.as_ref().and_then(|l| l.group.clone());
    let group_name = configured_group.or_else(|| membership.as_ref().map(|m| m.group.clone()));
    // Waiting in the hook now: a "no active action" at the end then means it expired.
    let state = membership.as_ref().map(|m| m.lifecycle_state.as_str());
    let waiting_at_start = state == Some("Pending:Wait");
    // Already in service (a re-run, a reboot): no action is waiting, nothing to beat or complete.
    let in_service = state == Some("InService");
    if in_service && config.node.lifecycle.is_some() {
        info!("the instance is already InService; no lifecycle action to keep alive or complete");
    }
    let context = match (&config.node.lifecycle, &group_name) {
        (None, _) => Ok(None),
        (Some(_), Some(_)) if in_service => Ok(None),
        (Some(_), None) => {
            warn!(
                instance_id = me,
                "a lifecycle hook is configured but this instance is in no Auto Scaling group; nothing to complete"
            );
            Ok(None)
        }
        (Some(opts), Some(group)) => {
            match lifecycle_context(lifecycle, group, opts, policy, seed).await {
                Ok(mut lc) => {
                    lc.waiting_at_start = waiting_at_start;
                    Ok(Some(lc))
                }
                Err(e) => Err((
                    LifecycleContext {
                        group: group.clone(),
                        hook: opts.hook.clone(),
                        interval: Duration::from_secs(10),
                        waiting_at_start,
                        seen_waiting: AtomicBool::new(false),
                    },
                    e,
                )),
            }
        }
    };
    Ok(LifecycleSetup {
        group_name,
        in_service,
        lifecycle: context,
    })
}

/// The hook as Auto Scaling has it, checked, and the heartbeat interval.
async fn lifecycle_context(
    lifecycle: &dyn LifecycleService,
    group: &str,
    opts: &LifecycleOptions,
    policy: RetryPolicy,
    seed: u64,
) -> Result<LifecycleContext, Error> {
    let hook = backoff::retry(policy, "DescribeLifecycleHooks", seed, || {
        lifecycle.lifecycle_hook(group, &opts.hook)
    })
    .await
    .map_err(Error::cloud("describing the lifecycle hook"))?
    .ok_or_else(|| Error::NoLifecycleHook {
        group: group.to_owned(),
        hook: opts.hook.clone(),
    })?;
    if !hook.transition.ends_with("EC2_INSTANCE_LAUNCHING") {
        return Err(Error::NoLifecycleHook {
            group: group.to_owned(),
            hook: format!(
                "{} as a launching hook (it is {})",
                opts.hook, hook.transition
            ),
        });
    }
    let default = hook.heartbeat_timeout / 3;
    let interval = match opts.heartbeat_interval {
        Some(i) if i < hook.heartbeat_timeout => i,
        Some(i) => {
            warn!(configured_s = i.as_secs(), heartbeat_timeout_s = hook.heartbeat_timeout.as_secs(),
                "lifecycle.heartbeat-interval is not below the hook's heartbeat timeout; using a third of the timeout");
            default
        }
        None => default,
    }
    .max(Duration::from_secs(1));
    info!(group = %group, hook = %opts.hook, heartbeat_timeout_s = hook.heartbeat_timeout.as_secs(), heartbeat_every_s = interval.as_secs(), "lifecycle hook found");
    Ok(LifecycleContext {
        group: group.to_owned(),
        hook: opts.hook.clone(),
        interval,
        waiting_at_start: false,
        seen_waiting: AtomicBool::new(false),
    })
}

/// A failed boot: abandon the lifecycle action (unless told to leave it), return the error.
pub(super) async fn fail(
    lifecycle: &dyn LifecycleService,
    lc: &LifecycleContext,
    config: &AttachConfig,
    me: &str,
    error: Error,
    policy: RetryPolicy,
    seed: u64,
) -> Error {
    let on_failure = config.node.lifecycle.as_ref().map(|l| l.on_failure);
    if on_failure == Some(OnFailure::Abandon) {
        warn!(error = %error, "boot failed; abandoning the lifecycle action so the group replaces this instance");
        let abandon = complete(lifecycle, lc, me, LifecycleResult::Abandon, policy, seed);
        match with_heartbeats(lc.interval, lifecycle, lc, me, abandon).await {
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "could not abandon the lifecycle action; the hook's timeout will decide")
            }
        }
    } else {
        warn!(error = %error, "boot failed; leaving the instance in Pending:Wait (lifecycle.on-failure: leave) until an operator completes it or the hook's timeout applies its default result");
    }
    error
}

/// Completes the action with `result`; "no active action" is an expiry once it was seen
/// waiting, and looked into otherwise.
pub(super) async fn complete(
    lifecycle: &dyn LifecycleService,
    lc: &LifecycleContext,
    me: &str,
    result: LifecycleResult,
    policy: RetryPolicy,
    seed: u64,
) -> Result<LifecycleOutcome, Error> {
    match send_completion(lifecycle, lc, me, result, policy, seed).await {
        Ok(done) => Ok(done),
        Err(CloudError::NoActiveLifecycleAction { message, .. }) if lc.seen_waiting() => {
            Err(Error::LifecycleExpired {
                group: lc.group.clone(),
                hook: lc.hook.clone(),
                detail: message,
            })
        }
        Err(CloudError::NoActiveLifecycleAction { message, .. }) => {
            complete_unseen(lifecycle, lc, me, result, message, policy, seed).await
        }
        Err(e) => Err(Error::cloud("completing the lifecycle action")(e)),
    }
}

/// CompleteLifecycleAction, retried; logged when it is accepted.
async fn send_completion(
    lifecycle: &dyn LifecycleService,
    lc: &LifecycleContext,
    me: &str,
    result: LifecycleResult,
    policy: RetryPolicy,
    seed: u64,
) -> Result<LifecycleOutcome, CloudError> {
    backoff::retry(policy, "CompleteLifecycleAction", seed, || {
        lifecycle.complete(&lc.group, &lc.hook, me, result)
    })
    .await?;
    info!(group = %lc.group, hook = %lc.hook, result = result.as_str(), "lifecycle action completed");
    Ok(LifecycleOutcome::Completed(result))
}

/// "No active lifecycle action" at the end of a boot during which the hook was never seen
/// holding the instance: it may still be `Pending`, so look (bounded) at what it becomes.
/// Held now → complete; in service → nothing was waiting; anything else → the action ended
/// without cps-attach, which is not a success.
async fn complete_unseen(
    lifecycle: &dyn LifecycleService,
    lc: &LifecycleContext,
    me: &str,
    result: LifecycleResult,
    detail: String,
    policy: RetryPolicy,
    seed: u64,
) -> Result<LifecycleOutcome, Error> {
    let settled = backoff::poll(Schedule::CLOUD_STATE, MEMBERSHIP_WAIT, || async {
        let m = backoff::retry(policy, "DescribeAutoScalingInstances", seed, || {
            lifecycle.membership(me)
        })
        .await
        .map_err(Error::cloud("finding the instance's Auto Scaling group"))?;
        Ok::<_, Error>(match m {
            Some(GroupMember {
                lifecycle_state, ..
            }) if lifecycle_state == "Pending" => Poll::Pending(format!(
                "{me} is still Pending, not yet held by {}",
                lc.hook
            )),
            other => Poll::Ready(other.map(|m| m.lifecycle_state)),
        })
    })
    .await?;
    let expired = |detail: String| Error::LifecycleExpired {
        group: lc.group.clone(),
        hook: lc.hook.clone(),
        detail,
    };
    match settled {
        Ok(Some(state)) if state == "Pending:Wait" => {
            lc.seen_waiting.store(true, Ordering::Relaxed);
            match send_completion(lifecycle, lc, me, result, policy, seed).await {
                Ok(done) => Ok(done),
                Err(CloudError::NoActiveLifecycleAction { message, .. }) => Err(expired(message)),
                Err(e) => Err(Error::cloud("completing the lifecycle action")(e)),
            }
        }
        Ok(Some(state)) if state == "InService" => {
            info!(group = %lc.group, hook = %lc.hook, detail = %detail, "the instance went in service without its lifecycle hook holding it; nothing to complete");
            Ok(LifecycleOutcome::NotWaiting)
        }
        Ok(state) => Err(expired(format!(
            "{detail}; the instance is {}",
            state.as_deref().unwrap_or("in no group any more")
        ))),
        Err(t) => Err(expired(format!("{detail}; {}", t.last))),
    }
}

/// Runs `steps` while sending lifecycle heartbeats every `lc.interval`.
pub(super) async fn with_heartbeats<T>(
    first_after: Duration,
    lifecycle: &dyn LifecycleService,
    lc: &LifecycleContext,
    me: &str,
    steps: impl Future<Output = T>,
) -> T {
    let beat = || async {
        match lifecycle.heartbeat(&lc.group, &lc.hook, me).await {
            Ok(()) => {
                lc.seen_waiting.store(true, Ordering::Relaxed);
                info!(group = %lc.group, hook = %lc.hook, "lifecycle heartbeat sent");
                true
            }
            Err(CloudError::NoActiveLifecycleAction { .. }) if lc.seen_waiting() => {
                info!(
                    "the lifecycle action is no longer waiting (expired or completed); no more heartbeats"
                );
                false
            }
            // Not held by the hook yet (still `Pending`): the action is still to come.
            Err(CloudError::NoActiveLifecycleAction { .. }) => {
                info!("no lifecycle action is waiting for this instance yet; heartbeats go on");
                true
            }
            // A missed heartbeat is not fatal: the next one may get through in time.
            Err(e) => {
                warn!(error = %e, "lifecycle heartbeat failed");
                true
            }
        }
    };
    // The boot's first one before anything else: the instance has waited since it launched.
    let mut go_on = true;
    if first_after.is_zero() {
        go_on = beat().await;
    }
    let beats = async {
        while go_on {
            tokio::time::sleep(lc.interval).await;
            go_on = beat().await;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        biased;
        out = steps => out,
        () = beats => unreachable!("the heartbeat loop never returns"),
    }
}
