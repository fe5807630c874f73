//! Node routes: list, get, and update scheduling, tags, zone and disk settings.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ApiState;
use super::error::{ApiError, ApiJson, ApiResult};
use crate::resources::Node;

/// Changes to one disk (absent = unchanged).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateDisk {
    /// Whether new replicas may go to this disk.
    #[serde(default)]
    pub allow_scheduling: Option<bool>,
    /// Disk tags (replace all).
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Bytes kept free for other uses.
    #[serde(default)]
    pub storage_reserved: Option<u64>,
}

/// Body of `PATCH /v1/nodes/{name}` (absent = unchanged).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateNode {
    /// Whether new replicas may go to this node.
    #[serde(default)]
    pub allow_scheduling: Option<bool>,
    /// Node tags (replace all).
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// Move every replica off this node.
    #[serde(default)]
    pub eviction_requested: Option<bool>,
    /// Changes to disks, by disk name (each must exist).
    #[serde(default)]
    pub disks: BTreeMap<String, UpdateDisk>,
}

fn check_tags(tags: &[String]) -> ApiResult<()> {
    for t in tags {
        if t.is_empty()
            || t.len() > 63
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(ApiError::bad_request(format!(
                "tag {t:?} must be 1-63 characters of letters, digits, '-', '_' and '.'"
            )));
        }
    }
    Ok(())
}

async fn get_node(state: &ApiState, name: &str) -> ApiResult<Node> {
    state
        .store
        .get::<Node>(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("node {name:?} not found")))
}

/// `GET /v1/nodes`
pub async fn list(State(state): State<ApiState>) -> ApiResult<Json<Vec<Node>>> {
    Ok(Json(state.store.list::<Node>().await?))
}

/// `GET /v1/nodes/{name}`
pub async fn get(State(state): State<ApiState>, Path(name): Path<String>) -> ApiResult<Json<Node>> {
    Ok(Json(get_node(&state, &name).await?))
}

/// `PATCH /v1/nodes/{name}`
pub async fn update(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateNode>,
) -> ApiResult<Json<Node>> {
    let node = get_node(&state, &name).await?;
    if let Some(t) = &req.tags {
        check_tags(t)?;
    }
    for (disk, change) in &req.disks {
        if !node.spec.disks.contains_key(disk) {
            return Err(ApiError::bad_request(format!(
                "node {name:?} has no disk {disk:?}"
            )));
        }
        if let Some(t) = &change.tags {
            check_tags(t)?;
        }
    }
    if let Some(z) = &req.zone
        && z.len() > 63
    {
        return Err(ApiError::bad_request("zone is longer than 63 characters"));
    }
    state
        .store
        .modify(&name, |n: &mut Node| {
            if let Some(a) = req.allow_scheduling {
                n.spec.allow_scheduling = a;
            }
            if let Some(t) = &req.tags {
                n.spec.tags = t.clone();
            }
            if let Some(z) = &req.zone {
                n.spec.zone = z.clone();
            }
            if let Some(e) = req.eviction_requested {
                n.spec.eviction_requested = e;
            }
            for (disk, change) in &req.disks {
                if let Some(d) = n.spec.disks.get_mut(disk) {
                    if let Some(a) = change.allow_scheduling {
                        d.allow_scheduling = a;
                    }
                    if let Some(t) = &change.tags {
                        d.tags = t.clone();
                    }
                    if let Some(r) = change.storage_reserved {
                        d.storage_reserved = r;
                    }
                }
            }
            Ok(())
        })
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("node {name:?} not found")))
}
