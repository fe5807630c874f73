//! The `nbdfuse` attach scheme: nbdfuse exposes the NBD export as the file `fuse/nbd` of a
//! FUSE mount, and a loop device (`losetup -f --show`) turns that file into a block device.
//!
//! State per volume, under `STATE_DIR/nbdfuse/VOLUME/`: `fuse/` (the FUSE mount point),
//! `nbdfuse.pid`, `nbdfuse.log` (its stderr) and `uri` (the export). An attachment is found
//! again by the loop device whose backing file is `fuse/nbd` (`/sys/block/loop*/loop/backing_file`).
//!
//! nbdfuse is started in its own process group, so it outlives a driver restart (the
//! filesystem on it stays mounted); the driver reaps the ones it started and stops the
//! others through their pid file.

use std::collections::HashMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{AttachScheme, Attachment, DeviceError, check_nbd_uri, device_size, volume_dir_name};
use crate::exec;
use crate::mount;

/// How long nbdfuse gets to connect and show its file.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long nbdfuse gets to exit after its FUSE mount is removed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at `losetup -f` (another process can take the free device first).
const LOSETUP_ATTEMPTS: u32 = 5;

/// nbdfuse + loop device attachments, with state under `STATE_DIR/nbdfuse`.
#[derive(Debug)]
pub struct Nbdfuse {
    root: PathBuf,
    /// nbdfuse processes this driver started, by volume, so they are reaped.
    children: Mutex<HashMap<String, Child>>,
}

/// The paths of one volume's attachment.
struct Paths {
    dir: PathBuf,
    fuse: PathBuf,
    file: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
    uri: PathBuf,
}

impl Nbdfuse {
    /// The scheme with its state under `state_dir/nbdfuse`.
    pub fn new(state_dir: &Path) -> Nbdfuse {
        let root = std::path::absolute(state_dir.join("nbdfuse"))
            .unwrap_or_else(|_| state_dir.join("nbdfuse"));
        Nbdfuse {
            root,
            children: Mutex::new(HashMap::new()),
        }
    }

    fn paths(&self, volume: &str) -> Paths {
        let dir = self.root.join(volume_dir_name(volume));
        let fuse = dir.join("fuse");
        Paths {
            file: fuse.join("nbd"),
            fuse,
            pidfile: dir.join("nbdfuse.pid"),
            log: dir.join("nbdfuse.log"),
            uri: dir.join("uri"),
            dir,
        }
    }

    /// Loop devices whose backing file is `file`.
    fn loops_backed_by(file: &Path) -> Vec<PathBuf> {
        let want = file.to_string_lossy();
        let Ok(entries) = fs::read_dir("/sys/block") else {
            return Vec::new();
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
            .filter(|e| {
                fs::read_to_string(e.path().join("loop/backing_file"))
                    .is_ok_and(|b| b.trim_end_matches('\n') == want)
            })
            .map(|e| Path::new("/dev").join(e.file_name()))
            .collect();
        found.sort();
        found
    }

    fn io_err(
        operation: &'static str,
        volume: &str,
        path: &Path,
        source: std::io::Error,
    ) -> DeviceError {
        DeviceError::Io {
            operation,
            volume: volume.to_owned(),
            path: path.to_owned(),
            source,
        }
    }

    fn cmd_err(operation: &'static str, volume: &str, source: exec::ExecError) -> DeviceError {
        DeviceError::Command {
            operation,
            volume: volume.to_owned(),
            source,
        }
    }

    /// Unmounts the FUSE mount (if any) and stops its nbdfuse process.
    fn stop_nbdfuse(&self, volume: &str, p: &Paths) -> Result<(), DeviceError> {
        let mounted = mount::mounted_at(&p.fuse)
            .map_err(|e| DeviceError::AttachFailed {
                volume: volume.to_owned(),
                reason: e.to_string(),
            })?
            .is_some();
        if mounted {
            exec::run(
                "fusermount3",
                &["-u".as_ref(), p.fuse.as_os_str()],
                exec::QUICK,
            )
            .map_err(|e| Self::cmd_err("detach", volume, e))?;
        }
        let child = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(volume);
        match child {
            Some(mut child) => {
                let deadline = Instant::now() + EXIT_TIMEOUT;
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() >= deadline => {
                            tracing::warn!(
                                volume,
                                "nbdfuse did not exit after unmount; killing it"
                            );
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
            None => stop_by_pidfile(&p.pidfile, &p.fuse),
        }
        Ok(())
    }

    /// Starts nbdfuse on `uri` and waits until its file shows the export.
    fn start_nbdfuse(&self, volume: &str, uri: &str, p: &Paths) -> Result<(), DeviceError> {
        fs::create_dir_all(&p.fuse).map_err(|e| Self::io_err("attach", volume, &p.fuse, e))?;
        let _ = fs::remove_file(&p.pidfile);
        fs::write(&p.uri, uri).map_err(|e| Self::io_err("attach", volume, &p.uri, e))?;
        let log =
            fs::File::create(&p.log).map_err(|e| Self::io_err("attach", volume, &p.log, e))?;
        let mut child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&p.pidfile)
            .arg(&p.fuse)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a signal to the driver's group leaves the device alone.
            .process_group(0)
            .spawn()
            .map_err(|e| DeviceError::AttachFailed {
                volume: volume.to_owned(),
                reason: format!("cannot start nbdfuse: {e}"),
            })?;
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = fs::read_to_string(&p.log).unwrap_or_default();
                return Err(DeviceError::AttachFailed {
                    volume: volume.to_owned(),
                    reason: format!("nbdfuse exited ({status}): {}", log.trim()),
                });
            }
            if p.pidfile.exists() && fs::metadata(&p.file).is_ok_and(|m| m.len() > 0) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = exec::run(
                    "fusermount3",
                    &["-uz".as_ref(), p.fuse.as_os_str()],
                    exec::QUICK,
                );
                let log = fs::read_to_string(&p.log).unwrap_or_default();
                return Err(DeviceError::AttachFailed {
                    volume: volume.to_owned(),
                    reason: format!(
                        "nbdfuse did not show the export within {CONNECT_TIMEOUT:?}: {}",
                        log.trim()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(volume.to_owned(), child);
        Ok(())
    }

    /// `losetup -f --show FILE`, retried while another process races for the free device.
    fn losetup(volume: &str, file: &Path) -> Result<PathBuf, DeviceError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match exec::run(
                "losetup",
                &["-f".as_ref(), "--show".as_ref(), file.as_os_str()],
                exec::QUICK,
            ) {
                Ok(out) => {
                    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                    return Ok(PathBuf::from(dev));
                }
                Err(e) if attempt >= LOSETUP_ATTEMPTS => {
                    return Err(Self::cmd_err("attach", volume, e));
                }
                Err(e) => {
                    tracing::debug!(volume, attempt, error = %e, "losetup failed; retrying");
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                }
            }
        }
    }
}

/// Whether process `pid` runs and is the nbdfuse serving `fuse` (its command line names it).
fn nbdfuse_serves(pid: i32, fuse: &Path) -> bool {
    fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let needle = fuse.as_os_str().as_encoded_bytes();
        c.split(|b| *b == 0).any(|arg| arg == needle)
    })
}

/// Stops an nbdfuse this driver did not start (found through its pid file), if it still
/// runs and is the one serving `fuse`.
fn stop_by_pidfile(pidfile: &Path, fuse: &Path) {
    let Some(pid) = fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let ours = || nbdfuse_serves(pid, fuse);
    if !ours() {
        return;
    }
    let pid = Pid::from_raw(pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while ours() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if ours() {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

impl AttachScheme for Nbdfuse {
    fn name(&self) -> &'static str {
        "nbdfuse"
    }

    fn attach(&self, volume: &str, uri: &str) -> Result<Attachment, DeviceError> {
        check_nbd_uri(uri)?;
        if let Some(existing) = self.find(volume)? {
            return Ok(existing);
        }
        let p = self.paths(volume);
        // Leftovers of an attach that did not finish (or whose loop device was removed).
        self.stop_nbdfuse(volume, &p)?;
        self.start_nbdfuse(volume, uri, &p)?;
        match Self::losetup(volume, &p.file) {
            Ok(device) => {
                tracing::info!(volume, uri, device = %device.display(), "attached through nbdfuse");
                Ok(Attachment {
                    device,
                    uri: Some(uri.to_owned()),
                })
            }
            Err(e) => {
                if let Err(undo) = self.stop_nbdfuse(volume, &p) {
                    tracing::warn!(volume, error = %undo, "cannot stop nbdfuse after a failed losetup");
                }
                Err(e)
            }
        }
    }

    fn find(&self, volume: &str) -> Result<Option<Attachment>, DeviceError> {
        let p = self.paths(volume);
        Ok(Self::loops_backed_by(&p.file)
            .into_iter()
            .next()
            .map(|device| Attachment {
                device,
                uri: fs::read_to_string(&p.uri).ok(),
            }))
    }

    fn detach(&self, volume: &str) -> Result<(), DeviceError> {
        let p = self.paths(volume);
        for dev in Self::loops_backed_by(&p.file) {
            super::ensure_unmounted(volume, &dev)?;
            exec::run("losetup", &["-d".as_ref(), dev.as_os_str()], exec::QUICK)
                .map_err(|e| Self::cmd_err("detach", volume, e))?;
        }
        // The loop device lets go of the file when its last user closes it.
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while !Self::loops_backed_by(&p.file).is_empty() {
            if Instant::now() >= deadline {
                return Err(DeviceError::Busy {
                    volume: volume.to_owned(),
                    reason: "its loop device is still open".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop_nbdfuse(volume, &p)?;
        if p.dir.exists() {
            fs::remove_dir_all(&p.dir).map_err(|e| Self::io_err("detach", volume, &p.dir, e))?;
        }
        tracing::info!(volume, "detached nbdfuse and loop device");
        Ok(())
    }

    fn refresh_size(&self, volume: &str, attachment: &Attachment) -> Result<u64, DeviceError> {
        // nbdfuse keeps the size it read when it connected, so this finds the loop device's
        // current size; the export's new size shows at the next attach.
        exec::run(
            "losetup",
            &["-c".as_ref(), attachment.device.as_os_str()],
            exec::QUICK,
        )
        .map_err(|e| Self::cmd_err("refresh size", volume, e))?;
        device_size(&attachment.device)
            .map_err(|e| Self::io_err("refresh size", volume, &attachment.device, e))
    }

    fn health(&self, volume: &str, _attachment: &Attachment) -> Result<(), String> {
        let p = self.paths(volume);
        let pid = fs::read_to_string(&p.pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .ok_or_else(|| format!("nbdfuse of volume {volume} has no pid file"))?;
        if nbdfuse_serves(pid, &p.fuse) {
            Ok(())
        } else {
            Err(format!(
                "nbdfuse (pid {pid}) of volume {volume} is not running: I/O fails until the volume is staged again"
            ))
        }
    }

    fn grows_online(&self, _attachment: &Attachment) -> bool {
        false
    }
}
