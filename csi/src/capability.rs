//! Volume capabilities: what access types, access modes and filesystems ironhorn supports.

use crate::error::{CsiError, invalid};
use crate::pb::VolumeCapability;
use crate::pb::volume_capability::{AccessType, access_mode::Mode};

/// Filesystems the node service can create, mount and grow.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs"];
/// Filesystem used when neither the capability nor the StorageClass names one.
pub const DEFAULT_FS: &str = "ext4";

/// How a volume is accessed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A filesystem mounted at the target path.
    Mount {
        /// Filesystem asked (empty: the StorageClass's, or [`DEFAULT_FS`]).
        fs_type: String,
        /// Extra mount options.
        flags: Vec<String>,
    },
    /// The raw block device at the target path.
    Block,
}

/// A checked [`VolumeCapability`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Access type.
    pub access: Access,
    /// Whether the access mode allows only reads.
    pub read_only_mode: bool,
}

/// Whether ironhorn supports an access mode: a volume is served by one engine on one node,
/// so only single-node modes.
pub fn mode_supported(mode: Mode) -> bool {
    matches!(
        mode,
        Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter
    )
}

/// Checks one capability: INVALID_ARGUMENT when it is incomplete or asks for what ironhorn
/// does not support.
pub fn check(cap: &VolumeCapability) -> Result<Capability, CsiError> {
    let access = match &cap.access_type {
        None => {
            return Err(invalid(
                "volume capability has no access type (mount or block)",
            ));
        }
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && !SUPPORTED_FS.contains(&m.fs_type.as_str()) {
                return Err(invalid(format!(
                    "filesystem {:?} is not supported (supported: {})",
                    m.fs_type,
                    SUPPORTED_FS.join(", ")
                )));
            }
            Access::Mount {
                fs_type: m.fs_type.clone(),
                flags: m.mount_flags.clone(),
            }
        }
    };
    let Some(am) = &cap.access_mode else {
        return Err(invalid("volume capability has no access mode"));
    };
    let mode = Mode::try_from(am.mode).unwrap_or(Mode::Unknown);
    if !mode_supported(mode) {
        return Err(invalid(format!(
            "access mode {} is not supported: an ironhorn volume is used from one node at a time",
            mode.as_str_name()
        )));
    }
    Ok(Capability {
        access,
        read_only_mode: mode == Mode::SingleNodeReaderOnly,
    })
}

/// Checks a list of capabilities (INVALID_ARGUMENT if it is empty or one is unsupported).
pub fn check_all(caps: &[VolumeCapability]) -> Result<Vec<Capability>, CsiError> {
    if caps.is_empty() {
        return Err(invalid("volume capabilities are missing"));
    }
    caps.iter().map(check).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(access: Option<AccessType>, mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_type: access,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn accepts_single_node_mount_and_block() {
        let m = check(&cap(
            Some(AccessType::Mount(MountVolume {
                fs_type: "xfs".into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: String::new(),
            })),
            Mode::SingleNodeWriter,
        ))
        .expect("mount");
        assert_eq!(
            m.access,
            Access::Mount {
                fs_type: "xfs".into(),
                flags: vec!["noatime".into()]
            }
        );
        let b = check(&cap(
            Some(AccessType::Block(BlockVolume {})),
            Mode::SingleNodeReaderOnly,
        ))
        .expect("block");
        assert!(b.read_only_mode);
    }

    #[test]
    fn refuses_multi_node_unknown_fs_and_missing_fields() {
        let block = Some(AccessType::Block(BlockVolume {}));
        assert!(check(&cap(block.clone(), Mode::MultiNodeMultiWriter)).is_err());
        assert!(check(&cap(block.clone(), Mode::Unknown)).is_err());
        assert!(check(&cap(None, Mode::SingleNodeWriter)).is_err());
        let ntfs = Some(AccessType::Mount(MountVolume {
            fs_type: "ntfs".into(),
            ..Default::default()
        }));
        assert!(check(&cap(ntfs, Mode::SingleNodeWriter)).is_err());
        assert!(check_all(&[]).is_err());
        let no_mode = VolumeCapability {
            access_type: block,
            access_mode: None,
        };
        assert!(check(&no_mode).is_err());
    }
}
