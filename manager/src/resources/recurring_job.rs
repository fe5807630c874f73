//! RecurringJob: snapshots or backups of volumes on a cron schedule, with retention.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::condition::Condition;

/// What a recurring job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RecurringTask {
    /// Take a snapshot.
    Snapshot,
    /// Take a snapshot and back it up.
    Backup,
}

fn one() -> u32 {
    1
}

/// Desired state of a recurring job.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ironhorn.io",
    version = "v1beta1",
    kind = "RecurringJob",
    namespaced,
    status = "RecurringJobStatus",
    shortname = "ihrj",
    printcolumn = r#"{"name":"Task","type":"string","jsonPath":".spec.task"}"#,
    printcolumn = r#"{"name":"Cron","type":"string","jsonPath":".spec.cron"}"#,
    printcolumn = r#"{"name":"Retain","type":"integer","jsonPath":".spec.retain"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RecurringJobSpec {
    /// Snapshot or backup.
    pub task: RecurringTask,
    /// Standard 5-field cron expression (minute hour day-of-month month day-of-week), UTC.
    pub cron: String,
    /// How many snapshots/backups this job keeps per volume (older ones are removed); 1..=100.
    pub retain: u32,
    /// How many volumes it works on at once; 1..=100.
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Volumes it applies to; empty = every volume.
    #[serde(default)]
    pub volumes: Vec<String>,
}

/// Observed state of a recurring job.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecurringJobStatus {
    /// When it last fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<Time>,
    /// When it fires next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run: Option<Time>,
    /// Conditions.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
