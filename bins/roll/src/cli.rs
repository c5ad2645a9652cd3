//! cps-roll's command line. ci/dist includes this file too, to generate the man pages and
//! completions from these very definitions without the shipped binary carrying the generators.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cps_orchestrate::config::parse_duration;

/// The version, the commit it was built from and the build date (see crates/build-info):
/// `--version` and the first log line of every run.
pub const VERSION: &str = cps_build_info::version!();

#[derive(Parser, Debug)]
#[command(
    name = "cps-roll",
    version = VERSION,
    about = "Replace a stateful cluster's outdated nodes one at a time without breaking quorum"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,

    #[command(flatten)]
    pub aws: AwsArgs,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Show every node, its version and what `run` would do; changes nothing.
    Plan {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        select: SelectArgs,
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Replace outdated nodes, each gated on its replacement being InService and Healthy.
    Run {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        select: SelectArgs,
        #[command(flatten)]
        run: RunArgs,
    },
    /// End the launch lifecycle action of an instance stuck in Pending:Wait with ABANDON, so the
    /// group replaces it now. Only a waiting instance is touched.
    Abandon {
        /// The Auto Scaling group.
        #[arg(long)]
        asg: String,
        /// The instance (required when more than one of the group waits in Pending:Wait).
        #[arg(long)]
        instance: Option<String>,
        /// The lifecycle hook (default: the group's only launching hook).
        #[arg(long)]
        hook: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct AwsArgs {
    /// AWS region.
    #[arg(long, env = "AWS_REGION", global = true)]
    pub region: Option<String>,
    /// Another endpoint for EC2 and Auto Scaling (an emulator, a VPC endpoint).
    #[arg(long, env = "CPS_AWS_ENDPOINT", global = true)]
    pub aws_endpoint: Option<String>,
    /// Log format on stderr.
    #[arg(long, env = "CPS_LOG_FORMAT", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// Every Auto Scaling group tagged <cluster-tag>=NAME.
    #[arg(long, value_name = "NAME")]
    pub cluster: Option<String>,
    /// These groups (repeatable or comma-separated).
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    pub asg: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SelectArgs {
    /// The group tag --cluster matches.
    #[arg(long, default_value = "cps:cluster")]
    pub cluster_tag: String,
    /// The group tag that holds a node's id (single-instance groups).
    #[arg(long, default_value = "cps:node-id")]
    pub node_id_tag: String,
    /// Replace the selected nodes even when up to date.
    #[arg(long)]
    pub force: bool,
    /// Only these nodes (node ids, instance ids or group names; repeatable or comma-separated).
    #[arg(long, value_name = "NODE", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Most nodes out of service at once; may not exceed what keeps a majority up.
    #[arg(long, default_value_t = 1)]
    pub max_unavailable: usize,
    /// Roll a cluster of fewer than 3 nodes (every replacement is downtime).
    #[arg(long)]
    pub allow_downtime: bool,
    /// Wait up to --timeout for unhealthy nodes instead of refusing to start.
    #[arg(long)]
    pub wait_healthy: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// How long one replacement may take to be InService and Healthy; --health-command then
    /// has as long again to pass. Also how long the roll waits for an unhealthy cluster.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub timeout: Duration,
    /// Time between looks at the groups.
    #[arg(long, default_value = "1s", value_parser = duration)]
    pub poll_interval: Duration,
    /// A shell command that prints the leader's node id; the leader is replaced last.
    #[arg(long, value_name = "CMD")]
    pub leader_command: Option<String>,
    /// A shell command that exits 0 when the cluster is healthy; run (and retried) after each
    /// replacement before the next node starts. $CPS_ROLL_NODE holds the node just replaced.
    #[arg(long, value_name = "CMD")]
    pub health_command: Option<String>,
    /// Longest one run of --leader-command or --health-command may take.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub command_timeout: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The longest any duration flag may be: cps-attach's configuration caps its timeouts there too.
pub const LONGEST: Duration = Duration::from_secs(24 * 3600);

pub fn duration(text: &str) -> Result<Duration, String> {
    parse_duration(text)
        .filter(|d| !d.is_zero() && *d <= LONGEST)
        .ok_or_else(|| {
            format!(
                "{text:?} is not a duration between 1ms and 24h; write it like 90s, 10m or 1h (a bare number is seconds)"
            )
        })
}
