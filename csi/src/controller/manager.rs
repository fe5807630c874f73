//! [`ManagerApi`] over the manager's REST client (`ironhorn_manager::client`).

use std::time::SystemTime;

use ironhorn_manager::client::{Client, ClientError, CreateBackup, CreateSnapshot, CreateVolume};
use ironhorn_manager::resources::{
    Backup, BackupState, ConditionStatus, DataLocality, Frontend, Node, Snapshot, Volume,
    VolumeState,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::backend::{
    ApiError, BackupRecord, Capacity, ManagerApi, NewVolume, SnapshotRecord, VolumeRecord,
};

/// The manager reached through its REST API.
#[derive(Debug, Clone)]
pub struct ManagerClient {
    client: Client,
}

impl ManagerClient {
    /// A client of the manager at `url` (`http://HOST:PORT`) with bearer `token`.
    pub fn new(url: &str, token: &str) -> Result<ManagerClient, ApiError> {
        let client = Client::new(url, token).map_err(|e| ApiError::Invalid(e.to_string()))?;
        Ok(ManagerClient { client })
    }
}

/// Sorts a client error into the kinds the Controller maps to gRPC codes.
fn api_error(e: ClientError) -> ApiError {
    let msg = e.to_string();
    match e.status().map(|s| s.as_u16()) {
        None => ApiError::Unavailable(msg),
        Some(404) => ApiError::NotFound(msg),
        Some(409) => ApiError::Conflict(msg),
        Some(400 | 422) => ApiError::Invalid(msg),
        Some(507) => ApiError::InsufficientStorage(msg),
        Some(502..=504) => ApiError::Unavailable(msg),
        Some(_) => ApiError::Other(msg),
    }
}

fn time(t: &Option<Time>) -> Option<SystemTime> {
    t.as_ref().map(|t| SystemTime::from(t.0))
}

fn state_name(s: VolumeState) -> &'static str {
    match s {
        VolumeState::Creating => "creating",
        VolumeState::Detached => "detached",
        VolumeState::Attaching => "attaching",
        VolumeState::Attached => "attached",
        VolumeState::Detaching => "detaching",
        VolumeState::Deleting => "deleting",
    }
}

fn volume_record(v: Volume) -> VolumeRecord {
    let status = v.status.unwrap_or_default();
    let scheduled = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Scheduled")
        .map(|c| match c.status {
            ConditionStatus::True => Ok(()),
            _ => Err(c.message.clone()),
        });
    VolumeRecord {
        scheduled,
        name: v.metadata.name.unwrap_or_default(),
        size: v.spec.size,
        current_size: status.current_size,
        number_of_replicas: v.spec.number_of_replicas,
        wanted_node: v.spec.node_id,
        current_node: status.current_node,
        endpoint: status.endpoint,
        device: status.device,
        state: state_name(status.state).to_owned(),
        from_backup: v.spec.from_backup,
        labels: v.spec.labels,
    }
}

fn snapshot_record(s: Snapshot) -> SnapshotRecord {
    let status = s.status.unwrap_or_default();
    SnapshotRecord {
        name: s.metadata.name.unwrap_or_default(),
        volume: s.spec.volume,
        size: status.size,
        created: time(&status.creation_time),
        ready: status.ready_to_use,
    }
}

fn backup_record(b: Backup) -> BackupRecord {
    let status = b.status.unwrap_or_default();
    BackupRecord {
        name: b.metadata.name.unwrap_or_default(),
        volume: b.spec.volume,
        size: status.volume_size,
        created: time(&status.completed_at),
        ready: status.state == BackupState::Completed,
        failed: (status.state == BackupState::Error)
            .then(|| status.error.unwrap_or_else(|| "backup failed".into())),
    }
}

#[tonic::async_trait]
impl ManagerApi for ManagerClient {
    async fn get_volume(&self, name: &str) -> Result<Option<VolumeRecord>, ApiError> {
        match self.client.get_volume(name).await {
            Ok(v) => Ok(Some(volume_record(v))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(api_error(e)),
        }
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, ApiError> {
        let vs = self.client.list_volumes().await.map_err(api_error)?;
        Ok(vs.into_iter().map(volume_record).collect())
    }

    async fn create_volume(&self, volume: &NewVolume) -> Result<VolumeRecord, ApiError> {
        let mut req = CreateVolume::named(volume.name.clone(), volume.size);
        req.number_of_replicas = volume.number_of_replicas;
        req.data_locality = match volume.data_locality.as_deref() {
            Some("best-effort") => Some(DataLocality::BestEffort),
            Some("disabled") => Some(DataLocality::Disabled),
            _ => None,
        };
        req.disk_selector = volume.disk_selector.clone();
        req.node_selector = volume.node_selector.clone();
        req.stale_replica_timeout_seconds = volume.stale_replica_timeout_seconds.unwrap_or(0);
        req.from_backup = volume.from_backup.clone();
        req.frontend = Some(match volume.frontend.as_deref() {
            Some("nbd") => Frontend::Nbd,
            Some("ublk") => Frontend::Ublk,
            _ => Frontend::Auto,
        });
        req.labels = volume.labels.clone();
        let v = self.client.create_volume(&req).await.map_err(api_error)?;
        Ok(volume_record(v))
    }

    async fn delete_volume(&self, name: &str) -> Result<(), ApiError> {
        self.client.delete_volume(name).await.map_err(api_error)
    }

    async fn node_exists(&self, node: &str) -> Result<bool, ApiError> {
        match self.client.get_node(node).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(api_error(e)),
        }
    }

    async fn attach(&self, name: &str, node: &str) -> Result<(), ApiError> {
        self.client
            .attach_volume(name, node)
            .await
            .map(|_| ())
            .map_err(api_error)
    }

    async fn detach(&self, name: &str) -> Result<(), ApiError> {
        self.client
            .detach_volume(name)
            .await
            .map(|_| ())
            .map_err(api_error)
    }

    async fn expand(&self, name: &str, size: u64) -> Result<(), ApiError> {
        self.client
            .expand_volume(name, size)
            .await
            .map(|_| ())
            .map_err(api_error)
    }

    async fn list_snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotRecord>, ApiError> {
        let volumes: Vec<String> = match volume {
            Some(v) => vec![v.to_owned()],
            None => self
                .list_volumes()
                .await?
                .into_iter()
                .map(|v| v.name)
                .collect(),
        };
        let mut out = Vec::new();
        for v in volumes {
            match self.client.list_snapshots(&v).await {
                Ok(snaps) => out.extend(snaps.into_iter().map(snapshot_record)),
                // A volume that does not exist (any more) has no snapshots.
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(api_error(e)),
            }
        }
        Ok(out)
    }

    async fn create_snapshot(&self, volume: &str, name: &str) -> Result<SnapshotRecord, ApiError> {
        let req = CreateSnapshot {
            name: Some(name.to_owned()),
            labels: Default::default(),
        };
        let s = self
            .client
            .create_snapshot(volume, &req)
            .await
            .map_err(api_error)?;
        Ok(snapshot_record(s))
    }

    async fn delete_snapshot(&self, volume: &str, name: &str) -> Result<(), ApiError> {
        self.client
            .delete_snapshot(volume, name)
            .await
            .map_err(api_error)
    }

    async fn list_backups(&self, volume: Option<&str>) -> Result<Vec<BackupRecord>, ApiError> {
        let bs = self.client.list_backups(volume).await.map_err(api_error)?;
        Ok(bs.into_iter().map(backup_record).collect())
    }

    async fn create_backup(&self, volume: &str, name: &str) -> Result<BackupRecord, ApiError> {
        let req = CreateBackup {
            name: Some(name.to_owned()),
            snapshot: None,
            labels: Default::default(),
        };
        let b = self
            .client
            .create_backup(volume, &req)
            .await
            .map_err(api_error)?;
        Ok(backup_record(b))
    }

    async fn delete_backup(&self, name: &str) -> Result<(), ApiError> {
        self.client.delete_backup(name).await.map_err(api_error)
    }

    async fn capacity(&self) -> Result<Capacity, ApiError> {
        let nodes: Vec<Node> = self.client.list_nodes().await.map_err(api_error)?;
        let mut c = Capacity::default();
        for n in nodes {
            if !n.spec.allow_scheduling {
                continue;
            }
            let Some(status) = n.status else { continue };
            for (id, d) in status.disks {
                let allowed = n.spec.disks.get(&id).is_none_or(|s| s.allow_scheduling);
                if d.schedulable && allowed {
                    c.available += d.storage_available;
                    c.maximum_volume_size = c.maximum_volume_size.max(d.storage_available);
                }
            }
        }
        Ok(c)
    }
}
