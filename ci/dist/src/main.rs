//! cps-dist: writes the man pages and shell completions of cps-attach and cps-roll from their
//! clap definitions, so the packages describe exactly the flags the binaries take. A separate
//! program so the shipped binaries carry no generators.
//!
//! `cps-dist OUT` writes `OUT/man/*.1` (one page per command and subcommand) and
//! `OUT/completions/{bash,zsh,fish}/…` under the names each shell looks for.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Command, CommandFactory};
use clap_complete::Shell;

// The binaries' own definitions, compiled here too. Their fields are read by the binaries
// only, hence the allowance.
#[allow(dead_code)]
#[path = "../../../bins/attach/src/cli.rs"]
mod attach_cli;
#[allow(dead_code)]
#[path = "../../../bins/roll/src/cli.rs"]
mod roll_cli;

fn commands() -> [Command; 2] {
    [attach_cli::Cli::command(), roll_cli::Cli::command()]
}

/// Where each shell's completion for `name` is installed (the Debian and Fedora paths agree).
fn completion_file(shell: Shell, name: &str) -> PathBuf {
    match shell {
        Shell::Bash => PathBuf::from("bash").join(name),
        Shell::Zsh => PathBuf::from("zsh").join(format!("_{name}")),
        Shell::Fish => PathBuf::from("fish").join(format!("{name}.fish")),
        _ => unreachable!("only bash, zsh and fish are packaged"),
    }
}

fn generate(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    for cmd in commands() {
        clap_mangen::generate_to(cmd.clone(), &man)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let name = cmd.get_name().to_owned();
            let path = out.join("completions").join(completion_file(shell, &name));
            std::fs::create_dir_all(path.parent().expect("a file under a directory"))?;
            let mut file = std::fs::File::create(&path)?;
            clap_complete::generate(shell, &mut cmd.clone(), &name, &mut file);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: cps-dist OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cps-dist: {e}");
            ExitCode::FAILURE
        }
    }
}
