//! `ironhorn backup …`: back up a replica's snapshot to object storage, list, inspect,
//! delete, verify and restore backups (library: `ironhorn-backup`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use ironhorn_backup::{
    BackupSummary, Compression, CreateRequest, Phase, Progress, ProgressSnapshot, Target,
    TargetOptions,
};
use ironhorn_replica::backup::{ReplicaRestore, ReplicaSnapshot};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::replica::spawn_signal_handler;
use crate::size::ByteSize;

/// `ironhorn backup` arguments: where the backups are, then what to do.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Backup target: s3://BUCKET/PREFIX[?endpoint=URL&region=R&path_style=true] or
    /// file:///PATH. S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    /// (or web identity / container credentials).
    #[arg(long, global = true, env = "IRONHORN_BACKUP_TARGET")]
    target: Option<String>,

    /// S3 endpoint (for S3-compatible services), e.g. http://127.0.0.1:9000.
    #[arg(long, global = true, env = "IRONHORN_BACKUP_ENDPOINT")]
    endpoint: Option<String>,

    /// S3 region (default: AWS_REGION, then us-east-1).
    #[arg(long, global = true, env = "IRONHORN_BACKUP_REGION")]
    region: Option<String>,

    /// Block transfers in flight (1-64); memory used is about twice this many blocks.
    #[arg(long, global = true, env = "IRONHORN_BACKUP_CONCURRENCY", default_value_t = ironhorn_backup::target::DEFAULT_CONCURRENCY)]
    concurrency: usize,

    /// Print JSON (a final result object) instead of text and a progress bar.
    #[arg(long, global = true)]
    json: bool,

    /// What to do.
    #[command(subcommand)]
    command: BackupCommand,
}

/// `ironhorn backup` subcommands.
#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Back up a snapshot of a replica directory (incremental on the newest earlier backup
    /// of the same volume whose snapshot is an ancestor).
    Create {
        /// Replica directory holding the snapshot.
        #[arg(long)]
        replica_dir: PathBuf,
        /// Snapshot to back up.
        #[arg(long)]
        snapshot: String,
        /// Backup volume name (default: the replica directory's name).
        #[arg(long)]
        volume: Option<String>,
        /// Label KEY=VALUE; repeat for several.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Block size of a new backup volume (a power of two, 4KiB to 64MiB; default 2MiB).
        #[arg(long)]
        block_size: Option<ByteSize>,
        /// Compression of new blocks: zstd, lz4 or none.
        #[arg(long, default_value = "zstd")]
        compression: Compression,
        /// Read the whole snapshot instead of only what changed since the last backup.
        #[arg(long)]
        full: bool,
        /// At most this many volume bytes per second, e.g. 100MiB.
        #[arg(long)]
        limit_rate: Option<ByteSize>,
    },
    /// List backups (of one volume, or all).
    Ls {
        /// Only this volume's backups.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Show one backup's manifest.
    Inspect {
        /// Backup id.
        id: String,
        /// Include the block list (index and hash of each stored block).
        #[arg(long)]
        blocks: bool,
    },
    /// Delete a backup and the blocks no other backup uses.
    Rm {
        /// Backup id.
        id: String,
    },
    /// Delete blocks no backup uses (leftovers of interrupted backups).
    Gc,
    /// Read every block of a backup and check its hash and crc; exit status 1 if any is bad.
    Verify {
        /// Backup id.
        id: String,
    },
    /// Restore a backup into a new replica directory (checked block by block; nothing is
    /// left at DIR if it fails).
    Restore {
        /// Backup id.
        id: String,
        /// New replica directory (must not exist, or be empty).
        #[arg(long)]
        to: PathBuf,
        /// At most this many volume bytes per second.
        #[arg(long)]
        limit_rate: Option<ByteSize>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("bad label {s:?}: expected KEY=VALUE")),
    }
}

/// Shows a progress bar (bytes, rate, ETA) on stderr while `progress` moves; nothing when
/// stderr is not a terminal or `hidden`. Returns a stopper.
pub(crate) fn progress_bar(
    progress: Arc<Progress>,
    what: &'static str,
    hidden: bool,
) -> impl FnOnce() {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    let bar = ProgressBar::with_draw_target(
        Some(0),
        if hidden {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    let style = ProgressStyle::with_template(
        "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    let stop = CancellationToken::new();
    let s = stop.clone();
    let b = bar.clone();
    let task = tokio::spawn(async move {
        loop {
            render(&b, &progress.snapshot(), what);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = s.cancelled() => break,
            }
        }
        render(&b, &progress.snapshot(), what);
        b.finish_and_clear();
    });
    move || {
        stop.cancel();
        drop(task);
    }
}

pub(crate) fn render(bar: &indicatif::ProgressBar, p: &ProgressSnapshot, what: &str) {
    bar.set_length(p.total_bytes);
    bar.set_position(p.done_bytes);
    let msg = match p.phase {
        Some(Phase::Locking) => "locking",
        Some(Phase::Scanning) => "scanning",
        Some(Phase::Committing) => "committing",
        _ => what,
    };
    bar.set_message(msg.to_owned());
}

fn human(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

fn print_summaries(list: &[BackupSummary]) {
    println!(
        "{:<32} {:<20} {:<20} {:>10} {:>10} {:>10}  LABELS",
        "ID", "VOLUME", "SNAPSHOT", "SIZE", "STORED", "UPLOADED"
    );
    for b in list {
        let labels: Vec<String> = b.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<32} {:<20} {:<20} {:>10} {:>10} {:>10}  {}",
            b.id,
            b.volume,
            b.snapshot,
            human(b.size),
            human(b.stored_volume_bytes),
            human(b.uploaded_bytes),
            labels.join(",")
        );
    }
}

impl BackupArgs {
    /// Runs the subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        let url = self
            .target
            .clone()
            .context("--target is required (or IRONHORN_BACKUP_TARGET)")?;
        let opts = TargetOptions {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            concurrency: self.concurrency,
            ..TargetOptions::default()
        };
        let target = Target::open(&url, &opts)?;
        let cancel = CancellationToken::new();
        spawn_signal_handler(cancel.clone())?;
        let json = self.json;
        let hidden = json;
        match self.command {
            BackupCommand::Create {
                replica_dir,
                snapshot,
                volume,
                labels,
                block_size,
                compression,
                full,
                limit_rate,
            } => {
                let volume = match volume {
                    Some(v) => v,
                    None => replica_dir
                        .canonicalize()
                        .ok()
                        .and_then(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
                        .context("cannot name the volume after --replica-dir; give --volume")?,
                };
                let dir = replica_dir.clone();
                let snap = snapshot.clone();
                let source =
                    tokio::task::spawn_blocking(move || ReplicaSnapshot::open(&dir, &snap))
                        .await?
                        .with_context(|| {
                            format!("open snapshot {snapshot:?} of {}", replica_dir.display())
                        })?;
                let req = CreateRequest {
                    volume,
                    labels: labels.into_iter().collect(),
                    block_size: block_size.map(ByteSize::bytes),
                    compression,
                    incremental: !full,
                    limit_rate: limit_rate.map(ByteSize::bytes),
                };
                let progress = Arc::new(Progress::new());
                let stop = progress_bar(progress.clone(), "uploading", hidden);
                let r = target
                    .create_backup(Arc::new(source), req, progress, cancel)
                    .await;
                stop();
                let r = r?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    let p = &r.progress;
                    println!(
                        "{}: read {}, uploaded {} blocks ({}), {} already stored, {} zero{}",
                        r.id,
                        human(p.done_bytes),
                        p.transferred_blocks,
                        human(p.transferred_bytes),
                        p.skipped_blocks,
                        p.zero_blocks,
                        r.base
                            .as_deref()
                            .map(|b| format!(", incremental on {b}"))
                            .unwrap_or_default()
                    );
                }
            }
            BackupCommand::Ls { volume } => {
                let list = target.list_backups(volume.as_deref()).await?;
                if json {
                    println!("{}", serde_json::to_string(&list)?);
                } else {
                    print_summaries(&list);
                }
            }
            BackupCommand::Inspect { id, blocks } => {
                let m = target.read_manifest(&id).await?;
                let mut v = serde_json::to_value(&m)?;
                if !blocks && let Some(o) = v.as_object_mut() {
                    o.remove("blocks");
                    o.insert("block_count".into(), json!(m.blocks.len()));
                    o.insert("stored_volume_bytes".into(), json!(m.stored_volume_bytes()));
                }
                if json {
                    println!("{v}");
                } else {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
            }
            BackupCommand::Rm { id } => {
                let r = target.delete_backup(&id, cancel).await?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "deleted {}; removed {} unused blocks ({})",
                        r.id,
                        r.gc.blocks_deleted,
                        human(r.gc.bytes_freed)
                    );
                }
            }
            BackupCommand::Gc => {
                let r = target.gc(cancel).await?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                        "{} backups reference {} blocks; removed {} unused blocks ({})",
                        r.manifests,
                        r.blocks_kept,
                        r.blocks_deleted,
                        human(r.bytes_freed)
                    );
                }
            }
            BackupCommand::Verify { id } => {
                let progress = Arc::new(Progress::new());
                let stop = progress_bar(progress.clone(), "verifying", hidden);
                let r = target.verify_backup(&id, progress).await;
                stop();
                let r = r?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    for b in &r.bad {
                        println!(
                            "BAD block {} at offsets {:?}: {}",
                            b.hash, b.offsets, b.problem
                        );
                    }
                    println!(
                        "{}: {} blocks checked, {} bad",
                        r.id,
                        r.blocks_checked,
                        r.bad.len()
                    );
                }
                if !r.ok() {
                    bail!("backup {} has {} bad blocks", r.id, r.bad.len());
                }
            }
            BackupCommand::Restore { id, to, limit_rate } => {
                let progress = Arc::new(Progress::new());
                let stop = progress_bar(progress.clone(), "restoring", hidden);
                let dest = to.clone();
                let r = target
                    .restore_backup(
                        &id,
                        move |m| ReplicaRestore::create(&dest, m.size, &m.id),
                        progress,
                        limit_rate.map(ByteSize::bytes),
                        cancel,
                    )
                    .await;
                stop();
                let r = r?;
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(&json!({ "report": r, "dir": to }))?
                    );
                } else {
                    println!(
                        "restored {} ({}) into {}",
                        r.id,
                        human(r.size),
                        to.display()
                    );
                }
            }
        }
        Ok(())
    }
}

/// `ironhorn engine ctl backup` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum EngineBackupCtl {
    /// Back up a snapshot of the volume: a healthy (RW) replica reads its own layers and
    /// uploads what changed; progress shows in `info`. Waits for the end unless --no-wait.
    Create {
        /// Snapshot to back up (take one with `snapshot create`).
        #[arg(long)]
        snapshot: String,
        /// Backup target: s3://BUCKET/PREFIX?... or file:///PATH (as seen by the replica;
        /// S3 credentials from the replica's environment).
        #[arg(long, env = "IRONHORN_BACKUP_TARGET")]
        target: String,
        /// Backup volume name (default: the engine's volume name).
        #[arg(long)]
        volume: Option<String>,
        /// Label KEY=VALUE; repeat for several.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Compression of new blocks: zstd, lz4 or none.
        #[arg(long, default_value = "zstd")]
        compression: Compression,
        /// Block size of a new backup volume (default 2MiB).
        #[arg(long)]
        block_size: Option<ByteSize>,
        /// Return once the backup has started.
        #[arg(long)]
        no_wait: bool,
    },
}

/// JSON of one engine backup job (`engine ctl info`).
pub(crate) fn engine_backup_json(b: &ironhorn_proto::engine::BackupStatus) -> serde_json::Value {
    json!({
        "job": b.job,
        "snapshot": b.snapshot,
        "target": b.target,
        "replica": b.replica,
        "state": b.state,
        "phase": b.phase,
        "total_bytes": b.total_bytes,
        "done_bytes": b.done_bytes,
        "total_blocks": b.total_blocks,
        "done_blocks": b.done_blocks,
        "uploaded_blocks": b.uploaded_blocks,
        "uploaded_bytes": b.uploaded_bytes,
        "skipped_blocks": b.skipped_blocks,
        "backup_id": b.backup_id,
        "error": b.error,
    })
}

/// Text lines of the engine's backup jobs (`engine ctl info`).
pub(crate) fn print_engine_backups(list: &[ironhorn_proto::engine::BackupStatus]) {
    if list.is_empty() {
        return;
    }
    println!(
        "{:<5} {:<20} {:<8} {:>7}  BACKUP / ERROR",
        "JOB", "SNAPSHOT", "STATE", "DONE"
    );
    for b in list {
        let pct = if b.total_bytes > 0 {
            format!("{:.0}%", 100.0 * b.done_bytes as f64 / b.total_bytes as f64)
        } else {
            "-".into()
        };
        let what = if b.error.is_empty() {
            &b.backup_id
        } else {
            &b.error
        };
        println!(
            "{:<5} {:<20} {:<8} {:>7}  {}",
            b.job, b.snapshot, b.state, pct, what
        );
    }
}

/// Runs `engine ctl backup …` against an engine.
pub(crate) async fn engine_ctl(
    c: &mut ironhorn_proto::engine::engine_control_client::EngineControlClient<
        tonic::transport::Channel,
    >,
    cmd: EngineBackupCtl,
    json: bool,
) -> anyhow::Result<()> {
    use ironhorn_proto::engine as pb;
    let status = |s: tonic::Status| anyhow::anyhow!("{} ({:?})", s.message(), s.code());
    let EngineBackupCtl::Create {
        snapshot,
        target,
        volume,
        labels,
        compression,
        block_size,
        no_wait,
    } = cmd;
    let started = c
        .create_backup(pb::BackupCreateRequest {
            snapshot,
            target,
            volume: volume.unwrap_or_default(),
            labels: labels.into_iter().collect(),
            compression: compression.to_string(),
            block_size: block_size.map(ByteSize::bytes).unwrap_or(0),
        })
        .await
        .map_err(status)?
        .into_inner();
    let job = started.job;
    let mut last = started;
    if !no_wait {
        use indicatif::{ProgressBar, ProgressDrawTarget};
        let bar = ProgressBar::with_draw_target(
            Some(0),
            if json {
                ProgressDrawTarget::hidden()
            } else {
                ProgressDrawTarget::stderr()
            },
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let info = c
                .info(pb::EngineInfoRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let Some(b) = info.backups.into_iter().find(|b| b.job == job) else {
                bail!("backup job {job} is no longer listed by the engine");
            };
            bar.set_length(b.total_bytes);
            bar.set_position(b.done_bytes);
            bar.set_message(b.phase.clone());
            last = b;
            if last.state != "running" {
                break;
            }
        }
        bar.finish_and_clear();
    }
    if json {
        println!("{}", engine_backup_json(&last));
    } else if last.state == "done" {
        println!(
            "{}: uploaded {} blocks ({}), {} already stored (replica {})",
            last.backup_id,
            last.uploaded_blocks,
            human(last.uploaded_bytes),
            last.skipped_blocks,
            last.replica
        );
    } else {
        println!(
            "backup job {job} {} on replica {}",
            last.state, last.replica
        );
    }
    if last.state == "error" {
        bail!("backup failed: {}", last.error);
    }
    Ok(())
}
