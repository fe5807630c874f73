//! The `EngineControl` gRPC service: a thin adapter over [`Volume`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ironhorn_proto::engine::engine_control_server::{EngineControl, EngineControlServer};
use ironhorn_proto::engine::{self as pb};
use ironhorn_proto::replica::{self as rpb, replica_backup_client::ReplicaBackupClient};
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use crate::stats::IoCounters;
use crate::volume::{Mode, SnapshotInfo, Volume};

/// The engine's control service.
#[derive(Clone)]
pub struct EngineService {
    volume: Arc<Volume>,
    frontends: Vec<String>,
    backups: Arc<Backups>,
}

/// Most backup jobs remembered for `info`.
pub const BACKUP_HISTORY: usize = 16;

/// Backup jobs started through this engine (newest last).
#[derive(Default)]
struct Backups {
    next: AtomicU64,
    jobs: Mutex<Vec<pb::BackupStatus>>,
}

impl Backups {
    fn update(&self, job: u64, f: impl FnOnce(&mut pb::BackupStatus)) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = jobs.iter_mut().find(|j| j.job == job) {
            f(j);
        }
    }

    fn list(&self) -> Vec<pb::BackupStatus> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl EngineService {
    /// A service over `volume`, whose frontends are listed in `info`.
    pub fn new(volume: Arc<Volume>, frontends: Vec<String>) -> Self {
        EngineService {
            volume,
            frontends,
            backups: Arc::default(),
        }
    }

    /// Wraps the service for `tonic::transport::Server::add_service`.
    pub fn into_server(self) -> EngineControlServer<EngineService> {
        EngineControlServer::new(self)
    }

    async fn info_now(&self) -> pb::EngineInfo {
        let replicas = self
            .volume
            .replicas()
            .await
            .into_iter()
            .map(|r| pb::ReplicaStatus {
                address: r.address,
                mode: match r.mode {
                    Mode::RW => pb::ReplicaMode::Rw,
                    Mode::WO => pb::ReplicaMode::Wo,
                    Mode::ERR => pb::ReplicaMode::Err,
                } as i32,
                message: r.message,
                rebuild_done_bytes: r.rebuild_done_bytes,
                rebuild_total_bytes: r.rebuild_total_bytes,
                epoch: r.epoch,
            })
            .collect();
        pb::EngineInfo {
            volume: self.volume.name().to_owned(),
            size: self.volume.size_bytes(),
            frontends: self.frontends.clone(),
            replicas,
            epoch: self.volume.epoch(),
            robustness: self.volume.robustness().await.to_owned(),
            backups: self.backups.list(),
            io: Some(io_to_pb(self.volume.io_stats())),
        }
    }

    async fn snapshot_list(&self) -> Result<pb::SnapshotListResponse, Status> {
        let snapshots = self
            .volume
            .snapshots()
            .await?
            .into_iter()
            .map(snapshot_to_pb)
            .collect();
        Ok(pb::SnapshotListResponse { snapshots })
    }
}

fn io_to_pb(c: IoCounters) -> pb::IoStats {
    pb::IoStats {
        read_ops: c.read_ops,
        read_bytes: c.read_bytes,
        read_latency_us: c.read_latency_us,
        write_ops: c.write_ops,
        write_bytes: c.write_bytes,
        write_latency_us: c.write_latency_us,
        unmap_ops: c.unmap_ops,
        unmap_bytes: c.unmap_bytes,
        flush_ops: c.flush_ops,
        errors: c.errors,
    }
}

fn snapshot_to_pb(s: SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        name: s.name,
        parent: s.parent,
        children: s.children,
        created_unix_ms: s.created_unix_ms,
        labels: s.labels.into_iter().collect(),
        size_bytes: s.size_bytes,
        removed: s.removed,
        is_head: s.is_head,
    }
}

fn require(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl EngineControl for EngineService {
    async fn info(
        &self,
        _request: Request<pb::EngineInfoRequest>,
    ) -> Result<Response<pb::EngineInfo>, Status> {
        Ok(Response::new(self.info_now().await))
    }

    async fn add_replica(
        &self,
        request: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::EngineInfo>, Status> {
        let address = request.into_inner().address;
        require("address", &address)?;
        self.volume
            .add_replica(&address)
            .instrument(info_span!("add_replica", replica = %address))
            .await?;
        Ok(Response::new(self.info_now().await))
    }

    async fn remove_replica(
        &self,
        request: Request<pb::RemoveReplicaRequest>,
    ) -> Result<Response<pb::EngineInfo>, Status> {
        let address = request.into_inner().address;
        require("address", &address)?;
        self.volume.remove_replica(&address).await?;
        Ok(Response::new(self.info_now().await))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::SnapshotCreateRequest>,
    ) -> Result<Response<pb::SnapshotCreateResponse>, Status> {
        let req = request.into_inner();
        let name = self
            .volume
            .snapshot(&req.name, req.labels.into_iter().collect())
            .await?;
        Ok(Response::new(pb::SnapshotCreateResponse { name }))
    }

    async fn list_snapshots(
        &self,
        _request: Request<pb::SnapshotListRequest>,
    ) -> Result<Response<pb::SnapshotListResponse>, Status> {
        Ok(Response::new(self.snapshot_list().await?))
    }

    async fn remove_snapshot(
        &self,
        request: Request<pb::SnapshotRemoveRequest>,
    ) -> Result<Response<pb::SnapshotListResponse>, Status> {
        let name = request.into_inner().name;
        require("name", &name)?;
        self.volume.remove_snapshot(&name).await?;
        Ok(Response::new(self.snapshot_list().await?))
    }

    async fn revert_snapshot(
        &self,
        request: Request<pb::SnapshotRevertRequest>,
    ) -> Result<Response<pb::SnapshotListResponse>, Status> {
        let name = request.into_inner().name;
        require("name", &name)?;
        self.volume.revert(&name).await?;
        Ok(Response::new(self.snapshot_list().await?))
    }

    async fn create_backup(
        &self,
        request: Request<pb::BackupCreateRequest>,
    ) -> Result<Response<pb::BackupStatus>, Status> {
        let r = request.into_inner();
        require("snapshot", &r.snapshot)?;
        require("target", &r.target)?;
        let volume = if r.volume.is_empty() {
            self.volume.name().to_owned()
        } else {
            r.volume.clone()
        };
        // The snapshot must exist on the volume (so on every RW replica).
        let snapshots = self.volume.snapshots().await?;
        if !snapshots.iter().any(|s| s.name == r.snapshot && !s.is_head) {
            return Err(Status::not_found(format!(
                "snapshot {:?} not found",
                r.snapshot
            )));
        }
        let replica = self
            .volume
            .replicas()
            .await
            .into_iter()
            .find(|x| x.mode == Mode::RW)
            .map(|x| x.address)
            .ok_or_else(|| {
                Status::failed_precondition("no healthy (RW) replica to back up from")
            })?;
        let mut client = ReplicaBackupClient::connect(format!("http://{replica}"))
            .await
            .map_err(|e| Status::unavailable(format!("connect to replica {replica}: {e}")))?;
        let mut stream = client
            .create_backup(rpb::CreateBackupRequest {
                snapshot: r.snapshot.clone(),
                target: r.target.clone(),
                volume,
                labels: r.labels,
                compression: r.compression,
                block_size: r.block_size,
                concurrency: 0,
            })
            .await?
            .into_inner();
        let job = self.backups.next.fetch_add(1, Ordering::Relaxed) + 1;
        let status = pb::BackupStatus {
            job,
            snapshot: r.snapshot.clone(),
            target: r.target.clone(),
            replica: replica.clone(),
            state: "running".into(),
            ..Default::default()
        };
        {
            let mut jobs = self.backups.jobs.lock().unwrap_or_else(|p| p.into_inner());
            jobs.push(status.clone());
            let excess = jobs.len().saturating_sub(BACKUP_HISTORY);
            jobs.drain(..excess);
        }
        let backups = self.backups.clone();
        let span = info_span!("backup", job, snapshot = %r.snapshot, replica = %replica);
        tokio::spawn(
            async move {
                loop {
                    match stream.message().await {
                        Ok(Some(p)) => {
                            let done = !p.backup_id.is_empty();
                            backups.update(job, |j| {
                                j.phase = p.phase.clone();
                                j.total_bytes = p.total_bytes;
                                j.done_bytes = p.done_bytes;
                                j.total_blocks = p.total_blocks;
                                j.done_blocks = p.done_blocks;
                                j.uploaded_blocks = p.uploaded_blocks;
                                j.uploaded_bytes = p.uploaded_bytes;
                                j.skipped_blocks = p.skipped_blocks;
                                if done {
                                    j.state = "done".into();
                                    j.backup_id = p.backup_id.clone();
                                }
                            });
                            if done {
                                info!(backup = %p.backup_id, "backup done");
                                return;
                            }
                        }
                        Ok(None) => {
                            backups.update(job, |j| {
                                j.state = "error".into();
                                j.error = "the replica ended the backup without a result".into();
                            });
                            return;
                        }
                        Err(e) => {
                            warn!(error = %e.message(), "backup failed");
                            backups.update(job, |j| {
                                j.state = "error".into();
                                j.error = e.message().to_owned();
                            });
                            return;
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(status))
    }

    async fn expand(
        &self,
        request: Request<pb::ExpandVolumeRequest>,
    ) -> Result<Response<pb::EngineInfo>, Status> {
        let size = request.into_inner().size;
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(Status::invalid_argument(format!(
                "size {size} must be a positive multiple of 4096"
            )));
        }
        self.volume.expand(size).await?;
        Ok(Response::new(self.info_now().await))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use ironhorn_replica::server::{DEFAULT_MAX_DATA_CONNECTIONS, ReplicaServer, ServeConfig};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::device::BlockDevice;
    use crate::volume::VolumeConfig;

    const SIZE: u64 = 16 << 20;

    /// Reads, writes, zeroes and flushes through a volume on a real replica move the
    /// counters `Info` reports.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn info_counts_io() {
        let dir = tempfile::tempdir().expect("tempdir");
        let replica = ReplicaServer::bind(ServeConfig {
            dir: dir.path().join("r1"),
            size: Some(SIZE),
            control_listen: "127.0.0.1:0".parse().expect("addr"),
            data_listen: "127.0.0.1:0".parse().expect("addr"),
            max_data_connections: DEFAULT_MAX_DATA_CONNECTIONS,
        })
        .await
        .expect("bind replica");
        let control = replica.control_addr().to_string();
        let stop = CancellationToken::new();
        let task = tokio::spawn(replica.run(stop.clone()));
        let volume = Volume::open(VolumeConfig {
            name: "v".into(),
            size: SIZE,
            replicas: vec![control],
            timeout: Duration::from_secs(5),
            conns_per_replica: 1,
        })
        .await
        .expect("open volume");
        let service = EngineService::new(volume.clone(), vec![]);
        let io = |i: pb::EngineInfo| i.io.expect("io counters in info");
        assert_eq!(io(service.info_now().await), pb::IoStats::default());

        for i in 0..3u64 {
            volume
                .write(i * 4096, Bytes::from(vec![7u8; 4096]), false)
                .await
                .expect("write");
        }
        let got = volume.read(0, 8192).await.expect("read");
        assert_eq!(&got[..4096], &[7u8; 4096][..]);
        volume
            .write_zeroes(1 << 20, 1 << 20, false)
            .await
            .expect("zero");
        volume.flush().await.expect("flush");
        // Out of range: answered with an error, counted as one.
        assert!(volume.read(SIZE, 4096).await.is_err());

        let c = io(service.info_now().await);
        assert_eq!((c.write_ops, c.write_bytes), (3, 3 * 4096), "{c:?}");
        assert_eq!((c.read_ops, c.read_bytes), (2, 8192), "{c:?}");
        assert_eq!((c.unmap_ops, c.unmap_bytes), (1, 1 << 20), "{c:?}");
        assert_eq!((c.flush_ops, c.errors), (1, 1), "{c:?}");
        assert!(c.write_latency_us > 0 && c.read_latency_us > 0, "{c:?}");

        stop.cancel();
        let _ = task.await;
    }
}
