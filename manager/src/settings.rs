//! The settings catalog: every setting's name, meaning, type, default and bounds, and the
//! validation the API applies before a value is stored (as a `Setting` resource named like
//! the setting). A setting with no stored resource has its default.

use serde::Serialize;

/// What values a setting takes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SettingType {
    /// `true` or `false`.
    Bool,
    /// A whole number within `[min, max]`.
    Int,
}

/// One entry of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SettingDefinition {
    /// Name (also the Setting resource's name).
    pub name: &'static str,
    /// What it does.
    pub description: &'static str,
    /// What values it takes.
    #[serde(rename = "type")]
    pub type_: SettingType,
    /// Value when none is stored.
    pub default: &'static str,
    /// Smallest value (Int).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<i64>,
    /// Largest value (Int).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<i64>,
}

const fn boolean(
    name: &'static str,
    default: &'static str,
    description: &'static str,
) -> SettingDefinition {
    SettingDefinition {
        name,
        description,
        type_: SettingType::Bool,
        default,
        min: None,
        max: None,
    }
}

const fn int(
    name: &'static str,
    default: &'static str,
    min: i64,
    max: i64,
    description: &'static str,
) -> SettingDefinition {
    SettingDefinition {
        name,
        description,
        type_: SettingType::Int,
        default,
        min: Some(min),
        max: Some(max),
    }
}

/// `replica-soft-anti-affinity`.
pub const REPLICA_SOFT_ANTI_AFFINITY: &str = "replica-soft-anti-affinity";
/// `replica-zone-soft-anti-affinity`.
pub const REPLICA_ZONE_SOFT_ANTI_AFFINITY: &str = "replica-zone-soft-anti-affinity";
/// `storage-over-provisioning-percentage`.
pub const STORAGE_OVER_PROVISIONING_PERCENTAGE: &str = "storage-over-provisioning-percentage";
/// `storage-minimal-available-percentage`.
pub const STORAGE_MINIMAL_AVAILABLE_PERCENTAGE: &str = "storage-minimal-available-percentage";
/// `node-down-timeout`.
pub const NODE_DOWN_TIMEOUT: &str = "node-down-timeout";
/// `replica-replenishment-wait-interval`.
pub const REPLICA_REPLENISHMENT_WAIT_INTERVAL: &str = "replica-replenishment-wait-interval";
/// `default-replica-count`.
pub const DEFAULT_REPLICA_COUNT: &str = "default-replica-count";
/// `concurrent-replica-rebuild-per-node-limit`.
pub const CONCURRENT_REBUILD_LIMIT: &str = "concurrent-replica-rebuild-per-node-limit";
/// `stale-replica-timeout`.
pub const STALE_REPLICA_TIMEOUT: &str = "stale-replica-timeout";
/// `backup-concurrent-limit`.
pub const BACKUP_CONCURRENT_LIMIT: &str = "backup-concurrent-limit";
/// `snapshot-max-count`.
pub const SNAPSHOT_MAX_COUNT: &str = "snapshot-max-count";
/// `agent-report-interval`.
pub const AGENT_REPORT_INTERVAL: &str = "agent-report-interval";

/// Every setting, sorted by name. (The backup target is not a setting: it is the
/// `BackupTarget` resource named `default`, at `/v1/backuptarget`.)
pub const CATALOG: &[SettingDefinition] = &[
    int(
        AGENT_REPORT_INTERVAL,
        "1000",
        100,
        60_000,
        "Milliseconds between an agent's reports of its node, disks and instances.",
    ),
    int(
        BACKUP_CONCURRENT_LIMIT,
        "2",
        1,
        32,
        "Backups and restores the manager runs at once.",
    ),
    int(
        CONCURRENT_REBUILD_LIMIT,
        "5",
        0,
        100,
        "Replica rebuilds at once per node; 0 stops new rebuilds.",
    ),
    int(
        DEFAULT_REPLICA_COUNT,
        "3",
        1,
        20,
        "Replicas of a volume created without numberOfReplicas.",
    ),
    int(
        NODE_DOWN_TIMEOUT,
        "60",
        5,
        86_400,
        "Seconds without an agent report after which a node is down and its replicas are marked failed and replaced.",
    ),
    int(
        REPLICA_REPLENISHMENT_WAIT_INTERVAL,
        "60",
        0,
        86_400,
        "Seconds to wait for a failed replica to come back before a new one replaces it.",
    ),
    boolean(
        REPLICA_SOFT_ANTI_AFFINITY,
        "false",
        "Allow replicas of one volume on the same node when no other node fits (hard anti-affinity when false).",
    ),
    boolean(
        REPLICA_ZONE_SOFT_ANTI_AFFINITY,
        "true",
        "Allow replicas of one volume in the same zone when no other zone fits.",
    ),
    int(
        SNAPSHOT_MAX_COUNT,
        "250",
        2,
        250,
        "Snapshots a volume may hold; creating more fails.",
    ),
    int(
        STALE_REPLICA_TIMEOUT,
        "2880",
        1,
        43_200,
        "Minutes a failed replica is kept for reuse before its data is deleted.",
    ),
    int(
        STORAGE_MINIMAL_AVAILABLE_PERCENTAGE,
        "10",
        0,
        99,
        "Percent of a disk's file system that must stay free for new replicas to be placed there.",
    ),
    int(
        STORAGE_OVER_PROVISIONING_PERCENTAGE,
        "100",
        100,
        1000,
        "Sum of replica sizes a disk may promise, in percent of its usable size.",
    ),
];

/// Why a setting value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    /// No setting of that name.
    #[error("unknown setting {0:?}")]
    Unknown(String),
    /// The value does not fit the setting.
    #[error("setting {name}: {reason}")]
    BadValue {
        /// Setting name.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The definition of `name`.
pub fn definition(name: &str) -> Result<&'static SettingDefinition, SettingError> {
    CATALOG
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| SettingError::Unknown(name.to_owned()))
}

/// Checks `value` for setting `name`; returns it normalised (trimmed, canonical form).
pub fn validate(name: &str, value: &str) -> Result<String, SettingError> {
    let def = definition(name)?;
    let v = value.trim();
    match def.type_ {
        SettingType::Bool => match v {
            "true" | "false" => Ok(v.to_owned()),
            _ => Err(SettingError::BadValue {
                name: def.name,
                reason: format!("{value:?} is not true or false"),
            }),
        },
        SettingType::Int => {
            let n: i64 = v.parse().map_err(|_| SettingError::BadValue {
                name: def.name,
                reason: format!("{value:?} is not a whole number"),
            })?;
            let (min, max) = (def.min.unwrap_or(i64::MIN), def.max.unwrap_or(i64::MAX));
            if n < min || n > max {
                return Err(SettingError::BadValue {
                    name: def.name,
                    reason: format!("{n} is outside {min}..={max}"),
                });
            }
            Ok(n.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_the_catalog_is_sorted() {
        for d in CATALOG {
            assert_eq!(
                validate(d.name, d.default).as_deref(),
                Ok(d.default),
                "{}",
                d.name
            );
        }
        assert!(CATALOG.windows(2).all(|w| w[0].name < w[1].name));
    }

    #[test]
    fn bad_values_are_refused_with_the_reason() {
        assert!(matches!(
            validate("nope", "1"),
            Err(SettingError::Unknown(_))
        ));
        let e = validate(STORAGE_OVER_PROVISIONING_PERCENTAGE, "50").expect_err("below min");
        assert!(e.to_string().contains("100..=1000"), "{e}");
        assert!(validate(REPLICA_SOFT_ANTI_AFFINITY, "yes").is_err());
        assert!(validate(NODE_DOWN_TIMEOUT, "ten").is_err());
        assert_eq!(validate(NODE_DOWN_TIMEOUT, " 30 ").as_deref(), Ok("30"));
    }
}
