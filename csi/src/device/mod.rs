//! The node's device layer: turns a volume's NBD export into a local block device.
//!
//! An attach scheme ([`AttachScheme`]) is chosen by name when the driver starts
//! (`--attach-scheme`):
//!
//! - `nbdfuse` ([`nbdfuse::Nbdfuse`]): `nbdfuse` exposes the export as a file in a FUSE
//!   mount, and `losetup -f --show` puts a loop device on that file. Needs only FUSE and
//!   loop devices, so it works where the kernel has no `nbd` module (CI machines, this
//!   machine). nbdfuse learns the export's size when it connects, so the device grows only
//!   when attached again: [`AttachScheme::grows_online`] is false.
//! - `kernel-nbd` ([`kernel_nbd::KernelNbd`]): the kernel's nbd driver (`/dev/nbdN`)
//!   through its netlink interface, for real nodes; a supervisor thread per device
//!   reconnects when the engine restarts, and a grown export grows the device online.
//!
//! Whatever the scheme, a volume whose engine serves a ublk device on this node
//! (`ublk:///dev/ublkbN` in the publish context) uses that device ([`ublk::UblkDevices`]):
//! [`open_scheme`] returns a [`NodeDevices`] that sends `ublk://` URIs there and NBD URIs
//! to the chosen scheme.
//!
//! Every scheme keeps what it needs to find an attachment again (after a driver restart)
//! on the host, under the driver's state directory, so that staging is idempotent: find
//! before attach.

pub mod kernel_nbd;
pub mod nbdfuse;
pub mod ublk;

use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::exec::ExecError;

/// A volume attached as a local block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The block device (`/dev/loop3`, `/dev/nbd0`).
    pub device: PathBuf,
    /// The NBD export it reads and writes (`nbd://HOST:PORT/NAME` or
    /// `nbd+unix:///NAME?socket=PATH`), when the scheme can tell.
    pub uri: Option<String>,
}

/// What went wrong attaching, finding or detaching a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The export URI is not one the scheme can attach.
    #[error("cannot attach {uri:?}: {reason}")]
    BadExport {
        /// The URI given.
        uri: String,
        /// Why it is refused.
        reason: String,
    },
    /// A helper command failed.
    #[error("{operation} of volume {volume}: {source}")]
    Command {
        /// What was being done (`attach`, `detach`, …).
        operation: &'static str,
        /// The volume.
        volume: String,
        /// The command's failure.
        source: ExecError,
    },
    /// A file or directory of the scheme's state could not be used.
    #[error("{operation} of volume {volume}: {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The volume.
        volume: String,
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The attach did not complete in time or the helper process died.
    #[error("attach of volume {volume} failed: {reason}")]
    AttachFailed {
        /// The volume.
        volume: String,
        /// What happened.
        reason: String,
    },
    /// The device is still in use (mounted, open) and cannot be detached.
    #[error("volume {volume} is still in use: {reason}")]
    Busy {
        /// The volume.
        volume: String,
        /// What holds it.
        reason: String,
    },
    /// This scheme cannot do what was asked (e.g. grow an attached device).
    #[error("the {scheme} attach scheme cannot {what}")]
    Unsupported {
        /// The scheme's name.
        scheme: &'static str,
        /// What it cannot do.
        what: String,
    },
}

/// One way of turning an NBD export into a block device: attach, find, detach.
///
/// Methods block (they run helper commands) and are called from blocking threads; the node
/// service holds a per-volume guard around them, so a scheme never sees two calls for the
/// same volume at once.
pub trait AttachScheme: Send + Sync + fmt::Debug {
    /// The scheme's name, as given to `--attach-scheme`.
    fn name(&self) -> &'static str;

    /// Attaches `uri` for `volume` and returns the device. If the volume is already
    /// attached, returns that attachment unchanged.
    fn attach(&self, volume: &str, uri: &str) -> Result<Attachment, DeviceError>;

    /// The attachment of `volume`, if it has one (also after a driver restart).
    fn find(&self, volume: &str) -> Result<Option<Attachment>, DeviceError>;

    /// Detaches `volume`'s device and frees what the attach set up; does nothing when it is
    /// not attached. Fails with [`DeviceError::Busy`] while the device is mounted.
    fn detach(&self, volume: &str) -> Result<(), DeviceError>;

    /// Makes an attached device take the export's current size (after the volume was
    /// expanded) and returns the device's size in bytes.
    fn refresh_size(&self, volume: &str, attachment: &Attachment) -> Result<u64, DeviceError>;

    /// Whether what keeps `volume`'s device working is still there (an Err says what is
    /// wrong); reported as the volume condition by NodeGetVolumeStats.
    fn health(&self, _volume: &str, _attachment: &Attachment) -> Result<(), String> {
        Ok(())
    }

    /// Whether [`AttachScheme::refresh_size`] can grow `attachment`'s device while it is
    /// attached (online expansion); when false, a grown volume shows its new size at its
    /// next attach.
    fn grows_online(&self, attachment: &Attachment) -> bool;
}

/// The attach schemes `--attach-scheme` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemeKind {
    /// nbdfuse + loop device.
    Nbdfuse,
    /// The kernel's nbd driver.
    KernelNbd,
}

impl SchemeKind {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SchemeKind::Nbdfuse => "nbdfuse",
            SchemeKind::KernelNbd => "kernel-nbd",
        }
    }
}

impl fmt::Display for SchemeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchemeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "nbdfuse" => Ok(SchemeKind::Nbdfuse),
            "kernel-nbd" => Ok(SchemeKind::KernelNbd),
            other => Err(format!(
                "unknown attach scheme {other:?} (nbdfuse or kernel-nbd)"
            )),
        }
    }
}

/// Opens the scheme `kind` for NBD exports, together with the engine's ublk devices
/// ([`NodeDevices`]), keeping their state under `state_dir`.
pub fn open_scheme(
    kind: SchemeKind,
    state_dir: &Path,
) -> Result<Arc<dyn AttachScheme>, DeviceError> {
    let nbd: Arc<dyn AttachScheme> = match kind {
        SchemeKind::Nbdfuse => Arc::new(nbdfuse::Nbdfuse::new(state_dir)),
        SchemeKind::KernelNbd => Arc::new(kernel_nbd::KernelNbd::new(
            kernel_nbd::AttachOptions::default(),
        )),
    };
    Ok(Arc::new(NodeDevices {
        nbd,
        ublk: ublk::UblkDevices::new(state_dir),
    }))
}

/// A node's devices: the engine's ublk devices for `ublk://` URIs, an NBD attach scheme
/// for the rest. A volume has at most one attachment, found in either.
#[derive(Debug)]
pub struct NodeDevices {
    nbd: Arc<dyn AttachScheme>,
    ublk: ublk::UblkDevices,
}

fn is_ublk(att: &Attachment) -> bool {
    att.uri
        .as_deref()
        .is_some_and(|u| u.starts_with(ublk::URI_PREFIX))
}

impl AttachScheme for NodeDevices {
    fn name(&self) -> &'static str {
        self.nbd.name()
    }

    fn attach(&self, volume: &str, uri: &str) -> Result<Attachment, DeviceError> {
        if uri.starts_with(ublk::URI_PREFIX) {
            self.ublk.attach(volume, uri)
        } else {
            self.nbd.attach(volume, uri)
        }
    }

    fn find(&self, volume: &str) -> Result<Option<Attachment>, DeviceError> {
        match self.ublk.find(volume)? {
            Some(att) => Ok(Some(att)),
            None => self.nbd.find(volume),
        }
    }

    fn detach(&self, volume: &str) -> Result<(), DeviceError> {
        self.ublk.detach(volume)?;
        self.nbd.detach(volume)
    }

    fn refresh_size(&self, volume: &str, attachment: &Attachment) -> Result<u64, DeviceError> {
        if is_ublk(attachment) {
            self.ublk.refresh_size(volume, attachment)
        } else {
            self.nbd.refresh_size(volume, attachment)
        }
    }

    fn health(&self, volume: &str, attachment: &Attachment) -> Result<(), String> {
        if is_ublk(attachment) {
            self.ublk.health(volume, attachment)
        } else {
            self.nbd.health(volume, attachment)
        }
    }

    fn grows_online(&self, attachment: &Attachment) -> bool {
        if is_ublk(attachment) {
            self.ublk.grows_online(attachment)
        } else {
            self.nbd.grows_online(attachment)
        }
    }
}

/// Fails with [`DeviceError::Busy`] when `device` is mounted anywhere (it cannot be
/// detached then).
pub(crate) fn ensure_unmounted(volume: &str, device: &Path) -> Result<(), DeviceError> {
    let mounts = crate::mount::mounts_of(device).map_err(|e| DeviceError::Busy {
        volume: volume.to_owned(),
        reason: e.to_string(),
    })?;
    match mounts.first() {
        Some(m) => Err(DeviceError::Busy {
            volume: volume.to_owned(),
            reason: format!(
                "{} is mounted on {}",
                device.display(),
                m.mount_point.display()
            ),
        }),
        None => Ok(()),
    }
}

/// Size in bytes of a block device (or regular file): where a seek to its end lands.
pub fn device_size(path: &Path) -> std::io::Result<u64> {
    File::open(path)?.seek(SeekFrom::End(0))
}

/// Checks that `uri` is an NBD URI the schemes understand: `nbd://HOST[:PORT]/NAME` or
/// `nbd+unix:///NAME?socket=PATH`.
pub fn check_nbd_uri(uri: &str) -> Result<(), DeviceError> {
    let bad = |reason: &str| DeviceError::BadExport {
        uri: uri.to_owned(),
        reason: reason.to_owned(),
    };
    if uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("it holds whitespace or control characters"));
    }
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let (host, _name) = rest.split_once('/').unwrap_or((rest, ""));
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(())
    } else if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        if !rest.contains("socket=/") {
            return Err(bad("no socket=/PATH"));
        }
        Ok(())
    } else {
        Err(bad("not an nbd:// or nbd+unix:// URI"))
    }
}

/// A directory name for `volume`: the id itself when it is a plain name, otherwise its hex
/// encoding (volume ids are opaque strings to the node).
pub fn volume_dir_name(volume: &str) -> String {
    let plain = !volume.is_empty()
        && volume.len() <= 128
        && !volume.starts_with('.')
        && volume
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if plain {
        volume.to_owned()
    } else {
        let mut s = String::from("x-");
        for b in volume.as_bytes().iter().take(100) {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris() {
        assert!(check_nbd_uri("nbd://127.0.0.1:10809/vol").is_ok());
        assert!(check_nbd_uri("nbd+unix:///vol?socket=/run/x.sock").is_ok());
        assert!(check_nbd_uri("http://x/y").is_err());
        assert!(check_nbd_uri("nbd:///vol").is_err());
        assert!(check_nbd_uri("nbd+unix:///vol").is_err());
        assert!(check_nbd_uri("nbd://h/v w").is_err());
    }

    #[test]
    fn volume_dir_names() {
        assert_eq!(volume_dir_name("pvc-1234.a_b"), "pvc-1234.a_b");
        assert_eq!(volume_dir_name("../x"), "x-2e2e2f78");
        assert_eq!(volume_dir_name("a/b"), "x-612f62");
        assert_eq!("nbdfuse".parse::<SchemeKind>(), Ok(SchemeKind::Nbdfuse));
        assert!("nbd".parse::<SchemeKind>().is_err());
    }
}
