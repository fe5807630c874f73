//! StorageClass and VolumeSnapshotClass parameters.

use std::collections::HashMap;

use super::backend::NewVolume;
use crate::error::{CsiError, invalid};
use crate::node::{CONTEXT_FS_TYPE, CONTEXT_MKFS_PARAMS};

/// Parameters the external-provisioner adds (`--extra-create-metadata`) or keeps for
/// itself; accepted and ignored.
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

/// Most replicas a StorageClass may ask for.
pub const MAX_REPLICAS: u32 = 20;

/// What a StorageClass asks for, checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeParams {
    /// Placement and protection, copied into the new volume.
    pub volume: NewVolume,
    /// What the node needs later (`fsType`, `mkfsParams`), returned as volume context.
    pub context: HashMap<String, String>,
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Parses StorageClass parameters: `numberOfReplicas` (1-20), `staleReplicaTimeout`
/// (minutes), `dataLocality` (`disabled`, `best-effort`), `fromBackup` (a backup name),
/// `diskSelector` / `nodeSelector` (comma-separated tags), `frontend` (`auto`, the
/// default: a ublk device on nodes whose kernel has ublk, kernel NBD elsewhere; `nbd`;
/// `ublk`), `fsType`, `mkfsParams`.
/// Unknown keys are refused, so a typo does not go unnoticed.
pub fn volume_params(params: &HashMap<String, String>) -> Result<VolumeParams, CsiError> {
    let mut out = VolumeParams::default();
    for (key, value) in params {
        match key.as_str() {
            "numberOfReplicas" => {
                let n: u32 = value
                    .parse()
                    .map_err(|_| invalid(format!("numberOfReplicas {value:?} is not a number")))?;
                if n == 0 || n > MAX_REPLICAS {
                    return Err(invalid(format!(
                        "numberOfReplicas {n} is out of range 1-{MAX_REPLICAS}"
                    )));
                }
                out.volume.number_of_replicas = Some(n);
            }
            "staleReplicaTimeout" => {
                let minutes: u64 = value.parse().map_err(|_| {
                    invalid(format!(
                        "staleReplicaTimeout {value:?} is not a number of minutes"
                    ))
                })?;
                out.volume.stale_replica_timeout_seconds = Some(minutes.saturating_mul(60));
            }
            "dataLocality" => match value.as_str() {
                "disabled" | "best-effort" => out.volume.data_locality = Some(value.clone()),
                other => {
                    return Err(invalid(format!(
                        "dataLocality {other:?} is not one of disabled, best-effort"
                    )));
                }
            },
            "fromBackup" => {
                if !value.is_empty() {
                    out.volume.from_backup = Some(value.clone());
                }
            }
            "frontend" => match value.as_str() {
                "auto" | "nbd" | "ublk" => out.volume.frontend = Some(value.clone()),
                other => {
                    return Err(invalid(format!(
                        "frontend {other:?} is not one of auto, nbd, ublk"
                    )));
                }
            },
            "diskSelector" => out.volume.disk_selector = list(value),
            "nodeSelector" => out.volume.node_selector = list(value),
            "fsType" => {
                if !value.is_empty() && !crate::capability::SUPPORTED_FS.contains(&value.as_str()) {
                    return Err(invalid(format!("fsType {value:?} is not supported")));
                }
                out.context.insert(CONTEXT_FS_TYPE.into(), value.clone());
            }
            "mkfsParams" => {
                out.context
                    .insert(CONTEXT_MKFS_PARAMS.into(), value.clone());
            }
            k if k.starts_with(PROVISIONER_PREFIX) => {}
            other => {
                return Err(invalid(format!("unknown StorageClass parameter {other:?}")));
            }
        }
    }
    Ok(out)
}

/// What a VolumeSnapshotClass asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// `type: snap` (default): an ironhorn snapshot in the replicas.
    Snapshot,
    /// `type: bak`: a backup to the backup target.
    Backup,
}

/// Parses VolumeSnapshotClass parameters (`type`: `snap` or `bak`).
pub fn snapshot_kind(params: &HashMap<String, String>) -> Result<SnapshotKind, CsiError> {
    let mut kind = SnapshotKind::Snapshot;
    for (key, value) in params {
        match key.as_str() {
            "type" => {
                kind = match value.as_str() {
                    "snap" | "" => SnapshotKind::Snapshot,
                    "bak" => SnapshotKind::Backup,
                    other => {
                        return Err(invalid(format!(
                            "snapshot type {other:?} is not one of snap, bak"
                        )));
                    }
                }
            }
            k if k.starts_with(PROVISIONER_PREFIX) => {}
            other => {
                return Err(invalid(format!(
                    "unknown VolumeSnapshotClass parameter {other:?}"
                )));
            }
        }
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn storage_class_parameters() {
        let p = volume_params(&map(&[
            ("numberOfReplicas", "2"),
            ("staleReplicaTimeout", "30"),
            ("dataLocality", "best-effort"),
            ("fromBackup", "backup-1"),
            ("diskSelector", "ssd, fast"),
            ("nodeSelector", "storage"),
            ("fsType", "xfs"),
            ("mkfsParams", "-m 0"),
            ("frontend", "ublk"),
            ("csi.storage.k8s.io/pvc/name", "data"),
        ]))
        .expect("valid");
        assert_eq!(p.volume.number_of_replicas, Some(2));
        assert_eq!(p.volume.stale_replica_timeout_seconds, Some(1800));
        assert_eq!(p.volume.data_locality.as_deref(), Some("best-effort"));
        assert_eq!(p.volume.from_backup.as_deref(), Some("backup-1"));
        assert_eq!(p.volume.disk_selector, ["ssd", "fast"]);
        assert_eq!(p.volume.node_selector, ["storage"]);
        assert_eq!(p.context[CONTEXT_FS_TYPE], "xfs");
        assert_eq!(p.context[CONTEXT_MKFS_PARAMS], "-m 0");
        assert_eq!(p.volume.frontend.as_deref(), Some("ublk"));
        // No frontend: the manager gets auto (ublk where the node has it).
        let p = volume_params(&map(&[])).expect("valid");
        assert_eq!(p.volume.frontend, None);
    }

    #[test]
    fn bad_storage_class_parameters() {
        for bad in [
            ("numberOfReplicas", "0"),
            ("numberOfReplicas", "x"),
            ("numberOfReplicas", "21"),
            ("staleReplicaTimeout", "-1"),
            ("dataLocality", "strict"),
            ("fsType", "ntfs"),
            ("frontend", "iscsi"),
            ("replicas", "3"),
        ] {
            assert!(volume_params(&map(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn snapshot_class_parameters() {
        assert_eq!(
            snapshot_kind(&map(&[])).expect("default"),
            SnapshotKind::Snapshot
        );
        assert_eq!(
            snapshot_kind(&map(&[("type", "bak")])).expect("bak"),
            SnapshotKind::Backup
        );
        assert!(snapshot_kind(&map(&[("type", "full")])).is_err());
        assert!(snapshot_kind(&map(&[("kind", "snap")])).is_err());
    }
}
