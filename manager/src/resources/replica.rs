//! Replica: one copy of one volume's data in a directory on one node's disk.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;
use super::engine::{DesiredState, InstanceState, ReplicaMode};

/// Desired state of a replica.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ironhorn.io",
    version = "v1beta1",
    kind = "Replica",
    namespaced,
    status = "ReplicaStatus",
    shortname = "ihr",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volumeName"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeId"}"#,
    printcolumn = r#"{"name":"Disk","type":"string","jsonPath":".spec.diskName"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".status.mode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSpec {
    /// Volume this replica belongs to.
    pub volume_name: String,
    /// Node it is scheduled on (empty until scheduled).
    #[serde(default)]
    pub node_id: String,
    /// Disk of that node (its name in the Node resource).
    #[serde(default)]
    pub disk_name: String,
    /// Directory under the disk that holds the replica's files.
    #[serde(default)]
    pub data_dir: String,
    /// Size in bytes.
    pub size: u64,
    /// Whether the process should run.
    #[serde(default)]
    pub desired_state: DesiredState,
    /// When the replica was found failed; none while healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_at: Option<Time>,
    /// When the replica was last RW in its engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_at: Option<Time>,
}

/// Observed state of a replica.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// Process state as its agent reports it.
    #[serde(default)]
    pub state: InstanceState,
    /// gRPC control address of the running replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_address: Option<String>,
    /// Data-protocol address of the running replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_address: Option<String>,
    /// Port of the control service (the data port is the next one).
    #[serde(default)]
    pub port: u16,
    /// Mode in the volume's engine, when attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ReplicaMode>,
    /// Rebuild progress 0..=100 while it is rebuilt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_progress: Option<u8>,
    /// Bytes allocated on disk.
    #[serde(default)]
    pub actual_size: u64,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
