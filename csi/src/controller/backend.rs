//! What the Controller service needs from the manager, as a trait: the tonic service maps
//! CSI calls onto it, and [`super::manager`] implements it over the manager's REST client.

use std::collections::BTreeMap;
use std::time::SystemTime;

/// A volume as the manager reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Manager name (= CSI volume id).
    pub name: String,
    /// Size in bytes (spec).
    pub size: u64,
    /// Size the engine serves now (lags `size` while expanding).
    pub current_size: u64,
    /// Number of replicas wanted.
    pub number_of_replicas: u32,
    /// Node the volume is to be attached to (spec), if any.
    pub wanted_node: Option<String>,
    /// Node its engine runs on (status), if attached.
    pub current_node: Option<String>,
    /// `nbd://HOST:PORT/NAME` while attached.
    pub endpoint: Option<String>,
    /// `/dev/ublkbN` on the attached node, when the volume is served through ublk there.
    pub device: Option<String>,
    /// Lifecycle state as text (`creating`, `detached`, `attached`, …).
    pub state: String,
    /// Backup the volume was restored from.
    pub from_backup: Option<String>,
    /// Labels (the driver keeps the CSI name and parameters it needs there).
    pub labels: BTreeMap<String, String>,
    /// The scheduler's verdict on the replicas: None until it has one, `Ok` when every
    /// replica is placed, `Err(why)` when some cannot be.
    pub scheduled: Option<Result<(), String>>,
}

impl VolumeRecord {
    /// Whether it is attached and serving on `node`.
    pub fn attached_on(&self, node: &str) -> bool {
        self.state == "attached"
            && self.current_node.as_deref() == Some(node)
            && self.endpoint.is_some()
    }
}

/// A volume to create.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewVolume {
    /// Manager name.
    pub name: String,
    /// Size in bytes (a multiple of 4096).
    pub size: u64,
    /// Replicas (None: the manager's default).
    pub number_of_replicas: Option<u32>,
    /// Seconds a failed replica is kept before it is deleted (None: the setting).
    pub stale_replica_timeout_seconds: Option<u64>,
    /// `disabled` or `best-effort`.
    pub data_locality: Option<String>,
    /// Disk tags replicas need.
    pub disk_selector: Vec<String>,
    /// Node tags replicas need.
    pub node_selector: Vec<String>,
    /// Backup to restore from.
    pub from_backup: Option<String>,
    /// `auto`, `nbd` or `ublk` (None: `auto`).
    pub frontend: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A snapshot of a volume (an ironhorn snapshot in the replicas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Snapshot name (unique among the manager's snapshots).
    pub name: String,
    /// Volume it belongs to.
    pub volume: String,
    /// Bytes of the volume it captures.
    pub size: u64,
    /// When it was taken.
    pub created: Option<SystemTime>,
    /// Whether it is complete.
    pub ready: bool,
}

/// A backup of a volume in the backup target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupRecord {
    /// Backup name.
    pub name: String,
    /// Volume it was taken from.
    pub volume: String,
    /// Size of the volume it captures.
    pub size: u64,
    /// When it completed.
    pub created: Option<SystemTime>,
    /// Whether it is complete.
    pub ready: bool,
    /// Whether it failed.
    pub failed: Option<String>,
}

/// A failed manager call, by kind; the Controller turns each into a gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// It exists already, or was changed concurrently.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The manager refused the request as malformed.
    #[error("refused: {0}")]
    Invalid(String),
    /// Not enough space on the schedulable disks.
    #[error("insufficient storage: {0}")]
    InsufficientStorage(String),
    /// The manager could not be reached or is not ready.
    #[error("manager unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// Free and largest schedulable space the manager reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    /// Bytes that can still be scheduled (over all schedulable disks).
    pub available: u64,
    /// Largest volume one replica set can hold (the largest free disk).
    pub maximum_volume_size: u64,
}

/// The manager operations the Controller service uses.
#[tonic::async_trait]
pub trait ManagerApi: Send + Sync + std::fmt::Debug + 'static {
    /// A volume by name.
    async fn get_volume(&self, name: &str) -> Result<Option<VolumeRecord>, ApiError>;
    /// All volumes.
    async fn list_volumes(&self) -> Result<Vec<VolumeRecord>, ApiError>;
    /// Creates a volume.
    async fn create_volume(&self, volume: &NewVolume) -> Result<VolumeRecord, ApiError>;
    /// Deletes a volume (and its replicas and data).
    async fn delete_volume(&self, name: &str) -> Result<(), ApiError>;
    /// Whether a node exists.
    async fn node_exists(&self, node: &str) -> Result<bool, ApiError>;
    /// Asks for the volume to be attached to `node` (returns at once).
    async fn attach(&self, name: &str, node: &str) -> Result<(), ApiError>;
    /// Asks for the volume to be detached (returns at once).
    async fn detach(&self, name: &str) -> Result<(), ApiError>;
    /// Grows the volume to `size` bytes.
    async fn expand(&self, name: &str, size: u64) -> Result<(), ApiError>;
    /// Snapshots, of one volume or of all volumes.
    async fn list_snapshots(&self, volume: Option<&str>) -> Result<Vec<SnapshotRecord>, ApiError>;
    /// Takes snapshot `name` of `volume`.
    async fn create_snapshot(&self, volume: &str, name: &str) -> Result<SnapshotRecord, ApiError>;
    /// Deletes snapshot `name` of `volume`.
    async fn delete_snapshot(&self, volume: &str, name: &str) -> Result<(), ApiError>;
    /// Backups, of one volume or all.
    async fn list_backups(&self, volume: Option<&str>) -> Result<Vec<BackupRecord>, ApiError>;
    /// Starts backup `name` of `volume` (of a new snapshot).
    async fn create_backup(&self, volume: &str, name: &str) -> Result<BackupRecord, ApiError>;
    /// Deletes a backup.
    async fn delete_backup(&self, name: &str) -> Result<(), ApiError>;
    /// Schedulable space.
    async fn capacity(&self) -> Result<Capacity, ApiError>;
}
