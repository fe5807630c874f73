//! `ironhorn engine …`: serve a volume (`serve`) and control a running engine (`ctl`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ironhorn_engine::control::EngineService;
use ironhorn_engine::nbd::{NbdExport, NbdListen, NbdListener, parse_nbd_url};
use ironhorn_engine::volume::{DEFAULT_CONNS_PER_REPLICA, Volume, VolumeConfig};
use ironhorn_proto::engine::engine_control_client::EngineControlClient;
use ironhorn_proto::engine::{self as pb};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::replica::{resolve, spawn_signal_handler};
use crate::size::ByteSize;

/// `ironhorn engine` subcommands.
#[derive(Debug, Subcommand)]
pub enum EngineCommand {
    /// Serve one volume over NBD, mirrored to its replicas.
    Serve(ServeArgs),
    /// Control a running engine through its gRPC service.
    Ctl(CtlArgs),
}

impl EngineCommand {
    /// Whether this is `engine serve`.
    pub fn is_serve(&self) -> bool {
        matches!(self, EngineCommand::Serve(_))
    }

    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            EngineCommand::Serve(args) => args.run().await,
            EngineCommand::Ctl(args) => args.run().await,
        }
    }
}

/// Arguments of `ironhorn engine serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Volume name; also the NBD export name.
    #[arg(long, env = "IRONHORN_VOLUME")]
    volume: String,

    /// Volume size, e.g. 10GiB. Every replica must have this size.
    #[arg(long, env = "IRONHORN_VOLUME_SIZE")]
    size: ByteSize,

    /// Control address (HOST:PORT) of a replica; repeat for each replica.
    #[arg(long = "replica", required = true)]
    replicas: Vec<String>,

    /// NBD endpoint: tcp://HOST:PORT or unix:///PATH; repeat for several. Required unless
    /// the frontend is ublk only.
    #[arg(long = "nbd")]
    nbd: Vec<String>,

    /// Frontends to serve the volume through: `nbd` (the --nbd endpoints) and/or `ublk`
    /// (/dev/ublkbN, Linux with the ublk_drv module); repeat or comma-separate.
    #[arg(long = "frontend", value_delimiter = ',', default_value = "nbd")]
    frontends: Vec<Frontend>,

    /// ublk device id N of /dev/ublkbN (default: any free). An engine restarted with the id
    /// of a device whose engine died takes the device over (user recovery).
    #[arg(long, env = "IRONHORN_UBLK_ID")]
    ublk_id: Option<u32>,

    /// ublk hardware queues (one thread each).
    #[arg(long, default_value_t = ironhorn_engine::ublk::DEFAULT_QUEUES)]
    ublk_queues: u16,

    /// ublk queue depth (requests in flight per queue).
    #[arg(long, default_value_t = ironhorn_engine::ublk::DEFAULT_DEPTH)]
    ublk_depth: u16,

    /// Address (HOST:PORT) of the engine's gRPC control service.
    #[arg(long, env = "IRONHORN_ENGINE_LISTEN")]
    listen: String,

    /// Time a replica has to answer one request before it is dropped (e.g. 4s, 500ms).
    #[arg(long, env = "IRONHORN_REPLICA_TIMEOUT", default_value = REPLICA_TIMEOUT_DEFAULT, value_parser = parse_duration)]
    replica_timeout: Duration,

    /// Data connections to each replica.
    #[arg(long, env = "IRONHORN_CONNS_PER_REPLICA", default_value_t = DEFAULT_CONNS_PER_REPLICA)]
    conns_per_replica: usize,
}

/// A frontend of `engine serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Frontend {
    /// NBD server on the --nbd endpoints.
    Nbd,
    /// ublk block device /dev/ublkbN.
    Ublk,
}

/// `--replica-timeout` default, as text for clap; a test keeps it equal to
/// [`ironhorn_engine::volume::DEFAULT_REPLICA_TIMEOUT`].
const REPLICA_TIMEOUT_DEFAULT: &str = "4s";

/// Parses `4s`, `500ms`, `1m` (humantime).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))
}

impl ServeArgs {
    async fn run(self) -> anyhow::Result<()> {
        if self.conns_per_replica == 0 || self.conns_per_replica > 64 {
            bail!("--conns-per-replica must be between 1 and 64");
        }
        let serve_nbd = self.frontends.contains(&Frontend::Nbd);
        let serve_ublk = self.frontends.contains(&Frontend::Ublk);
        if serve_nbd && self.nbd.is_empty() {
            bail!("the nbd frontend needs at least one --nbd endpoint");
        }
        if !serve_nbd && !self.nbd.is_empty() {
            bail!("--nbd given but the nbd frontend is not selected (--frontend nbd,ublk)");
        }
        if serve_ublk && !ironhorn_engine::ublk::available() {
            bail!(
                "the ublk frontend needs the kernel's ublk driver (/dev/ublk-control; modprobe ublk_drv)"
            );
        }
        let listens: Vec<NbdListen> = self
            .nbd
            .iter()
            .map(|u| parse_nbd_url(u).with_context(|| format!("bad --nbd {u:?}")))
            .collect::<anyhow::Result<_>>()?;
        let control = resolve(&self.listen)
            .await
            .context("bad --listen address")?;
        let volume = Volume::open(VolumeConfig {
            name: self.volume.clone(),
            size: self.size.bytes(),
            replicas: self.replicas.clone(),
            timeout: self.replica_timeout,
            conns_per_replica: self.conns_per_replica,
        })
        .await
        .with_context(|| format!("open volume {}", self.volume))?;
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone())?;
        let export = Arc::new(NbdExport {
            name: self.volume.clone(),
            device: volume.clone(),
            read_only: false,
        });
        let mut frontends = Vec::new();
        let mut tasks = Vec::new();
        for l in &listens {
            let listener = l.bind().await.with_context(|| format!("bind {l}"))?;
            // With port 0 the clients need the port the listener actually got.
            let bound = match (l, &listener) {
                (NbdListen::Tcp { host, .. }, NbdListener::Tcp(t)) => NbdListen::Tcp {
                    host: host.clone(),
                    port: t.local_addr().context("NBD listener address")?.port(),
                },
                _ => l.clone(),
            };
            frontends.push(bound.client_uri(&self.volume));
            let export = export.clone();
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                match listener {
                    NbdListener::Tcp(t) => {
                        ironhorn_engine::nbd::serve_tcp(t, export, shutdown).await
                    }
                    NbdListener::Unix(u) => {
                        ironhorn_engine::nbd::serve_unix(u, export, shutdown).await
                    }
                }
            }));
        }
        let ublk = if serve_ublk {
            let cfg = ironhorn_engine::ublk::UblkConfig {
                id: self.ublk_id,
                queues: self.ublk_queues,
                depth: self.ublk_depth,
            };
            let rt = tokio::runtime::Handle::current();
            let device = volume.clone();
            let server =
                tokio::task::spawn_blocking(move || ironhorn_engine::ublk::start(device, &cfg, rt))
                    .await
                    .context("ublk start task")?
                    .context("start the ublk frontend")?;
            frontends.push(format!("ublk://{}", server.block_device()));
            Some(server)
        } else {
            None
        };
        let grpc_listener = tokio::net::TcpListener::bind(control)
            .await
            .with_context(|| format!("bind control {control}"))?;
        let control_addr = grpc_listener.local_addr()?;
        tracing::info!(volume = %self.volume, control = %control_addr, frontends = ?frontends, "engine serving");
        let service = EngineService::new(volume.clone(), frontends);
        let incoming =
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
            .await
            .context("engine control server")?;
        for t in tasks {
            let _ = t.await;
        }
        if let Some(server) = ublk {
            match tokio::task::spawn_blocking(move || server.stop()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "ublk stop failed"),
                Err(e) => tracing::warn!(error = %e, "ublk stop task failed"),
            }
        }
        // Leave the replicas with everything durable.
        use ironhorn_engine::device::BlockDevice;
        if let Err(e) = volume.flush().await {
            tracing::warn!(error = %e, "final flush failed");
        }
        tracing::info!("engine stopped");
        Ok(())
    }
}

/// Arguments of `ironhorn engine ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// Control address (HOST:PORT) of the engine.
    #[arg(long, env = "IRONHORN_ENGINE")]
    engine: String,

    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,

    /// What to do.
    #[command(subcommand)]
    command: CtlCommand,
}

/// `ironhorn engine ctl` subcommands.
#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Volume, size, frontends, replicas and their modes, rebuild progress.
    Info,
    /// Replicas of the volume.
    #[command(subcommand)]
    Replica(ReplicaCtl),
    /// Snapshots of the volume.
    #[command(subcommand)]
    Snapshot(SnapshotCtl),
    /// Backups of the volume, taken by a healthy replica.
    #[command(subcommand)]
    Backup(super::backup::EngineBackupCtl),
    /// Grow the volume, e.g. `expand 20GiB`.
    Expand {
        /// New size.
        size: ByteSize,
    },
}

#[derive(Debug, Subcommand)]
enum ReplicaCtl {
    /// List replicas with their modes.
    Ls,
    /// Add a replica (control address); it is rebuilt online, then becomes RW.
    Add {
        /// Control address HOST:PORT.
        address: String,
    },
    /// Remove a replica.
    Rm {
        /// Control address HOST:PORT.
        address: String,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCtl {
    /// Take a snapshot (a name is generated when none is given).
    Create {
        /// Snapshot name.
        name: Option<String>,
        /// Label KEY=VALUE; repeat for several.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// List snapshots.
    Ls,
    /// Remove a snapshot (its data is merged into its child).
    Rm {
        /// Snapshot name.
        name: String,
    },
    /// Revert the volume to a snapshot.
    Revert {
        /// Snapshot name.
        name: String,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("bad label {s:?}: expected KEY=VALUE")),
    }
}

fn mode_name(m: i32) -> &'static str {
    match pb::ReplicaMode::try_from(m) {
        Ok(pb::ReplicaMode::Rw) => "RW",
        Ok(pb::ReplicaMode::Wo) => "WO",
        Ok(pb::ReplicaMode::Err) => "ERR",
        _ => "?",
    }
}

fn replica_json(r: &pb::ReplicaStatus) -> Value {
    json!({
        "address": r.address,
        "mode": mode_name(r.mode),
        "message": r.message,
        "rebuild_done_bytes": r.rebuild_done_bytes,
        "rebuild_total_bytes": r.rebuild_total_bytes,
        "epoch": r.epoch,
    })
}

fn info_json(i: &pb::EngineInfo) -> Value {
    json!({
        "volume": i.volume,
        "size": i.size,
        "frontends": i.frontends,
        "epoch": i.epoch,
        "robustness": i.robustness,
        "replicas": i.replicas.iter().map(replica_json).collect::<Vec<_>>(),
        "backups": i.backups.iter().map(super::backup::engine_backup_json).collect::<Vec<_>>(),
    })
}

fn snapshots_json(s: &pb::SnapshotListResponse) -> Value {
    Value::Array(
        s.snapshots
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "parent": s.parent,
                    "children": s.children,
                    "created_unix_ms": s.created_unix_ms,
                    "labels": s.labels,
                    "size_bytes": s.size_bytes,
                    "removed": s.removed,
                    "is_head": s.is_head,
                })
            })
            .collect(),
    )
}

fn print_replicas(rs: &[pb::ReplicaStatus]) {
    println!("{:<24} {:<4} {:>7}  MESSAGE", "ADDRESS", "MODE", "REBUILD");
    for r in rs {
        let progress = if r.rebuild_total_bytes > 0 && mode_name(r.mode) == "WO" {
            format!(
                "{:.0}%",
                100.0 * r.rebuild_done_bytes as f64 / r.rebuild_total_bytes as f64
            )
        } else {
            "-".into()
        };
        println!(
            "{:<24} {:<4} {:>7}  {}",
            r.address,
            mode_name(r.mode),
            progress,
            r.message
        );
    }
}

fn print_info(i: &pb::EngineInfo) {
    println!("volume:     {}", i.volume);
    println!("size:       {} bytes", i.size);
    println!("robustness: {}", i.robustness);
    println!("epoch:      {}", i.epoch);
    for f in &i.frontends {
        println!("frontend:   {f}");
    }
    print_replicas(&i.replicas);
    super::backup::print_engine_backups(&i.backups);
}

fn print_snapshots(s: &pb::SnapshotListResponse) {
    println!("{:<32} {:<32} {:>12}  CREATED", "NAME", "PARENT", "SIZE");
    for s in &s.snapshots {
        let mut name = s.name.clone();
        if s.removed {
            name.push_str(" (removed)");
        }
        println!(
            "{:<32} {:<32} {:>12}  {}",
            name, s.parent, s.size_bytes, s.created_unix_ms
        );
    }
}

impl CtlArgs {
    async fn run(self) -> anyhow::Result<()> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.engine))
            .with_context(|| format!("bad --engine address {:?}", self.engine))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach the engine at {}", self.engine))?;
        let mut c = EngineControlClient::new(channel);
        let json = self.json;
        let status = |s: tonic::Status| anyhow::anyhow!("{} ({:?})", s.message(), s.code());
        // Each answer is printed as JSON with --json, as text otherwise.
        let emit = |value: Value, text: &dyn Fn()| {
            if json {
                println!("{value}");
            } else {
                text();
            }
        };
        match self.command {
            CtlCommand::Info | CtlCommand::Expand { .. } => {
                let i = match self.command {
                    CtlCommand::Expand { size } => {
                        c.expand(pb::ExpandVolumeRequest { size: size.bytes() })
                            .await
                    }
                    _ => c.info(pb::EngineInfoRequest {}).await,
                }
                .map_err(status)?
                .into_inner();
                emit(info_json(&i), &|| print_info(&i));
            }
            CtlCommand::Replica(r) => {
                let i = match r {
                    ReplicaCtl::Ls => c.info(pb::EngineInfoRequest {}).await,
                    ReplicaCtl::Add { address } => {
                        c.add_replica(pb::AddReplicaRequest { address }).await
                    }
                    ReplicaCtl::Rm { address } => {
                        c.remove_replica(pb::RemoveReplicaRequest { address }).await
                    }
                }
                .map_err(status)?
                .into_inner();
                let value = Value::Array(i.replicas.iter().map(replica_json).collect());
                emit(value, &|| print_replicas(&i.replicas));
            }
            CtlCommand::Backup(b) => super::backup::engine_ctl(&mut c, b, json).await?,
            CtlCommand::Snapshot(SnapshotCtl::Create { name, labels }) => {
                let labels: HashMap<String, String> = labels.into_iter().collect();
                let r = c
                    .create_snapshot(pb::SnapshotCreateRequest {
                        name: name.unwrap_or_default(),
                        labels,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                emit(json!({ "name": r.name }), &|| println!("{}", r.name));
            }
            CtlCommand::Snapshot(s) => {
                let list = match s {
                    SnapshotCtl::Rm { name } => {
                        c.remove_snapshot(pb::SnapshotRemoveRequest { name }).await
                    }
                    SnapshotCtl::Revert { name } => {
                        c.revert_snapshot(pb::SnapshotRevertRequest { name }).await
                    }
                    _ => c.list_snapshots(pb::SnapshotListRequest {}).await,
                }
                .map_err(status)?
                .into_inner();
                emit(snapshots_json(&list), &|| print_snapshots(&list));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn replica_timeout_default_is_the_engines() {
        assert_eq!(
            parse_duration(REPLICA_TIMEOUT_DEFAULT).unwrap(),
            ironhorn_engine::volume::DEFAULT_REPLICA_TIMEOUT
        );
        assert!(parse_duration("soon").is_err());
    }
}
