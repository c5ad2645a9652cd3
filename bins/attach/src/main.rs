//! cps-attach: at boot, claim this node's EBS volume (or create it), attach it, find and verify
//! its device, make a filesystem only if the device is proven empty, and mount it.
//!
//! This binary only parses arguments, sets up logging, calls `run()` and maps errors to the
//! documented exit codes; the flow lives in cps-orchestrate.

mod cli;

use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use cli::{Cli, Cmd, Common, LogFormat, VERSION};
use cps_orchestrate::{
    AttachConfig, Error, ErrorClass, FsOutcome, Hosts, MountOutcome, Overrides, Services,
};
use tracing::{error, info, warn};

/// Exit codes (documented in the README).
mod exit {
    pub const CONFIG: u8 = 3;
    pub const CLOUD: u8 = 4;
    pub const REFUSED: u8 = 5;
    pub const TIMEOUT: u8 = 6;
    pub const HOST: u8 = 7;
    pub const HOOK: u8 = 8;
    pub const IDENTITY: u8 = 9;
    pub const INTERRUPTED: u8 = 10;
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,aws_config=warn,aws_smithy_runtime=warn,aws_sdk_ec2=warn,aws_sdk_ssm=warn,aws_sdk_secretsmanager=warn",
        )
    });
    // Colour is for a person at a terminal: not in a file or the journal, nor with NO_COLOR.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        // Its report of a failed write goes to stderr too, and panics when stderr is gone.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

enum Failure {
    Identity(cps_aws::Error),
    Attach(Error),
    /// A signal before the boot began.
    Interrupted,
}

impl Failure {
    fn code(&self) -> u8 {
        match self {
            Self::Identity(_) => exit::CLOUD,
            Self::Interrupted => exit::INTERRUPTED,
            Self::Attach(e) => match e.class() {
                ErrorClass::Cloud => exit::CLOUD,
                ErrorClass::Refused => exit::REFUSED,
                ErrorClass::Timeout => exit::TIMEOUT,
                ErrorClass::Host => exit::HOST,
                ErrorClass::Hook => exit::HOOK,
                ErrorClass::Identity => exit::IDENTITY,
                ErrorClass::Interrupted => exit::INTERRUPTED,
            },
        }
    }
}

/// SIGTERM (a service manager stopping the unit, a CI timeout) and SIGINT (Ctrl-C): the first
/// ends the boot at the wait it is in (the receiver turns true); a second quits at once.
fn listen_for_signals() -> tokio::sync::watch::Receiver<bool> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let (term, int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            warn!(error = %e, "cannot listen for signals; SIGTERM and Ctrl-C will end cps-attach at once");
            return rx;
        }
    };
    let (mut term, mut int) = (term, int);
    tokio::spawn(async move {
        let mut seen = false;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if seen {
                error!(signal = name, "interrupted again; quitting at once");
                std::process::exit(i32::from(exit::INTERRUPTED));
            }
            seen = true;
            warn!(
                signal = name,
                "interrupted; ending the boot at the wait it is in (a filesystem being made or a mount under way finishes first); send it again to quit at once"
            );
            let _ = tx.send(true);
        }
    });
    rx
}

/// Completes once a signal was received (never, when no listener runs).
async fn stopped(mut signals: tokio::sync::watch::Receiver<bool>) {
    if signals.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The instance's identity (interrupted by a signal) and the AWS clients.
async fn connect(
    common: &Common,
    config: &AttachConfig,
    signals: &tokio::sync::watch::Receiver<bool>,
) -> Result<(cps_provider::InstanceIdentity, Clients), Failure> {
    let identity = tokio::select! {
        biased;
        () = stopped(signals.clone()) => return Err(Failure::Interrupted),
        identity = cps_aws::fetch_identity(common.imds_endpoint.as_deref()) => {
            identity.map_err(Failure::Identity)?
        }
    };
    info!(instance_id = %identity.instance_id, zone = %identity.availability_zone, region = %identity.region, "instance identity");
    let mut settings = cps_aws::AwsSettings::new(identity.region.clone());
    settings.endpoint_url = common.aws_endpoint.clone();
    let sdk = settings.load().await;
    let clients = Clients {
        ec2: cps_aws::Ec2Api::new(&sdk),
        autoscaling: cps_aws::AutoScalingApi::new(&sdk),
        secrets: cps_aws::SecretsApi::new(&sdk),
        // The relocation lock's table, only when relocation is on.
        locks: match (&config.relocation.mode, &config.relocation.lock_table) {
            (cps_orchestrate::config::RelocationMode::Snapshot, Some(table)) => {
                Some(cps_aws::LockTable::new(&sdk, table))
            }
            _ => None,
        },
    };
    Ok((identity, clients))
}

struct Clients {
    ec2: cps_aws::Ec2Api,
    autoscaling: cps_aws::AutoScalingApi,
    secrets: cps_aws::SecretsApi,
    locks: Option<cps_aws::LockTable>,
}

impl Clients {
    /// Requests sent, by operation, for the report line.
    fn calls(&self) -> std::collections::BTreeMap<&'static str, u64> {
        let mut calls = self.ec2.calls().snapshot();
        calls.extend(self.autoscaling.calls().snapshot());
        calls.extend(self.secrets.calls().snapshot());
        if let Some(locks) = &self.locks {
            calls.extend(locks.calls().snapshot());
        }
        calls
    }
}

fn block_host(config: &AttachConfig) -> Arc<cps_blockdev::LinuxHost> {
    Arc::new(cps_blockdev::LinuxHost::new(
        &config.device_root,
        &config.sysfs_root,
    ))
}

async fn run(common: &Common, config: AttachConfig) -> Result<(), Failure> {
    let signals = listen_for_signals();
    let (identity, clients) = connect(common, &config, &signals).await?;
    let services = Services {
        volumes: &clients.ec2,
        interfaces: &clients.ec2,
        lifecycle: &clients.autoscaling,
        secrets: &clients.secrets,
        locks: clients
            .locks
            .as_ref()
            .map(|l| l as &dyn cps_provider::LockService),
    };
    let hosts = Hosts {
        block: block_host(&config),
        node: Arc::new(cps_node::LinuxNode::new(&config.sysfs_root)),
    };
    let out = cps_orchestrate::boot_until(services, hosts, &identity, &config, stopped(signals))
        .await
        .map_err(Failure::Attach)?;
    let a = &out.attach;
    let (formatted, fs) = match &a.filesystem {
        FsOutcome::Created(fs) => (true, fs),
        FsOutcome::Existing(fs) => (false, fs),
    };
    let calls = clients.calls();
    info!(
        volume_id = %a.volume_id,
        origin = ?a.origin,
        node_id = out.node_id.as_deref().unwrap_or(""),
        device = %a.device.display(),
        fstype = %fs.fstype,
        uuid = fs.uuid.as_deref().unwrap_or(""),
        formatted,
        mount_target = %config.mount.target.display(),
        already_mounted = a.mount == MountOutcome::AlreadyMounted,
        interface_id = out.interface.as_ref().map(|i| i.id.as_str()).unwrap_or(""),
        ip = out.interface.as_ref().and_then(|i| i.private_ip.as_deref()).unwrap_or(""),
        files_changed = out.files_changed,
        configured = ?out.configured,
        health_runs = out.health_runs,
        lifecycle = ?out.lifecycle,
        attach_attempts = a.attach_attempts,
        modified = a.grow.modified.is_some(),
        filesystem_grown = a.grow.filesystem.is_some(),
        api_calls = calls.values().sum::<u64>(),
        calls = %calls.iter().map(|(op, n)| format!("{op}={n}")).collect::<Vec<_>>().join(","),
        "volume ready"
    );
    Ok(())
}

async fn grow(common: &Common, config: AttachConfig) -> Result<(), Failure> {
    let signals = listen_for_signals();
    let (identity, clients) = connect(common, &config, &signals).await?;
    let host = block_host(&config);
    let out = tokio::select! {
        biased;
        () = stopped(signals) => return Err(Failure::Interrupted),
        out = cps_orchestrate::boot::grow::grow_running(&clients.ec2, host, &identity, &config) => {
            out.map_err(Failure::Attach)?
        }
    };
    let calls = clients.calls();
    let (from, to) = out.grow.filesystem.unwrap_or_default();
    info!(
        volume_id = %out.volume_id,
        device = %out.device.display(),
        modified = out.grow.modified.is_some(),
        size_gib = out.grow.modified.as_ref().and_then(|c| c.size_gib),
        filesystem_grown = out.grow.filesystem.is_some(),
        from_bytes = from,
        to_bytes = to,
        deferred = out.grow.deferred.as_deref().unwrap_or(""),
        api_calls = calls.values().sum::<u64>(),
        calls = %calls.iter().map(|(op, n)| format!("{op}={n}")).collect::<Vec<_>>().join(","),
        "grow done"
    );
    Ok(())
}

fn validate(config: &AttachConfig, path: &std::path::Path) {
    println!("{}: valid", path.display());
    print!("{}", config.summary());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.common.log_format);
    let is_validate = matches!(cli.command, Some(Cmd::Validate));
    // validate's output is its report (an error first, at its position); every other run
    // logs the build first.
    if !is_validate {
        info!(version = VERSION, "cps-attach {VERSION}");
    }
    // The default path may be absent when flags carry everything; a named file must exist,
    // and validate always needs one.
    let explicit = is_validate
        || cli.common.config != std::path::Path::new(cps_orchestrate::config::DEFAULT_PATH);
    let overrides: Overrides = cli.overrides.into();
    let config = match AttachConfig::load(&cli.common.config, explicit, &overrides) {
        Ok(c) => c,
        Err(e) => {
            if is_validate {
                // Not eprintln!: with stderr gone it would panic instead of exiting 3.
                let _ = writeln!(std::io::stderr(), "{e}");
            } else {
                error!("{e}");
            }
            return ExitCode::from(exit::CONFIG);
        }
    };
    if is_validate {
        validate(&config, &cli.common.config);
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work = async {
        match cli.command {
            Some(Cmd::Grow) => grow(&cli.common, config).await,
            _ => run(&cli.common, config).await,
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            match &f {
                Failure::Identity(e) => error!("cannot read the instance identity: {e}"),
                Failure::Attach(e) => error!("{e}"),
                Failure::Interrupted => error!("interrupted by a signal before the boot began"),
            }
            ExitCode::from(f.code())
        }
    }
}
