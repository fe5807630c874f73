//! The CSI Node service: stage (attach, format if blank, mount at the staging path),
//! publish (bind mount, read-only when asked, raw block too), unpublish, unstage, stats,
//! expansion and node info.
//!
//! The tonic service is a thin adapter: each call runs the blocking [`NodeOps`] method on
//! a blocking thread. Calls on one volume are serialised by a per-volume guard; a call
//! that finds the guard taken fails with ABORTED, which the CO retries.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::capability::{self, Access, Capability, DEFAULT_FS, SUPPORTED_FS};
use crate::device::{AttachScheme, Attachment, device_size};
use crate::error::{CsiError, invalid};
use crate::filesystem::{self, Probe};
use crate::guard::VolumeLocks;
use crate::mount;
use crate::pb;
use crate::pb::node_server::Node;
use crate::pb::node_service_capability::rpc::Type as NodeCap;

/// Key of the NBD export URI in ControllerPublishVolume's `publish_context`.
pub const PUBLISH_NBD_URI: &str = "nbdUri";
/// Key of the ublk block device (`/dev/ublkbN`) in `publish_context`, present when the
/// engine on this node serves the volume through ublk; the node then uses that device
/// rather than attaching the NBD export.
pub const PUBLISH_UBLK_DEVICE: &str = "ublkDevice";
/// Key of the filesystem type in `volume_context` (from the StorageClass `fsType`).
pub const CONTEXT_FS_TYPE: &str = "fsType";
/// Key of extra mkfs options in `volume_context` (from the StorageClass `mkfsParams`).
pub const CONTEXT_MKFS_PARAMS: &str = "mkfsParams";
/// Topology key of the node a volume's engine runs on.
pub const TOPOLOGY_NODE: &str = "topology.ironhorn.io/node";
/// Topology key of the node's zone (the well-known Kubernetes label).
pub const TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// The node service's settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (the manager's node name).
    pub node_id: String,
    /// Zone of this node, reported in the topology.
    pub zone: Option<String>,
    /// Most volumes the CO may put on this node (0 = no limit).
    pub max_volumes: i64,
}

/// The node operations, blocking; see the module documentation.
#[derive(Debug)]
pub struct NodeOps {
    config: NodeConfig,
    scheme: Arc<dyn AttachScheme>,
    locks: VolumeLocks,
}

fn required<'a>(value: &'a str, what: &str) -> Result<&'a str, CsiError> {
    if value.is_empty() {
        Err(invalid(format!("{what} is missing")))
    } else {
        Ok(value)
    }
}

fn required_capability(cap: Option<&pb::VolumeCapability>) -> Result<Capability, CsiError> {
    capability::check(cap.ok_or_else(|| invalid("volume capability is missing"))?)
}

fn mounted_at(path: &Path, doing: &str) -> Result<Option<mount::MountEntry>, CsiError> {
    mount::mounted_at(path).map_err(|e| CsiError::mount(doing.to_owned(), e))
}

/// Whether `a` and `b` are both the same block device (device file or bind mount of one).
fn same_device(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(ma), Ok(mb)) => {
            ma.file_type().is_block_device()
                && mb.file_type().is_block_device()
                && ma.rdev() == mb.rdev()
        }
        _ => false,
    }
}

fn is_block_device(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

impl NodeOps {
    /// Node operations attaching through `scheme`.
    pub fn new(config: NodeConfig, scheme: Arc<dyn AttachScheme>) -> NodeOps {
        NodeOps {
            config,
            scheme,
            locks: VolumeLocks::default(),
        }
    }

    /// The attach scheme in use.
    pub fn scheme(&self) -> &Arc<dyn AttachScheme> {
        &self.scheme
    }

    /// NodeStageVolume.
    pub fn stage(&self, req: &pb::NodeStageVolumeRequest) -> Result<(), CsiError> {
        let volume = required(&req.volume_id, "volume id")?;
        let staging = Path::new(required(&req.staging_target_path, "staging target path")?);
        let cap = required_capability(req.volume_capability.as_ref())?;
        // The engine's ublk device when it serves one here, the NBD export otherwise.
        let uri = match req
            .publish_context
            .get(PUBLISH_UBLK_DEVICE)
            .filter(|d| !d.is_empty())
        {
            Some(dev) => format!("{}{dev}", crate::device::ublk::URI_PREFIX),
            None => req
                .publish_context
                .get(PUBLISH_NBD_URI)
                .filter(|u| !u.is_empty())
                .cloned()
                .ok_or_else(|| {
                    invalid(format!(
                        "publish context has no {PUBLISH_NBD_URI} (was the volume published to this node?)"
                    ))
                })?,
        };
        let uri = uri.as_str();
        let fs_request = match &cap.access {
            Access::Mount { fs_type, flags } => {
                let fs = if fs_type.is_empty() {
                    req.volume_context
                        .get(CONTEXT_FS_TYPE)
                        .cloned()
                        .unwrap_or_default()
                } else {
                    fs_type.clone()
                };
                if !fs.is_empty() && !SUPPORTED_FS.contains(&fs.as_str()) {
                    return Err(invalid(format!(
                        "filesystem {fs:?} is not supported (supported: {})",
                        SUPPORTED_FS.join(", ")
                    )));
                }
                Some((fs, flags.clone()))
            }
            Access::Block => None,
        };
        let _guard = self.locks.lock(volume)?;
        let span = tracing::info_span!("node_stage", volume, staging = %staging.display());
        let _enter = span.enter();

        // Find before attach: a second stage of the same volume changes nothing.
        let existing = self
            .scheme
            .find(volume)
            .map_err(|e| CsiError::device("find the volume's device", e))?;
        if let (Some(att), Some(current)) = (&existing, &att_uri_mismatch(&existing, uri)) {
            return Err(CsiError::AlreadyExists(format!(
                "volume {volume} is attached on {} from {current}, not from {uri}",
                att.device.display()
            )));
        }
        let current_mount = mounted_at(staging, "read the staging path's mount")?;
        if let Some(m) = &current_mount {
            let same = existing
                .as_ref()
                .is_some_and(|a| Path::new(&m.source) == a.device);
            return match (same, &fs_request) {
                (true, Some(_)) => Ok(()),
                _ => Err(CsiError::AlreadyExists(format!(
                    "staging path {} already has {} mounted on it",
                    staging.display(),
                    m.source
                ))),
            };
        }
        let created = existing.is_none();
        let att = match existing {
            Some(att) => att,
            None => self
                .scheme
                .attach(volume, uri)
                .map_err(|e| CsiError::device(format!("attach {uri}"), e))?,
        };
        let Some((fs, flags)) = fs_request else {
            tracing::info!(device = %att.device.display(), "staged raw block volume");
            return Ok(());
        };
        let mkfs_params = req
            .volume_context
            .get(CONTEXT_MKFS_PARAMS)
            .map(|p| filesystem::split_params(p))
            .unwrap_or_default();
        match self.format_and_mount(&att, staging, &fs, &flags, &mkfs_params, cap.read_only_mode) {
            Ok(()) => Ok(()),
            Err(e) => {
                // Undo the attach this call made, so that a failed stage leaves nothing.
                if created && let Err(undo) = self.scheme.detach(volume) {
                    tracing::warn!(error = %undo, "cannot undo the attach after a failed stage");
                }
                Err(e)
            }
        }
    }

    fn format_and_mount(
        &self,
        att: &Attachment,
        staging: &Path,
        fs: &str,
        flags: &[String],
        mkfs_params: &[String],
        read_only: bool,
    ) -> Result<(), CsiError> {
        let dev = &att.device;
        let found = filesystem::probe(dev)
            .map_err(|e| CsiError::exec(format!("probe {}", dev.display()), e))?;
        let fs_type = match found {
            Probe::Blank => {
                let fs = if fs.is_empty() { DEFAULT_FS } else { fs };
                if read_only {
                    return Err(CsiError::FailedPrecondition(format!(
                        "{} is blank and the volume is read-only: cannot create a filesystem",
                        dev.display()
                    )));
                }
                tracing::info!(device = %dev.display(), fs, "blank device: creating a filesystem");
                filesystem::make(dev, fs, mkfs_params)
                    .map_err(|e| CsiError::exec(format!("create {fs} on {}", dev.display()), e))?;
                fs.to_owned()
            }
            Probe::Found(existing) => {
                if !fs.is_empty() && existing != fs {
                    return Err(CsiError::FailedPrecondition(format!(
                        "{} holds {existing}, not the {fs} asked for; it is left as it is",
                        dev.display()
                    )));
                }
                if !SUPPORTED_FS.contains(&existing.as_str()) {
                    return Err(CsiError::FailedPrecondition(format!(
                        "{} holds {existing}, which this driver does not mount",
                        dev.display()
                    )));
                }
                if existing.starts_with("ext") && !read_only {
                    // A volume expanded while detached: grow its filesystem before mounting
                    // (offline growth needs no privilege beyond opening the device).
                    filesystem::grow_offline(dev).map_err(|e| {
                        CsiError::exec(format!("grow {existing} on {}", dev.display()), e)
                    })?;
                }
                existing
            }
        };
        std::fs::create_dir_all(staging).map_err(|e| {
            CsiError::Internal(format!("create staging path {}: {e}", staging.display()))
        })?;
        let mut options: Vec<String> = flags.to_vec();
        if read_only {
            options.push("ro".into());
        }
        if fs_type == "xfs" && !options.iter().any(|o| o == "nouuid") {
            // Clones and restored snapshots carry their source's XFS UUID.
            options.push("nouuid".into());
        }
        mount::mount_fs(dev, staging, &fs_type, &options).map_err(|e| {
            CsiError::mount(
                format!("mount {} on {}", dev.display(), staging.display()),
                e,
            )
        })?;
        if fs_type == "xfs" && !read_only {
            // XFS grows only while mounted.
            if let Err(e) = filesystem::grow(dev, staging, "xfs") {
                let _ = mount::umount(staging);
                return Err(CsiError::exec(format!("grow xfs on {}", dev.display()), e));
            }
        }
        tracing::info!(device = %dev.display(), fs = fs_type, "staged");
        Ok(())
    }

    /// NodeUnstageVolume.
    pub fn unstage(&self, req: &pb::NodeUnstageVolumeRequest) -> Result<(), CsiError> {
        let volume = required(&req.volume_id, "volume id")?;
        let staging = Path::new(required(&req.staging_target_path, "staging target path")?);
        let _guard = self.locks.lock(volume)?;
        let span = tracing::info_span!("node_unstage", volume, staging = %staging.display());
        let _enter = span.enter();
        // Unmount everything stacked on the staging path.
        while mounted_at(staging, "read the staging path's mount")?.is_some() {
            mount::umount(staging)
                .map_err(|e| CsiError::mount(format!("unmount {}", staging.display()), e))?;
        }
        self.scheme
            .detach(volume)
            .map_err(|e| CsiError::device("detach the volume's device", e))?;
        tracing::info!("unstaged");
        Ok(())
    }

    /// NodePublishVolume.
    pub fn publish(&self, req: &pb::NodePublishVolumeRequest) -> Result<(), CsiError> {
        let volume = required(&req.volume_id, "volume id")?;
        let staging = Path::new(required(&req.staging_target_path, "staging target path")?);
        let target = Path::new(required(&req.target_path, "target path")?);
        let cap = required_capability(req.volume_capability.as_ref())?;
        let read_only = req.readonly || cap.read_only_mode;
        let _guard = self.locks.lock(volume)?;
        let span =
            tracing::info_span!("node_publish", volume, target = %target.display(), read_only);
        let _enter = span.enter();

        let (source, flags) = match &cap.access {
            Access::Mount { flags, .. } => {
                let staged =
                    mounted_at(staging, "read the staging path's mount")?.ok_or_else(|| {
                        CsiError::FailedPrecondition(format!(
                            "volume {volume} is not staged at {}",
                            staging.display()
                        ))
                    })?;
                (PathBuf::from(staged.source), flags.clone())
            }
            Access::Block => {
                let att = self
                    .scheme
                    .find(volume)
                    .map_err(|e| CsiError::device("find the volume's device", e))?
                    .ok_or_else(|| {
                        CsiError::FailedPrecondition(format!(
                            "volume {volume} is not staged on this node (no device attached)"
                        ))
                    })?;
                (att.device, Vec::new())
            }
        };
        if let Some(m) = mounted_at(target, "read the target path's mount")? {
            // Published already: the same volume with the same access is success. A bound
            // device file shows devtmpfs as its source: compare the device numbers.
            let same_source = match &cap.access {
                Access::Mount { .. } => Path::new(&m.source) == source,
                Access::Block => same_device(target, &source),
            };
            if same_source && m.read_only() == read_only {
                return Ok(());
            }
            return Err(CsiError::AlreadyExists(format!(
                "target path {} already has {} mounted ({}) on it",
                target.display(),
                m.source,
                if m.read_only() {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        let bind_source: &Path = match &cap.access {
            Access::Mount { .. } => {
                std::fs::create_dir_all(target).map_err(|e| {
                    CsiError::Internal(format!("create target path {}: {e}", target.display()))
                })?;
                staging
            }
            Access::Block => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        CsiError::Internal(format!("create {}: {e}", parent.display()))
                    })?;
                }
                if !target.exists() {
                    std::fs::File::create(target).map_err(|e| {
                        CsiError::Internal(format!("create target file {}: {e}", target.display()))
                    })?;
                }
                &source
            }
        };
        mount::bind(bind_source, target, read_only, &flags).map_err(|e| {
            CsiError::mount(
                format!("bind {} on {}", bind_source.display(), target.display()),
                e,
            )
        })?;
        tracing::info!(source = %source.display(), "published");
        Ok(())
    }

    /// NodeUnpublishVolume.
    pub fn unpublish(&self, req: &pb::NodeUnpublishVolumeRequest) -> Result<(), CsiError> {
        let volume = required(&req.volume_id, "volume id")?;
        let target = Path::new(required(&req.target_path, "target path")?);
        let _guard = self.locks.lock(volume)?;
        let span = tracing::info_span!("node_unpublish", volume, target = %target.display());
        let _enter = span.enter();
        while mounted_at(target, "read the target path's mount")?.is_some() {
            mount::umount(target)
                .map_err(|e| CsiError::mount(format!("unmount {}", target.display()), e))?;
        }
        // The SP removes the file or directory it created at the target path.
        let removed = if target.is_dir() {
            std::fs::remove_dir(target)
        } else {
            std::fs::remove_file(target)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(CsiError::Internal(format!(
                    "remove target path {}: {e}",
                    target.display()
                )));
            }
        }
        tracing::info!("unpublished");
        Ok(())
    }

    /// NodeGetVolumeStats.
    pub fn stats(
        &self,
        req: &pb::NodeGetVolumeStatsRequest,
    ) -> Result<pb::NodeGetVolumeStatsResponse, CsiError> {
        let volume = required(&req.volume_id, "volume id")?;
        let path = Path::new(required(&req.volume_path, "volume path")?);
        if !path.exists() {
            return Err(CsiError::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let att = self
            .scheme
            .find(volume)
            .map_err(|e| CsiError::device("find the volume's device", e))?
            .ok_or_else(|| {
                CsiError::NotFound(format!("volume {volume} is not attached on this node"))
            })?;
        let condition = match self.scheme.health(volume, &att) {
            Ok(()) => pb::VolumeCondition {
                abnormal: false,
                message: format!("attached as {}", att.device.display()),
            },
            Err(problem) => pb::VolumeCondition {
                abnormal: true,
                message: problem,
            },
        };
        if is_block_device(path) {
            if !same_device(path, &att.device) {
                return Err(CsiError::NotFound(format!(
                    "{} is not volume {volume}'s device",
                    path.display()
                )));
            }
            let total = device_size(path)
                .map_err(|e| CsiError::Internal(format!("size of {}: {e}", path.display())))?;
            return Ok(pb::NodeGetVolumeStatsResponse {
                usage: vec![pb::VolumeUsage {
                    total: total as i64,
                    unit: pb::volume_usage::Unit::Bytes as i32,
                    ..Default::default()
                }],
                volume_condition: Some(condition),
            });
        }
        match mounted_at(path, "read the volume path's mount")? {
            Some(m) if Path::new(&m.source) == att.device => {}
            _ => {
                return Err(CsiError::NotFound(format!(
                    "volume {volume} is not mounted at {}",
                    path.display()
                )));
            }
        }
        let st = nix::sys::statvfs::statvfs(path)
            .map_err(|e| CsiError::Internal(format!("statvfs {}: {e}", path.display())))?;
        let frag = st.fragment_size() as i64;
        let blocks = st.blocks() as i64;
        let bfree = st.blocks_free() as i64;
        let bavail = st.blocks_available() as i64;
        let files = st.files() as i64;
        let ffree = st.files_free() as i64;
        Ok(pb::NodeGetVolumeStatsResponse {
            usage: vec![
                pb::VolumeUsage {
                    total: blocks * frag,
                    available: bavail * frag,
                    used: (blocks - bfree) * frag,
                    unit: pb::volume_usage::Unit::Bytes as i32,
                },
                pb::VolumeUsage {
                    total: files,
                    available: ffree,
                    used: files - ffree,
                    unit: pb::volume_usage::Unit::Inodes as i32,
                },
            ],
            volume_condition: Some(condition),
        })
    }

    /// NodeExpandVolume.
    pub fn expand(
        &self,
        req: &pb::NodeExpandVolumeRequest,
    ) -> Result<pb::NodeExpandVolumeResponse, CsiError> {
        let volume = required(&req.volume_id, "volume id")?;
        let path = Path::new(required(&req.volume_path, "volume path")?);
        if let Some(cap) = req.volume_capability.as_ref() {
            capability::check(cap)?;
        }
        let required_bytes = req
            .capacity_range
            .as_ref()
            .map(|r| r.required_bytes)
            .unwrap_or(0);
        if required_bytes < 0 {
            return Err(invalid("required_bytes is negative"));
        }
        if !path.exists() {
            return Err(CsiError::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let _guard = self.locks.lock(volume)?;
        let span =
            tracing::info_span!("node_expand", volume, path = %path.display(), required_bytes);
        let _enter = span.enter();
        let att = self
            .scheme
            .find(volume)
            .map_err(|e| CsiError::device("find the volume's device", e))?
            .ok_or_else(|| {
                CsiError::NotFound(format!("volume {volume} is not attached on this node"))
            })?;
        let size = self
            .scheme
            .refresh_size(volume, &att)
            .map_err(|e| CsiError::device("refresh the device's size", e))?;
        if (size as i64) < required_bytes {
            let how = if self.scheme.grows_online(&att) {
                "the device has not grown yet; retry"
            } else {
                "this attach scheme cannot grow an attached device: unstage and stage the volume again (offline expansion)"
            };
            return Err(CsiError::FailedPrecondition(format!(
                "{} is {size} bytes, {required_bytes} were asked: {how}",
                att.device.display()
            )));
        }
        if is_block_device(path) {
            return Ok(pb::NodeExpandVolumeResponse {
                capacity_bytes: size as i64,
            });
        }
        let m = mounted_at(path, "read the volume path's mount")?.ok_or_else(|| {
            CsiError::NotFound(format!(
                "volume {volume} is not mounted at {}",
                path.display()
            ))
        })?;
        if Path::new(&m.source) != att.device {
            return Err(CsiError::InvalidArgument(format!(
                "{} holds {}, not volume {volume}'s device {}",
                path.display(),
                m.source,
                att.device.display()
            )));
        }
        filesystem::grow(&att.device, path, &m.fs_type).map_err(|e| {
            CsiError::exec(
                format!(
                    "grow the {} filesystem on {}",
                    m.fs_type,
                    att.device.display()
                ),
                e,
            )
        })?;
        tracing::info!(size, "filesystem grown");
        Ok(pb::NodeExpandVolumeResponse {
            capacity_bytes: size as i64,
        })
    }

    /// NodeGetInfo.
    pub fn info(&self) -> pb::NodeGetInfoResponse {
        let mut segments = HashMap::new();
        segments.insert(TOPOLOGY_NODE.to_owned(), self.config.node_id.clone());
        if let Some(zone) = &self.config.zone {
            segments.insert(TOPOLOGY_ZONE.to_owned(), zone.clone());
        }
        pb::NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: self.config.max_volumes,
            accessible_topology: Some(pb::Topology { segments }),
        }
    }
}

/// The URI an existing attachment uses, when it is known and differs from `uri`.
fn att_uri_mismatch(existing: &Option<Attachment>, uri: &str) -> Option<String> {
    existing
        .as_ref()
        .and_then(|a| a.uri.clone())
        .filter(|current| current != uri)
}

/// The tonic Node service over [`NodeOps`].
#[derive(Debug, Clone)]
pub struct NodeService {
    ops: Arc<NodeOps>,
}

impl NodeService {
    /// A service running `ops`.
    pub fn new(ops: Arc<NodeOps>) -> NodeService {
        NodeService { ops }
    }
}

/// Runs a blocking node operation on a blocking thread and turns its error into a Status.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            tracing::warn!(code = ?e.code(), error = %e, "node call failed");
            Err(e.into())
        }
        Err(e) => Err(Status::internal(format!("node operation panicked: {e}"))),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let ops = self.ops.clone();
        let req = request.into_inner();
        blocking(move || ops.stage(&req)).await?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let ops = self.ops.clone();
        let req = request.into_inner();
        blocking(move || ops.unstage(&req)).await?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let ops = self.ops.clone();
        let req = request.into_inner();
        blocking(move || ops.publish(&req)).await?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let ops = self.ops.clone();
        let req = request.into_inner();
        blocking(move || ops.unpublish(&req)).await?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let ops = self.ops.clone();
        let req = request.into_inner();
        Ok(Response::new(blocking(move || ops.stats(&req)).await?))
    }

    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let ops = self.ops.clone();
        let req = request.into_inner();
        Ok(Response::new(blocking(move || ops.expand(&req)).await?))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            NodeCap::StageUnstageVolume,
            NodeCap::GetVolumeStats,
            NodeCap::ExpandVolume,
            NodeCap::VolumeCondition,
        ]
        .into_iter()
        .map(|t| pb::NodeServiceCapability {
            r#type: Some(pb::node_service_capability::Type::Rpc(
                pb::node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(self.ops.info()))
    }
}
