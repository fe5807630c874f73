//! Volume routes: CRUD and the actions (attach, detach, expand, snapshots, backup, replica
//! removal). Handlers only write desired state (spec, or new Snapshot/Backup resources)
//! and read status; the controllers act on it.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::error::{ApiError, ApiJson, ApiResult};
use crate::resources::{
    Backup, BackupSpec, DataLocality, Frontend, Node, Replica, Snapshot, SnapshotSpec,
    VOLUME_BLOCK_SIZE, Volume, VolumeSpec,
};
use crate::settings;

/// Largest volume the API accepts: 64 TiB.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
/// Most replicas a volume may have.
pub const MAX_REPLICAS: u32 = 20;

/// Body of `POST /v1/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVolume {
    /// Name: 1-253 characters of a-z, 0-9, '-', '.'.
    pub name: String,
    /// Size in bytes: a positive multiple of 4096, at most 64 TiB.
    pub size: u64,
    /// Replicas (default: the `default-replica-count` setting).
    #[serde(default)]
    pub number_of_replicas: Option<u32>,
    /// Frontend (default nbd).
    #[serde(default)]
    pub frontend: Option<Frontend>,
    /// Data locality (default disabled).
    #[serde(default)]
    pub data_locality: Option<DataLocality>,
    /// Disk tags every replica's disk must carry.
    #[serde(default)]
    pub disk_selector: Vec<String>,
    /// Node tags every replica's node must carry.
    #[serde(default)]
    pub node_selector: Vec<String>,
    /// Seconds a failed replica is kept; 0 = the setting.
    #[serde(default)]
    pub stale_replica_timeout_seconds: u64,
    /// Backup to restore from.
    #[serde(default)]
    pub from_backup: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Body of `PATCH /v1/volumes/{name}`: fields to change (absent = unchanged).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateVolume {
    /// New replica count.
    #[serde(default)]
    pub number_of_replicas: Option<u32>,
    /// New data locality.
    #[serde(default)]
    pub data_locality: Option<DataLocality>,
    /// New disk selector.
    #[serde(default)]
    pub disk_selector: Option<Vec<String>>,
    /// New node selector.
    #[serde(default)]
    pub node_selector: Option<Vec<String>>,
    /// New labels (replace all).
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// Body of `POST /v1/volumes/{name}/attach`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachVolume {
    /// Node to attach to.
    pub node: String,
}

/// Body of `POST /v1/volumes/{name}/expand`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpandVolume {
    /// New size in bytes: a multiple of 4096, larger than the current size.
    pub size: u64,
}

/// Body of `POST /v1/volumes/{name}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// Name (default: `VOLUME-sNNN`, from the time).
    #[serde(default)]
    pub name: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Body of `POST /v1/volumes/{name}/backups`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBackup {
    /// Name of the Backup (default: `VOLUME-bNNN`, from the time).
    #[serde(default)]
    pub name: Option<String>,
    /// Snapshot to back up (default: a new one).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

pub(super) fn check_size(size: u64) -> ApiResult<()> {
    if size == 0 || !size.is_multiple_of(VOLUME_BLOCK_SIZE) {
        return Err(ApiError::bad_request(format!(
            "size {size} is not a positive multiple of {VOLUME_BLOCK_SIZE} bytes"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(ApiError::bad_request(format!(
            "size {size} is larger than the maximum {MAX_VOLUME_SIZE} (64 TiB)"
        )));
    }
    Ok(())
}

async fn setting_value(state: &ApiState, name: &str) -> ApiResult<String> {
    let def = settings::definition(name)?;
    Ok(
        match state.store.get::<crate::resources::Setting>(name).await? {
            Some(s) => s.spec.value,
            None => def.default.to_owned(),
        },
    )
}

/// Refuses more replicas than nodes when replicas may not share a node.
async fn check_replicas(state: &ApiState, replicas: u32) -> ApiResult<()> {
    if replicas == 0 || replicas > MAX_REPLICAS {
        return Err(ApiError::bad_request(format!(
            "numberOfReplicas {replicas} is outside 1..={MAX_REPLICAS}"
        )));
    }
    let soft = setting_value(state, settings::REPLICA_SOFT_ANTI_AFFINITY).await? == "true";
    if !soft {
        let nodes = state.store.list::<Node>().await?.len();
        if replicas as usize > nodes {
            return Err(ApiError::bad_request(format!(
                "numberOfReplicas {replicas} is more than the {nodes} nodes, and replicas of a volume may not share a node (setting {} is false)",
                settings::REPLICA_SOFT_ANTI_AFFINITY
            )));
        }
    }
    Ok(())
}

pub(super) async fn get_volume(state: &ApiState, name: &str) -> ApiResult<Volume> {
    state
        .store
        .get::<Volume>(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("volume {name:?} not found")))
}

/// A default name `PREFIX-KNNN` from the current time in milliseconds.
fn generated_name(prefix: &str, letter: char) -> String {
    let ms = jiff::Timestamp::now().as_millisecond();
    let mut name = format!("{prefix}-{letter}{ms}");
    if name.len() > 253 {
        name = format!("{letter}{ms}");
    }
    name
}

/// `GET /v1/volumes`
pub async fn list(State(state): State<ApiState>) -> ApiResult<Json<Vec<Volume>>> {
    Ok(Json(state.store.list::<Volume>().await?))
}

/// `GET /v1/volumes/{name}`
pub async fn get(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Volume>> {
    Ok(Json(get_volume(&state, &name).await?))
}

/// `POST /v1/volumes`
pub async fn create(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<CreateVolume>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    create_volume(&state, req).await
}

pub(super) async fn create_volume(
    state: &ApiState,
    req: CreateVolume,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    crate::store::validate_name(crate::resources::Kind::Volume, &req.name)?;
    check_size(req.size)?;
    let replicas = match req.number_of_replicas {
        Some(n) => n,
        None => setting_value(state, settings::DEFAULT_REPLICA_COUNT)
            .await?
            .parse()
            .unwrap_or(crate::resources::DEFAULT_NUMBER_OF_REPLICAS),
    };
    check_replicas(state, replicas).await?;
    if let Some(backup) = &req.from_backup
        && state.store.get::<Backup>(backup).await?.is_none()
    {
        return Err(ApiError::bad_request(format!(
            "fromBackup: backup {backup:?} not found"
        )));
    }
    let volume = Volume::new(
        &req.name,
        VolumeSpec {
            size: req.size,
            number_of_replicas: replicas,
            frontend: req.frontend.unwrap_or_default(),
            data_locality: req.data_locality.unwrap_or_default(),
            disk_selector: req.disk_selector,
            node_selector: req.node_selector,
            stale_replica_timeout_seconds: req.stale_replica_timeout_seconds,
            from_backup: req.from_backup,
            node_id: None,
            revert_to_snapshot: None,
            labels: req.labels,
        },
    );
    let created = state.store.create(&volume).await?;
    tracing::info!(volume = %req.name, size = req.size, replicas, "volume created");
    Ok((StatusCode::CREATED, Json(created)))
}

/// `PATCH /v1/volumes/{name}`
pub async fn update(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateVolume>,
) -> ApiResult<Json<Volume>> {
    get_volume(&state, &name).await?;
    if let Some(n) = req.number_of_replicas {
        check_replicas(&state, n).await?;
    }
    let updated = state
        .store
        .modify(&name, |v: &mut Volume| {
            if let Some(n) = req.number_of_replicas {
                v.spec.number_of_replicas = n;
            }
            if let Some(d) = req.data_locality {
                v.spec.data_locality = d;
            }
            if let Some(s) = &req.disk_selector {
                v.spec.disk_selector = s.clone();
            }
            if let Some(s) = &req.node_selector {
                v.spec.node_selector = s.clone();
            }
            if let Some(l) = &req.labels {
                v.spec.labels = l.clone();
            }
            Ok(())
        })
        .await?;
    updated
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("volume {name:?} not found")))
}

/// `DELETE /v1/volumes/{name}`: the volume is marked for deletion; the controllers clean up
/// its engine, replicas and data, then it is gone.
pub async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    get_volume(&state, &name).await?;
    state.store.delete::<Volume>(&name).await?;
    tracing::info!(volume = %name, "volume deleted");
    Ok(StatusCode::ACCEPTED)
}

/// `POST /v1/volumes/{name}/attach`
pub async fn attach(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<AttachVolume>,
) -> ApiResult<Json<Volume>> {
    let v = get_volume(&state, &name).await?;
    let Some(node) = state.store.get::<Node>(&req.node).await? else {
        return Err(ApiError::bad_request(format!(
            "node {:?} not found",
            req.node
        )));
    };
    let node_has_ublk = node.status.as_ref().is_some_and(|s| s.ublk);
    if v.spec.frontend.resolve(node_has_ublk).is_none() {
        return Err(ApiError::conflict(format!(
            "volume {name:?} has frontend ublk but node {:?} has no usable ublk driver; use frontend nbd or auto, or load ublk_drv there",
            req.node
        )));
    }
    if let Some(current) = &v.spec.node_id
        && current != &req.node
    {
        return Err(ApiError::conflict(format!(
            "volume {name:?} is attached to node {current:?}; detach it first"
        )));
    }
    if v.metadata.deletion_timestamp.is_some() {
        return Err(ApiError::conflict(format!(
            "volume {name:?} is being deleted"
        )));
    }
    modify_volume(&state, &name, |v| v.spec.node_id = Some(req.node.clone())).await
}

/// `POST /v1/volumes/{name}/detach`
pub async fn detach(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Volume>> {
    get_volume(&state, &name).await?;
    modify_volume(&state, &name, |v| v.spec.node_id = None).await
}

/// `POST /v1/volumes/{name}/expand`
pub async fn expand(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<ExpandVolume>,
) -> ApiResult<Json<Volume>> {
    let v = get_volume(&state, &name).await?;
    check_size(req.size)?;
    if req.size < v.spec.size {
        return Err(ApiError::bad_request(format!(
            "size {} is smaller than the current {}; volumes only grow",
            req.size, v.spec.size
        )));
    }
    modify_volume(&state, &name, |v| v.spec.size = v.spec.size.max(req.size)).await
}

async fn modify_volume(
    state: &ApiState,
    name: &str,
    mut change: impl FnMut(&mut Volume) + Send,
) -> ApiResult<Json<Volume>> {
    state
        .store
        .modify(name, |v: &mut Volume| {
            change(v);
            Ok(())
        })
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("volume {name:?} not found")))
}

/// `GET /v1/volumes/{name}/snapshots`
pub async fn list_snapshots(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<Snapshot>>> {
    get_volume(&state, &name).await?;
    let all = state.store.list::<Snapshot>().await?;
    Ok(Json(
        all.into_iter().filter(|s| s.spec.volume == name).collect(),
    ))
}

/// `POST /v1/volumes/{name}/snapshots`
pub async fn create_snapshot(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<CreateSnapshot>,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    let v = get_volume(&state, &name).await?;
    if v.metadata.deletion_timestamp.is_some() {
        return Err(ApiError::conflict(format!(
            "volume {name:?} is being deleted"
        )));
    }
    let snap_name = req.name.unwrap_or_else(|| generated_name(&name, 's'));
    let snapshot = Snapshot::new(
        &snap_name,
        SnapshotSpec {
            volume: name.clone(),
            labels: req.labels,
        },
    );
    let created = state.store.create(&snapshot).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

async fn get_snapshot(state: &ApiState, volume: &str, snapshot: &str) -> ApiResult<Snapshot> {
    get_volume(state, volume).await?;
    match state.store.get::<Snapshot>(snapshot).await? {
        Some(s) if s.spec.volume == volume => Ok(s),
        _ => Err(ApiError::not_found(format!(
            "snapshot {snapshot:?} of volume {volume:?} not found"
        ))),
    }
}

/// `GET /v1/volumes/{name}/snapshots/{snapshot}`
pub async fn get_snapshot_route(
    State(state): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<Json<Snapshot>> {
    Ok(Json(get_snapshot(&state, &name, &snapshot).await?))
}

/// `DELETE /v1/volumes/{name}/snapshots/{snapshot}`
pub async fn delete_snapshot(
    State(state): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    get_snapshot(&state, &name, &snapshot).await?;
    state.store.delete::<Snapshot>(&snapshot).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `POST /v1/volumes/{name}/snapshots/{snapshot}/revert`: the volume must be detached.
pub async fn revert_snapshot(
    State(state): State<ApiState>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult<Json<Volume>> {
    get_snapshot(&state, &name, &snapshot).await?;
    let v = get_volume(&state, &name).await?;
    if let Some(node) = &v.spec.node_id {
        return Err(ApiError::conflict(format!(
            "volume {name:?} is attached to {node:?}; detach it before reverting"
        )));
    }
    modify_volume(&state, &name, |v| {
        v.spec.revert_to_snapshot = Some(snapshot.clone())
    })
    .await
}

/// `POST /v1/volumes/{name}/backups`
pub async fn create_backup(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<CreateBackup>,
) -> ApiResult<(StatusCode, Json<Backup>)> {
    get_volume(&state, &name).await?;
    if let Some(s) = &req.snapshot {
        get_snapshot(&state, &name, s).await?;
    }
    let backup_name = req.name.unwrap_or_else(|| generated_name(&name, 'b'));
    let backup = Backup::new(
        &backup_name,
        BackupSpec {
            volume: name.clone(),
            snapshot: req.snapshot,
            labels: req.labels,
        },
    );
    let created = state.store.create(&backup).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// `GET /v1/volumes/{name}/replicas`
pub async fn list_replicas(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<Replica>>> {
    get_volume(&state, &name).await?;
    let all = state.store.list::<Replica>().await?;
    Ok(Json(
        all.into_iter()
            .filter(|r| r.spec.volume_name == name)
            .collect(),
    ))
}

/// `DELETE /v1/volumes/{name}/replicas/{replica}`: the replica is removed and the volume
/// controller schedules a new one.
pub async fn remove_replica(
    State(state): State<ApiState>,
    Path((name, replica)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    get_volume(&state, &name).await?;
    match state.store.get::<Replica>(&replica).await? {
        Some(r) if r.spec.volume_name == name => {}
        _ => {
            return Err(ApiError::not_found(format!(
                "replica {replica:?} of volume {name:?} not found"
            )));
        }
    }
    state.store.delete::<Replica>(&replica).await?;
    tracing::info!(volume = %name, replica = %replica, "replica removed");
    Ok(StatusCode::ACCEPTED)
}
