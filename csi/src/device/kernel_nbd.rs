//! Kernel NBD attach: connects an NBD export (the engine's) to a `/dev/nbdN` through the
//! kernel's generic-netlink interface, finds an existing attachment before making a second
//! one, keeps it alive across engine restarts, and detaches.
//!
//! Keeping it alive: the kernel is given `timeout` (an unanswered request is retried) and
//! `dead_conn_timeout` (how long requests wait for a new socket once every socket is dead,
//! before they fail with EIO). [`supervise`] holds its own descriptor of every socket it
//! handed to the kernel and polls it for hang-up (`POLLRDHUP`, never reading from it); when
//! one dies it dials the export again, redoes the handshake and passes the new socket to the
//! device with `NBD_CMD_RECONFIGURE`. If the engine is back within `dead_conn_timeout`, the
//! file system on the device sees no error.
//!
//! An attachment is named in the kernel by its backend identifier
//! (`/sys/block/nbdN/backend`): `ironhorn-csi:VOLUME URI` for the CSI node ([`KernelNbd`],
//! the `kernel-nbd` attach scheme), `ironhorn:URI` for `ironhorn nbd attach`
//! ([`backend_id`]); that is how [`find`] recognises one made earlier (by another process,
//! or before a driver restart), with no state file.

pub mod handshake;
mod netlink;
mod target;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

pub use handshake::{ExportInfo, HandshakeError};
pub use netlink::NetlinkError;
pub use target::{Endpoint, NbdTarget, ParseTargetError};

use super::{AttachScheme, DeviceError, check_nbd_uri, device_size, volume_dir_name};

use handshake::{FLAG_CAN_MULTI_CONN, negotiate};
use netlink::{ConnectRequest, NbdNetlink};

/// `POLLRDHUP` (linux/poll.h, 0x2000 on every Linux architecture but sparc/mips/parisc):
/// the peer closed its end. nix does not name it.
const POLLRDHUP: PollFlags = PollFlags::from_bits_retain(0x2000);

/// Where the kernel lists block devices.
const SYS_BLOCK: &str = "/sys/block";

/// How an attachment is made.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Seconds-granular time after which an unanswered request is retried (on a reconnected
    /// socket). Default 30 s.
    pub io_timeout: Duration,
    /// How long I/O waits for a reconnection once every socket is dead. Default 120 s.
    pub dead_conn_timeout: Duration,
    /// Sockets to the export (more than one only if the server allows multi-conn).
    pub connections: u32,
    /// Logical block size. Default 4096 (the engine's block).
    pub block_size: u32,
    /// Deadline for dialing and the handshake of one connection. Default 5 s.
    pub handshake_timeout: Duration,
    /// A specific device index, or any free one.
    pub index: Option<u32>,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            io_timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
            connections: 1,
            block_size: 4096,
            handshake_timeout: Duration::from_secs(5),
            index: None,
        }
    }
}

/// A failed attach, detach or reconnect.
#[derive(Debug, thiserror::Error)]
pub enum KernelNbdError {
    /// Could not reach the export.
    #[error("connect to {target}: {source}")]
    Connect {
        /// The export.
        target: String,
        /// Why.
        source: io::Error,
    },
    /// The NBD handshake failed.
    #[error("handshake with {target}: {source}")]
    Handshake {
        /// The export.
        target: String,
        /// Why.
        source: HandshakeError,
    },
    /// The kernel's netlink interface failed or refused.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// Bad options.
    #[error("invalid option: {0}")]
    Invalid(String),
    /// Reading sysfs or /dev failed.
    #[error("{what} {path}: {source}")]
    Sys {
        /// What was being read.
        what: &'static str,
        /// Which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A device did not reach the expected state in time.
    #[error("/dev/nbd{index}: {what} within {waited:?}")]
    Timeout {
        /// Device index.
        index: u32,
        /// What did not happen.
        what: &'static str,
        /// How long we waited.
        waited: Duration,
    },
    /// The device is attached to something else.
    #[error("/dev/nbd{index} is not attached to {backend:?}")]
    NotOurs {
        /// Device index.
        index: u32,
        /// The expected backend.
        backend: String,
    },
}

/// One attached device.
#[derive(Debug)]
pub struct Attachment {
    /// Device index N of /dev/nbdN.
    pub index: u32,
    /// Backend identifier the kernel knows it by.
    pub backend: String,
    /// Export size in bytes.
    pub size: u64,
    /// Whether this call found an attachment made earlier instead of making one.
    pub existing: bool,
    /// Our descriptors of the sockets handed to the kernel (watched by [`supervise`]).
    sockets: Vec<OwnedFd>,
}

impl Attachment {
    /// The block device path, `/dev/nbdN`.
    pub fn device(&self) -> PathBuf {
        device_path(self.index)
    }
}

/// `/dev/nbdN`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The backend identifier of an attachment to `target`.
pub fn backend_id(target: &NbdTarget) -> String {
    format!("ironhorn:{target}")
}

/// A connected nbd device, as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// N of /dev/nbdN.
    pub index: u32,
    /// Backend identifier (empty if the attacher gave none, e.g. nbd-client).
    pub backend: String,
    /// Size in bytes.
    pub size: u64,
}

/// Every connected nbd device.
pub fn list() -> Result<Vec<DeviceInfo>, KernelNbdError> {
    let sys = |source, path: &Path| KernelNbdError::Sys {
        what: "read",
        path: path.to_owned(),
        source,
    };
    let dir = Path::new(SYS_BLOCK);
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| sys(e, dir))? {
        let entry = entry.map_err(|e| sys(e, dir))?;
        let name = entry.file_name();
        let Some(index) = name
            .to_str()
            .and_then(|n| n.strip_prefix("nbd"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(info) = device_info(index) {
            out.push(info);
        }
    }
    out.sort_by_key(|d| d.index);
    Ok(out)
}

/// Sysfs state of /dev/nbd`index` if it is connected (its `pid` attribute exists only then).
fn device_info(index: u32) -> Option<DeviceInfo> {
    let base = PathBuf::from(format!("{SYS_BLOCK}/nbd{index}"));
    if !base.join("pid").exists() {
        return None;
    }
    let backend = fs::read_to_string(base.join("backend"))
        .map(|s| s.trim_end_matches('\n').to_owned())
        .unwrap_or_default();
    let sectors: u64 = fs::read_to_string(base.join("size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Some(DeviceInfo {
        index,
        backend,
        size: sectors * 512,
    })
}

/// The connected device attached to `backend`, if any.
pub fn find(backend: &str) -> Result<Option<u32>, KernelNbdError> {
    Ok(list()?
        .into_iter()
        .find(|d| d.backend == backend)
        .map(|d| d.index))
}

/// Whether /dev/nbd`index` is connected and attached to `backend`.
fn is_attached(index: u32, backend: &str) -> bool {
    device_info(index).is_some_and(|d| d.backend == backend)
}

/// Dials `target` and runs the handshake.
fn dial(target: &NbdTarget, timeout: Duration) -> Result<(OwnedFd, ExportInfo), KernelNbdError> {
    let mut conn = target
        .connect(timeout)
        .map_err(|source| KernelNbdError::Connect {
            target: target.to_string(),
            source,
        })?;
    let info =
        negotiate(&mut conn, &target.export).map_err(|source| KernelNbdError::Handshake {
            target: target.to_string(),
            source,
        })?;
    conn.clear_timeouts()
        .map_err(|source| KernelNbdError::Connect {
            target: target.to_string(),
            source,
        })?;
    Ok((conn.into_fd(), info))
}

/// Grows connected device `index` (backend identifier `backend`) to the size `target`'s
/// export has now (after the volume was expanded), while it stays attached and in use;
/// returns the device's size. The export's size is learnt from a fresh handshake on a
/// connection that is closed right after. A device already as large is left alone;
/// devices never shrink.
#[tracing::instrument(skip(backend), fields(target = %target))]
pub fn grow(index: u32, backend: &str, target: &NbdTarget) -> Result<u64, KernelNbdError> {
    if !is_attached(index, backend) {
        return Err(KernelNbdError::NotOurs {
            index,
            backend: backend.to_owned(),
        });
    }
    let (conn, info) = dial(target, Duration::from_secs(10))?;
    drop(conn);
    let dev = device_path(index);
    let current = device_size(&dev).map_err(|source| KernelNbdError::Sys {
        what: "size of",
        path: dev.clone(),
        source,
    })?;
    if info.size <= current {
        return Ok(current);
    }
    let mut nl = NbdNetlink::open()?;
    nl.resize(index, backend, info.size)?;
    let waited = Duration::from_secs(10);
    let deadline = Instant::now() + waited;
    loop {
        let now = device_size(&dev).unwrap_or(0);
        if now >= info.size {
            tracing::info!(from = current, to = now, "grew /dev/nbd{index}");
            return Ok(now);
        }
        if Instant::now() >= deadline {
            return Err(KernelNbdError::Timeout {
                index,
                what: "the new size did not show",
                waited,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Attaches `target` to a free /dev/nbdN under the backend identifier `backend`, or returns
/// the attachment with that identifier if one exists.
#[tracing::instrument(skip(opts), fields(target = %target))]
pub fn attach(
    target: &NbdTarget,
    backend: &str,
    opts: &AttachOptions,
) -> Result<Attachment, KernelNbdError> {
    if !(512..=4096).contains(&opts.block_size) || !opts.block_size.is_power_of_two() {
        return Err(KernelNbdError::Invalid(format!(
            "block size {} (must be 512, 1024, 2048 or 4096)",
            opts.block_size
        )));
    }
    if opts.connections == 0 || opts.connections > 16 {
        return Err(KernelNbdError::Invalid(format!(
            "{} connections (1 to 16)",
            opts.connections
        )));
    }
    if opts.io_timeout < Duration::from_secs(1) {
        return Err(KernelNbdError::Invalid("I/O timeout under 1 s".into()));
    }
    if backend.is_empty() || backend.contains('\n') || backend.len() > 1024 {
        return Err(KernelNbdError::Invalid(format!(
            "backend identifier {backend:?}"
        )));
    }
    let backend = backend.to_owned();
    if let Some(index) = find(&backend)? {
        tracing::info!(index, "already attached");
        let size = device_info(index).map(|d| d.size).unwrap_or(0);
        return Ok(Attachment {
            index,
            backend,
            size,
            existing: true,
            sockets: Vec::new(),
        });
    }
    let mut nl = NbdNetlink::open()?;
    let (first, info) = dial(target, opts.handshake_timeout)?;
    let mut sockets = vec![first];
    let conns = if info.flags & FLAG_CAN_MULTI_CONN != 0 {
        opts.connections
    } else {
        1
    };
    for _ in 1..conns {
        let (s, more) = dial(target, opts.handshake_timeout)?;
        if more.size != info.size {
            return Err(KernelNbdError::Invalid(format!(
                "export size changed between connections ({} then {})",
                info.size, more.size
            )));
        }
        sockets.push(s);
    }
    let fds: Vec<_> = sockets.iter().map(|s| s.as_raw_fd()).collect();
    let index = nl.connect(
        &ConnectRequest {
            index: opts.index,
            size: info.size,
            block_size: u64::from(opts.block_size),
            timeout_secs: opts.io_timeout.as_secs(),
            dead_conn_timeout_secs: opts.dead_conn_timeout.as_secs(),
            server_flags: u64::from(info.flags),
            backend: backend.clone(),
        },
        &fds,
    )?;
    let dev = device_path(index);
    wait_for(
        index,
        Duration::from_secs(10),
        "device node did not appear",
        || dev.exists(),
    )?;
    tracing::info!(
        index,
        size = info.size,
        flags = info.flags,
        connections = conns,
        "attached"
    );
    Ok(Attachment {
        index,
        backend,
        size: info.size,
        existing: false,
        sockets,
    })
}

/// Detaches /dev/nbd`index`, which must be attached to `backend` (if given), and waits up
/// to `timeout` for the kernel to let go of it. Unmount first: a mounted file system loses
/// its device.
#[tracing::instrument]
pub fn detach(index: u32, backend: Option<&str>, timeout: Duration) -> Result<(), KernelNbdError> {
    match (device_info(index), backend) {
        (None, _) => {
            tracing::info!(index, "not connected; nothing to detach");
            return Ok(());
        }
        (Some(d), Some(b)) if d.backend != b => {
            return Err(KernelNbdError::NotOurs {
                index,
                backend: b.to_owned(),
            });
        }
        _ => {}
    }
    let mut nl = NbdNetlink::open()?;
    nl.disconnect(index)?;
    wait_for(index, timeout, "still connected", || {
        device_info(index).is_none()
    })?;
    tracing::info!(index, "detached");
    Ok(())
}

fn wait_for(
    index: u32,
    timeout: Duration,
    what: &'static str,
    mut done: impl FnMut() -> bool,
) -> Result<(), KernelNbdError> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            return Err(KernelNbdError::Timeout {
                index,
                what,
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Why [`supervise`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuperviseEnd {
    /// `stop` was set; the device stays attached.
    Stopped,
    /// The device was detached (or attached to something else) meanwhile.
    Detached,
}

/// How often an attachment adopted from an earlier process (whose sockets we do not hold)
/// is probed with a reconnection attempt.
const ADOPTED_PROBE: Duration = Duration::from_secs(2);

/// Keeps `att` connected until `stop` is set or the device is detached: whenever one of its
/// sockets dies (engine killed or restarted, network cut, request timeout), dials the export
/// again and hands the new socket to the kernel. Blocking; run it on its own thread.
pub fn supervise(
    att: &mut Attachment,
    target: &NbdTarget,
    opts: &AttachOptions,
    stop: &AtomicBool,
) -> Result<SuperviseEnd, KernelNbdError> {
    let mut nl = NbdNetlink::open()?;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(SuperviseEnd::Stopped);
        }
        if !is_attached(att.index, &att.backend) {
            tracing::info!(index = att.index, "device detached; supervision ends");
            return Ok(SuperviseEnd::Detached);
        }
        if att.sockets.is_empty() {
            // Adopted: the kernel's sockets are not ours to watch. A reconnect attempt is
            // harmless while they live (the kernel answers ENOSPC: no dead socket).
            std::thread::sleep(ADOPTED_PROBE);
            if let Some(sock) = reconnect_once(&mut nl, att, target, opts, false)? {
                tracing::info!(index = att.index, "reconnected (adopted attachment)");
                att.sockets.push(sock);
            }
            continue;
        }
        let dead = wait_hangup(&att.sockets, 500).map_err(|source| KernelNbdError::Sys {
            what: "poll sockets of",
            path: att.device(),
            source,
        })?;
        let Some(i) = dead else { continue };
        tracing::warn!(
            index = att.index,
            socket = i,
            "connection to the export lost; reconnecting"
        );
        let started = Instant::now();
        let mut warned = false;
        let mut delay = Duration::from_millis(100);
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(SuperviseEnd::Stopped);
            }
            if !is_attached(att.index, &att.backend) {
                tracing::info!(index = att.index, "device detached; supervision ends");
                return Ok(SuperviseEnd::Detached);
            }
            if let Some(sock) = reconnect_once(&mut nl, att, target, opts, true)? {
                att.sockets[i] = sock;
                tracing::info!(index = att.index, after = ?started.elapsed(), "reconnected");
                break;
            }
            if !warned && started.elapsed() > opts.dead_conn_timeout {
                tracing::error!(
                    index = att.index,
                    "export unreachable past the dead-connection timeout: the device now fails I/O until it is back"
                );
                warned = true;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }
}

/// The `kernel-nbd` attach scheme: the kernel's nbd driver, one supervisor thread per
/// attached volume (see the module doc). Attachments are found again by their backend
/// identifier `ironhorn-csi:VOLUME URI`, so a restarted driver adopts them (at start, and
/// at the next stage of the volume).
#[derive(Debug)]
pub struct KernelNbd {
    opts: AttachOptions,
    supervisors: Mutex<HashMap<String, Supervisor>>,
}

/// A running [`supervise`] thread.
#[derive(Debug)]
struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Prefix of the backend identifiers of the CSI node's attachments.
const CSI_BACKEND_PREFIX: &str = "ironhorn-csi:";

impl KernelNbd {
    /// The scheme with `opts` for new attachments; adopts (supervises) the attachments a
    /// previous driver left.
    pub fn new(opts: AttachOptions) -> KernelNbd {
        let scheme = KernelNbd {
            opts,
            supervisors: Mutex::new(HashMap::new()),
        };
        match list() {
            Ok(devs) => {
                for d in devs {
                    let Some(rest) = d.backend.strip_prefix(CSI_BACKEND_PREFIX) else {
                        continue;
                    };
                    let Some((volume, uri)) = rest.split_once(' ') else {
                        continue;
                    };
                    if let Ok(target) = NbdTarget::parse(uri) {
                        let att = Attachment {
                            index: d.index,
                            backend: d.backend.clone(),
                            size: d.size,
                            existing: true,
                            sockets: Vec::new(),
                        };
                        tracing::info!(volume, device = %att.device().display(), "adopting attachment");
                        scheme.start_supervisor(volume, att, target);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "no nbd devices to adopt"),
        }
        scheme
    }

    fn backend(volume: &str, uri: &str) -> String {
        format!("{CSI_BACKEND_PREFIX}{} {uri}", volume_dir_name(volume))
    }

    fn start_supervisor(&self, key: &str, mut att: Attachment, target: NbdTarget) {
        let mut sups = self.supervisors.lock().unwrap_or_else(|e| e.into_inner());
        if sups.get(key).is_some_and(|s| !s.thread.is_finished()) {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let opts = self.opts.clone();
        let name = format!("nbd{}-supervisor", att.index);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            match supervise(&mut att, &target, &opts, &stop2) {
                Ok(end) => tracing::info!(device = %att.device().display(), ?end, "supervision ended"),
                Err(e) => tracing::error!(device = %att.device().display(), error = %e, "supervision failed"),
            }
        });
        match thread {
            Ok(thread) => {
                sups.insert(key.to_owned(), Supervisor { stop, thread });
            }
            Err(e) => tracing::error!(error = %e, "cannot start the nbd supervisor thread"),
        }
    }

    fn stop_supervisor(&self, key: &str) {
        let sup = self
            .supervisors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        if let Some(s) = sup {
            s.stop.store(true, Ordering::Relaxed);
            let _ = s.thread.join();
        }
    }

    fn find_device(volume: &str) -> Result<Option<(DeviceInfo, String)>, DeviceError> {
        let prefix = format!("{CSI_BACKEND_PREFIX}{} ", volume_dir_name(volume));
        let devs = list().map_err(|e| DeviceError::AttachFailed {
            volume: volume.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(devs.into_iter().find_map(|d| {
            let uri = d.backend.strip_prefix(&prefix)?.to_owned();
            Some((d, uri))
        }))
    }
}

impl AttachScheme for KernelNbd {
    fn name(&self) -> &'static str {
        "kernel-nbd"
    }

    fn attach(&self, volume: &str, uri: &str) -> Result<super::Attachment, DeviceError> {
        check_nbd_uri(uri)?;
        let target = NbdTarget::parse(uri).map_err(|e| DeviceError::BadExport {
            uri: uri.to_owned(),
            reason: e.to_string(),
        })?;
        if let Some((d, old)) = Self::find_device(volume)?
            && old != uri
        {
            return Err(DeviceError::AttachFailed {
                volume: volume.to_owned(),
                reason: format!("already attached to {old} on /dev/nbd{}", d.index),
            });
        }
        let att = attach(&target, &Self::backend(volume, uri), &self.opts).map_err(|e| {
            DeviceError::AttachFailed {
                volume: volume.to_owned(),
                reason: e.to_string(),
            }
        })?;
        let device = att.device();
        self.start_supervisor(volume_dir_name(volume).as_str(), att, target);
        Ok(super::Attachment {
            device,
            uri: Some(uri.to_owned()),
        })
    }

    fn find(&self, volume: &str) -> Result<Option<super::Attachment>, DeviceError> {
        Ok(
            Self::find_device(volume)?.map(|(d, uri)| super::Attachment {
                device: device_path(d.index),
                uri: Some(uri),
            }),
        )
    }

    fn detach(&self, volume: &str) -> Result<(), DeviceError> {
        let Some((d, uri)) = Self::find_device(volume)? else {
            self.stop_supervisor(&volume_dir_name(volume));
            return Ok(());
        };
        let dev = device_path(d.index);
        super::ensure_unmounted(volume, &dev)?;
        self.stop_supervisor(&volume_dir_name(volume));
        detach(
            d.index,
            Some(&Self::backend(volume, &uri)),
            Duration::from_secs(30),
        )
        .map_err(|e| DeviceError::AttachFailed {
            volume: volume.to_owned(),
            reason: format!("detach: {e}"),
        })
    }

    fn refresh_size(
        &self,
        volume: &str,
        attachment: &super::Attachment,
    ) -> Result<u64, DeviceError> {
        // Online growth: the export's new size goes to the kernel through netlink.
        let Some((d, uri)) = Self::find_device(volume)? else {
            return Err(DeviceError::AttachFailed {
                volume: volume.to_owned(),
                reason: format!("{} is no longer attached", attachment.device.display()),
            });
        };
        let target = NbdTarget::parse(&uri).map_err(|e| DeviceError::BadExport {
            uri: uri.clone(),
            reason: e.to_string(),
        })?;
        grow(d.index, &d.backend, &target).map_err(|e| DeviceError::AttachFailed {
            volume: volume.to_owned(),
            reason: format!("grow /dev/nbd{}: {e}", d.index),
        })
    }

    fn grows_online(&self, _attachment: &super::Attachment) -> bool {
        true
    }
}

/// Waits up to `timeout_ms` for one of `sockets` to be hung up (peer closed, reset, or shut
/// down by the kernel) and returns its position. Incoming data does not wake it: only
/// `POLLRDHUP` is asked for (`POLLHUP`/`POLLERR` always count), and nothing is read.
fn wait_hangup(sockets: &[OwnedFd], timeout_ms: u16) -> io::Result<Option<usize>> {
    let mut fds: Vec<PollFd<'_>> = sockets
        .iter()
        .map(|s| PollFd::new(s.as_fd(), POLLRDHUP))
        .collect();
    match poll(&mut fds, PollTimeout::from(timeout_ms)) {
        Ok(0) | Err(Errno::EINTR) => Ok(None),
        // Any event is a hang-up (nix's `revents()` is `None` for POLLRDHUP, a bit it does
        // not name).
        Ok(_) => Ok(fds
            .iter()
            .position(|f| f.revents() != Some(PollFlags::empty()))),
        Err(errno) => Err(io::Error::from(errno)),
    }
}

/// One reconnection attempt: dial, handshake, `NBD_CMD_RECONFIGURE`. `None` if the export
/// is not reachable yet or the kernel has no dead socket to replace (yet).
fn reconnect_once(
    nl: &mut NbdNetlink,
    att: &Attachment,
    target: &NbdTarget,
    opts: &AttachOptions,
    log_failures: bool,
) -> Result<Option<OwnedFd>, KernelNbdError> {
    let (sock, info) = match dial(target, opts.handshake_timeout) {
        Ok(x) => x,
        Err(e) => {
            if log_failures {
                tracing::debug!(error = %e, "export not reachable yet");
            }
            return Ok(None);
        }
    };
    if info.size != att.size && att.size != 0 {
        tracing::warn!(
            old = att.size,
            new = info.size,
            "export size changed; the device keeps its size until re-attached"
        );
    }
    match nl.reconfigure(att.index, &att.backend, sock.as_raw_fd()) {
        Ok(()) => Ok(Some(sock)),
        Err(NetlinkError::Refused {
            errno: Errno::ENOSPC,
            ..
        }) => {
            if log_failures {
                tracing::debug!("kernel has not marked the socket dead yet");
            }
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "reconfigure failed");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn hangup_is_seen_and_data_is_not() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut peer, _) = l.accept().expect("accept");
        let socks = vec![OwnedFd::from(c)];
        assert_eq!(wait_hangup(&socks, 50).expect("poll"), None);
        peer.write_all(b"reply bytes").expect("write");
        assert_eq!(
            wait_hangup(&socks, 50).expect("poll"),
            None,
            "data is not a hang-up"
        );
        drop(peer);
        assert_eq!(wait_hangup(&socks, 1000).expect("poll"), Some(0));
    }

    #[test]
    fn bad_options_are_refused_before_anything_is_touched() {
        let t = NbdTarget::parse("nbd://127.0.0.1:1/v").expect("uri");
        for opts in [
            AttachOptions {
                block_size: 1000,
                ..AttachOptions::default()
            },
            AttachOptions {
                connections: 0,
                ..AttachOptions::default()
            },
            AttachOptions {
                io_timeout: Duration::from_millis(10),
                ..AttachOptions::default()
            },
        ] {
            assert!(matches!(
                attach(&t, "ironhorn:test", &opts),
                Err(KernelNbdError::Invalid(_))
            ));
        }
    }
}
