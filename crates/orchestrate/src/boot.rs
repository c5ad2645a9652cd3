//! The whole boot of a node: identity, volume, interface, files, hooks, lifecycle.
//!
//! 1. If a lifecycle hook is configured, find the instance's group and the hook, and send
//!    heartbeats for as long as the rest runs (at a third of the hook's heartbeat timeout).
//! 2. Identity: pool, node id (configured, or from a tag on the instance or its group), or slot.
//! 3. Claim and prepare the volume (see [`crate::claim`] and [`crate::attach`]).
//! 4. The node's network interface: found by tags (or id), waited for while another instance
//!    holds it, attached at the configured index, then waited for in the OS by its MAC.
//! 5. The identity environment file and the node files (after the mount: they may live on it).
//! 6. `configure` once per boot, then `health` until it passes or its timeout expires.
//! 7. CompleteLifecycleAction: CONTINUE on success; on failure ABANDON (unless told to leave
//!    the instance waiting), so the group replaces it at once instead of after the hook timeout.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cps_blockdev::BlockHost;
use cps_node::{Hook, HookExit, NodeFile, NodeHost};
use cps_provider::{
    AttachmentState, Error as CloudError, GroupMember, InstanceIdentity, InterfaceService,
    LifecycleResult, LifecycleService, NetworkInterface, ScalingGroup, SecretService, Tags,
    VolumeService,
};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::attach::{AttachOutcome, prepare_device};
use crate::backoff::{self, Poll, RetryPolicy, Schedule, hash_str};
use crate::claim::{ClaimTarget, claim_volume};
use crate::config::{AttachConfig, Identity, InterfaceOptions, OnFailure, check_node_id};
use crate::error::Error;

/// The cloud services a boot uses (one object may provide them all).
#[derive(Clone, Copy)]
pub struct Services<'a> {
    pub volumes: &'a dyn VolumeService,
    pub interfaces: &'a dyn InterfaceService,
    pub lifecycle: &'a dyn LifecycleService,
    /// Node file contents kept in the cloud (`content-from`).
    pub secrets: &'a dyn SecretService,
}

/// The host sides a boot uses.
#[derive(Clone)]
pub struct Hosts {
    pub block: Arc<dyn BlockHost>,
    pub node: Arc<dyn NodeHost>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceOutcome {
    pub id: String,
    pub private_ip: Option<String>,
    pub mac: String,
    /// The OS name of the interface (`eth1`, `ens6`).
    pub os_name: String,
    /// `false` when it was attached here already.
    pub attached_now: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleOutcome {
    /// No lifecycle hook configured.
    NotConfigured,
    /// Configured, but the instance is in no Auto Scaling group.
    NotInGroup,
    /// The instance was not waiting (a re-run, or the hook already timed out).
    NotWaiting,
    Completed(LifecycleResult),
}

/// What a boot did.
#[derive(Clone, Debug)]
pub struct BootOutcome {
    pub attach: AttachOutcome,
    pub node_id: Option<String>,
    pub slot: Option<u32>,
    pub interface: Option<InterfaceOutcome>,
    /// The identity environment, as written to the env file and given to the hooks.
    pub env: Vec<(String, String)>,
    pub files_changed: usize,
    /// `Some(true)` ran now, `Some(false)` already ran this boot, `None` no configure hook.
    pub configured: Option<bool>,
    /// Health runs until it passed (0 without a health hook).
    pub health_runs: u32,
    pub lifecycle: LifecycleOutcome,
}

struct LifecycleContext {
    group: String,
    hook: String,
    interval: Duration,
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

/// Boots the node. On failure, the lifecycle action is abandoned (if configured so) before the
/// error is returned.
pub async fn boot(
    services: Services<'_>,
    hosts: Hosts,
    identity: &InstanceIdentity,
    config: &AttachConfig,
) -> Result<BootOutcome, Error> {
    boot_until(services, hosts, identity, config, std::future::pending()).await
}

/// How long completing the lifecycle action may take after an interruption (the service manager
/// that sent the signal kills the process for good after its own timeout).
const INTERRUPTED_COMPLETION: Duration = Duration::from_secs(15);

/// [`boot`], until `stop` completes (a signal): then the wait in progress ends, the lifecycle
/// action is completed as on any failure (`lifecycle.on-failure`), and [`Error::Interrupted`]
/// is returned. A host step already under way on the blocking pool (mkfs, mount) is not cut
/// short; the caller's runtime lets it finish before the process exits.
pub async fn boot_until(
    services: Services<'_>,
    hosts: Hosts,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    stop: impl Future<Output = ()>,
) -> Result<BootOutcome, Error> {
    tokio::pin!(stop);
    let policy = RetryPolicy::within(config.node.command_timeout);
    let seed = hash_str(&identity.instance_id);
    let me = identity.instance_id.as_str();
    let setup = tokio::select! {
        biased;
        () = &mut stop => return Err(Error::Interrupted),
        setup = lifecycle_setup(services.lifecycle, me, config, policy, seed) => setup?,
    };
    let LifecycleSetup {
        group_name,
        in_service,
        lifecycle,
    } = setup;
    let steps = run_steps(
        services,
        &hosts,
        identity,
        config,
        group_name.as_deref(),
        policy,
    );
    let lc = match lifecycle {
        Ok(Some(lc)) => lc,
        Ok(None) => {
            let mut out = tokio::select! {
                biased;
                () = &mut stop => return Err(Error::Interrupted),
                out = steps => out?,
            };
            out.lifecycle = match (&config.node.lifecycle, in_service) {
                (None, _) => LifecycleOutcome::NotConfigured,
                (Some(_), true) => LifecycleOutcome::NotWaiting,
                (Some(_), false) => LifecycleOutcome::NotInGroup,
            };
            return Ok(out);
        }
        // The hook could not be read, but its name is known: still release the instance
        // rather than leave it to the hook's timeout (and default result).
        Err((lc, e)) => {
            return Err(fail(services.lifecycle, &lc, config, me, e, policy, seed).await);
        }
    };
    let stepped = tokio::select! {
        biased;
        () = &mut stop => Err(Error::Interrupted),
        out = with_heartbeats(Duration::ZERO, services.lifecycle, &lc, me, steps) => out,
    };
    match stepped {
        Ok(mut out) => {
            let done = complete(
                services.lifecycle,
                &lc,
                me,
                LifecycleResult::Continue,
                policy,
                seed,
            );
            out.lifecycle = with_heartbeats(lc.interval, services.lifecycle, &lc, me, done).await?;
            Ok(out)
        }
        Err(e) => {
            // After a signal, the completion gets a short bound of its own.
            let policy = match e {
                Error::Interrupted => RetryPolicy::within(INTERRUPTED_COMPLETION),
                _ => policy,
            };
            Err(fail(services.lifecycle, &lc, config, me, e, policy, seed).await)
        }
    }
}

/// What the boot knows of its group before the steps.
struct LifecycleSetup {
    group_name: Option<String>,
    /// Already InService: a re-run or a reboot.
    in_service: bool,
    /// The action to keep alive and complete; `Err` when the hook could not be read (with a
    /// context under its configured name, to abandon).
    lifecycle: Result<Option<LifecycleContext>, (LifecycleContext, Error)>,
}

/// The group lookup (once, if anything needs it) and the lifecycle hook.
async fn lifecycle_setup(
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
    opts: &crate::config::LifecycleOptions,
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
async fn fail(
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

async fn complete(
    lifecycle: &dyn LifecycleService,
    lc: &LifecycleContext,
    me: &str,
    result: LifecycleResult,
    policy: RetryPolicy,
    seed: u64,
) -> Result<LifecycleOutcome, Error> {
    match backoff::retry(policy, "CompleteLifecycleAction", seed, || {
        lifecycle.complete(&lc.group, &lc.hook, me, result)
    })
    .await
    {
        Ok(()) => {
            info!(group = %lc.group, hook = %lc.hook, result = result.as_str(), "lifecycle action completed");
            Ok(LifecycleOutcome::Completed(result))
        }
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
            match backoff::retry(policy, "CompleteLifecycleAction", seed, || {
                lifecycle.complete(&lc.group, &lc.hook, me, result)
            })
            .await
            {
                Ok(()) => {
                    info!(group = %lc.group, hook = %lc.hook, result = result.as_str(), "lifecycle action completed");
                    Ok(LifecycleOutcome::Completed(result))
                }
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
async fn with_heartbeats<T>(
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

async fn run_steps(
    services: Services<'_>,
    hosts: &Hosts,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    group_name: Option<&str>,
    policy: RetryPolicy,
) -> Result<BootOutcome, Error> {
    let me = identity.instance_id.as_str();
    let seed = hash_str(me);
    // The group's details, only when the identity needs them (one request).
    let describe_group = || async {
        match group_name {
            Some(name) => backoff::retry(policy, "DescribeAutoScalingGroups", seed, || {
                services.lifecycle.group(name)
            })
            .await
            .map_err(Error::cloud("describing the Auto Scaling group")),
            None => Ok(None::<ScalingGroup>),
        }
    };

    // Identity → which volume (and interface) is this node's.
    let (target, node_id) = match &config.node.identity {
        Identity::Pool => (ClaimTarget::pool(config), None),
        Identity::NodeId {
            id,
            source_tag,
            id_tag,
        } => {
            let id = match id {
                Some(id) => id.clone(),
                None => {
                    let tags = backoff::retry(policy, "DescribeTags", seed, || {
                        services.volumes.instance_tags(me)
                    })
                    .await
                    .map_err(Error::cloud("reading the instance's tags"))?;
                    let (value, origin) = match tags.get(source_tag) {
                        Some(v) => (Some(v.clone()), format!("instance {me}")),
                        None => (
                            describe_group()
                                .await?
                                .and_then(|g| g.tags.get(source_tag).cloned()),
                            format!("group {}", group_name.unwrap_or("?")),
                        ),
                    };
                    let id = value.ok_or_else(|| Error::NoNodeId {
                        instance_id: me.to_owned(),
                        tag: source_tag.clone(),
                    })?;
                    // Exactly the check a configured id gets.
                    check_node_id(&id).map_err(|reason| Error::BadNodeId {
                        tag: source_tag.clone(),
                        origin,
                        value: id.clone(),
                        reason: reason.to_owned(),
                    })?;
                    id
                }
            };
            info!(node_id = %id, "node identity");
            let mut tags = config.tags.clone();
            tags.insert(id_tag.clone(), id.clone());
            (
                ClaimTarget::Node {
                    tags,
                    release_timeout: config.node.release_timeout,
                },
                Some(id),
            )
        }
        Identity::Slot { max, id_tag } => {
            // The instances booting here now share the slots out (see claim.rs).
            let mut peers: Vec<String> = describe_group()
                .await?
                .map(|g| {
                    g.instances
                        .into_iter()
                        .filter(|i| {
                            i.lifecycle_state.starts_with("Pending")
                                && i.availability_zone == identity.availability_zone
                        })
                        .map(|i| i.instance_id)
                        .collect()
                })
                .unwrap_or_default();
            if !peers.iter().any(|p| p == me) {
                peers.push(me.to_owned());
            }
            (
                ClaimTarget::Slot {
                    tags: config.tags.clone(),
                    key: id_tag.clone(),
                    max: *max,
                    peers,
                },
                None,
            )
        }
    };

    let claim = claim_volume(services.volumes, identity, config, &target, policy).await?;
    let slot = claim.slot;
    let node_id = node_id.or_else(|| slot.map(|s| s.to_string()));
    if let Some(s) = slot {
        info!(slot = s, volume_id = %claim.volume.id, "slot claimed");
    }
    let attach = prepare_device(
        hosts.block.clone(),
        services.volumes,
        &claim,
        config,
        policy,
    )
    .await?;

    // The node's own tags: the cluster's plus its id, for finding its interface.
    let mut node_tags: Tags = config.tags.clone();
    if let (Some(key), Some(id)) = (config.node.identity.id_tag(), &node_id) {
        node_tags.insert(key.to_owned(), id.clone());
    }
    let interface = match &config.node.interface {
        None => None,
        Some(opts) => Some(
            attach_interface(
                services.interfaces,
                services.volumes,
                hosts.node.as_ref(),
                identity,
                &node_tags,
                opts,
                config,
                policy,
            )
            .await?,
        ),
    };

    let env = environment(
        identity,
        config,
        &attach,
        node_id.as_deref(),
        slot,
        interface.as_ref(),
    );
    let node = hosts.node.clone();
    let (path, vars) = (config.node.env_file.clone(), env.clone());
    blocking(move || node.write_env_file(&path, &vars)).await?;
    info!(env_file = %config.node.env_file.display(), "identity written");

    // Every secret is read before any file is written: a missing one writes nothing.
    let mut fetched = Vec::with_capacity(config.node.files.len());
    for spec in &config.node.files {
        fetched.push(match &spec.secret {
            None => None,
            Some(secret) => Some(
                backoff::retry(policy, "reading a secret", seed, || {
                    services.secrets.secret(secret)
                })
                .await
                .map_err(|source| Error::Secret {
                    path: spec.path.clone(),
                    secret: secret.clone(),
                    source: Box::new(source),
                })?,
            ),
        });
    }
    let mut files_changed = 0;
    for (spec, fetched) in config.node.files.iter().zip(fetched) {
        let content = if let Some(value) = fetched {
            value.into_bytes()
        } else if spec.template {
            fill(&String::from_utf8_lossy(&spec.content), &env).into_bytes()
        } else {
            spec.content.clone()
        };
        let file = NodeFile {
            path: spec.path.clone(),
            content,
            mode: spec.mode,
            ownership: spec.ownership.clone(),
        };
        let node = hosts.node.clone();
        if blocking(move || node.write_file(&file)).await? {
            files_changed += 1;
            info!(path = %spec.path.display(), "node file written");
        }
    }

    let hooks = &config.node.hooks;
    let configured = match &hooks.configure {
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
                    .run_hook(&hook, &env, hooks.run_timeout)
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
    };

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
                    &env,
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

    Ok(BootOutcome {
        attach,
        node_id,
        slot,
        interface,
        env,
        files_changed,
        configured,
        health_runs,
        lifecycle: LifecycleOutcome::NotConfigured,
    })
}

/// Runs a blocking node-host call off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, cps_node::Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Node {
            source: cps_node::Error::Io {
                path: PathBuf::new(),
                action: "run a host task",
                source: std::io::Error::other(e.to_string()),
            },
        })?
        .map_err(|source| Error::Node { source })
}

/// The identity environment: the env file's content and the hooks' extra environment.
fn environment(
    identity: &InstanceIdentity,
    config: &AttachConfig,
    attach: &AttachOutcome,
    node_id: Option<&str>,
    slot: Option<u32>,
    interface: Option<&InterfaceOutcome>,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("CPS_INSTANCE_ID", identity.instance_id.clone()),
        ("CPS_REGION", identity.region.clone()),
        ("CPS_AVAILABILITY_ZONE", identity.availability_zone.clone()),
    ];
    if let Some(id) = node_id {
        env.push(("CPS_NODE_ID", id.to_owned()));
    }
    if let Some(s) = slot {
        env.push(("CPS_SLOT", s.to_string()));
    }
    env.extend([
        ("CPS_VOLUME_ID", attach.volume_id.clone()),
        ("CPS_DEVICE", attach.device.display().to_string()),
        ("CPS_MOUNT_PATH", config.mount.target.display().to_string()),
        (
            "CPS_FILESYSTEM",
            attach.filesystem.filesystem().fstype.clone(),
        ),
    ]);
    if let Some(i) = interface {
        env.push(("CPS_ENI_ID", i.id.clone()));
        if let Some(ip) = &i.private_ip {
            env.push(("CPS_ENI_IP", ip.clone()));
        }
        env.push(("CPS_ENI_MAC", i.mac.clone()));
        env.push(("CPS_ENI_INTERFACE", i.os_name.clone()));
    }
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Replaces `${NAME}` for every NAME in `env`, in one pass (a value is never expanded again);
/// anything else is left as written. The configuration already refused unknown `${CPS_…}`.
pub fn fill(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}').map(|end| (&after[..end], end)) {
            Some((name, end)) => match env.iter().find(|(k, _)| k == name) {
                Some((_, v)) => {
                    out.push_str(v);
                    rest = &after[end + 1..];
                }
                None => {
                    out.push_str("${");
                    rest = after;
                }
            },
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Finds this node's interface, waits while another instance holds it, attaches it, and waits
/// until both EC2 and the OS show it.
#[allow(clippy::too_many_arguments)]
async fn attach_interface(
    interfaces: &dyn InterfaceService,
    instances: &dyn VolumeService,
    node: &dyn NodeHost,
    identity: &InstanceIdentity,
    node_tags: &Tags,
    opts: &InterfaceOptions,
    config: &AttachConfig,
    policy: RetryPolicy,
) -> Result<InterfaceOutcome, Error> {
    let me = identity.instance_id.as_str();
    let seed = hash_str(me);
    let find = || async {
        match &opts.id {
            Some(id) => match backoff::retry(policy, "DescribeNetworkInterfaces", seed, || {
                interfaces.interface(id)
            })
            .await
            {
                Ok(e) => Ok(e),
                Err(CloudError::NotFound { .. }) => Err(Error::NoInterface { what: id.clone() }),
                Err(e) => Err(Error::cloud("describing the network interface")(e)),
            },
            None => {
                let mut tags = node_tags.clone();
                tags.extend(opts.extra_tags.clone());
                let found = backoff::retry(policy, "DescribeNetworkInterfaces", seed, || {
                    interfaces.interfaces_tagged(&tags)
                })
                .await
                .map_err(Error::cloud("finding the node's network interface"))?;
                let describe = || {
                    tags.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let (here, far): (Vec<_>, Vec<_>) = found
                    .into_iter()
                    .partition(|e| e.availability_zone == identity.availability_zone);
                match here.as_slice() {
                    [one] => Ok(one.clone()),
                    [] if !far.is_empty() => Err(Error::WrongZone {
                        what: "this node's network interface",
                        resources: far
                            .iter()
                            .map(|e| format!("{} in {}", e.id, e.availability_zone))
                            .collect::<Vec<_>>()
                            .join(", "),
                        zone: identity.availability_zone.clone(),
                    }),
                    [] => Err(Error::NoInterface {
                        what: format!("tagged {}", describe()),
                    }),
                    many => Err(Error::Duplicates {
                        what: format!("the network interface tagged {}", describe()),
                        volumes: many
                            .iter()
                            .map(|e| e.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }),
                }
            }
        }
    };

    let started = Instant::now();
    let mut looks = 0;
    let mut last_holder = String::new();
    let mut attached_now = false;
    let eni: NetworkInterface = loop {
        let eni = find().await?;
        if eni.availability_zone != identity.availability_zone {
            return Err(Error::WrongZone {
                what: "this node's network interface",
                resources: format!("{} in {}", eni.id, eni.availability_zone),
                zone: identity.availability_zone.clone(),
            });
        }
        match &eni.attachment {
            Some(a) if a.instance_id == me => break eni,
            Some(a) => {
                let states = backoff::retry(policy, "DescribeInstances", seed, || {
                    instances.instance_states(std::slice::from_ref(&a.instance_id))
                })
                .await
                .map_err(Error::cloud(
                    "looking up the instance holding the interface",
                ))?;
                let state = states
                    .get(&a.instance_id)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| "unknown".into());
                let holder = format!(
                    "{} ({} to {}, which is {state})",
                    eni.id, a.state, a.instance_id
                );
                if started.elapsed() >= config.node.release_timeout {
                    return Err(Error::Timeout {
                        what: "the network interface to be released by the instance holding it (never detached by cps)".into(),
                        waited: started.elapsed(),
                        last: holder,
                    });
                }
                if holder != last_holder {
                    info!(held = %holder, "the node's network interface is held by another instance; waiting for it to be released");
                    last_holder = holder;
                }
                tokio::time::sleep(Schedule::CLOUD_STATE.delay(looks)).await;
                looks += 1;
            }
            None => {
                info!(interface_id = %eni.id, device_index = opts.device_index, ip = eni.private_ip.as_deref().unwrap_or(""), "attaching the node's network interface");
                match backoff::retry(policy, "AttachNetworkInterface", seed, || {
                    interfaces.attach_interface(&eni.id, me, opts.device_index)
                })
                .await
                {
                    Ok(_) => {
                        attached_now = true;
                        break eni;
                    }
                    // Someone got it first (the old instance again?): look again after a
                    // pause, within the same release timeout as waiting for a holder.
                    Err(
                        e @ (CloudError::InterfaceInUse { .. } | CloudError::IncorrectState { .. }),
                    ) => {
                        if started.elapsed() >= config.node.release_timeout {
                            return Err(Error::Timeout {
                                what: "the network interface to become attachable".into(),
                                waited: started.elapsed(),
                                last: e.to_string(),
                            });
                        }
                        tokio::time::sleep(Schedule::CLOUD_STATE.delay(looks)).await;
                        looks += 1;
                    }
                    Err(e) => return Err(Error::cloud("attaching the network interface")(e)),
                }
            }
        }
    };

    let id = eni.id.clone();
    let waited = backoff::poll(Schedule::CLOUD_STATE, opts.timeout, || async {
        let e = backoff::retry(policy, "DescribeNetworkInterfaces", seed, || {
            interfaces.interface(&id)
        })
        .await
        .map_err(Error::cloud("waiting for the interface attachment"))?;
        Ok::<_, Error>(match &e.attachment {
            Some(a) if a.instance_id == me && a.state == AttachmentState::Attached => {
                Poll::Ready(e)
            }
            Some(a) => Poll::Pending(format!("{id} is {} to {}", a.state, a.instance_id)),
            None => Poll::Pending(format!("{id} shows no attachment yet")),
        })
    })
    .await?;
    let eni = waited.map_err(|t| Error::Timeout {
        what: format!("{id} to be attached to {me}"),
        waited: t.waited,
        last: t.last,
    })?;

    let mac = eni.mac.clone();
    let seen = backoff::poll(Schedule::DEVICE, opts.timeout, || {
        let r = node.interface_by_mac(&mac).map(|n| match n {
            Some(name) => Poll::Ready(name),
            None => Poll::Pending(format!("no network interface with MAC {mac} in the OS yet")),
        });
        async move { r }
    })
    .await
    .map_err(|source| Error::Node { source })?;
    let os_name = seen.map_err(|t| Error::Timeout {
        what: format!("{id} to appear in the OS"),
        waited: t.waited,
        last: t.last,
    })?;
    info!(interface_id = %eni.id, ip = eni.private_ip.as_deref().unwrap_or(""), os_name = %os_name, attached_now, "network interface ready");
    Ok(InterfaceOutcome {
        id: eni.id,
        private_ip: eni.private_ip,
        mac: eni.mac,
        os_name,
        attached_now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_and_others_left() {
        let env = vec![
            ("CPS_NODE_ID".to_string(), "2".to_string()),
            ("CPS_ENI_IP".to_string(), "10.0.1.12".to_string()),
        ];
        assert_eq!(
            fill(
                "broker.id=${CPS_NODE_ID}\nlisteners=PLAINTEXT://${CPS_ENI_IP}:9092\nhome=${HOME}\n",
                &env
            ),
            "broker.id=2\nlisteners=PLAINTEXT://10.0.1.12:9092\nhome=${HOME}\n"
        );
        let tricky = vec![
            ("CPS_A".to_string(), "${CPS_B}".to_string()),
            ("CPS_B".to_string(), "b".to_string()),
        ];
        assert_eq!(
            fill("${CPS_A} ${CPS_B} ${ unclosed", &tricky),
            "${CPS_B} b ${ unclosed",
            "no second expansion"
        );
    }
}
