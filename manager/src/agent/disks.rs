//! The agent's disks: `PATH[:tag,tag]` arguments, and their capacity, free space and health
//! measured with statvfs and a probe write.

use std::path::{Path, PathBuf};

use ironhorn_proto::agent::DiskReport;

/// One disk of a node: a directory on a local file system, with scheduling tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Absolute path of the directory; replicas live in `PATH/replicas/NAME`.
    pub path: PathBuf,
    /// Tags a volume can require (`diskSelector`).
    pub tags: Vec<String>,
}

/// Errors of disk arguments.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The argument has no path.
    #[error("bad --disk {0:?}: expected PATH[:tag,tag]")]
    Empty(String),
    /// A tag holds characters other than letters, digits, '-', '_' and '.'.
    #[error("bad tag {tag:?} in --disk {arg:?}: use letters, digits, '-', '_' and '.'")]
    BadTag {
        /// The whole argument.
        arg: String,
        /// The tag.
        tag: String,
    },
    /// The path cannot be made absolute.
    #[error("cannot resolve disk path {path:?}: {source}")]
    Resolve {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl DiskConfig {
    /// Parses `PATH[:tag,tag]`; the path is made absolute (it need not exist yet).
    pub fn parse(arg: &str) -> Result<Self, DiskError> {
        let (path, tags) = match arg.rsplit_once(':') {
            Some((p, t)) => (p, t),
            None => (arg, ""),
        };
        if path.is_empty() {
            return Err(DiskError::Empty(arg.to_owned()));
        }
        let mut out = Vec::new();
        for tag in tags.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(DiskError::BadTag {
                    arg: arg.to_owned(),
                    tag: tag.to_owned(),
                });
            }
            out.push(tag.to_owned());
        }
        let path = std::path::absolute(path).map_err(|source| DiskError::Resolve {
            path: path.into(),
            source,
        })?;
        Ok(DiskConfig { path, tags: out })
    }

    /// Directory that holds this disk's replicas.
    pub fn replicas_dir(&self) -> PathBuf {
        self.path.join("replicas")
    }

    /// Measures the disk: creates it when missing, writes a probe file, reads statvfs.
    pub fn measure(&self) -> DiskReport {
        let mut report = DiskReport {
            path: self.path.display().to_string(),
            tags: self.tags.clone(),
            ..Default::default()
        };
        match probe(&self.path).and_then(|()| space(&self.path)) {
            Ok((capacity, free)) => {
                report.capacity_bytes = capacity;
                report.free_bytes = free;
                report.healthy = true;
            }
            Err(e) => {
                report.healthy = false;
                report.message = e;
            }
        }
        report
    }
}

/// Creates the directory (and `replicas/`) and writes and removes a probe file.
fn probe(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path.join("replicas"))
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let p = path.join(".ironhorn-probe");
    std::fs::write(&p, b"ok").map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    std::fs::remove_file(&p).map_err(|e| format!("cannot remove {}: {e}", p.display()))
}

/// (capacity, free for unprivileged users) of the file system holding `path`.
fn space(path: &Path) -> Result<(u64, u64), String> {
    let st =
        nix::sys::statvfs::statvfs(path).map_err(|e| format!("statvfs {}: {e}", path.display()))?;
    let frag = st.fragment_size() as u64;
    Ok((
        (st.blocks() as u64).saturating_mul(frag),
        (st.blocks_available() as u64).saturating_mul(frag),
    ))
}

/// Replica directories present under the disks' `replicas/` directories.
pub fn replica_dirs(disks: &[DiskConfig]) -> Vec<String> {
    let mut out = Vec::new();
    for d in disks {
        let Ok(rd) = std::fs::read_dir(d.replicas_dir()) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.push(e.path().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Bytes the files under `dir` take on disk (allocated 512-byte blocks, so the holes of
/// sparse files do not count); symbolic links are not followed and unreadable entries are
/// skipped. A replica's actual size.
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut stack = vec![(dir.to_path_buf(), 0u32)];
    while let Some((d, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                // Replica directories are shallow; bound the walk anyway.
                if depth < 8 {
                    stack.push((e.path(), depth + 1));
                }
            } else if m.is_file() {
                total = total.saturating_add(m.blocks().saturating_mul(512));
            }
        }
    }
    total
}

/// Whether `dir` lies strictly inside the replicas directory of one of `disks` (so that a
/// removal asked for by the manager never reaches outside them).
pub fn is_replica_dir(disks: &[DiskConfig], dir: &Path) -> bool {
    let Some(parent) = dir.parent() else {
        return false;
    };
    dir.file_name().is_some_and(|n| n != ".." && n != ".")
        && disks.iter().any(|d| parent == d.replicas_dir())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn allocated_bytes_counts_data_not_holes() {
        use std::io::{Seek, SeekFrom, Write};
        let t = tempfile::tempdir().unwrap();
        assert_eq!(allocated_bytes(t.path()), 0);
        std::fs::create_dir_all(t.path().join("layers")).unwrap();
        // 64 MiB sparse file with 1 MiB of data at its end.
        let mut f = std::fs::File::create(t.path().join("layers/data")).unwrap();
        f.seek(SeekFrom::Start(63 << 20)).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        std::fs::write(t.path().join("meta"), b"x").unwrap();
        let n = allocated_bytes(t.path());
        assert!((1 << 20..8 << 20).contains(&n), "{n}");
        assert_eq!(allocated_bytes(&t.path().join("missing")), 0);
    }

    #[test]
    fn parses_paths_and_tags() {
        let d = DiskConfig::parse("/data/d1:ssd,fast").unwrap();
        assert_eq!(d.path, PathBuf::from("/data/d1"));
        assert_eq!(d.tags, vec!["ssd", "fast"]);
        let d = DiskConfig::parse("/data/d2").unwrap();
        assert!(d.tags.is_empty());
        let d = DiskConfig::parse("rel/d3:").unwrap();
        assert!(d.path.is_absolute());
        assert!(DiskConfig::parse(":ssd").is_err());
        assert!(DiskConfig::parse("/d:s s").is_err());
    }

    #[test]
    fn measures_a_directory_and_reports_a_bad_one() {
        let t = tempfile::tempdir().unwrap();
        let d = DiskConfig::parse(&t.path().join("disk").display().to_string()).unwrap();
        let r = d.measure();
        assert!(r.healthy, "{}", r.message);
        assert!(r.capacity_bytes > 0 && r.free_bytes <= r.capacity_bytes);
        assert!(d.replicas_dir().is_dir());
        // A file where the directory should be.
        let f = t.path().join("file");
        std::fs::write(&f, b"x").unwrap();
        let bad = DiskConfig::parse(&f.display().to_string())
            .unwrap()
            .measure();
        assert!(!bad.healthy && !bad.message.is_empty());
    }

    #[test]
    fn removals_stay_inside_the_replicas_directories() {
        let disks = vec![DiskConfig::parse("/data/d1").unwrap()];
        assert!(is_replica_dir(&disks, Path::new("/data/d1/replicas/v-r-1")));
        assert!(!is_replica_dir(&disks, Path::new("/data/d1/replicas")));
        assert!(!is_replica_dir(&disks, Path::new("/data/d1/other/v")));
        assert!(!is_replica_dir(&disks, Path::new("/data/d1/replicas/..")));
        assert!(!is_replica_dir(&disks, Path::new("/etc")));
    }
}
