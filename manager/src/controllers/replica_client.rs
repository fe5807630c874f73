//! Calls from the manager straight to replicas, for a detached volume (no engine runs, so
//! no write can come in between): snapshot, remove a snapshot, revert — on every trusted
//! replica, so they stay the same.

use std::time::Duration;

use ironhorn_proto::replica::replica_control_client::ReplicaControlClient;
use ironhorn_proto::replica::{
    CreateSnapshotRequest, PurgeRequest, RemoveSnapshotRequest, RevertRequest,
};
use tonic::transport::Endpoint;

use super::engine_client::EngineCallError;

/// Deadline of one replica call (purge merges data).
pub const REPLICA_CALL_TIMEOUT: Duration = Duration::from_secs(60);

async fn client(
    address: &str,
    call: &'static str,
) -> Result<ReplicaControlClient<tonic::transport::Channel>, EngineCallError> {
    let err = |code, message: String| EngineCallError {
        address: address.to_owned(),
        call,
        code,
        message,
    };
    let ch = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| err(tonic::Code::InvalidArgument, e.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(REPLICA_CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| err(tonic::Code::Unavailable, e.to_string()))?;
    Ok(ReplicaControlClient::new(ch))
}

fn status_err(address: &str, call: &'static str, s: tonic::Status) -> EngineCallError {
    EngineCallError {
        address: address.to_owned(),
        call,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

/// Takes snapshot `name` on one replica.
pub async fn snapshot(
    address: &str,
    name: &str,
    labels: std::collections::BTreeMap<String, String>,
) -> Result<(), EngineCallError> {
    let mut c = client(address, "replica snapshot").await?;
    c.create_snapshot(CreateSnapshotRequest {
        name: name.to_owned(),
        labels: labels.into_iter().collect(),
    })
    .await
    .map(|_| ())
    .map_err(|s| status_err(address, "replica snapshot", s))
}

/// Removes snapshot `name` on one replica and merges it into its child.
pub async fn remove_snapshot(address: &str, name: &str) -> Result<(), EngineCallError> {
    let mut c = client(address, "replica remove snapshot").await?;
    c.remove_snapshot(RemoveSnapshotRequest {
        name: name.to_owned(),
    })
    .await
    .map_err(|s| status_err(address, "replica remove snapshot", s))?;
    c.purge(PurgeRequest {})
        .await
        .map(|_| ())
        .map_err(|s| status_err(address, "replica purge", s))
}

/// Reverts one replica to snapshot `name`.
pub async fn revert(address: &str, name: &str) -> Result<(), EngineCallError> {
    let mut c = client(address, "replica revert").await?;
    c.revert(RevertRequest {
        name: name.to_owned(),
    })
    .await
    .map(|_| ())
    .map_err(|s| status_err(address, "replica revert", s))
}
