//! The whole boot of a node: identity, volume, interface, files, hooks, lifecycle.
//!
//! 1. If a lifecycle hook is configured, find the instance's group and the hook, and send
//!    heartbeats for as long as the rest runs (at a third of the hook's heartbeat timeout).
//! 2. Identity: pool, node id (configured, or from a tag on the instance or its group), or slot.
//! 3. Claim and prepare the volume (see [`claim`] and [`device`]).
//! 4. The node's network interface: found by tags (or id), waited for while another instance
//!    holds it, attached at the configured index, then waited for in the OS by its MAC.
//! 5. The identity environment file and the node files (after the mount: they may live on it).
//! 6. `configure` once per boot, then `health` until it passes or its timeout expires.
//! 7. CompleteLifecycleAction: CONTINUE on success; on failure ABANDON (unless told to leave
//!    the instance waiting), so the group replaces it at once instead of after the hook timeout.

pub mod claim;
pub mod device;
mod files;
pub mod grow;
mod hooks;
mod identity;
mod interface;
pub mod journal;
mod lifecycle;
pub mod relocate;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cps_blockdev::BlockHost;
use cps_node::NodeHost;
use cps_provider::{
    InstanceIdentity, InterfaceService, LifecycleResult, LifecycleService, LockService,
    SecretService, Tags, VolumeService,
};
use tracing::info;

pub use files::fill;
use lifecycle::{LifecycleSetup, complete, fail, lifecycle_setup, with_heartbeats};

use crate::backoff::{RetryPolicy, hash_str};
use crate::config::{AttachConfig, RelocationMode};
use crate::error::Error;
use claim::claim_volume;
use device::{AttachOutcome, prepare_device};

/// The cloud services a boot uses (one object may provide them all).
#[derive(Clone, Copy)]
pub struct Services<'a> {
    pub volumes: &'a dyn VolumeService,
    pub interfaces: &'a dyn InterfaceService,
    pub lifecycle: &'a dyn LifecycleService,
    /// Node file contents kept in the cloud (`content-from`).
    pub secrets: &'a dyn SecretService,
    /// The relocation lock (`relocation: snapshot`); `None` when relocation is off.
    pub locks: Option<&'a dyn LockService>,
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

/// Steps 2 to 6, between the lifecycle hook's setup and its completion.
async fn run_steps(
    services: Services<'_>,
    hosts: &Hosts,
    identity: &InstanceIdentity,
    config: &AttachConfig,
    group_name: Option<&str>,
    policy: RetryPolicy,
) -> Result<BootOutcome, Error> {
    let (target, node_id) =
        identity::claim_target(services, identity, config, group_name, policy).await?;
    let relocating = config.relocation.mode == RelocationMode::Snapshot;
    let claim = match (relocating, services.locks) {
        (false, _) => claim_volume(services.volumes, identity, config, &target, policy).await?,
        (true, Some(locks)) => {
            let mover = relocate::Mover {
                cloud: services.volumes,
                locks,
                identity,
                config,
                policy,
            };
            mover.claim(&target).await?
        }
        (true, None) => return Err(Error::NoLockService),
    };
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
    if relocating && config.relocation.delete_source {
        relocate::delete_retired(services.volumes, &claim, policy).await?;
    }

    // The node's own tags: the cluster's plus its id, for finding its interface.
    let mut node_tags: Tags = config.tags.clone();
    if let (Some(key), Some(id)) = (config.node.identity.id_tag(), &node_id) {
        node_tags.insert(key.to_owned(), id.clone());
    }
    let interface = match &config.node.interface {
        None => None,
        Some(opts) => {
            let ask = interface::Ask {
                interfaces: services.interfaces,
                instances: services.volumes,
                identity,
                node_tags: &node_tags,
                opts,
                config,
                policy,
            };
            Some(interface::attach_interface(&ask, hosts.node.as_ref()).await?)
        }
    };

    let env = files::environment(
        identity,
        config,
        &attach,
        node_id.as_deref(),
        slot,
        interface.as_ref(),
    );
    let files_changed =
        files::write_node_files(services, hosts, identity, config, &env, policy).await?;
    let configured = hooks::configure(hosts, config, &env).await?;
    let health_runs = hooks::health(hosts, config, &env).await?;
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
pub(super) async fn blocking<T: Send + 'static>(
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
