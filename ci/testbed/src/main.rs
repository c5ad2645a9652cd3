//! cps-testbed: the replacement story as a demo, and the benchmarks, on the local bench.

mod bench;
mod bench_life;
mod bench_probe;
mod bench_roll;
mod demo;
mod demo_vm;

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
        #[arg(long, required_unless_present = "vm")]
        attach_bin: Option<PathBuf>,
        /// The story on real guests (QEMU): the user data and the cps-attach it downloads come
        /// from CPS_VM_USER_DATA and CPS_VM_ATTACH (ci/demo --vm sets them).
        #[arg(long)]
        vm: bool,
    },
    /// API calls, attempts, overhead, herd behaviour, binary size and memory; prints Markdown.
    Bench {
        #[arg(long)]
        attach_bin: PathBuf,
        #[arg(long)]
        roll_bin: PathBuf,
        /// The second design's roll script, run side by side with cps-roll.
        #[arg(long, default_value = "../shared/reference/roll_cluster_instances.sh")]
        script: PathBuf,
        /// Herd sizes to run.
        #[arg(long, value_delimiter = ',', default_value = "50,200")]
        herd: Vec<usize>,
        /// Which parts to run: attach (everything of cps-attach), herds (only its herd tables),
        /// binary (only the real binary's boot paths), probe (the blank check's cost), roll, life (grow, restore, relocation, the lock).
        #[arg(long, value_delimiter = ',', default_value = "attach,probe,roll,life")]
        parts: Vec<String>,
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
        Cmd::Demo { attach_bin, vm } => {
            if !cps_testbed::ready("demo") {
                return ExitCode::from(2);
            }
            match attach_bin {
                Some(bin) if !vm => runtime.block_on(demo::run(&bin)),
                _ => runtime.block_on(demo_vm::run()),
            }
        }
        Cmd::Bench {
            attach_bin,
            roll_bin,
            script,
            herd,
            parts,
        } => {
            if !cps_testbed::ready("bench") {
                return ExitCode::from(2);
            }
            runtime.block_on(async {
                println!("# cps bench report\n");
                if parts.iter().any(|p| p == "attach") {
                    bench::run(&attach_bin, &herd).await?;
                } else if parts.iter().any(|p| p == "herds") {
                    bench::herds(&herd).await?;
                } else if parts.iter().any(|p| p == "binary") {
                    bench::binary(&attach_bin).await?;
                }
                if parts.iter().any(|p| p == "probe") {
                    bench_probe::run()?;
                }
                if parts.iter().any(|p| p == "roll") {
                    bench_roll::run(&roll_bin, &script).await?;
                }
                if parts.iter().any(|p| p == "life") {
                    bench_life::run(&attach_bin).await?;
                }
                Ok(())
            })
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
