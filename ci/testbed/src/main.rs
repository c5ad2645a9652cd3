//! cps-testbed: the replacement story as a demo, and the benchmarks, on the local bench.

mod bench;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cps-testbed",
    about = "The cps bench: AWS emulator, fake IMDS, loop devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot, write, replace, re-run: the story of one node, narrated step by step.
    Demo {
        /// The cps-attach binary to run on each simulated instance.
        #[arg(long)]
        attach_bin: PathBuf,
    },
    /// API calls, attempts, overhead, herd behaviour, binary size and memory; prints Markdown.
    Bench {
        #[arg(long)]
        attach_bin: PathBuf,
        /// Herd sizes to run.
        #[arg(long, value_delimiter = ',', default_value = "50,200")]
        herd: Vec<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match cli.command {
        Cmd::Demo { attach_bin } => {
            if !cps_testbed::ready("demo") {
                return ExitCode::from(2);
            }
            runtime.block_on(demo::run(&attach_bin))
        }
        Cmd::Bench { attach_bin, herd } => {
            if !cps_testbed::ready("bench") {
                return ExitCode::from(2);
            }
            runtime.block_on(bench::run(&attach_bin, &herd))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cps-testbed: {e}");
            ExitCode::FAILURE
        }
    }
}
