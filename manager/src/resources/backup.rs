//! Backup and BackupTarget: volume snapshots shipped to object storage, and where to.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

/// Desired state of a backup: taken when it appears, removed from the target when deleted.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ironhorn.io",
    version = "v1beta1",
    kind = "Backup",
    namespaced,
    status = "BackupStatus",
    shortname = "ihbak",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volume"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Progress","type":"integer","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// Volume to back up.
    pub volume: String,
    /// Snapshot to back up; none = the controller takes a new snapshot first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Free-form labels stored with the backup.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Lifecycle of a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    /// Waiting to start.
    #[default]
    Pending,
    /// Uploading.
    InProgress,
    /// In the target, restorable.
    Completed,
    /// Failed; see `error`.
    Error,
    /// Being removed from the target.
    Deleting,
}

/// Observed state of a backup.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// Lifecycle state.
    #[serde(default)]
    pub state: BackupState,
    /// Upload progress 0..=100.
    #[serde(default)]
    pub progress: u8,
    /// Snapshot that was backed up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Where the backup lives in the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Bytes of data in the backup (holes excluded).
    #[serde(default)]
    pub size: u64,
    /// Bytes newly uploaded (blocks the target did not hold yet).
    #[serde(default)]
    pub uploaded_bytes: u64,
    /// Size of the volume when it was backed up.
    #[serde(default)]
    pub volume_size: u64,
    /// When the backup completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Name of the one BackupTarget the manager uses.
pub const DEFAULT_BACKUP_TARGET: &str = "default";

/// Desired state of a backup target (the manager uses the one named `default`).
#[derive(CustomResource, Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ironhorn.io",
    version = "v1beta1",
    kind = "BackupTarget",
    namespaced,
    status = "BackupTargetStatus",
    shortname = "ihbt",
    printcolumn = r#"{"name":"URL","type":"string","jsonPath":".spec.url"}"#,
    printcolumn = r#"{"name":"Available","type":"boolean","jsonPath":".status.available"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackupTargetSpec {
    /// `s3://BUCKET/PREFIX?endpoint=http://HOST:PORT&region=R` or `file:///PATH`; empty =
    /// no target (backups fail with a clear condition).
    #[serde(default)]
    pub url: String,
    /// Name of the secret (Kubernetes) or file under the data directory (embedded) holding
    /// the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_secret: Option<String>,
    /// Seconds between listings of the target's backups (0 = default 300).
    #[serde(default)]
    pub poll_interval_seconds: u64,
}

/// Observed state of a backup target.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupTargetStatus {
    /// Whether the last check reached the target.
    #[serde(default)]
    pub available: bool,
    /// When the target was last listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_synced_at: Option<Time>,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
