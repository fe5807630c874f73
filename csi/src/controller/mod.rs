//! The CSI Controller service: volumes, attachments, snapshots and expansion, turned into
//! manager calls through [`backend::ManagerApi`].
//!
//! - Volume ids are manager volume names ([`ids::manager_name`] of the CSI name), so a
//!   repeated CreateVolume finds what the first made.
//! - ControllerPublishVolume asks the manager to attach the volume to the node (an engine
//!   starts there) and waits until it serves; the NBD URI goes to the node in the publish
//!   context (`nbdUri`), and so does the ublk device (`ublkDevice`) when the engine serves
//!   one (volume frontend `auto` on a node whose kernel has ublk, or `ublk`).
//! - Snapshot ids are `snap/VOLUME/NAME` (an ironhorn snapshot) or `bak/NAME` (a backup), chosen by
//!   the VolumeSnapshotClass parameter `type`.
//! - A call on an object another call is working on fails with ABORTED (the CO retries).

pub mod backend;
pub mod ids;
pub mod manager;
pub mod params;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tonic::{Request, Response, Status};

use self::backend::{ApiError, ManagerApi, VolumeRecord};
use self::ids::SnapshotId;
use self::params::SnapshotKind;
use crate::capability::{self, Access};
use crate::error::{CsiError, invalid};
use crate::guard::VolumeLocks;
use crate::node::{PUBLISH_NBD_URI, PUBLISH_UBLK_DEVICE};
use crate::pb;
use crate::pb::controller_server::Controller;
use crate::pb::controller_service_capability::rpc::Type as Cap;

/// Size of a volume whose request names no capacity.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
/// Volume sizes are rounded up to a multiple of this.
pub const SIZE_GRANULE: u64 = 1 << 20;
/// Smallest volume the driver creates.
pub const MIN_VOLUME_SIZE: u64 = 16 << 20;
/// How long attach, detach and expansion may take before the call fails (the CO retries).
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long CreateVolume waits for the scheduler's verdict on the replicas.
pub const SCHEDULE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the manager is polled while waiting.
const POLL: Duration = Duration::from_millis(250);
/// Label holding the CSI name a volume or snapshot was created under.
pub const LABEL_CSI_NAME: &str = "csi.ironhorn.io/name";

/// The Controller service.
#[derive(Debug, Clone)]
pub struct ControllerService {
    api: Arc<dyn ManagerApi>,
    locks: Arc<VolumeLocks>,
    wait_timeout: Duration,
}

impl From<ApiError> for CsiError {
    fn from(e: ApiError) -> CsiError {
        let msg = e.to_string();
        match e {
            ApiError::NotFound(_) => CsiError::NotFound(msg),
            ApiError::Conflict(_) => CsiError::Aborted(msg),
            ApiError::Invalid(_) => CsiError::InvalidArgument(msg),
            ApiError::InsufficientStorage(_) => CsiError::ResourceExhausted(msg),
            ApiError::Unavailable(_) => CsiError::Unavailable(msg),
            ApiError::Other(_) => CsiError::Internal(msg),
        }
    }
}

/// The size to create for `range`: `required` rounded up to [`SIZE_GRANULE`] (at least
/// [`MIN_VOLUME_SIZE`]), or [`DEFAULT_VOLUME_SIZE`] when nothing is asked; OUT_OF_RANGE
/// when that exceeds `limit`.
pub fn volume_size(range: Option<&pb::CapacityRange>) -> Result<u64, CsiError> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(invalid("capacity range has a negative value"));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && required > limit {
        return Err(CsiError::OutOfRange(format!(
            "required_bytes {required} is above limit_bytes {limit}"
        )));
    }
    let size = if required == 0 {
        if limit > 0 {
            (limit.min(DEFAULT_VOLUME_SIZE) / SIZE_GRANULE) * SIZE_GRANULE
        } else {
            DEFAULT_VOLUME_SIZE
        }
    } else {
        required
            .checked_next_multiple_of(SIZE_GRANULE)
            .ok_or_else(|| {
                CsiError::OutOfRange(format!("required_bytes {required} is too large"))
            })?
    }
    .max(MIN_VOLUME_SIZE);
    if limit > 0 && size > limit {
        return Err(CsiError::OutOfRange(format!(
            "the smallest volume that fits ({size} bytes, a multiple of {SIZE_GRANULE} and at least {MIN_VOLUME_SIZE}) is above limit_bytes {limit}"
        )));
    }
    Ok(size)
}

fn required<'a>(value: &'a str, what: &str) -> Result<&'a str, CsiError> {
    if value.is_empty() {
        Err(invalid(format!("{what} is missing")))
    } else {
        Ok(value)
    }
}

fn to_timestamp(t: Option<SystemTime>) -> Option<prost_types::Timestamp> {
    t.map(prost_types::Timestamp::from)
}

/// Index in a listing given as a `starting_token` (ABORTED when it is not one ours).
fn start_index(token: &str, len: usize) -> Result<usize, CsiError> {
    if token.is_empty() {
        return Ok(0);
    }
    match token.parse::<usize>() {
        Ok(i) if i <= len => Ok(i),
        _ => Err(CsiError::Aborted(format!(
            "starting_token {token:?} is not valid"
        ))),
    }
}

/// The page of `items` starting at `token` with at most `max` entries, and the next token.
fn page<T>(items: Vec<T>, token: &str, max: i32) -> Result<(Vec<T>, String), CsiError> {
    if max < 0 {
        return Err(invalid("max_entries is negative"));
    }
    let start = start_index(token, items.len())?;
    let total = items.len();
    let take = if max == 0 { total } else { max as usize };
    let entries: Vec<T> = items.into_iter().skip(start).take(take).collect();
    let end = start + entries.len();
    let next = if end < total {
        end.to_string()
    } else {
        String::new()
    };
    Ok((entries, next))
}

impl ControllerService {
    /// A Controller service over `api`.
    pub fn new(api: Arc<dyn ManagerApi>) -> ControllerService {
        ControllerService {
            api,
            locks: Arc::new(VolumeLocks::default()),
            wait_timeout: WAIT_TIMEOUT,
        }
    }

    fn csi_volume(&self, v: &VolumeRecord, context: HashMap<String, String>) -> pb::Volume {
        pb::Volume {
            capacity_bytes: v.size as i64,
            volume_id: v.name.clone(),
            volume_context: context,
            content_source: v.from_backup.as_ref().map(|b| pb::VolumeContentSource {
                r#type: Some(pb::volume_content_source::Type::Snapshot(
                    pb::volume_content_source::SnapshotSource {
                        snapshot_id: SnapshotId::Backup(b.clone()).to_id(),
                    },
                )),
            }),
            accessible_topology: Vec::new(),
        }
    }

    /// Polls the volume until `done` holds, up to the wait timeout.
    async fn wait_for(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(&VolumeRecord) -> bool,
    ) -> Result<VolumeRecord, CsiError> {
        let deadline = Instant::now() + self.wait_timeout;
        loop {
            let v = self
                .api
                .get_volume(name)
                .await?
                .ok_or_else(|| CsiError::NotFound(format!("volume {name} disappeared")))?;
            if done(&v) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(CsiError::DeadlineExceeded(format!(
                    "volume {name} is not {what} after {:?} (state {})",
                    self.wait_timeout, v.state
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn create_volume(
        &self,
        req: pb::CreateVolumeRequest,
    ) -> Result<pb::CreateVolumeResponse, CsiError> {
        let csi_name = required(&req.name, "volume name")?;
        capability::check_all(&req.volume_capabilities)?;
        let size = volume_size(req.capacity_range.as_ref())?;
        let mut p = params::volume_params(&req.parameters)?;
        let name = ids::manager_name("csi", csi_name);
        match req
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => {}
            Some(pb::volume_content_source::Type::Volume(_)) => {
                return Err(invalid(
                    "cloning a volume is not supported (CLONE_VOLUME is not offered): take a backup snapshot (type: bak) and restore it",
                ));
            }
            Some(pb::volume_content_source::Type::Snapshot(s)) => {
                match SnapshotId::parse(&s.snapshot_id) {
                    Some(SnapshotId::Backup(b)) => {
                        let backups = self.api.list_backups(None).await?;
                        if !backups.iter().any(|x| x.name == b) {
                            return Err(CsiError::NotFound(format!("backup {b} does not exist")));
                        }
                        p.volume.from_backup = Some(b);
                    }
                    Some(SnapshotId::Snapshot(..)) => {
                        return Err(invalid(
                            "a new volume cannot be made from an in-cluster snapshot (type: snap); use a VolumeSnapshotClass with type: bak",
                        ));
                    }
                    None => {
                        return Err(CsiError::NotFound(format!(
                            "snapshot {:?} does not exist",
                            s.snapshot_id
                        )));
                    }
                }
            }
        }
        let _guard = self.locks.lock(&name)?;
        let span = tracing::info_span!("create_volume", volume = %name, size);
        let _enter = span.enter();
        if let Some(existing) = self.api.get_volume(&name).await? {
            let range = req.capacity_range.as_ref();
            let req_bytes = range.map_or(0, |r| r.required_bytes.max(0) as u64);
            let limit = range.map_or(0, |r| r.limit_bytes.max(0) as u64);
            if existing.size < req_bytes || (limit > 0 && existing.size > limit) {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} exists with {} bytes, which does not fit the capacity asked",
                    existing.size
                )));
            }
            if existing.from_backup != p.volume.from_backup {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {name} exists with another content source"
                )));
            }
            let existing = self.check_scheduled(existing).await?;
            return Ok(pb::CreateVolumeResponse {
                volume: Some(self.csi_volume(&existing, p.context)),
            });
        }
        p.volume.name = name.clone();
        p.volume.size = size;
        p.volume
            .labels
            .insert(LABEL_CSI_NAME.into(), ids::manager_name("csi", csi_name));
        let created = match self.api.create_volume(&p.volume).await {
            Ok(v) => v,
            Err(ApiError::Conflict(_)) => self
                .api
                .get_volume(&name)
                .await?
                .ok_or_else(|| CsiError::Aborted(format!("volume {name} is being created")))?,
            Err(e) => return Err(e.into()),
        };
        let created = self.check_scheduled(created).await?;
        tracing::info!("volume created");
        Ok(pb::CreateVolumeResponse {
            volume: Some(self.csi_volume(&created, p.context)),
        })
    }

    /// Waits (up to [`SCHEDULE_TIMEOUT`]) for the scheduler's verdict on a new volume's
    /// replicas. When they cannot all be placed, the volume is deleted again and the call
    /// fails with RESOURCE_EXHAUSTED (the CO may retry, e.g. after nodes are added); when
    /// the verdict takes longer, the volume is returned and scheduled later.
    async fn check_scheduled(&self, v: VolumeRecord) -> Result<VolumeRecord, CsiError> {
        let deadline = Instant::now() + SCHEDULE_TIMEOUT;
        let mut v = v;
        loop {
            match &v.scheduled {
                Some(Ok(())) => return Ok(v),
                Some(Err(why)) => {
                    let why = why.clone();
                    if let Err(e) = self.api.delete_volume(&v.name).await {
                        tracing::warn!(volume = %v.name, error = %e, "cannot delete an unschedulable volume");
                    }
                    return Err(CsiError::ResourceExhausted(format!(
                        "the replicas of volume {} cannot be placed: {why}",
                        v.name
                    )));
                }
                None if Instant::now() >= deadline => {
                    tracing::info!(volume = %v.name, "no scheduling verdict yet; returning the volume");
                    return Ok(v);
                }
                None => {}
            }
            tokio::time::sleep(POLL).await;
            v = match self.api.get_volume(&v.name).await? {
                Some(v) => v,
                None => {
                    return Err(CsiError::Aborted(format!(
                        "volume {} disappeared while it was created",
                        v.name
                    )));
                }
            };
        }
    }

    async fn delete_volume(&self, req: pb::DeleteVolumeRequest) -> Result<(), CsiError> {
        let name = required(&req.volume_id, "volume id")?;
        let _guard = self.locks.lock(name)?;
        let Some(v) = self.api.get_volume(name).await? else {
            return Ok(());
        };
        if let Some(node) = v.wanted_node.as_ref().or(v.current_node.as_ref()) {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} is still published to node {node}"
            )));
        }
        match self.api.delete_volume(name).await {
            Ok(()) | Err(ApiError::NotFound(_)) => {
                tracing::info!(volume = name, "volume deleted");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn publish(
        &self,
        req: pb::ControllerPublishVolumeRequest,
    ) -> Result<pb::ControllerPublishVolumeResponse, CsiError> {
        let name = required(&req.volume_id, "volume id")?;
        let node = required(&req.node_id, "node id")?;
        capability::check(
            req.volume_capability
                .as_ref()
                .ok_or_else(|| invalid("volume capability is missing"))?,
        )?;
        let _guard = self.locks.lock(name)?;
        let span = tracing::info_span!("controller_publish", volume = name, node);
        let _enter = span.enter();
        let v = self
            .api
            .get_volume(name)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {name} does not exist")))?;
        if !self.api.node_exists(node).await? {
            return Err(CsiError::NotFound(format!("node {node} does not exist")));
        }
        if let Some(other) = v.wanted_node.as_deref().filter(|n| *n != node) {
            return Err(CsiError::FailedPrecondition(format!(
                "volume {name} is published to node {other}; a volume is used on one node at a time"
            )));
        }
        if v.wanted_node.is_none() {
            self.api.attach(name, node).await?;
        }
        let v = self
            .wait_for(name, &format!("attached on {node}"), |v| {
                v.attached_on(node)
            })
            .await?;
        let uri = v.endpoint.clone().unwrap_or_default();
        let mut publish_context = HashMap::from([(PUBLISH_NBD_URI.to_owned(), uri.clone())]);
        if let Some(dev) = &v.device {
            publish_context.insert(PUBLISH_UBLK_DEVICE.to_owned(), dev.clone());
        }
        tracing::info!(
            uri,
            device = v.device.as_deref().unwrap_or("-"),
            "published"
        );
        Ok(pb::ControllerPublishVolumeResponse { publish_context })
    }

    async fn unpublish(&self, req: pb::ControllerUnpublishVolumeRequest) -> Result<(), CsiError> {
        let name = required(&req.volume_id, "volume id")?;
        let _guard = self.locks.lock(name)?;
        let span = tracing::info_span!("controller_unpublish", volume = name, node = %req.node_id);
        let _enter = span.enter();
        let Some(v) = self.api.get_volume(name).await? else {
            return Ok(());
        };
        let on = |n: &Option<String>| n.as_deref() == Some(req.node_id.as_str());
        let published = if req.node_id.is_empty() {
            v.wanted_node.is_some() || v.current_node.is_some()
        } else {
            on(&v.wanted_node) || on(&v.current_node)
        };
        if !published {
            return Ok(());
        }
        if v.wanted_node.is_some() {
            self.api.detach(name).await?;
        }
        self.wait_for(name, "detached", |v| {
            v.wanted_node.is_none() && v.current_node.is_none()
        })
        .await?;
        tracing::info!("unpublished");
        Ok(())
    }

    async fn validate(
        &self,
        req: pb::ValidateVolumeCapabilitiesRequest,
    ) -> Result<pb::ValidateVolumeCapabilitiesResponse, CsiError> {
        let name = required(&req.volume_id, "volume id")?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume capabilities are missing"));
        }
        if self.api.get_volume(name).await?.is_none() {
            return Err(CsiError::NotFound(format!("volume {name} does not exist")));
        }
        if let Err(e) = params::volume_params(&req.parameters) {
            return Ok(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            });
        }
        match capability::check_all(&req.volume_capabilities) {
            Ok(_) => Ok(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                }),
                message: String::new(),
            }),
            Err(e) => Ok(pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            }),
        }
    }

    async fn list_volumes(
        &self,
        req: pb::ListVolumesRequest,
    ) -> Result<pb::ListVolumesResponse, CsiError> {
        let mut volumes = self.api.list_volumes().await?;
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let (page, next_token) = page(volumes, &req.starting_token, req.max_entries)?;
        let entries = page
            .iter()
            .map(|v| pb::list_volumes_response::Entry {
                volume: Some(self.csi_volume(v, HashMap::new())),
                status: Some(pb::list_volumes_response::VolumeStatus {
                    published_node_ids: v.wanted_node.iter().cloned().collect(),
                }),
            })
            .collect();
        Ok(pb::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    async fn capacity(
        &self,
        req: pb::GetCapacityRequest,
    ) -> Result<pb::GetCapacityResponse, CsiError> {
        if !req.volume_capabilities.is_empty()
            && capability::check_all(&req.volume_capabilities).is_err()
        {
            return Ok(pb::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
            });
        }
        let replicas = params::volume_params(&req.parameters)?
            .volume
            .number_of_replicas
            .unwrap_or(1)
            .max(1) as u64;
        let c = self.api.capacity().await?;
        Ok(pb::GetCapacityResponse {
            available_capacity: (c.available / replicas) as i64,
            maximum_volume_size: Some(c.maximum_volume_size as i64),
        })
    }

    async fn expand(
        &self,
        req: pb::ControllerExpandVolumeRequest,
    ) -> Result<pb::ControllerExpandVolumeResponse, CsiError> {
        let name = required(&req.volume_id, "volume id")?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("capacity range is missing"))?;
        let size = volume_size(Some(range))?;
        let node_expansion_required = match req.volume_capability.as_ref() {
            Some(cap) => capability::check(cap)?.access != Access::Block,
            None => true,
        };
        let _guard = self.locks.lock(name)?;
        let span = tracing::info_span!("controller_expand", volume = name, size);
        let _enter = span.enter();
        let v = self
            .api
            .get_volume(name)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {name} does not exist")))?;
        if v.size >= size {
            return Ok(pb::ControllerExpandVolumeResponse {
                capacity_bytes: v.size as i64,
                node_expansion_required,
            });
        }
        self.api.expand(name, size).await?;
        let v = self
            .wait_for(name, &format!("{size} bytes"), |v| {
                v.size >= size && (v.current_node.is_none() || v.current_size >= size)
            })
            .await?;
        tracing::info!("expanded");
        Ok(pb::ControllerExpandVolumeResponse {
            capacity_bytes: v.size as i64,
            node_expansion_required,
        })
    }

    async fn create_snapshot(
        &self,
        req: pb::CreateSnapshotRequest,
    ) -> Result<pb::CreateSnapshotResponse, CsiError> {
        let volume = required(&req.source_volume_id, "source volume id")?;
        let csi_name = required(&req.name, "snapshot name")?;
        let kind = params::snapshot_kind(&req.parameters)?;
        let name = ids::manager_name("snap", csi_name);
        let _guard = self.locks.lock(&format!("snapshot/{name}"))?;
        let span = tracing::info_span!("create_snapshot", volume, snapshot = %name, ?kind);
        let _enter = span.enter();
        let v = self
            .api
            .get_volume(volume)
            .await?
            .ok_or_else(|| CsiError::NotFound(format!("volume {volume} does not exist")))?;
        let snapshot = match kind {
            SnapshotKind::Snapshot => {
                let existing = self
                    .api
                    .list_snapshots(Some(volume))
                    .await?
                    .into_iter()
                    .find(|s| s.name == name);
                let s = match existing {
                    Some(s) => s,
                    None => match self.api.create_snapshot(volume, &name).await {
                        Ok(s) => s,
                        Err(ApiError::Conflict(_)) => {
                            return Err(CsiError::AlreadyExists(format!(
                                "snapshot {csi_name} exists for another volume"
                            )));
                        }
                        Err(e) => return Err(e.into()),
                    },
                };
                pb::Snapshot {
                    size_bytes: v.size as i64,
                    snapshot_id: SnapshotId::Snapshot(volume.to_owned(), s.name).to_id(),
                    source_volume_id: volume.to_owned(),
                    creation_time: to_timestamp(s.created.or(Some(SystemTime::now()))),
                    ready_to_use: s.ready,
                }
            }
            SnapshotKind::Backup => {
                let existing = self
                    .api
                    .list_backups(None)
                    .await?
                    .into_iter()
                    .find(|b| b.name == name);
                let b = match existing {
                    Some(b) => b,
                    None => self.api.create_backup(volume, &name).await?,
                };
                if b.volume != volume {
                    return Err(CsiError::AlreadyExists(format!(
                        "snapshot {csi_name} exists for volume {}",
                        b.volume
                    )));
                }
                if let Some(err) = &b.failed {
                    return Err(CsiError::Internal(format!("backup {name} failed: {err}")));
                }
                pb::Snapshot {
                    size_bytes: v.size as i64,
                    snapshot_id: SnapshotId::Backup(b.name).to_id(),
                    source_volume_id: volume.to_owned(),
                    creation_time: to_timestamp(b.created.or(Some(SystemTime::now()))),
                    ready_to_use: b.ready,
                }
            }
        };
        Ok(pb::CreateSnapshotResponse {
            snapshot: Some(snapshot),
        })
    }

    async fn delete_snapshot(&self, req: pb::DeleteSnapshotRequest) -> Result<(), CsiError> {
        let id = required(&req.snapshot_id, "snapshot id")?;
        let Some(parsed) = SnapshotId::parse(id) else {
            // Not an id this driver made: nothing to delete.
            return Ok(());
        };
        let _guard = self.locks.lock(&format!("snapshot/{id}"))?;
        let result = match &parsed {
            SnapshotId::Snapshot(v, n) => self.api.delete_snapshot(v, n).await,
            SnapshotId::Backup(n) => self.api.delete_backup(n).await,
        };
        match result {
            Ok(()) | Err(ApiError::NotFound(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn list_snapshots(
        &self,
        req: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsResponse, CsiError> {
        let wanted = if req.snapshot_id.is_empty() {
            None
        } else {
            match SnapshotId::parse(&req.snapshot_id) {
                Some(id) => Some(id),
                None => {
                    return Ok(pb::ListSnapshotsResponse::default());
                }
            }
        };
        let volume_filter =
            (!req.source_volume_id.is_empty()).then_some(req.source_volume_id.as_str());
        let sizes: HashMap<String, u64> = self
            .api
            .list_volumes()
            .await?
            .into_iter()
            .map(|v| (v.name, v.size))
            .collect();
        let mut all: Vec<pb::Snapshot> = Vec::new();
        if !matches!(wanted, Some(SnapshotId::Backup(_))) {
            let volume = match &wanted {
                Some(SnapshotId::Snapshot(v, _)) => Some(v.as_str()),
                _ => volume_filter,
            };
            for s in self.api.list_snapshots(volume).await? {
                all.push(pb::Snapshot {
                    size_bytes: sizes.get(&s.volume).copied().unwrap_or(s.size) as i64,
                    snapshot_id: SnapshotId::Snapshot(s.volume.clone(), s.name).to_id(),
                    source_volume_id: s.volume,
                    creation_time: to_timestamp(s.created),
                    ready_to_use: s.ready,
                });
            }
        }
        if !matches!(wanted, Some(SnapshotId::Snapshot(..))) {
            for b in self.api.list_backups(volume_filter).await? {
                all.push(pb::Snapshot {
                    size_bytes: b.size as i64,
                    snapshot_id: SnapshotId::Backup(b.name).to_id(),
                    source_volume_id: b.volume,
                    creation_time: to_timestamp(b.created),
                    ready_to_use: b.ready,
                });
            }
        }
        all.retain(|s| {
            wanted.as_ref().is_none_or(|w| w.to_id() == s.snapshot_id)
                && volume_filter.is_none_or(|v| v == s.source_volume_id)
        });
        all.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
        let (page, next_token) = page(all, &req.starting_token, req.max_entries)?;
        Ok(pb::ListSnapshotsResponse {
            entries: page
                .into_iter()
                .map(|s| pb::list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token,
        })
    }
}

/// Logs a failed call once, with its code, and turns it into a Status.
fn status(e: CsiError) -> Status {
    tracing::warn!(code = ?e.code(), error = %e, "controller call failed");
    e.into()
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        self.create_volume(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        self.delete_volume(request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<pb::ControllerPublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerPublishVolumeResponse>, Status> {
        self.publish(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<pb::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<pb::ControllerUnpublishVolumeResponse>, Status> {
        self.unpublish(request.into_inner()).await.map_err(status)?;
        Ok(Response::new(pb::ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        self.validate(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        self.list_volumes(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn get_capacity(
        &self,
        request: Request<pb::GetCapacityRequest>,
    ) -> Result<Response<pb::GetCapacityResponse>, Status> {
        self.capacity(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            Cap::CreateDeleteVolume,
            Cap::PublishUnpublishVolume,
            Cap::ListVolumes,
            Cap::ListVolumesPublishedNodes,
            Cap::GetCapacity,
            Cap::CreateDeleteSnapshot,
            Cap::ListSnapshots,
            Cap::ExpandVolume,
        ]
        .into_iter()
        .map(|t| pb::ControllerServiceCapability {
            r#type: Some(pb::controller_service_capability::Type::Rpc(
                pb::controller_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        self.create_snapshot(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        self.delete_snapshot(request.into_inner())
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        self.list_snapshots(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn controller_expand_volume(
        &self,
        request: Request<pb::ControllerExpandVolumeRequest>,
    ) -> Result<Response<pb::ControllerExpandVolumeResponse>, Status> {
        self.expand(request.into_inner())
            .await
            .map(Response::new)
            .map_err(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> pb::CapacityRange {
        pb::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }
    }

    #[test]
    fn sizes_round_up_and_respect_the_limit() {
        assert_eq!(volume_size(None).expect("default"), DEFAULT_VOLUME_SIZE);
        assert_eq!(
            volume_size(Some(&range(100 << 20, 0))).expect("exact"),
            100 << 20
        );
        assert_eq!(
            volume_size(Some(&range((100 << 20) + 1, 0))).expect("rounded"),
            101 << 20
        );
        assert_eq!(
            volume_size(Some(&range(1, 0))).expect("min"),
            MIN_VOLUME_SIZE
        );
        assert_eq!(
            volume_size(Some(&range(0, 64 << 20))).expect("limit only"),
            64 << 20
        );
        assert!(matches!(
            volume_size(Some(&range(10 << 20, 1 << 20))),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            volume_size(Some(&range((20 << 20) + 1, (20 << 20) + 100))),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(volume_size(Some(&range(-1, 0))).is_err());
    }

    #[test]
    fn pages() {
        let items: Vec<u32> = (0..5).collect();
        assert_eq!(
            page(items.clone(), "", 0).expect("all"),
            (items.clone(), String::new())
        );
        assert_eq!(
            page(items.clone(), "", 2).expect("first"),
            (vec![0, 1], "2".into())
        );
        assert_eq!(
            page(items.clone(), "4", 2).expect("last"),
            (vec![4], String::new())
        );
        assert!(matches!(
            page(items.clone(), "x", 2),
            Err(CsiError::Aborted(_))
        ));
        assert!(matches!(page(items, "9", 2), Err(CsiError::Aborted(_))));
    }
}
