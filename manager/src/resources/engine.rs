//! Engine: the process that serves one attached volume and mirrors it to its replicas.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;
use super::volume::{Frontend, VolumeStats};

/// Whether an engine or replica process should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DesiredState {
    /// Keep it running.
    #[default]
    Running,
    /// Stop it.
    Stopped,
}

/// What an agent reports about an engine or replica process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Not started yet.
    #[default]
    Pending,
    /// Started, not serving yet.
    Starting,
    /// Serving.
    Running,
    /// Being stopped.
    Stopping,
    /// Not running.
    Stopped,
    /// Exited or failed; see conditions.
    Error,
    /// The node's agent does not report it (node down).
    Unknown,
}

/// Mode of a replica in its engine (DESIGN §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ReplicaMode {
    /// Takes writes and serves reads.
    RW,
    /// Takes writes while it is rebuilt; no reads.
    WO,
    /// Dropped: missed writes, never RW again without a rebuild.
    ERR,
}

/// Progress of one replica's rebuild.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildStatus {
    /// Whether the rebuild is running.
    pub in_progress: bool,
    /// 0..=100.
    pub progress: u8,
    /// Address of the healthy replica it copies from.
    #[serde(default)]
    pub from_replica: String,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Desired state of an engine.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ironhorn.io",
    version = "v1beta1",
    kind = "Engine",
    namespaced,
    status = "EngineStatus",
    shortname = "iheng",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volumeName"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeId"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// Volume this engine serves.
    pub volume_name: String,
    /// Node it runs on.
    pub node_id: String,
    /// Size it serves, in bytes.
    pub size: u64,
    /// How the volume is exposed on the node: `nbd` or `ublk` (a volume's `auto` is
    /// resolved when the engine is created).
    #[serde(default)]
    pub frontend: Frontend,
    /// Replicas it should mirror to: replica name → data-protocol address.
    #[serde(default)]
    pub replica_addresses: BTreeMap<String, String>,
    /// Whether the process should run.
    #[serde(default)]
    pub desired_state: DesiredState,
}

/// Observed state of an engine.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EngineStatus {
    /// Process state as its agent reports it.
    #[serde(default)]
    pub state: InstanceState,
    /// gRPC control address of the running engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_address: Option<String>,
    /// NBD endpoint `nbd://HOST:PORT/NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// NBD unix socket path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// The ublk block device (`/dev/ublkbN`) it serves, if it has the ublk frontend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Size the running engine serves.
    #[serde(default)]
    pub current_size: u64,
    /// Mode of each replica in the engine: replica name → mode.
    #[serde(default)]
    pub replica_modes: BTreeMap<String, ReplicaMode>,
    /// Rebuilds in progress: replica name → progress.
    #[serde(default)]
    pub rebuild_status: BTreeMap<String, RebuildStatus>,
    /// Snapshot names as the engine lists them, oldest first.
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// I/O statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<VolumeStats>,
    /// When the process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
