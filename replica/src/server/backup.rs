//! The `ReplicaBackup` gRPC service: backs up one of this replica's snapshots to a target
//! (the replica reads its own layers, see [`crate::backup`]), streaming progress.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ironhorn_backup::{
    BackupError, Compression, CreateRequest, Progress, ProgressSnapshot, Target, TargetOptions,
};
use ironhorn_proto::replica as pb;
use ironhorn_proto::replica::replica_backup_server::{ReplicaBackup, ReplicaBackupServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span, warn};

use crate::backup::ReplicaSnapshot;

/// How often progress is sent while a backup runs.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Maps a backup error to a gRPC status (its text is the message).
pub fn backup_status(e: &BackupError) -> Status {
    let m = e.to_string();
    match e {
        BackupError::InvalidTarget { .. } | BackupError::InvalidArgument { .. } => {
            Status::invalid_argument(m)
        }
        BackupError::BackupNotFound(_) => Status::not_found(m),
        BackupError::LockTimeout(_) => Status::unavailable(m),
        BackupError::Cancelled => Status::cancelled(m),
        BackupError::CorruptManifest { .. } | BackupError::BadBlock { .. } => Status::data_loss(m),
        BackupError::LeaseLost(_) => Status::aborted(m),
        BackupError::Store { .. } => Status::unavailable(m),
        BackupError::Io { .. } | BackupError::Task(_) => Status::internal(m),
    }
}

/// Progress as sent on the wire.
pub fn progress_to_pb(p: &ProgressSnapshot, backup_id: String) -> pb::BackupProgress {
    let phase = p
        .phase
        .and_then(|ph| serde_json::to_value(ph).ok())
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    pb::BackupProgress {
        phase,
        total_bytes: p.total_bytes,
        done_bytes: p.done_bytes,
        total_blocks: p.total_blocks,
        done_blocks: p.done_blocks,
        uploaded_blocks: p.transferred_blocks,
        uploaded_bytes: p.transferred_bytes,
        skipped_blocks: p.skipped_blocks,
        zero_blocks: p.zero_blocks,
        backup_id,
    }
}

/// The `ReplicaBackup` service of one replica directory.
#[derive(Clone, Debug)]
pub struct BackupService {
    dir: PathBuf,
}

impl BackupService {
    /// A service backing up snapshots of the replica in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        BackupService { dir }
    }

    /// Wraps the service for `tonic::transport::Server::add_service`.
    pub fn into_server(self) -> ReplicaBackupServer<BackupService> {
        ReplicaBackupServer::new(self)
    }
}

#[tonic::async_trait]
impl ReplicaBackup for BackupService {
    type CreateBackupStream = ReceiverStream<Result<pb::BackupProgress, Status>>;

    async fn create_backup(
        &self,
        request: Request<pb::CreateBackupRequest>,
    ) -> Result<Response<Self::CreateBackupStream>, Status> {
        let r = request.into_inner();
        if r.snapshot.is_empty() || r.target.is_empty() || r.volume.is_empty() {
            return Err(Status::invalid_argument(
                "snapshot, target and volume are required",
            ));
        }
        let compression = if r.compression.is_empty() {
            Compression::Zstd
        } else {
            r.compression.parse().map_err(Status::invalid_argument)?
        };
        let mut opts = TargetOptions::default();
        if r.concurrency > 0 {
            opts.concurrency = r.concurrency as usize;
        }
        let target = Target::open(&r.target, &opts).map_err(|e| backup_status(&e))?;
        let dir = self.dir.clone();
        let snap = r.snapshot.clone();
        let source = tokio::task::spawn_blocking(move || ReplicaSnapshot::open(&dir, &snap))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let req = CreateRequest {
            volume: r.volume.clone(),
            labels: r.labels.into_iter().collect(),
            block_size: (r.block_size > 0).then_some(r.block_size),
            compression,
            incremental: true,
            limit_rate: None,
        };
        let progress = Arc::new(Progress::new());
        let cancel = CancellationToken::new();
        let (tx, rx) = mpsc::channel(4);
        let span = info_span!("replica_backup", snapshot = %r.snapshot, volume = %r.volume);
        let job = {
            let progress = progress.clone();
            let cancel = cancel.clone();
            tokio::spawn(
                async move {
                    target
                        .create_backup(Arc::new(source), req, progress, cancel)
                        .await
                }
                .instrument(span),
            )
        };
        tokio::spawn(async move {
            let mut job = job;
            let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
            loop {
                tokio::select! {
                    done = &mut job => {
                        let msg = match done {
                            Ok(Ok(report)) => Ok(progress_to_pb(&report.progress, report.id)),
                            Ok(Err(e)) => {
                                warn!(error = %e, "backup failed");
                                Err(backup_status(&e))
                            }
                            Err(e) => Err(Status::internal(format!("backup task failed: {e}"))),
                        };
                        let _ = tx.send(msg).await;
                        return;
                    }
                    _ = tick.tick() => {
                        let p = progress_to_pb(&progress.snapshot(), String::new());
                        if tx.send(Ok(p)).await.is_err() {
                            // The caller went away: stop the backup.
                            cancel.cancel();
                        }
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
