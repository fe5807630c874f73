//! Snapshot: a point-in-time, read-only layer of a volume.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

/// Desired state of a snapshot: created when it appears, removed (purged into its child)
/// when it is deleted.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ironhorn.io",
    version = "v1beta1",
    kind = "Snapshot",
    namespaced,
    status = "SnapshotStatus",
    shortname = "ihsnap",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volume"}"#,
    printcolumn = r#"{"name":"Ready","type":"boolean","jsonPath":".status.readyToUse"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// Volume the snapshot is of.
    pub volume: String,
    /// Free-form labels (`recurring-job: NAME` for snapshots a recurring job took).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// Observed state of a snapshot.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// Whether every replica holds the snapshot.
    #[serde(default)]
    pub ready_to_use: bool,
    /// When the engine took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<Time>,
    /// Volume size at the time.
    #[serde(default)]
    pub size: u64,
    /// Parent snapshot, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Why taking or removing it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
