//! The `ironhorn` binary: one executable for every ironhorn process (replica, and later
//! engine, agent, manager, csi). Subcommands live in [`cli`]; they call into the crates.
//!
//! Logs go to stderr (`RUST_LOG` filter, default `info`); stdout is kept for output a
//! command is asked to print.

mod cli;
mod size;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging();
    raise_nofile_limit();
    // The engine's data path is one chain of tasks per request (NBD connection, replica
    // writer and reader tasks); on one thread their wake-ups stay on-CPU (DESIGN.md §8),
    // and the replicas run on the other cores.
    let mut builder = if cli.single_threaded() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().thread_name("ironhorn-rt").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Printed rather than logged: visible whatever RUST_LOG says, and only once.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sends `tracing` output to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Raises the soft open-file limit to the hard limit: a replica holds a socket per data
/// connection and a file per layer, and the default soft limit (often 1024) is low.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            } else {
                tracing::debug!(from = soft, to = hard, "raised the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}
