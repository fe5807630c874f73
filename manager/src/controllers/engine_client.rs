//! Calls from the manager to a running engine's control service, each with a deadline, over
//! channels cached per address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ironhorn_proto::engine::engine_control_client::EngineControlClient;
use ironhorn_proto::engine::{
    AddReplicaRequest, BackupCreateRequest, BackupStatus, EngineInfo, EngineInfoRequest,
    ExpandVolumeRequest, RemoveReplicaRequest, SnapshotCreateRequest, SnapshotListRequest,
    SnapshotListResponse, SnapshotRemoveRequest, SnapshotRevertRequest,
};
use tonic::transport::{Channel, Endpoint};

/// Deadline of one engine call (snapshot removal merges data, so it gets more).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of calls that move data (remove snapshot, revert, expand).
pub const SLOW_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed engine call: which engine, which call, what it said.
#[derive(Debug, Clone, thiserror::Error)]
#[error("engine {address}: {call}: {message}")]
pub struct EngineCallError {
    /// Control address of the engine.
    pub address: String,
    /// The call.
    pub call: &'static str,
    /// gRPC code.
    pub code: tonic::Code,
    /// What it said.
    pub message: String,
}

/// Cached channels to engines.
#[derive(Debug, Clone, Default)]
pub struct Engines {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Engines {
    fn client(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<EngineControlClient<Channel>, EngineCallError> {
        let mut g = self.channels.lock().map_err(|_| EngineCallError {
            address: address.to_owned(),
            call: "connect",
            code: tonic::Code::Internal,
            message: "channel cache poisoned".into(),
        })?;
        let ch = match g.get(address) {
            Some(c) => c.clone(),
            None => {
                let ch = Endpoint::from_shared(format!("http://{address}"))
                    .map_err(|e| EngineCallError {
                        address: address.to_owned(),
                        call: "connect",
                        code: tonic::Code::InvalidArgument,
                        message: e.to_string(),
                    })?
                    .connect_timeout(Duration::from_secs(2))
                    .connect_lazy();
                g.insert(address.to_owned(), ch.clone());
                ch
            }
        };
        let _ = timeout;
        Ok(EngineControlClient::new(ch))
    }

    /// Forgets the channel of an engine that went away.
    pub fn forget(&self, address: &str) {
        if let Ok(mut g) = self.channels.lock() {
            g.remove(address);
        }
    }

    async fn call<T, F, Fut>(
        &self,
        address: &str,
        call: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, EngineCallError>
    where
        F: FnOnce(EngineControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let c = self.client(address, timeout)?;
        let err = |code, message: String| EngineCallError {
            address: address.to_owned(),
            call,
            code,
            message,
        };
        match tokio::time::timeout(timeout, f(c)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(err(s.code(), s.message().to_owned())),
            Err(_) => Err(err(
                tonic::Code::DeadlineExceeded,
                format!("no answer in {timeout:?}"),
            )),
        }
    }

    /// Volume, replicas, modes, rebuild progress.
    pub async fn info(&self, address: &str) -> Result<EngineInfo, EngineCallError> {
        self.call(address, "info", CALL_TIMEOUT, |mut c| async move {
            c.info(EngineInfoRequest {}).await
        })
        .await
    }

    /// Adds a replica (rebuilt online). Returns when the rebuild started.
    pub async fn add_replica(
        &self,
        address: &str,
        replica: &str,
    ) -> Result<EngineInfo, EngineCallError> {
        let replica = replica.to_owned();
        self.call(
            address,
            "add replica",
            SLOW_CALL_TIMEOUT,
            |mut c| async move { c.add_replica(AddReplicaRequest { address: replica }).await },
        )
        .await
    }

    /// Removes a replica from the engine.
    pub async fn remove_replica(
        &self,
        address: &str,
        replica: &str,
    ) -> Result<EngineInfo, EngineCallError> {
        let replica = replica.to_owned();
        self.call(
            address,
            "remove replica",
            CALL_TIMEOUT,
            |mut c| async move {
                c.remove_replica(RemoveReplicaRequest { address: replica })
                    .await
            },
        )
        .await
    }

    /// Takes a snapshot on every replica.
    pub async fn create_snapshot(
        &self,
        address: &str,
        name: &str,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<String, EngineCallError> {
        let name = name.to_owned();
        self.call(
            address,
            "create snapshot",
            SLOW_CALL_TIMEOUT,
            |mut c| async move {
                c.create_snapshot(SnapshotCreateRequest {
                    name,
                    labels: labels.into_iter().collect(),
                })
                .await
            },
        )
        .await
        .map(|r| r.name)
    }

    /// Lists snapshots.
    pub async fn snapshots(&self, address: &str) -> Result<SnapshotListResponse, EngineCallError> {
        self.call(
            address,
            "list snapshots",
            CALL_TIMEOUT,
            |mut c| async move { c.list_snapshots(SnapshotListRequest {}).await },
        )
        .await
    }

    /// Removes (purges) a snapshot.
    pub async fn remove_snapshot(&self, address: &str, name: &str) -> Result<(), EngineCallError> {
        let name = name.to_owned();
        self.call(
            address,
            "remove snapshot",
            SLOW_CALL_TIMEOUT,
            |mut c| async move { c.remove_snapshot(SnapshotRemoveRequest { name }).await },
        )
        .await
        .map(|_| ())
    }

    /// Reverts the volume to a snapshot.
    pub async fn revert(&self, address: &str, name: &str) -> Result<(), EngineCallError> {
        let name = name.to_owned();
        self.call(address, "revert", SLOW_CALL_TIMEOUT, |mut c| async move {
            c.revert_snapshot(SnapshotRevertRequest { name }).await
        })
        .await
        .map(|_| ())
    }

    /// Grows the volume.
    pub async fn expand(&self, address: &str, size: u64) -> Result<(), EngineCallError> {
        self.call(address, "expand", SLOW_CALL_TIMEOUT, |mut c| async move {
            c.expand(ExpandVolumeRequest { size }).await
        })
        .await
        .map(|_| ())
    }

    /// Starts a backup of `snapshot` to `target` (backup volume `volume`); returns the job
    /// at once, its progress is in [`Engines::info`].
    pub async fn create_backup(
        &self,
        address: &str,
        snapshot: &str,
        target: &str,
        volume: &str,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<BackupStatus, EngineCallError> {
        let req = BackupCreateRequest {
            snapshot: snapshot.to_owned(),
            target: target.to_owned(),
            volume: volume.to_owned(),
            labels: labels.into_iter().collect(),
            compression: String::new(),
            block_size: 0,
        };
        self.call(
            address,
            "create backup",
            SLOW_CALL_TIMEOUT,
            |mut c| async move { c.create_backup(req).await },
        )
        .await
    }
}
