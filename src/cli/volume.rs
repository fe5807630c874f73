//! `ironhorn volume …`: a client of the manager's REST API for volumes, their snapshots,
//! backups and replicas. Tables for people; `--json` prints the API's JSON for scripts.

use std::collections::BTreeMap;

use anyhow::Context;
use clap::{Args, Subcommand};
use ironhorn_manager::client::{Client, CreateBackup, CreateSnapshot, CreateVolume, RestoreBackup};
use ironhorn_manager::resources::Object;
use ironhorn_manager::resources::{Frontend, Volume};
use serde::Serialize;

use crate::size::ByteSize;

/// Where the manager is and how to authenticate; shared by the API client commands.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// URL of the manager's API.
    #[arg(
        long,
        global = true,
        env = "IRONHORN_MANAGER",
        default_value = "http://127.0.0.1:9500"
    )]
    pub manager: String,
    /// API token (printed by the manager at first start; in DATA_DIR/token).
    #[arg(long, global = true, env = "IRONHORN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl ClientArgs {
    /// A client of the manager.
    pub fn client(&self) -> anyhow::Result<Client> {
        let token = match &self.token {
            Some(t) => t.clone(),
            None => std::fs::read_to_string("ironhorn-data/manager/token")
                .map(|t| t.trim().to_owned())
                .context(
                    "no --token (or IRONHORN_TOKEN) given and no ironhorn-data/manager/token here",
                )?,
        };
        Ok(Client::new(&self.manager, token)?)
    }

    /// Prints `value` as JSON, or `table()` as a table.
    pub fn print<T: Serialize>(
        &self,
        value: &T,
        table: impl FnOnce() -> Table,
    ) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            print!("{}", table());
        }
        Ok(())
    }
}

/// A plain text table: a header and rows, columns padded to the widest cell.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }
    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(c.chars().count());
                }
            }
        }
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let cells: Vec<String> = line
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            writeln!(f, "{}", cells.join("  ").trim_end())?;
        }
        Ok(())
    }
}

/// Shows a value as text through its JSON form (enums as their API names).
pub fn text<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Null) => "-".into(),
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// `ironhorn volume …`
#[derive(Debug, Args)]
pub struct VolumeArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: VolumeCommand,
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume.
    Create {
        /// Name.
        name: String,
        /// Size (4096, 512MiB, 10GiB).
        #[arg(long)]
        size: ByteSize,
        /// Replicas (default: the default-replica-count setting).
        #[arg(long)]
        replicas: Option<u32>,
        /// Restore from this backup.
        #[arg(long)]
        from_backup: Option<String>,
        /// How the volume is exposed where it is attached: nbd (default), ublk
        /// (/dev/ublkbN too; the node needs the ublk driver) or auto (ublk where the
        /// node has it).
        #[arg(long, value_parser = parse_frontend)]
        frontend: Option<Frontend>,
    },
    /// List volumes.
    Ls,
    /// Show one volume.
    Get {
        /// Name.
        name: String,
    },
    /// Delete a volume and its data.
    Rm {
        /// Name.
        name: String,
    },
    /// Attach a volume to a node.
    Attach {
        /// Name.
        name: String,
        /// Node.
        #[arg(long)]
        node: String,
    },
    /// Detach a volume.
    Detach {
        /// Name.
        name: String,
    },
    /// Grow a volume.
    Expand {
        /// Name.
        name: String,
        /// New size.
        #[arg(long)]
        size: ByteSize,
    },
    /// Snapshots of a volume.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Backups of a volume.
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Replicas of a volume.
    #[command(subcommand)]
    Replica(ReplicaCommand),
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Take a snapshot.
    Create {
        /// Volume.
        volume: String,
        /// Snapshot name (default: generated).
        name: Option<String>,
    },
    /// List snapshots.
    Ls {
        /// Volume.
        volume: String,
    },
    /// Remove a snapshot.
    Rm {
        /// Volume.
        volume: String,
        /// Snapshot.
        name: String,
    },
    /// Revert a detached volume to a snapshot.
    Revert {
        /// Volume.
        volume: String,
        /// Snapshot.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Back up a volume (to the backup target).
    Create {
        /// Volume.
        volume: String,
        /// Snapshot to back up (default: a new one).
        #[arg(long)]
        snapshot: Option<String>,
        /// Backup name (default: generated).
        #[arg(long)]
        name: Option<String>,
    },
    /// List backups (of one volume, or all).
    Ls {
        /// Volume.
        volume: Option<String>,
    },
    /// Restore a backup into a new volume.
    Restore {
        /// Backup.
        backup: String,
        /// Name of the new volume.
        #[arg(long)]
        name: String,
        /// Replicas of the new volume.
        #[arg(long)]
        replicas: Option<u32>,
    },
    /// Delete a backup from the target.
    Rm {
        /// Backup.
        backup: String,
    },
}

#[derive(Debug, Subcommand)]
enum ReplicaCommand {
    /// List replicas.
    Ls {
        /// Volume.
        volume: String,
    },
    /// Remove a replica (a new one is scheduled and rebuilt).
    Rm {
        /// Volume.
        volume: String,
        /// Replica.
        name: String,
    },
}

/// Parses `--frontend`: nbd, ublk or auto.
fn parse_frontend(s: &str) -> Result<Frontend, String> {
    match s {
        "nbd" => Ok(Frontend::Nbd),
        "ublk" => Ok(Frontend::Ublk),
        "auto" => Ok(Frontend::Auto),
        other => Err(format!("unknown frontend {other:?} (nbd, ublk or auto)")),
    }
}

fn volumes_table(vols: &[Volume]) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "SIZE",
        "REPLICAS",
        "STATE",
        "ROBUSTNESS",
        "NODE",
        "DEVICE/ENDPOINT",
    ]);
    for v in vols {
        let s = v.status.clone().unwrap_or_default();
        t.row(vec![
            v.name().to_owned(),
            ByteSize(v.spec.size).to_string(),
            v.spec.number_of_replicas.to_string(),
            text(&s.state),
            text(&s.robustness),
            s.current_node
                .or(v.spec.node_id.clone())
                .unwrap_or_else(|| "-".into()),
            s.device.or(s.endpoint).unwrap_or_else(|| "-".into()),
        ]);
    }
    t
}

impl VolumeArgs {
    /// Runs the command.
    pub async fn run(self) -> anyhow::Result<()> {
        let out = &self.client;
        let c = out.client()?;
        match self.command {
            VolumeCommand::Create {
                name,
                size,
                replicas,
                from_backup,
                frontend,
            } => {
                let mut req = CreateVolume::named(name, size.bytes());
                req.number_of_replicas = replicas;
                req.from_backup = from_backup;
                req.frontend = frontend;
                let v = c.create_volume(&req).await?;
                out.print(&v, || volumes_table(std::slice::from_ref(&v)))
            }
            VolumeCommand::Ls => {
                let vols = c.list_volumes().await?;
                out.print(&vols, || volumes_table(&vols))
            }
            VolumeCommand::Get { name } => {
                let v = c.get_volume(&name).await?;
                out.print(&v, || volumes_table(std::slice::from_ref(&v)))
            }
            VolumeCommand::Rm { name } => {
                c.delete_volume(&name).await?;
                out.print(&serde_json::json!({"deleted": name}), || {
                    let mut t = Table::new(&["DELETED"]);
                    t.row(vec![name.clone()]);
                    t
                })
            }
            VolumeCommand::Attach { name, node } => {
                let v = c.attach_volume(&name, &node).await?;
                out.print(&v, || volumes_table(std::slice::from_ref(&v)))
            }
            VolumeCommand::Detach { name } => {
                let v = c.detach_volume(&name).await?;
                out.print(&v, || volumes_table(std::slice::from_ref(&v)))
            }
            VolumeCommand::Expand { name, size } => {
                let v = c.expand_volume(&name, size.bytes()).await?;
                out.print(&v, || volumes_table(std::slice::from_ref(&v)))
            }
            VolumeCommand::Snapshot(cmd) => snapshot(out, &c, cmd).await,
            VolumeCommand::Backup(cmd) => backup(out, &c, cmd).await,
            VolumeCommand::Replica(cmd) => replica(out, &c, cmd).await,
        }
    }
}

async fn snapshot(out: &ClientArgs, c: &Client, cmd: SnapshotCommand) -> anyhow::Result<()> {
    let table = |snaps: &[ironhorn_manager::resources::Snapshot]| {
        let mut t = Table::new(&["NAME", "VOLUME", "READY", "CREATED"]);
        for s in snaps {
            let st = s.status.clone().unwrap_or_default();
            t.row(vec![
                s.name().to_owned(),
                s.spec.volume.clone(),
                st.ready_to_use.to_string(),
                st.creation_time
                    .map(|t| t.0.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        t
    };
    match cmd {
        SnapshotCommand::Create { volume, name } => {
            let s = c
                .create_snapshot(
                    &volume,
                    &CreateSnapshot {
                        name,
                        labels: BTreeMap::new(),
                    },
                )
                .await?;
            out.print(&s, || table(std::slice::from_ref(&s)))
        }
        SnapshotCommand::Ls { volume } => {
            let snaps = c.list_snapshots(&volume).await?;
            out.print(&snaps, || table(&snaps))
        }
        SnapshotCommand::Rm { volume, name } => {
            c.delete_snapshot(&volume, &name).await?;
            out.print(&serde_json::json!({"deleted": name}), || {
                let mut t = Table::new(&["DELETED"]);
                t.row(vec![name.clone()]);
                t
            })
        }
        SnapshotCommand::Revert { volume, name } => {
            let v = c.revert_snapshot(&volume, &name).await?;
            out.print(&v, || volumes_table(std::slice::from_ref(&v)))
        }
    }
}

async fn backup(out: &ClientArgs, c: &Client, cmd: BackupCommand) -> anyhow::Result<()> {
    let table = |backups: &[ironhorn_manager::resources::Backup]| {
        let mut t = Table::new(&["NAME", "VOLUME", "STATE", "PROGRESS", "SIZE", "SNAPSHOT"]);
        for b in backups {
            let st = b.status.clone().unwrap_or_default();
            t.row(vec![
                b.name().to_owned(),
                b.spec.volume.clone(),
                text(&st.state),
                format!("{}%", st.progress),
                ByteSize(st.size).to_string(),
                st.snapshot
                    .or(b.spec.snapshot.clone())
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        t
    };
    match cmd {
        BackupCommand::Create {
            volume,
            snapshot,
            name,
        } => {
            let b = c
                .create_backup(
                    &volume,
                    &CreateBackup {
                        name,
                        snapshot,
                        labels: BTreeMap::new(),
                    },
                )
                .await?;
            out.print(&b, || table(std::slice::from_ref(&b)))
        }
        BackupCommand::Ls { volume } => {
            let list = c.list_backups(volume.as_deref()).await?;
            out.print(&list, || table(&list))
        }
        BackupCommand::Restore {
            backup,
            name,
            replicas,
        } => {
            let v = c
                .restore_backup(
                    &backup,
                    &RestoreBackup {
                        name,
                        number_of_replicas: replicas,
                    },
                )
                .await?;
            out.print(&v, || volumes_table(std::slice::from_ref(&v)))
        }
        BackupCommand::Rm { backup } => {
            c.delete_backup(&backup).await?;
            out.print(&serde_json::json!({"deleted": backup}), || {
                let mut t = Table::new(&["DELETED"]);
                t.row(vec![backup.clone()]);
                t
            })
        }
    }
}

async fn replica(out: &ClientArgs, c: &Client, cmd: ReplicaCommand) -> anyhow::Result<()> {
    match cmd {
        ReplicaCommand::Ls { volume } => {
            let list = c.list_replicas(&volume).await?;
            out.print(&list, || {
                let mut t = Table::new(&["NAME", "NODE", "DISK", "STATE", "MODE", "ADDRESS"]);
                for r in &list {
                    let st = r.status.clone().unwrap_or_default();
                    t.row(vec![
                        r.name().to_owned(),
                        r.spec.node_id.clone(),
                        r.spec.disk_name.clone(),
                        text(&st.state),
                        st.mode.map(|m| text(&m)).unwrap_or_else(|| "-".into()),
                        st.data_address.unwrap_or_else(|| "-".into()),
                    ]);
                }
                t
            })
        }
        ReplicaCommand::Rm { volume, name } => {
            c.remove_replica(&volume, &name).await?;
            out.print(&serde_json::json!({"deleted": name}), || {
                let mut t = Table::new(&["DELETED"]);
                t.row(vec![name.clone()]);
                t
            })
        }
    }
}
