//! cps-attach's command line: arguments, their `CPS_*` variables and the overrides they make.
//! ci/dist includes this file too, to generate the man pages and completions from these very
//! definitions without the shipped binary carrying the generators.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cps_orchestrate::Overrides;

/// The version, the commit it was built from and the build date (see crates/build-info):
/// `--version` and the first log line of every run but `validate`.
pub const VERSION: &str = cps_build_info::version!();

#[derive(Parser, Debug)]
#[command(
    name = "cps-attach",
    version = VERSION,
    about = "Attach, format-if-empty and mount this node's persistent EBS volume"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Cmd>,

    #[command(flatten)]
    pub common: Common,

    #[command(flatten)]
    pub overrides: OverrideArgs,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Attach and mount the volume (the default).
    Run,
    /// Check a configuration file and print the effective settings; touches nothing.
    Validate,
    /// On a running node: modify the volume to the configured size, type and performance, and
    /// grow its filesystem to the device. Touches nothing else.
    Grow,
}

#[derive(Args, Debug)]
pub struct Common {
    /// Configuration file.
    #[arg(short, long, env = "CPS_CONFIG", global = true, default_value = cps_orchestrate::config::DEFAULT_PATH)]
    pub config: PathBuf,

    /// Log format on stderr.
    #[arg(long, env = "CPS_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Instance metadata endpoint (default: the link-local IMDS).
    #[arg(long, env = "CPS_IMDS_ENDPOINT", global = true)]
    pub imds_endpoint: Option<String>,

    /// EC2 API endpoint (default: the region's).
    #[arg(long, env = "CPS_AWS_ENDPOINT", global = true)]
    pub aws_endpoint: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Each wins over the configuration file (see docs/configuration.md).
#[derive(Args, Debug)]
pub struct OverrideArgs {
    /// EC2 device name to attach as (block-device).
    #[arg(long, env = "CPS_BLOCK_DEVICE", global = true)]
    pub block_device: Option<String>,
    /// KEY=VALUE; repeatable; replaces ebs-tags (CPS_TAGS: comma-separated).
    #[arg(long = "tag", env = "CPS_TAGS", global = true, value_delimiter = ',', value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// gp3, gp2, io2, io1, st1, sc1 or standard.
    #[arg(long, env = "CPS_VOLUME_TYPE", global = true)]
    pub volume_type: Option<String>,
    /// Size in GiB of a volume created when none can be claimed.
    #[arg(long, env = "CPS_SIZE", global = true)]
    pub size: Option<i64>,
    #[arg(long, env = "CPS_IOPS", global = true)]
    pub iops: Option<i64>,
    /// MiB/s (gp3).
    #[arg(long, env = "CPS_THROUGHPUT", global = true)]
    pub throughput: Option<i64>,
    #[arg(long, env = "CPS_ENCRYPTED", global = true)]
    pub encrypted: Option<bool>,
    #[arg(long, env = "CPS_KMS_KEY_ID", global = true)]
    pub kms_key_id: Option<String>,
    /// Raw mkfs argument; repeatable or space-separated (replaces file-system).
    #[arg(
        long = "mkfs-arg",
        env = "CPS_MKFS_ARGS",
        global = true,
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub mkfs_args: Option<Vec<String>>,
    /// ext4, xfs or btrfs (replaces file-system.mkfs).
    #[arg(long, env = "CPS_FS_TYPE", global = true)]
    pub fs_type: Option<String>,
    #[arg(long, env = "CPS_FS_LABEL", global = true)]
    pub fs_label: Option<String>,
    /// Extra mkfs.<type> argument; repeatable or space-separated.
    #[arg(
        long = "fs-option",
        env = "CPS_FS_OPTIONS",
        global = true,
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub fs_options: Option<Vec<String>>,
    #[arg(long, env = "CPS_MOUNT_TARGET", global = true)]
    pub mount_target: Option<String>,
    /// Repeatable or comma-separated; replaces mount.options.
    #[arg(
        long = "mount-option",
        env = "CPS_MOUNT_OPTIONS",
        global = true,
        value_delimiter = ','
    )]
    pub mount_options: Option<Vec<String>>,
    #[arg(long, env = "CPS_OWNER", global = true)]
    pub owner: Option<String>,
    #[arg(long, env = "CPS_GROUP", global = true)]
    pub group: Option<String>,
    /// Octal, like 0750.
    #[arg(long, env = "CPS_MODE", global = true)]
    pub mode: Option<String>,
    /// fstab or none.
    #[arg(long, env = "CPS_PERSIST", global = true)]
    pub persist: Option<String>,
    #[arg(long, env = "CPS_FSTAB", global = true)]
    pub fstab: Option<String>,
    #[arg(long, env = "CPS_CREATE_TIMEOUT", global = true)]
    pub create_timeout: Option<String>,
    #[arg(long, env = "CPS_ATTACH_TIMEOUT", global = true)]
    pub attach_timeout: Option<String>,
    #[arg(long, env = "CPS_DEVICE_TIMEOUT", global = true)]
    pub device_timeout: Option<String>,
    #[arg(long, env = "CPS_MODIFY_TIMEOUT", global = true)]
    pub modify_timeout: Option<String>,
    /// Where device nodes and disk/by-id links are (default /dev).
    #[arg(long, env = "CPS_DEVICE_ROOT", global = true)]
    pub device_root: Option<String>,
    /// Where sysfs is (default /sys).
    #[arg(long, env = "CPS_SYSFS_ROOT", global = true)]
    pub sysfs_root: Option<String>,
    /// pool, node-id or slot (identity.mode).
    #[arg(long = "identity", env = "CPS_IDENTITY", global = true)]
    pub identity_mode: Option<String>,
    /// This node's id (identity.node-id). Not CPS_NODE_ID: that is the output in node.env.
    #[arg(long, env = "CPS_IDENTITY_NODE_ID", global = true)]
    pub node_id: Option<String>,
    /// Slots in the pool (identity.max-slots).
    #[arg(long, env = "CPS_MAX_SLOTS", global = true)]
    pub max_slots: Option<i64>,
    /// Name of the group's launch lifecycle hook (lifecycle.hook).
    #[arg(long, env = "CPS_LIFECYCLE_HOOK", global = true)]
    pub lifecycle_hook: Option<String>,
    /// Where to write the identity environment (default /run/cps/node.env).
    #[arg(long, env = "CPS_ENV_FILE", global = true)]
    pub env_file: Option<String>,
    /// Where the once-per-boot marker lives (default /run/cps).
    #[arg(long, env = "CPS_RUN_DIR", global = true)]
    pub run_dir: Option<String>,
    /// Overall retry deadline for one AWS request (default 10m).
    #[arg(long, env = "CPS_COMMAND_TIMEOUT", global = true)]
    pub command_timeout: Option<String>,
}

pub fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

impl From<OverrideArgs> for Overrides {
    fn from(a: OverrideArgs) -> Self {
        Overrides {
            block_device: a.block_device,
            tags: a.tags,
            volume_type: a.volume_type,
            size: a.size,
            iops: a.iops,
            throughput: a.throughput,
            encrypted: a.encrypted,
            kms_key_id: a.kms_key_id,
            mkfs_args: a.mkfs_args,
            fs_type: a.fs_type,
            fs_label: a.fs_label,
            fs_options: a.fs_options,
            mount_target: a.mount_target,
            mount_options: a.mount_options,
            owner: a.owner,
            group: a.group,
            mode: a.mode,
            persist: a.persist,
            fstab: a.fstab,
            create_timeout: a.create_timeout,
            attach_timeout: a.attach_timeout,
            device_timeout: a.device_timeout,
            modify_timeout: a.modify_timeout,
            device_root: a.device_root,
            sysfs_root: a.sysfs_root,
            identity_mode: a.identity_mode,
            node_id: a.node_id,
            max_slots: a.max_slots,
            lifecycle_hook: a.lifecycle_hook,
            env_file: a.env_file,
            run_dir: a.run_dir,
            command_timeout: a.command_timeout,
        }
    }
}
