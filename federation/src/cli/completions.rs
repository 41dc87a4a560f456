//! `federation completions SHELL` and `federation man --out DIR`: shell
//! completion scripts (`clap_complete`) and man pages (`clap_mangen`), both
//! generated from the same clap definitions the commands parse with, so
//! they never drift from the real flags.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::CommandFactory as _;

use super::Cli;

/// Arguments of `completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Arguments of `man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Folder to write `federation.1` and `federation-<command>.1` into
    /// (created).
    #[arg(long)]
    pub out: PathBuf,
}

/// Prints the completion script for `args.shell` on standard output.
pub fn completions(args: &CompletionsArgs) -> ExitCode {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "federation", &mut buf);
    super::output::emit(&String::from_utf8_lossy(&buf));
    ExitCode::SUCCESS
}

/// Writes one man page per command (and nested command) into `args.out`.
pub fn man(args: &ManArgs) -> ExitCode {
    match write_man(&args.out) {
        Ok(files) => {
            super::output::say!("{} man pages in {}", files, args.out.display());
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(&e, 1),
    }
}

fn write_man(dir: &std::path::Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let count = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "1"))
        .count();
    Ok(count)
}
