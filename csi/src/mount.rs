//! The mount table (`/proc/self/mountinfo`) and the mount/umount calls of the node service.

use std::path::{Path, PathBuf};

use crate::exec::{self, ExecError};

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Directory (or file) the filesystem is mounted on.
    pub mount_point: PathBuf,
    /// Path inside the source filesystem that is mounted there (`/` unless a bind mount of
    /// a subdirectory or file).
    pub root: PathBuf,
    /// Filesystem type (`ext4`, `xfs`, `fuse`, `devtmpfs`, …).
    pub fs_type: String,
    /// Mount source (a device path for block filesystems).
    pub source: String,
    /// Per-mount options (`rw`/`ro`, …).
    pub options: Vec<String>,
    /// `major:minor` of the filesystem's device.
    pub dev: String,
}

impl MountEntry {
    /// Whether the mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Errors reading the mount table or mounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read /proc/self/mountinfo: {0}")]
    ReadTable(std::io::Error),
    /// mount or umount failed.
    #[error(transparent)]
    Exec(#[from] ExecError),
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file; lines it cannot read are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountEntry {
                dev: l[2].to_owned(),
                root: PathBuf::from(unescape(l[3])),
                mount_point: PathBuf::from(unescape(l[4])),
                options: l[5].split(',').map(str::to_owned).collect(),
                fs_type: r[0].to_owned(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The current mount table of this process's mount namespace.
pub fn mount_table() -> Result<Vec<MountEntry>, MountError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::ReadTable)?;
    Ok(parse_mountinfo(&text))
}

/// `path` made absolute and free of symlinks where it exists (the form the mount table uses).
pub fn normalize(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// The topmost mount on `path`, if something is mounted there.
pub fn mounted_at(path: &Path) -> Result<Option<MountEntry>, MountError> {
    let path = normalize(path);
    Ok(mount_table()?
        .into_iter()
        .rev()
        .find(|m| m.mount_point == path))
}

/// Every mount whose source is `device`.
pub fn mounts_of(device: &Path) -> Result<Vec<MountEntry>, MountError> {
    let device = device.to_string_lossy();
    Ok(mount_table()?
        .into_iter()
        .filter(|m| m.source == device)
        .collect())
}

/// `mount -t FS -o OPTIONS DEVICE TARGET`.
pub fn mount_fs(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &[String],
) -> Result<(), MountError> {
    let mut args: Vec<String> = vec!["-t".into(), fs_type.into()];
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.join(","));
    }
    args.push(device.to_string_lossy().into_owned());
    args.push(target.to_string_lossy().into_owned());
    exec::run("mount", &args, exec::QUICK)?;
    Ok(())
}

/// `mount --bind SOURCE TARGET`, then a read-only remount when asked (a bind mount takes
/// its flags only on remount) with the extra `options`.
pub fn bind(
    source: &Path,
    target: &Path,
    read_only: bool,
    options: &[String],
) -> Result<(), MountError> {
    exec::run(
        "mount",
        &["--bind".as_ref(), source.as_os_str(), target.as_os_str()],
        exec::QUICK,
    )?;
    let mut remount: Vec<String> = vec!["remount".into(), "bind".into()];
    if read_only {
        remount.push("ro".into());
    }
    remount.extend(
        options
            .iter()
            .filter(|o| *o != "bind" && *o != "rw")
            .cloned(),
    );
    if remount.len() > 2 {
        let opts = remount.join(",");
        if let Err(e) = exec::run(
            "mount",
            &["-o".as_ref(), opts.as_ref(), target.as_os_str()],
            exec::QUICK,
        ) {
            let _ = umount(target);
            return Err(e.into());
        }
    }
    Ok(())
}

/// `umount PATH`.
pub fn umount(path: &Path) -> Result<(), MountError> {
    exec::run("umount", &[path.as_os_str()], exec::QUICK)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_lines() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
36 22 7:3 / /var/lib/kubelet/plugins/x\\040y/globalmount rw,relatime shared:5 - ext4 /dev/loop3 rw
37 22 7:3 / /pods/p1/volumes/v ro,relatime - ext4 /dev/loop3 rw
38 22 0:5 /loop3 /pods/p2/dev rw shared:2 - devtmpfs udev rw,size=100k
garbage line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/plugins/x y/globalmount")
        );
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].fs_type, "ext4");
        assert!(!m[1].read_only());
        assert!(m[2].read_only());
        assert_eq!(m[3].root, PathBuf::from("/loop3"));
        assert_eq!(m[3].dev, "0:5");
    }

    #[test]
    fn unescape_handles_octal_and_plain_backslashes() {
        assert_eq!(unescape("a\\040b"), "a b");
        assert_eq!(unescape("a\\\\b"), "a\\\\b");
        assert_eq!(unescape("end\\04"), "end\\04");
    }

    #[test]
    fn the_root_is_mounted() {
        assert!(mounted_at(Path::new("/")).expect("table").is_some());
    }
}
