//! Volume: a replicated block device — the resource users create.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

/// Default number of replicas of a volume when the request names none.
pub const DEFAULT_NUMBER_OF_REPLICAS: u32 = 3;
/// Block size every volume size must be a multiple of.
pub const VOLUME_BLOCK_SIZE: u64 = 4096;

fn default_replicas() -> u32 {
    DEFAULT_NUMBER_OF_REPLICAS
}

/// How the volume is exposed on the node it is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Frontend {
    /// An NBD export (TCP on the node and a unix socket).
    #[default]
    Nbd,
    /// A ublk block device `/dev/ublkbN` on the attached node, as well as the NBD export;
    /// attaching to a node whose kernel has no ublk driver is refused.
    Ublk,
    /// `ublk` when the attached node's kernel has the ublk driver (its agent reports
    /// `status.ublk`), `nbd` otherwise; decided at each attach.
    Auto,
}

impl Frontend {
    /// What an engine on a node serves for a volume with this frontend: `Nbd` or `Ublk`,
    /// `None` when the volume asks for ublk and the node has no ublk driver.
    pub fn resolve(self, node_has_ublk: bool) -> Option<Frontend> {
        match (self, node_has_ublk) {
            (Frontend::Nbd, _) | (Frontend::Auto, false) => Some(Frontend::Nbd),
            (Frontend::Ublk, true) | (Frontend::Auto, true) => Some(Frontend::Ublk),
            (Frontend::Ublk, false) => None,
        }
    }
}

/// Whether one replica should live on the node the volume is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DataLocality {
    /// Replicas go wherever the scheduler puts them.
    #[default]
    Disabled,
    /// Try to keep one replica on the attached node.
    BestEffort,
}

/// Desired state of a volume.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ironhorn.io",
    version = "v1beta1",
    kind = "Volume",
    namespaced,
    status = "VolumeStatus",
    shortname = "ihvol",
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Robustness","type":"string","jsonPath":".status.robustness"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.size"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.currentNode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSpec {
    /// Size in bytes; a multiple of 4096. Only grows (expand).
    pub size: u64,
    /// How many replicas to keep (default 3).
    #[serde(default = "default_replicas")]
    pub number_of_replicas: u32,
    /// How the volume is exposed when attached.
    #[serde(default)]
    pub frontend: Frontend,
    /// Whether one replica should follow the attached node.
    #[serde(default)]
    pub data_locality: DataLocality,
    /// Replicas go only to disks carrying every one of these tags.
    #[serde(default)]
    pub disk_selector: Vec<String>,
    /// Replicas go only to nodes carrying every one of these tags.
    #[serde(default)]
    pub node_selector: Vec<String>,
    /// Seconds a failed replica is kept (for reuse) before it is deleted; 0 = the setting.
    #[serde(default)]
    pub stale_replica_timeout_seconds: u64,
    /// Backup to restore the new volume from (a Backup name); empty for a blank volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_backup: Option<String>,
    /// Node the volume should be attached to; none = detached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// A revert the user asked for: the controller reverts the volume to this snapshot
    /// (the volume must be detached) and clears the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert_to_snapshot: Option<String>,
    /// Free-form labels (recurring jobs, UI grouping).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl VolumeSpec {
    /// A volume of `size` bytes with every other field at its default (3 replicas, NBD,
    /// no selectors, detached).
    pub fn with_size(size: u64) -> VolumeSpec {
        VolumeSpec {
            size,
            number_of_replicas: DEFAULT_NUMBER_OF_REPLICAS,
            frontend: Frontend::default(),
            data_locality: DataLocality::default(),
            disk_selector: vec![],
            node_selector: vec![],
            stale_replica_timeout_seconds: 0,
            from_backup: None,
            node_id: None,
            revert_to_snapshot: None,
            labels: Default::default(),
        }
    }
}

/// Lifecycle state of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Just created: replicas being scheduled (or restored).
    #[default]
    Creating,
    /// Replicas exist, no engine.
    Detached,
    /// Engine starting on the chosen node.
    Attaching,
    /// Engine running; I/O possible at `endpoint`.
    Attached,
    /// Engine stopping.
    Detaching,
    /// Being deleted (replicas and data cleaned up).
    Deleting,
}

/// How well protected the volume's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Robustness {
    /// Not known (detached volumes, or no report yet).
    #[default]
    Unknown,
    /// Every wanted replica is RW.
    Healthy,
    /// Serving, with fewer RW replicas than wanted (rebuilding or waiting for space).
    Degraded,
    /// No RW replica left: I/O fails.
    Faulted,
}

/// I/O statistics of an attached volume, sampled from its engine by the controllers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStats {
    /// Read requests per second over the last sample period.
    pub read_iops: f64,
    /// Write requests per second over the last sample period.
    pub write_iops: f64,
    /// Bytes read per second over the last sample period.
    pub read_bytes_per_second: f64,
    /// Bytes written per second over the last sample period.
    pub write_bytes_per_second: f64,
    /// Mean read latency in microseconds over the last sample period.
    pub read_latency_micros: f64,
    /// Mean write latency in microseconds over the last sample period.
    pub write_latency_micros: f64,
    /// Read requests since the engine started.
    #[serde(default)]
    pub read_ops_total: u64,
    /// Write requests since the engine started.
    #[serde(default)]
    pub write_ops_total: u64,
    /// Bytes read since the engine started.
    #[serde(default)]
    pub read_bytes_total: u64,
    /// Bytes written since the engine started.
    #[serde(default)]
    pub write_bytes_total: u64,
    /// When this sample was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at: Option<Time>,
}

/// Observed state of a volume.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// Lifecycle state.
    #[serde(default)]
    pub state: VolumeState,
    /// Data protection.
    #[serde(default)]
    pub robustness: Robustness,
    /// Node the engine runs on, when attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_node: Option<String>,
    /// Where to reach the block device when attached: `nbd://HOST:PORT/NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Unix socket of the NBD export on the attached node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// The ublk block device (`/dev/ublkbN`) on the attached node, when the volume is
    /// served through ublk there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Size the engine serves (lags `spec.size` while expanding).
    #[serde(default)]
    pub current_size: u64,
    /// Bytes allocated on disk by the largest replica.
    #[serde(default)]
    pub actual_size: u64,
    /// Number of replicas that are RW.
    #[serde(default)]
    pub healthy_replicas: u32,
    /// Rebuild progress 0..=100 of the replica being rebuilt, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_progress: Option<u8>,
    /// Restore progress 0..=100 while the volume is restored from `spec.fromBackup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_progress: Option<u8>,
    /// Name of the newest completed backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<String>,
    /// When the newest completed backup was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_at: Option<Time>,
    /// I/O statistics, while attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<VolumeStats>,
    /// `metadata.generation` the controller last acted on.
    #[serde(default)]
    pub observed_generation: i64,
    /// Conditions: `Scheduled`, `Restored`, `TooManySnapshots`...
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod frontend_tests {
    use super::Frontend;

    #[test]
    fn frontend_resolves_per_node() {
        assert_eq!(Frontend::Nbd.resolve(true), Some(Frontend::Nbd));
        assert_eq!(Frontend::Nbd.resolve(false), Some(Frontend::Nbd));
        assert_eq!(Frontend::Auto.resolve(true), Some(Frontend::Ublk));
        assert_eq!(Frontend::Auto.resolve(false), Some(Frontend::Nbd));
        assert_eq!(Frontend::Ublk.resolve(true), Some(Frontend::Ublk));
        assert_eq!(Frontend::Ublk.resolve(false), None);
        // Stored volumes written before `auto` existed still read.
        let f: Frontend = serde_json::from_str("\"nbd\"").expect("nbd");
        assert_eq!(f, Frontend::Nbd);
        let f: Frontend = serde_json::from_str("\"auto\"").expect("auto");
        assert_eq!(f, Frontend::Auto);
    }
}
