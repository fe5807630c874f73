//! Backup routes: list, get, delete, restore into a new volume; the backup target.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::error::{ApiError, ApiJson, ApiQuery, ApiResult};
use super::volumes::{CreateVolume, create_volume};
use crate::resources::{
    Backup, BackupState, BackupTarget, BackupTargetSpec, DEFAULT_BACKUP_TARGET, Volume,
};

/// Query of `GET /v1/backups`.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
pub struct BackupQuery {
    /// Only backups of this volume.
    #[serde(default)]
    pub volume: Option<String>,
}

/// Body of `POST /v1/backups/{name}/restore`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreBackup {
    /// Name of the new volume.
    pub name: String,
    /// Replicas of the new volume (default: the setting).
    #[serde(default)]
    pub number_of_replicas: Option<u32>,
}

/// Body of `PUT /v1/backuptarget`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SetBackupTarget {
    /// `s3://BUCKET/PREFIX?endpoint=…&region=…`, `file:///PATH`, or empty for none.
    pub url: String,
    /// Credentials (secret name or file under the data directory).
    #[serde(default)]
    pub credential_secret: Option<String>,
    /// Seconds between listings of the target (0 = default).
    #[serde(default)]
    pub poll_interval_seconds: u64,
}

async fn get_backup(state: &ApiState, name: &str) -> ApiResult<Backup> {
    state
        .store
        .get::<Backup>(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("backup {name:?} not found")))
}

/// `GET /v1/backups[?volume=NAME]`
pub async fn list(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<BackupQuery>,
) -> ApiResult<Json<Vec<Backup>>> {
    let all = state.store.list::<Backup>().await?;
    Ok(Json(
        all.into_iter()
            .filter(|b| q.volume.as_ref().is_none_or(|v| *v == b.spec.volume))
            .collect(),
    ))
}

/// `GET /v1/backups/{name}`
pub async fn get(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Backup>> {
    Ok(Json(get_backup(&state, &name).await?))
}

/// `DELETE /v1/backups/{name}`: removed from the target by the backup controller.
pub async fn delete(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    get_backup(&state, &name).await?;
    state.store.delete::<Backup>(&name).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `POST /v1/backups/{name}/restore`: creates a new volume restored from the backup.
pub async fn restore(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<RestoreBackup>,
) -> ApiResult<(StatusCode, Json<Volume>)> {
    let backup = get_backup(&state, &name).await?;
    let status = backup.status.unwrap_or_default();
    if status.state != BackupState::Completed {
        return Err(ApiError::conflict(format!(
            "backup {name:?} is not completed (state {:?})",
            status.state
        )));
    }
    create_volume(
        &state,
        CreateVolume {
            name: req.name,
            size: status.volume_size,
            number_of_replicas: req.number_of_replicas,
            frontend: None,
            data_locality: None,
            disk_selector: vec![],
            node_selector: vec![],
            stale_replica_timeout_seconds: 0,
            from_backup: Some(name),
            labels: Default::default(),
        },
    )
    .await
}

fn default_target() -> BackupTarget {
    BackupTarget::new(DEFAULT_BACKUP_TARGET, BackupTargetSpec::default())
}

/// `GET /v1/backuptarget`
pub async fn get_target(State(state): State<ApiState>) -> ApiResult<Json<BackupTarget>> {
    Ok(Json(
        state
            .store
            .get::<BackupTarget>(DEFAULT_BACKUP_TARGET)
            .await?
            .unwrap_or_else(default_target),
    ))
}

fn check_url(url: &str) -> ApiResult<()> {
    if url.is_empty() {
        return Ok(());
    }
    let ok = match url.split_once("://") {
        Some(("s3", rest)) => !rest.is_empty() && !rest.starts_with('/'),
        Some(("file", rest)) => rest.starts_with('/') && rest.len() > 1,
        _ => false,
    };
    if !ok {
        return Err(ApiError::bad_request(format!(
            "backup target url {url:?} must be s3://BUCKET[/PREFIX][?endpoint=…] or file:///PATH"
        )));
    }
    Ok(())
}

/// `PUT /v1/backuptarget`
pub async fn set_target(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<SetBackupTarget>,
) -> ApiResult<Json<BackupTarget>> {
    check_url(&req.url)?;
    let spec = BackupTargetSpec {
        url: req.url,
        credential_secret: req.credential_secret,
        poll_interval_seconds: req.poll_interval_seconds,
    };
    for _ in 0..8 {
        let result = match state
            .store
            .get::<BackupTarget>(DEFAULT_BACKUP_TARGET)
            .await?
        {
            None => state
                .store
                .create(&BackupTarget::new(DEFAULT_BACKUP_TARGET, spec.clone()))
                .await
                .map(Some),
            Some(mut t) => {
                t.spec = spec.clone();
                state.store.update(&t).await
            }
        };
        match result {
            Ok(Some(t)) => return Ok(Json(t)),
            Ok(None) => {}
            Err(e)
                if e.is_conflict()
                    || matches!(e, crate::store::StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict("the backup target kept changing; retry"))
}

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn target_urls() {
        assert!(check_url("").is_ok());
        assert!(check_url("s3://bucket/prefix?endpoint=http://127.0.0.1:9000").is_ok());
        assert!(check_url("file:///backups").is_ok());
        assert!(check_url("http://x").is_err());
        assert!(check_url("file://relative").is_err());
        assert!(check_url("s3://").is_err());
    }
}
