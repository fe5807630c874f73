//! `ironhorn ublk …`: the node's ublk devices (`/dev/ublkbN`) — list them with their state,
//! and delete one whose engine died and will not come back (a quiesced device holds its
//! I/O until an engine recovers it; deleting it fails that I/O).

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;

/// `ironhorn ublk` subcommands.
#[derive(Debug, Subcommand)]
pub enum UblkCommand {
    /// List the kernel's ublk devices: id, state, serving pid, queues, depth.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete ublk device N. A live device whose engine still runs is refused: stop the
    /// engine instead (it removes its device), or pass --force.
    Rm {
        /// Device id N of /dev/ublkbN.
        id: u32,
        /// Delete it even while its engine runs (its I/O fails).
        #[arg(long)]
        force: bool,
    },
}

impl UblkCommand {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            UblkCommand::Ls { json } => {
                let devs = tokio::task::spawn_blocking(ironhorn_engine::ublk::list)
                    .await
                    .context("ublk list task")?;
                if json {
                    let v: Vec<_> = devs
                        .iter()
                        .map(|d| {
                            json!({
                                "id": d.id,
                                "device": format!("/dev/ublkb{}", d.id),
                                "state": d.state,
                                "pid": d.pid,
                                "queues": d.queues,
                                "depth": d.depth,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    for d in devs {
                        println!(
                            "/dev/ublkb{}\t{}\tpid {}\tqueues {}\tdepth {}",
                            d.id, d.state, d.pid, d.queues, d.depth
                        );
                    }
                }
                Ok(())
            }
            UblkCommand::Rm { id, force } => {
                tokio::task::spawn_blocking(move || ironhorn_engine::ublk::remove(id, force))
                    .await
                    .context("ublk remove task")?
                    .with_context(|| format!("delete /dev/ublkb{id}"))?;
                println!("deleted /dev/ublkb{id}");
                Ok(())
            }
        }
    }
}
