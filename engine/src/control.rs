//! The `EngineControl` gRPC service: a thin adapter over [`Volume`].

use std::sync::Arc;

use ironhorn_proto::engine::engine_control_server::{EngineControl, EngineControlServer};
use ironhorn_proto::engine::{self as pb};
use tonic::{Request, Response, Status};
use tracing::{Instrument, info_span};

use crate::volume::{Mode, SnapshotInfo, Volume};

/// The engine's control service.
#[derive(Clone)]
pub struct EngineService {
    volume: Arc<Volume>,
    frontends: Vec<String>,
}

impl EngineService {
    /// A service over `volume`, whose frontends are listed in `info`.
    pub fn new(volume: Arc<Volume>, frontends: Vec<String>) -> Self {
        EngineService { volume, frontends }
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
