//! CSI names and ids ↔ manager names: volume ids are manager volume names; snapshot ids
//! say whether they name an ironhorn snapshot or a backup.

/// Longest manager name the driver makes (a DNS label: it also names processes and files).
const MAX_NAME: usize = 63;

/// Whether `s` can be a manager name as it is: 1-63 of `a-z0-9-`, starting and ending with
/// a letter or digit.
pub fn is_plain_name(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.chars().all(|c| ok(c) || c == '-')
        && s.chars().next().is_some_and(ok)
        && s.chars().last().is_some_and(ok)
}

/// FNV-1a, 64 bits: a stable hash for names (not for security).
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The manager name for a CSI object name: the name itself when it is a plain name,
/// otherwise `PREFIX-` and a hash of it, so the same CSI name always maps to the same
/// object (idempotent creates).
pub fn manager_name(prefix: &str, csi_name: &str) -> String {
    if is_plain_name(csi_name) {
        csi_name.to_owned()
    } else {
        format!("{prefix}-{:016x}", fnv1a(csi_name))
    }
}

/// What a snapshot id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotId {
    /// An ironhorn snapshot (in the volume's replicas): volume, snapshot name.
    Snapshot(String, String),
    /// A backup in the backup target, by name.
    Backup(String),
}

impl SnapshotId {
    /// Parses `snap/VOLUME/NAME` or `bak/NAME`; None for anything else.
    pub fn parse(id: &str) -> Option<SnapshotId> {
        let mut parts = id.split('/');
        let kind = parts.next()?;
        let rest: Vec<&str> = parts.collect();
        if rest.iter().any(|p| p.is_empty()) {
            return None;
        }
        match (kind, rest.as_slice()) {
            ("snap", [volume, name]) => Some(SnapshotId::Snapshot(
                (*volume).to_owned(),
                (*name).to_owned(),
            )),
            ("bak", [name]) => Some(SnapshotId::Backup((*name).to_owned())),
            _ => None,
        }
    }

    /// The id's text.
    pub fn to_id(&self) -> String {
        match self {
            SnapshotId::Snapshot(v, n) => format!("snap/{v}/{n}"),
            SnapshotId::Backup(n) => format!("bak/{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(manager_name("pvc", "pvc-0a1b"), "pvc-0a1b");
        let hashed = manager_name("csi", "Sanity-Node-Full-1");
        assert!(
            hashed.starts_with("csi-") && is_plain_name(&hashed),
            "{hashed}"
        );
        assert_eq!(hashed, manager_name("csi", "Sanity-Node-Full-1"));
        assert_ne!(hashed, manager_name("csi", "Sanity-Node-Full-2"));
        assert!(!is_plain_name("-a"));
        assert!(!is_plain_name(&"a".repeat(64)));
    }

    #[test]
    fn snapshot_ids() {
        let s = SnapshotId::parse("snap/v1/s1").expect("snap");
        assert_eq!(s, SnapshotId::Snapshot("v1".into(), "s1".into()));
        assert_eq!(s.to_id(), "snap/v1/s1");
        assert_eq!(
            SnapshotId::parse("bak/b1"),
            Some(SnapshotId::Backup("b1".into()))
        );
        for bad in [
            "",
            "snap",
            "snap/",
            "snap/a",
            "x/y",
            "snap/a/b/c",
            "snap//b",
            "bak/a/b",
        ] {
            assert_eq!(SnapshotId::parse(bad), None, "{bad}");
        }
    }
}
