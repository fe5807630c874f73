//! ublk frontend: serves a [`BlockDevice`] as `/dev/ublkbN` through the kernel's ublk driver
//! (io_uring passthrough commands, via the `libublk` crate).
//!
//! Threads: libublk's control thread (`ublk-ctrl`, adds/starts the device and waits) and one
//! thread per queue. A queue thread runs a smol executor with one task per tag; each request
//! is copied out of (or into) the tag's buffer and handed to the engine's tokio runtime as
//! its own task, so a queue has up to `depth` requests in flight in the engine. When a
//! request completes, the tag's task pushes `COMMIT_AND_FETCH` and submits it at once: the
//! event loop sleeps on the ring's fd in smol's reactor and would not submit it otherwise.
//!
//! Same invariants as the NBD frontend: flush → [`BlockDevice::flush`], FUA writes →
//! `write(.., fua = true)` (the device advertises a volatile cache and FUA), discard →
//! [`BlockDevice::trim`], write-zeroes → [`BlockDevice::write_zeroes`]; the kernel checks
//! ranges against the size set here.
//!
//! Recovery: devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`,
//! so when the engine dies the kernel keeps `/dev/ublkbN` and queues I/O (in-flight requests
//! are re-issued); an engine started with the same `--ublk-id` finds the device quiesced
//! and takes it over (`START_USER_RECOVERY` … `END_USER_RECOVERY`). A clean stop deletes the
//! device.

// libublk hands out the io_uring fd as a raw descriptor and the request descriptors as raw
// memory shared with the kernel; wrapping the fd for smol's reactor needs `unsafe`. Nothing
// else in this module is unsafe.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::uring_async::{ublk_reap_io_events_with_update_queue, ublk_wake_task};
use libublk::{BufDesc, UblkError, UblkFlags, sys};

use crate::device::{BlockDevice, DeviceError};

/// Default number of queues.
pub const DEFAULT_QUEUES: u16 = 1;
/// Default queue depth.
pub const DEFAULT_DEPTH: u16 = 64;
/// Largest request, in bytes (the kernel splits bigger ones).
pub const IO_BUF_BYTES: u32 = 512 << 10;
/// How long the control thread gets to add and start the device.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How to expose the device.
#[derive(Debug, Clone)]
pub struct UblkConfig {
    /// Device id N (`/dev/ublkbN`); `None` lets the kernel pick. With an id whose device is
    /// quiesced (its server died), the device is recovered instead of added.
    pub id: Option<u32>,
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
}

impl Default for UblkConfig {
    fn default() -> Self {
        UblkConfig {
            id: None,
            queues: DEFAULT_QUEUES,
            depth: DEFAULT_DEPTH,
        }
    }
}

/// A failure to start or stop the ublk frontend.
#[derive(Debug, thiserror::Error)]
pub enum UblkFrontendError {
    /// Bad configuration.
    #[error("ublk: invalid {0}")]
    Invalid(String),
    /// libublk or the kernel refused.
    #[error("ublk device {id:?}: {what}: {source}")]
    Ublk {
        /// Device id, if known.
        id: Option<u32>,
        /// What was being done.
        what: &'static str,
        /// libublk's error.
        source: UblkError,
    },
    /// The device is served by another live process.
    #[error("ublk device {0} is live (served by another process)")]
    Busy(u32),
    /// The control thread died or did not report in time.
    #[error("ublk: {0}")]
    Start(String),
}

/// A running ublk frontend.
#[derive(Debug)]
pub struct UblkServer {
    id: u32,
    recovered: bool,
    thread: Option<JoinHandle<()>>,
}

impl UblkServer {
    /// Device id N.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// `/dev/ublkbN`.
    pub fn block_device(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }

    /// Whether the device was taken over from a dead server rather than created.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Stops serving and deletes the device (blocking; in-flight requests finish or fail).
    pub fn stop(mut self) -> Result<(), UblkFrontendError> {
        let ctrl =
            UblkCtrl::new_simple(self.id as i32).map_err(|source| UblkFrontendError::Ublk {
                id: Some(self.id),
                what: "open control",
                source,
            })?;
        if let Err(source) = ctrl.kill_dev() {
            tracing::warn!(id = self.id, error = %source, "ublk stop");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The control thread's UblkCtrl deletes an added device when dropped; a recovered
        // one is deleted here.
        match ctrl.del_dev() {
            Ok(_) | Err(UblkError::UringIOError(_)) => {}
            Err(e) => tracing::debug!(id = self.id, error = %e, "ublk delete"),
        }
        tracing::info!(id = self.id, "ublk device removed");
        Ok(())
    }
}

/// Whether the kernel has the ublk driver loaded (`/dev/ublk-control`).
pub fn available() -> bool {
    std::path::Path::new("/dev/ublk-control").exists()
}

/// A ublk device the kernel has, as `ironhorn ublk ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Device id N (`/dev/ublkbN`, `/dev/ublkcN`).
    pub id: u32,
    /// `live`, `quiesced` (its server died; I/O waits for recovery), `fail-io` or `dead`.
    pub state: &'static str,
    /// Pid of the process serving it (the last one, for a quiesced device).
    pub pid: i32,
    /// Hardware queues.
    pub queues: u16,
    /// Queue depth.
    pub depth: u16,
}

fn state_name(state: u32) -> &'static str {
    match state {
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        sys::UBLK_S_DEV_FAIL_IO => "fail-io",
        _ => "dead",
    }
}

/// Ids of the ublk devices the kernel has (the `/dev/ublkcN` control nodes), ascending.
pub fn device_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/dev")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

/// The ublk devices the kernel has, with their state; devices that vanish while listed
/// are left out.
pub fn list() -> Vec<DeviceInfo> {
    device_ids()
        .into_iter()
        .filter_map(|id| {
            let ctrl = UblkCtrl::new_simple(id as i32).ok()?;
            let info = ctrl.dev_info();
            Some(DeviceInfo {
                id,
                state: state_name(info.state as u32),
                pid: info.ublksrv_pid,
                queues: info.nr_hw_queues,
                depth: info.queue_depth,
            })
        })
        .collect()
}

/// Deletes ublk device `id`, failing queued and new I/O. A live device whose server
/// still runs is refused unless `force` (stop that server instead: it removes its
/// device). For devices left behind by a server that died and will not come back.
pub fn remove(id: u32, force: bool) -> Result<(), UblkFrontendError> {
    if id > i32::MAX as u32 {
        return Err(UblkFrontendError::Invalid(format!("device id {id}")));
    }
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|source| UblkFrontendError::Ublk {
        id: Some(id),
        what: "open control",
        source,
    })?;
    let info = ctrl.dev_info();
    let server_alive = info.ublksrv_pid > 0
        && std::path::Path::new(&format!("/proc/{}", info.ublksrv_pid)).exists();
    if info.state as u32 == sys::UBLK_S_DEV_LIVE && server_alive && !force {
        return Err(UblkFrontendError::Busy(id));
    }
    // Stop first (a quiesced device's waiting I/O fails), then delete.
    if let Err(e) = ctrl.kill_dev() {
        tracing::debug!(id, error = %e, "ublk stop before delete");
    }
    ctrl.del_dev().map_err(|source| UblkFrontendError::Ublk {
        id: Some(id),
        what: "delete",
        source,
    })?;
    tracing::info!(id, "ublk device deleted");
    Ok(())
}

/// Starts serving `dev` as a ublk device; returns once `/dev/ublkbN` is live. Requests run
/// on `rt` (the engine's runtime).
pub fn start<D: BlockDevice>(
    dev: Arc<D>,
    cfg: &UblkConfig,
    rt: tokio::runtime::Handle,
) -> Result<UblkServer, UblkFrontendError> {
    if cfg.queues == 0 || cfg.queues > 32 {
        return Err(UblkFrontendError::Invalid(format!(
            "queue count {} (1 to 32)",
            cfg.queues
        )));
    }
    if !(1..=4096).contains(&cfg.depth) {
        return Err(UblkFrontendError::Invalid(format!(
            "queue depth {} (1 to 4096)",
            cfg.depth
        )));
    }
    let size = dev.size();
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(UblkFrontendError::Invalid(format!("device size {size}")));
    }
    let mut recover = false;
    if let Some(id) = cfg.id
        && let Ok(old) = UblkCtrl::new_simple(id as i32)
    {
        let state = old.dev_info().state as u32;
        match state {
            sys::UBLK_S_DEV_QUIESCED | sys::UBLK_S_DEV_FAIL_IO => {
                old.start_user_recover()
                    .map_err(|source| UblkFrontendError::Ublk {
                        id: Some(id),
                        what: "start user recovery",
                        source,
                    })?;
                recover = true;
            }
            sys::UBLK_S_DEV_LIVE => return Err(UblkFrontendError::Busy(id)),
            _ => {
                // Dead (stopped, not deleted): remove it and add afresh.
                let _ = old.del_dev();
            }
        }
    }
    let dev_flags = if recover {
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let ctrl_flags = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    let id = cfg.id.map(|i| i as i32).unwrap_or(-1);
    let (queues, depth) = (cfg.queues, cfg.depth);
    let (tx, rx) = mpsc::channel::<Result<u32, UblkFrontendError>>();
    let thread = std::thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || {
            let ctrl = match UblkCtrlBuilder::default()
                .name("ironhorn")
                .id(id)
                .nr_queues(queues)
                .depth(depth)
                .io_buf_bytes(IO_BUF_BYTES)
                .ctrl_flags(ctrl_flags)
                .dev_flags(dev_flags)
                .build()
            {
                Ok(c) => c,
                Err(source) => {
                    let _ = tx.send(Err(UblkFrontendError::Ublk {
                        id: (id >= 0).then_some(id as u32),
                        what: if recover { "recover" } else { "add" },
                        source,
                    }));
                    return;
                }
            };
            let tgt_init = move |d: &mut UblkDev| {
                set_params(d, size);
                Ok(())
            };
            let q_fn = move |qid: u16, d: &UblkDev| serve_queue(qid, d, dev.clone(), rt.clone());
            let started = tx.clone();
            let on_start = move |c: &UblkCtrl| {
                let _ = started.send(Ok(c.dev_info().dev_id));
            };
            if let Err(source) = ctrl.run_target(tgt_init, q_fn, on_start) {
                let _ = tx.send(Err(UblkFrontendError::Ublk {
                    id: (id >= 0).then_some(id as u32),
                    what: "start",
                    source,
                }));
            }
            tracing::debug!("ublk control thread ends");
        })
        .map_err(|e| UblkFrontendError::Start(format!("spawn control thread: {e}")))?;
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(id)) => {
            tracing::info!(
                id,
                recovered = recover,
                queues,
                depth,
                "ublk device /dev/ublkb{id} live"
            );
            Ok(UblkServer {
                id,
                recovered: recover,
                thread: Some(thread),
            })
        }
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(UblkFrontendError::Start(format!(
            "device not started within {START_TIMEOUT:?}"
        ))),
    }
}

/// Size, a volatile write cache with FUA (so flushes and FUA reach the engine), 4 KiB
/// physical blocks, discard and write-zeroes.
fn set_params(d: &mut UblkDev, size: u64) {
    d.set_default_params(size);
    let p = &mut d.tgt.params;
    p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
    p.basic.attrs |= sys::UBLK_ATTR_FUA;
    p.discard = sys::ublk_param_discard {
        discard_alignment: 0,
        discard_granularity: 4096,
        max_discard_sectors: u32::MAX >> 9,
        max_write_zeroes_sectors: u32::MAX >> 9,
        max_discard_segments: 1,
        reserved0: 0,
    };
}

/// One queue thread: a task per tag and the ring's event loop.
fn serve_queue<D: BlockDevice>(qid: u16, udev: &UblkDev, dev: Arc<D>, rt: tokio::runtime::Handle) {
    let q = match UblkQueue::new(qid, udev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!(qid, error = %e, "ublk queue setup failed");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in 0..udev.dev_info.queue_depth {
        let q = q.clone();
        let dev = dev.clone();
        let rt = rt.clone();
        tasks.push(exe.spawn(async move {
            match serve_tag(&q, tag, dev, rt).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!(qid, tag, error = %e, "ublk tag task failed"),
            }
        }));
    }
    let exe2 = exe.clone();
    let q2 = q.clone();
    smol::block_on(exe.run(async move {
        if let Err(e) = event_loop(&exe2, &q2, tasks).await {
            tracing::error!(qid, error = %e, "ublk queue event loop failed");
        }
    }));
    tracing::debug!(qid, "ublk queue thread ends");
}

/// Waits on the ring's fd in smol's reactor (so wake-ups from the engine's runtime thread
/// interrupt it), reaps completions and wakes the tag tasks, until every tag task ended.
async fn event_loop<T>(
    exe: &smol::LocalExecutor<'_>,
    q: &UblkQueue<'_>,
    tasks: Vec<smol::Task<T>>,
) -> Result<(), UblkError> {
    let ring_fd = libublk::io::with_task_io_ring(|r| r.as_raw_fd());
    // SAFETY: the ring outlives this function (it belongs to the queue thread), and the
    // descriptor is released with `into_raw_fd` below instead of being closed.
    let file = unsafe { File::from_raw_fd(ring_fd) };
    let ring = smol::Async::new(file).map_err(UblkError::IOError)?;
    let poll = || async {
        libublk::io::with_task_io_ring_mut(|r| r.submit_and_wait(0)).map_err(UblkError::IOError)?;
        ring.readable().await.map_err(UblkError::IOError)?;
        Ok(false)
    };
    let reap = |timed_out| {
        ublk_reap_io_events_with_update_queue(q, timed_out, None, |cqe| {
            ublk_wake_task(cqe.user_data(), cqe)
        })
    };
    let run = || while exe.try_tick() {};
    let done = || tasks.iter().all(|t| t.is_finished());
    let r = libublk::run_uring_tasks(poll, reap, run, done).await;
    if let Ok(f) = ring.into_inner() {
        let _ = f.into_raw_fd();
    }
    r
}

/// Serves one tag: fetch a request, run it on the engine, commit the result, repeat.
async fn serve_tag<D: BlockDevice>(
    q: &UblkQueue<'_>,
    tag: u16,
    dev: Arc<D>,
    rt: tokio::runtime::Handle,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let fua = iod.op_flags & sys::UBLK_IO_F_FUA != 0;
        let offset = iod.start_sector << 9;
        let len = iod.nr_sectors << 9;
        let res = run_request(&dev, &rt, op, fua, offset, len, buf.as_mut_slice()).await;
        let commit = q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res);
        let mut commit = std::pin::pin!(commit);
        // First poll pushes the SQE; submit it now (see the module doc), then wait for the
        // tag's next request.
        if let std::task::Poll::Ready(r) = futures::poll!(commit.as_mut()) {
            r?;
            continue;
        }
        libublk::io::with_task_io_ring_mut(|r| r.submit_and_wait(0)).map_err(UblkError::IOError)?;
        commit.await?;
    }
}

/// Runs one request on the engine's runtime; returns the ublk result (bytes or -errno).
async fn run_request<D: BlockDevice>(
    dev: &Arc<D>,
    rt: &tokio::runtime::Handle,
    op: u32,
    fua: bool,
    offset: u64,
    len: u32,
    buf: &mut [u8],
) -> i32 {
    let n = len as usize;
    // Only reads and writes carry data; discard and write-zeroes may be longer than the
    // buffer.
    if matches!(op, sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE) && n > buf.len() {
        return -libc::EINVAL;
    }
    let dev = dev.clone();
    let outcome: Result<Option<Bytes>, DeviceError> = match op {
        sys::UBLK_IO_OP_READ => {
            join(rt.spawn(async move { dev.read(offset, len).await.map(Some) })).await
        }
        sys::UBLK_IO_OP_WRITE => {
            let data = Bytes::copy_from_slice(&buf[..n]);
            join(rt.spawn(async move { dev.write(offset, data, fua).await.map(|()| None) })).await
        }
        sys::UBLK_IO_OP_FLUSH => {
            join(rt.spawn(async move { dev.flush().await.map(|()| None) })).await
        }
        sys::UBLK_IO_OP_DISCARD => {
            join(
                rt.spawn(async move { dev.trim(offset, u64::from(len), fua).await.map(|()| None) }),
            )
            .await
        }
        sys::UBLK_IO_OP_WRITE_ZEROES => {
            join(rt.spawn(async move {
                dev.write_zeroes(offset, u64::from(len), fua)
                    .await
                    .map(|()| None)
            }))
            .await
        }
        _ => Err(DeviceError::EOPNOTSUPP),
    };
    match outcome {
        Ok(Some(data)) => {
            if data.len() != n {
                tracing::error!(offset, len, got = data.len(), "short read from the volume");
                return -libc::EIO;
            }
            buf[..n].copy_from_slice(&data);
            len as i32
        }
        Ok(None) => len as i32,
        Err(e) => -e.0,
    }
}

/// Awaits a request task on the engine's runtime; a panicked or cancelled task is EIO.
async fn join<T>(h: tokio::task::JoinHandle<Result<T, DeviceError>>) -> Result<T, DeviceError> {
    h.await.unwrap_or(Err(DeviceError::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceResult;

    /// A device that must never be called: bad configurations are refused first.
    struct Untouched(u64);

    impl BlockDevice for Untouched {
        fn size(&self) -> u64 {
            self.0
        }
        async fn read(&self, _: u64, _: u32) -> DeviceResult<Bytes> {
            panic!("read on a refused configuration")
        }
        async fn write(&self, _: u64, _: Bytes, _: bool) -> DeviceResult<()> {
            panic!("write on a refused configuration")
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> DeviceResult<()> {
            panic!("write_zeroes on a refused configuration")
        }
        async fn trim(&self, _: u64, _: u64, _: bool) -> DeviceResult<()> {
            panic!("trim on a refused configuration")
        }
        async fn flush(&self) -> DeviceResult<()> {
            panic!("flush on a refused configuration")
        }
    }

    #[test]
    fn bad_configurations_are_refused_before_the_kernel_is_asked() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let cases = [
            (
                1 << 30,
                UblkConfig {
                    queues: 0,
                    ..UblkConfig::default()
                },
            ),
            (
                1 << 30,
                UblkConfig {
                    queues: 33,
                    ..UblkConfig::default()
                },
            ),
            (
                1 << 30,
                UblkConfig {
                    depth: 0,
                    ..UblkConfig::default()
                },
            ),
            (
                1 << 30,
                UblkConfig {
                    depth: 5000,
                    ..UblkConfig::default()
                },
            ),
            (0, UblkConfig::default()),
            ((1 << 30) + 512, UblkConfig::default()),
        ];
        for (size, cfg) in cases {
            let r = start(Arc::new(Untouched(size)), &cfg, rt.handle().clone());
            assert!(
                matches!(r, Err(UblkFrontendError::Invalid(_))),
                "size {size}, {cfg:?}: {r:?}"
            );
        }
    }
}
