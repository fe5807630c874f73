//! Command-line interface: clap definitions and the code each subcommand runs.

mod agent;
mod backup;
mod crd;
mod csi;
mod engine;
mod manager;
mod nbd;
mod node;
mod replica;
mod setting;
mod ublk;
mod up;
mod volume;

use clap::{Parser, Subcommand};

/// ironhorn: distributed, replicated block storage for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "ironhorn", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    command: Command,
}

/// Top-level subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Replica process: serves one replica of one volume from a directory.
    #[command(subcommand)]
    Replica(replica::ReplicaCommand),
    /// Backups to object storage (S3 or a directory): create, ls, inspect, rm, gc, verify,
    /// restore.
    Backup(backup::BackupArgs),
    /// Node agent: registers the node and its disks with the manager and runs the engine and
    /// replica processes the manager wants on this node.
    Agent(agent::AgentArgs),
    /// The manager: embedded store, REST API and web UI, agent service, controllers.
    Manager(manager::ManagerArgs),
    /// Engine process: serves one volume over NBD, mirrored to its replicas; and its control.
    #[command(subcommand)]
    Engine(engine::EngineCommand),
    /// The whole system on this machine: the manager (API on 127.0.0.1:9500) and three
    /// agents (node-1..3); Ctrl-C stops it, running it again brings back the same volumes.
    Up(up::UpArgs),
    /// CSI driver (Identity, Controller, Node) on a unix socket, for Kubernetes.
    Csi(csi::CsiArgs),
    /// Prints the CustomResourceDefinitions of every resource kind (deploy/crds.yaml).
    Crd(crd::CrdArgs),
    /// Kernel NBD client: attach an export to /dev/nbdN (kept connected across engine
    /// restarts), list, detach.
    #[command(subcommand)]
    Nbd(nbd::NbdCommand),
    /// The node's ublk devices: list them, delete one left behind by a dead engine.
    #[command(subcommand)]
    Ublk(ublk::UblkCommand),
    /// Volumes through the manager's API: create, ls, get, rm, attach, detach, expand,
    /// snapshot …, backup …, replica ….
    Volume(volume::VolumeArgs),
    /// Nodes and their disks through the manager's API: ls, get, update.
    Node(node::NodeArgs),
    /// Settings through the manager's API: ls, get, set.
    Setting(setting::SettingArgs),
}

impl Cli {
    /// Whether the command runs best on a single-threaded runtime (the engine's data path).
    pub fn single_threaded(&self) -> bool {
        matches!(&self.command, Command::Engine(e) if e.is_serve())
    }

    /// Runs the chosen subcommand to completion.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Replica(cmd) => cmd.run().await,
            Command::Backup(args) => args.run().await,
            Command::Agent(args) => args.run().await,
            Command::Manager(args) => args.run().await,
            Command::Engine(cmd) => cmd.run().await,
            Command::Up(args) => args.run().await,
            Command::Csi(args) => args.run().await,
            Command::Crd(args) => args.run().await,
            Command::Nbd(cmd) => cmd.run().await,
            Command::Ublk(cmd) => cmd.run().await,
            Command::Volume(args) => args.run().await,
            Command::Node(args) => args.run().await,
            Command::Setting(args) => args.run().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
