//! Node: a machine running an agent, with the disks replicas may be placed on.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

fn yes() -> bool {
    true
}

/// Desired state of one disk of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    /// Directory replicas of this disk live under.
    pub path: String,
    /// Whether new replicas may be placed here.
    #[serde(default = "yes")]
    pub allow_scheduling: bool,
    /// Bytes kept free for other uses; not counted as available.
    #[serde(default)]
    pub storage_reserved: u64,
    /// Tags matched against a volume's `diskSelector`.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Desired state of a node.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ironhorn.io",
    version = "v1beta1",
    kind = "Node",
    namespaced,
    status = "NodeStatus",
    shortname = "ihnode",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"AllowScheduling","type":"boolean","jsonPath":".spec.allowScheduling"}"#,
    printcolumn = r#"{"name":"Zone","type":"string","jsonPath":".spec.zone"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    /// Whether new replicas may be placed on this node.
    #[serde(default = "yes")]
    pub allow_scheduling: bool,
    /// Tags matched against a volume's `nodeSelector`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Failure zone (replicas of one volume spread across zones when they can).
    #[serde(default)]
    pub zone: String,
    /// Disks by name.
    #[serde(default)]
    pub disks: BTreeMap<String, DiskSpec>,
    /// Move every replica off this node.
    #[serde(default)]
    pub eviction_requested: bool,
}

/// Observed state of one disk.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DiskStatus {
    /// Size of the file system holding the disk, in bytes.
    #[serde(default)]
    pub storage_maximum: u64,
    /// Free bytes on that file system.
    #[serde(default)]
    pub storage_available: u64,
    /// Bytes promised to the replicas scheduled here (sum of their sizes).
    #[serde(default)]
    pub storage_scheduled: u64,
    /// Replicas scheduled here: name → size.
    #[serde(default)]
    pub scheduled_replicas: BTreeMap<String, u64>,
    /// Whether the scheduler may place replicas here now (spec, health and space).
    #[serde(default)]
    pub schedulable: bool,
    /// Whether the agent can read and write the disk.
    #[serde(default)]
    pub healthy: bool,
    /// File-system identity, to notice a disk that was swapped.
    #[serde(default)]
    pub disk_uuid: String,
    /// Conditions: `Ready`, `Schedulable`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Observed state of a node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// gRPC address of the node's agent.
    #[serde(default)]
    pub agent_address: String,
    /// Address engines and replicas on this node are reached at.
    #[serde(default)]
    pub address: String,
    /// Last time the agent reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<Time>,
    /// Disks by name.
    #[serde(default)]
    pub disks: BTreeMap<String, DiskStatus>,
    /// Conditions: `Ready` (agent heartbeating), `Schedulable`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Whether the node's kernel has the ublk driver and its agent may use it: volumes
    /// with frontend `auto` attached here are served as `/dev/ublkbN`.
    #[serde(default)]
    pub ublk: bool,
}
