//! `pvpatch`: the post-link tool.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pvpatch",
    version,
    about = "Paravirtualization patching for x86-64 kernel images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the op catalogue: ids, names, native forms, inputs, outputs, effects.
    Ops,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Ops => print!("{}", pvpatch::catalogue::render()),
    }
    ExitCode::SUCCESS
}
