//! ublk devices: the engine on this node serves the volume as `/dev/ublkbN` itself (volume
//! frontend `ublk`, or `auto` on a node whose kernel has the ublk driver), so "attaching"
//! is taking the device the publish context names (`ublk:///dev/ublkbN`) once it is there.
//! The device belongs to the engine: it appears when the engine starts, survives an engine
//! crash (the kernel holds I/O until the restarted engine recovers it) and goes when the
//! engine is stopped (ControllerUnpublishVolume). Detaching only forgets the attachment.
//!
//! State per volume: `STATE_DIR/ublk/VOLUME` holds the device path, so a restarted driver
//! finds the attachment again.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{AttachScheme, Attachment, DeviceError, device_size, volume_dir_name};

/// URI prefix of a ublk device: `ublk:///dev/ublkbN`.
pub const URI_PREFIX: &str = "ublk://";
/// How long attach waits for the engine's device to show up.
const APPEAR_TIMEOUT: Duration = Duration::from_secs(30);

/// ublk device attachments, with state under `STATE_DIR/ublk`.
#[derive(Debug)]
pub struct UblkDevices {
    root: PathBuf,
}

/// The device path of a `ublk:///dev/ublkbN` URI.
pub fn parse_uri(uri: &str) -> Result<PathBuf, DeviceError> {
    let bad = |reason: &str| DeviceError::BadExport {
        uri: uri.to_owned(),
        reason: reason.to_owned(),
    };
    let path = uri
        .strip_prefix(URI_PREFIX)
        .ok_or_else(|| bad("not a ublk:// URI"))?;
    let n = path
        .strip_prefix("/dev/ublkb")
        .ok_or_else(|| bad("the device is not /dev/ublkbN"))?;
    if n.is_empty() || n.len() > 6 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("the device is not /dev/ublkbN"));
    }
    Ok(PathBuf::from(path))
}

fn is_block_device(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

impl UblkDevices {
    /// The scheme with its state under `state_dir/ublk`.
    pub fn new(state_dir: &Path) -> UblkDevices {
        let root =
            std::path::absolute(state_dir.join("ublk")).unwrap_or_else(|_| state_dir.join("ublk"));
        UblkDevices { root }
    }

    fn state_file(&self, volume: &str) -> PathBuf {
        self.root.join(volume_dir_name(volume))
    }

    fn io_err(
        operation: &'static str,
        volume: &str,
        path: &Path,
        e: std::io::Error,
    ) -> DeviceError {
        DeviceError::Io {
            operation,
            volume: volume.to_owned(),
            path: path.to_owned(),
            source: e,
        }
    }
}

impl AttachScheme for UblkDevices {
    fn name(&self) -> &'static str {
        "ublk"
    }

    fn attach(&self, volume: &str, uri: &str) -> Result<Attachment, DeviceError> {
        let device = parse_uri(uri)?;
        if let Some(att) = self.find(volume)? {
            return Ok(att);
        }
        let deadline = Instant::now() + APPEAR_TIMEOUT;
        while !is_block_device(&device) || device_size(&device).unwrap_or(0) == 0 {
            if Instant::now() >= deadline {
                return Err(DeviceError::AttachFailed {
                    volume: volume.to_owned(),
                    reason: format!(
                        "{} did not appear within {APPEAR_TIMEOUT:?} (is the volume's engine running on this node?)",
                        device.display()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        fs::create_dir_all(&self.root)
            .map_err(|e| Self::io_err("attach", volume, &self.root, e))?;
        let file = self.state_file(volume);
        let tmp = file.with_extension("tmp");
        fs::write(&tmp, device.to_string_lossy().as_bytes())
            .and_then(|()| fs::rename(&tmp, &file))
            .map_err(|e| Self::io_err("attach", volume, &file, e))?;
        tracing::info!(volume, device = %device.display(), "using the engine's ublk device");
        Ok(Attachment {
            uri: Some(format!("{URI_PREFIX}{}", device.display())),
            device,
        })
    }

    fn find(&self, volume: &str) -> Result<Option<Attachment>, DeviceError> {
        let file = self.state_file(volume);
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io_err("find", volume, &file, e)),
        };
        let uri = format!("{URI_PREFIX}{}", text.trim());
        let device = parse_uri(&uri)?;
        // A device that is gone (its engine was stopped) is no attachment.
        Ok(is_block_device(&device).then_some(Attachment {
            device,
            uri: Some(uri),
        }))
    }

    fn detach(&self, volume: &str) -> Result<(), DeviceError> {
        let file = self.state_file(volume);
        if let Ok(text) = fs::read_to_string(&file) {
            super::ensure_unmounted(volume, Path::new(text.trim()))?;
        }
        match fs::remove_file(&file) {
            Ok(()) => {
                tracing::info!(
                    volume,
                    "forgot the ublk device (the engine removes it when stopped)"
                );
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io_err("detach", volume, &file, e)),
        }
    }

    fn refresh_size(&self, volume: &str, attachment: &Attachment) -> Result<u64, DeviceError> {
        device_size(&attachment.device)
            .map_err(|e| Self::io_err("read the size", volume, &attachment.device, e))
    }

    fn health(&self, _volume: &str, attachment: &Attachment) -> Result<(), String> {
        if is_block_device(&attachment.device) {
            Ok(())
        } else {
            Err(format!(
                "{} is gone (the volume's engine was stopped)",
                attachment.device.display()
            ))
        }
    }

    fn grows_online(&self, _attachment: &Attachment) -> bool {
        // The engine's ublk frontend keeps the size it started with.
        false
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("ublk:///dev/ublkb3").unwrap(),
            PathBuf::from("/dev/ublkb3")
        );
        for bad in [
            "ublk:///dev/ublkb",
            "ublk:///dev/ublkbx",
            "ublk:///dev/sda",
            "ublk:///dev/ublkb1/../sda",
            "nbd://h/v",
            "ublk:///dev/ublkb12345678",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn find_detach_without_device() {
        let dir = tempfile::tempdir().unwrap();
        let u = UblkDevices::new(dir.path());
        assert_eq!(u.find("v").unwrap(), None);
        u.detach("v").unwrap();
        // A recorded device that no longer exists is not an attachment.
        fs::create_dir_all(dir.path().join("ublk")).unwrap();
        fs::write(dir.path().join("ublk/v"), "/dev/ublkb999").unwrap();
        assert_eq!(u.find("v").unwrap(), None);
        u.detach("v").unwrap();
        assert!(!dir.path().join("ublk/v").exists());
        // A garbled state file is an error, not a panic.
        fs::write(dir.path().join("ublk/w"), "/etc/passwd").unwrap();
        assert!(u.find("w").is_err());
    }

    #[test]
    fn attach_refuses_bad_uri_fast() {
        let dir = tempfile::tempdir().unwrap();
        let u = UblkDevices::new(dir.path());
        assert!(matches!(
            u.attach("v", "ublk:///dev/sda"),
            Err(DeviceError::BadExport { .. })
        ));
    }
}
