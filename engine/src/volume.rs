//! The replicator: one volume mirrored to several replicas (DESIGN.md §3, invariants 1–6).
//!
//! Membership (which replica is RW, WO or ERR) sits behind an async `RwLock`. Every I/O
//! request holds it shared from dispatch to acknowledgment; anything that changes membership
//! or must see a quiet write stream (dropping a replica, a snapshot, a promotion) holds it
//! exclusive. So:
//! - a write is acknowledged only after every RW/WO replica acknowledged it, or after the
//!   ones that failed were marked ERR *and* the survivors' epoch was raised (fencing);
//! - a snapshot happens between whole requests, at the same point on every replica.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use ironhorn_proto::frame::Checksummed;
use ironhorn_proto::replica::replica_control_client::ReplicaControlClient;
use ironhorn_proto::replica::replica_sync_client::ReplicaSyncClient;
use ironhorn_proto::replica::{
    self as rpb, BeginRebuildRequest, CreateSnapshotRequest, ExpandRequest, FinishRebuildRequest,
    InfoRequest, LayerChecksumsRequest, ListLayersRequest, PurgeRequest, RemoveSnapshotRequest,
    RevertRequest, SetEpochRequest, SyncRequest,
};
use tokio::sync::RwLock;
use tonic::transport::{Channel, Endpoint};
use tracing::{Instrument, error, info, info_span, warn};

use crate::device::{BlockDevice, DeviceError, DeviceResult, Extent};
use crate::error::EngineError;
use crate::inflight::InFlight;
use crate::replica_client::{ReplicaDataClient, ReplicaIoError};
use crate::stats::{IoCounters, IoKind, IoStats};

/// Default time a replica has to answer one request before it is dropped.
pub const DEFAULT_REPLICA_TIMEOUT: Duration = Duration::from_secs(4);
/// Default data connections per replica.
pub const DEFAULT_CONNS_PER_REPLICA: usize = 2;
/// Largest range one write-zeroes or discard request to a replica covers; longer ones are
/// sent in pieces. Zeroing 8 MiB over older data takes tens of ms even on a slow disk, far
/// below any sensible replica timeout.
pub const MAX_ZERO_PIECE: u64 = 8 << 20;
/// How often a running rebuild checks that its source and target are still in the volume.
const REBUILD_WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Label put on snapshots the engine takes for its own use (rebuild).
pub const SYSTEM_LABEL: &str = "ironhorn.io/system";

/// Mode of a replica in the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Mode {
    /// In sync: takes writes and serves reads.
    RW,
    /// Being rebuilt: takes writes, serves no reads.
    WO,
    /// Dropped: gets nothing until it is rebuilt.
    ERR,
}

impl Mode {
    fn from_u8(v: u8) -> Mode {
        match v {
            0 => Mode::RW,
            1 => Mode::WO,
            _ => Mode::ERR,
        }
    }
    fn as_u8(self) -> u8 {
        match self {
            Mode::RW => 0,
            Mode::WO => 1,
            Mode::ERR => 2,
        }
    }
}

/// One replica of the volume: its control client, data client and mode.
pub struct Replica {
    /// Control (gRPC) address, which names the replica.
    pub address: String,
    control: Option<ReplicaControlClient<Channel>>,
    sync: Option<ReplicaSyncClient<Channel>>,
    data: Mutex<Option<Arc<ReplicaDataClient>>>,
    mode: AtomicU8,
    message: Mutex<String>,
    epoch: AtomicU64,
    rebuild_done: AtomicU64,
    rebuild_total: AtomicU64,
}

/// A replica's state as shown by `info`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaStatus {
    /// Control address.
    pub address: String,
    /// Mode.
    pub mode: Mode,
    /// Why it is ERR, or what the rebuild is doing.
    pub message: String,
    /// Rebuild progress: bytes done.
    pub rebuild_done_bytes: u64,
    /// Rebuild progress: bytes to do.
    pub rebuild_total_bytes: u64,
    /// Epoch the replica was last known to hold.
    pub epoch: u64,
}

impl Replica {
    fn mode(&self) -> Mode {
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    fn set_mode(&self, mode: Mode, message: impl Into<String>) {
        self.mode.store(mode.as_u8(), Ordering::Release);
        *self.message.lock().unwrap_or_else(|p| p.into_inner()) = message.into();
        if mode == Mode::ERR {
            // Closing the data connections fails whatever is still queued on them.
            self.data.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    fn data(&self) -> Option<Arc<ReplicaDataClient>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn control(&self) -> Result<ReplicaControlClient<Channel>, EngineError> {
        self.control
            .clone()
            .ok_or_else(|| EngineError::ReplicaUnavailable(self.address.clone()))
    }

    fn sync_client(&self) -> Result<ReplicaSyncClient<Channel>, EngineError> {
        self.sync
            .clone()
            .ok_or_else(|| EngineError::ReplicaUnavailable(self.address.clone()))
    }

    /// Status for `info`.
    pub fn status(&self) -> ReplicaStatus {
        ReplicaStatus {
            address: self.address.clone(),
            mode: self.mode(),
            message: self
                .message
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            rebuild_done_bytes: self.rebuild_done.load(Ordering::Relaxed),
            rebuild_total_bytes: self.rebuild_total.load(Ordering::Relaxed),
            epoch: self.epoch.load(Ordering::Relaxed),
        }
    }

    fn err_replica(address: &str, message: String) -> Arc<Replica> {
        Arc::new(Replica {
            address: address.to_owned(),
            control: None,
            sync: None,
            data: Mutex::new(None),
            mode: AtomicU8::new(Mode::ERR.as_u8()),
            message: Mutex::new(message),
            epoch: AtomicU64::new(0),
            rebuild_done: AtomicU64::new(0),
            rebuild_total: AtomicU64::new(0),
        })
    }
}

/// Settings of a volume's engine.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Volume name (the NBD export name).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Control addresses of the replicas.
    pub replicas: Vec<String>,
    /// Time a replica has to answer one request.
    pub timeout: Duration,
    /// Data connections per replica.
    pub conns_per_replica: usize,
}

/// Snapshot as listed by the engine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotInfo {
    /// Name (`volume-head` for the head).
    pub name: String,
    /// Parent snapshot.
    pub parent: String,
    /// Children.
    pub children: Vec<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: i64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Bytes of data in this layer (on the replica asked).
    pub size_bytes: u64,
    /// Marked removed.
    pub removed: bool,
    /// The writable head.
    pub is_head: bool,
}

/// The replicated volume.
pub struct Volume {
    name: String,
    size: AtomicU64,
    members: RwLock<Vec<Arc<Replica>>>,
    epoch: AtomicU64,
    timeout: Duration,
    conns: usize,
    read_rr: AtomicUsize,
    rebuilding: Arc<tokio::sync::Mutex<()>>,
    inflight: InFlight,
    io: IoStats,
}

async fn connect_control(
    address: &str,
    timeout: Duration,
) -> Result<(ReplicaControlClient<Channel>, ReplicaSyncClient<Channel>), EngineError> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| EngineError::BadAddress(address.to_owned(), e.to_string()))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| EngineError::Connect(address.to_owned(), e.to_string()))?;
    Ok((
        ReplicaControlClient::new(channel.clone()),
        ReplicaSyncClient::new(channel),
    ))
}

fn status_err(address: &str, what: &'static str, s: tonic::Status) -> EngineError {
    EngineError::Replica {
        address: address.to_owned(),
        op: what,
        code: s.code(),
        message: s.message().to_owned(),
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Connected replica with what its Info said.
struct Probe {
    replica: Arc<Replica>,
    info: rpb::ReplicaInfo,
}

impl Volume {
    async fn probe(&self, address: &str) -> Result<Probe, EngineError> {
        let (mut control, sync) = connect_control(address, self.timeout).await?;
        let info = tokio::time::timeout(self.timeout, control.info(InfoRequest {}))
            .await
            .map_err(|_| EngineError::Timeout(address.to_owned(), "info"))?
            .map_err(|s| status_err(address, "info", s))?
            .into_inner();
        let replica = Arc::new(Replica {
            address: address.to_owned(),
            control: Some(control),
            sync: Some(sync),
            data: Mutex::new(None),
            mode: AtomicU8::new(Mode::ERR.as_u8()),
            message: Mutex::new(String::new()),
            epoch: AtomicU64::new(info.epoch),
            rebuild_done: AtomicU64::new(0),
            rebuild_total: AtomicU64::new(0),
        });
        Ok(Probe { replica, info })
    }

    async fn connect_data(&self, r: &Replica, data_address: &str) -> Result<(), EngineError> {
        let addr: SocketAddr = data_address
            .parse()
            .map_err(|e| EngineError::BadAddress(data_address.to_owned(), format!("{e}")))?;
        let client = ReplicaDataClient::connect(addr, self.conns, self.timeout)
            .await
            .map_err(|e| EngineError::Connect(data_address.to_owned(), e.to_string()))?;
        *r.data.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(client));
        Ok(())
    }

    /// Opens the volume: probes every replica, trusts the ones with the highest epoch,
    /// raises their epoch (recording the membership), reconciles them, and connects.
    pub async fn open(config: VolumeConfig) -> Result<Arc<Volume>, EngineError> {
        let vol = Volume {
            name: config.name.clone(),
            size: AtomicU64::new(config.size),
            members: RwLock::new(Vec::new()),
            epoch: AtomicU64::new(0),
            timeout: config.timeout,
            conns: config.conns_per_replica,
            read_rr: AtomicUsize::new(0),
            rebuilding: Arc::new(tokio::sync::Mutex::new(())),
            inflight: InFlight::default(),
            io: IoStats::default(),
        };
        let probes = join_all(config.replicas.iter().map(|a| vol.probe(a))).await;
        let mut members = Vec::new();
        let mut candidates = Vec::new();
        for (address, p) in config.replicas.iter().zip(probes) {
            match p {
                Err(e) => {
                    warn!(replica = %address, error = %e, "replica unreachable at start");
                    members.push(Replica::err_replica(address, format!("unreachable: {e}")));
                }
                Ok(p) if p.info.size != config.size => {
                    let msg = format!(
                        "size {} differs from the volume size {}",
                        p.info.size, config.size
                    );
                    p.replica.set_mode(Mode::ERR, msg);
                    members.push(p.replica);
                }
                Ok(p) if p.info.rebuilding => {
                    p.replica
                        .set_mode(Mode::ERR, "was being rebuilt when the engine stopped");
                    members.push(p.replica);
                }
                Ok(p) => {
                    members.push(p.replica.clone());
                    candidates.push(p);
                }
            }
        }
        let max_epoch = candidates.iter().map(|p| p.info.epoch).max();
        let Some(max_epoch) = max_epoch else {
            return Err(EngineError::NoHealthyReplica(
                members
                    .iter()
                    .map(|r| format!("{}: {}", r.address, r.status().message))
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        };
        let mut trusted = Vec::new();
        for p in candidates {
            if p.info.epoch == max_epoch {
                trusted.push(p);
            } else {
                p.replica.set_mode(
                    Mode::ERR,
                    format!(
                        "stale: epoch {} < {}; it missed writes and needs a rebuild",
                        p.info.epoch, max_epoch
                    ),
                );
            }
        }
        // Record the membership before serving: raise the epoch on the trusted replicas.
        let epoch = max_epoch + 1;
        vol.epoch.store(epoch, Ordering::Release);
        let mut ready = Vec::new();
        // A trusted replica that fails from here on holds the new epoch all the same.
        let mut trusted_dropped = false;
        for p in trusted {
            let r = p.replica.clone();
            let res = async {
                vol.set_epoch(&r, epoch).await?;
                vol.connect_data(&r, &p.info.data_address).await
            }
            .await;
            match res {
                Ok(()) => ready.push(p),
                Err(e) => {
                    r.set_mode(Mode::ERR, format!("at start: {e}"));
                    trusted_dropped = true;
                }
            }
        }
        if ready.is_empty() {
            return Err(EngineError::NoHealthyReplica(
                "no trusted replica could be fenced and connected".into(),
            ));
        }
        // Reconcile: replicas may differ in writes that were in flight (never acknowledged)
        // when the last engine stopped. Make every trusted replica equal to the first.
        let primary = ready[0].replica.clone();
        primary.set_mode(Mode::RW, "");
        for p in &ready[1..] {
            match vol.sync_replica(&p.replica, &primary, true).await {
                Ok(()) => p.replica.set_mode(Mode::RW, ""),
                Err(e) => {
                    warn!(replica = %p.replica.address, error = %e, "reconcile failed");
                    p.replica
                        .set_mode(Mode::ERR, format!("reconcile failed: {e}"));
                    trusted_dropped = true;
                }
            }
        }
        if trusted_dropped {
            // It took the new epoch (or may have) and then missed out: it would be trusted
            // again after a restart, although every write of this engine passes it by.
            vol.fence(&members).await;
            if !members.iter().any(|r| r.mode() == Mode::RW) {
                return Err(EngineError::NoHealthyReplica(
                    "no trusted replica could take the epoch".into(),
                ));
            }
        }
        let epoch = vol.epoch();
        *vol.members.write().await = members;
        info!(volume = %vol.name, epoch, "volume open");
        Ok(Arc::new(vol))
    }

    async fn set_epoch(&self, r: &Replica, epoch: u64) -> Result<(), EngineError> {
        let mut c = r.control()?;
        tokio::time::timeout(self.timeout, c.set_epoch(SetEpochRequest { epoch }))
            .await
            .map_err(|_| EngineError::Timeout(r.address.clone(), "set epoch"))?
            .map_err(|s| status_err(&r.address, "set epoch", s))?;
        r.epoch.store(epoch, Ordering::Relaxed);
        Ok(())
    }

    /// Makes `target`'s layers equal to `source`'s, reporting progress on `target`.
    async fn sync_replica(
        &self,
        target: &Replica,
        source: &Replica,
        include_head: bool,
    ) -> Result<(), EngineError> {
        let mut c = target.sync_client()?;
        let mut stream = c
            .sync(SyncRequest {
                source: source.address.clone(),
                include_head,
            })
            .await
            .map_err(|s| status_err(&target.address, "sync", s))?
            .into_inner();
        while let Some(p) = stream
            .message()
            .await
            .map_err(|s| status_err(&target.address, "sync", s))?
        {
            target.rebuild_done.store(p.done_bytes, Ordering::Relaxed);
            target.rebuild_total.store(p.total_bytes, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current fencing epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Status of every replica.
    pub async fn replicas(&self) -> Vec<ReplicaStatus> {
        self.members
            .read()
            .await
            .iter()
            .map(|r| r.status())
            .collect()
    }

    /// healthy (every replica RW), degraded (at least one RW, not all), faulted (no RW).
    pub async fn robustness(&self) -> &'static str {
        let m = self.members.read().await;
        let rw = m.iter().filter(|r| r.mode() == Mode::RW).count();
        match rw {
            0 => "faulted",
            n if n == m.len() => "healthy",
            _ => "degraded",
        }
    }

    /// Marks `failed` replicas ERR and raises the survivors' epoch, all before returning, so
    /// that the caller may then acknowledge.
    async fn drop_replicas(&self, failed: Vec<(Arc<Replica>, String)>) {
        let members = self.members.write().await;
        let mut changed = false;
        for (r, why) in failed {
            if r.mode() != Mode::ERR {
                error!(volume = %self.name, replica = %r.address, reason = %why, "dropping replica");
                r.set_mode(Mode::ERR, why);
                changed = true;
            }
        }
        if changed {
            self.fence(&members).await;
        }
    }

    /// Raises the epoch on every RW replica; one that cannot take it is dropped too.
    ///
    /// A replica that failed to answer may still have taken the epoch (its answer was late
    /// or lost, e.g. a slow fsync of its metadata): it would then hold the same epoch as the
    /// survivors while missing every later write, and a restarted engine would trust it. So
    /// after a failure the epoch is raised again on the replicas left, until a round has no
    /// failure (each round drops at least one replica, so this ends).
    async fn fence(&self, members: &[Arc<Replica>]) {
        loop {
            let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
            let rw: Vec<_> = members
                .iter()
                .filter(|r| r.mode() == Mode::RW)
                .cloned()
                .collect();
            let results = join_all(rw.iter().map(|r| self.set_epoch(r, epoch))).await;
            let mut failed = false;
            for (r, res) in rw.iter().zip(results) {
                if let Err(e) = res {
                    error!(volume = %self.name, replica = %r.address, error = %e, "fencing failed; dropping replica");
                    r.set_mode(Mode::ERR, format!("fencing failed: {e}"));
                    failed = true;
                }
            }
            info!(volume = %self.name, epoch, "membership recorded");
            if !failed || !members.iter().any(|r| r.mode() == Mode::RW) {
                return;
            }
        }
    }

    fn writable(members: &[Arc<Replica>]) -> Vec<(Arc<Replica>, Arc<ReplicaDataClient>)> {
        members
            .iter()
            .filter(|r| matches!(r.mode(), Mode::RW | Mode::WO))
            .filter_map(|r| r.data().map(|d| (r.clone(), d)))
            .collect()
    }

    /// Sends one mutation to every RW/WO replica and applies invariant 1 to the results.
    async fn mutate<F, Fut>(&self, op: F) -> DeviceResult<()>
    where
        F: Fn(Arc<ReplicaDataClient>) -> Fut,
        Fut: std::future::Future<Output = Result<(), ReplicaIoError>>,
    {
        let members = self.members.read().await;
        let targets = Self::writable(&members);
        if !targets.iter().any(|(r, _)| r.mode() == Mode::RW) {
            return Err(DeviceError::EIO);
        }
        let results = join_all(targets.iter().map(|(_, d)| op(d.clone()))).await;
        let mut failed = Vec::new();
        for ((r, _), res) in targets.iter().zip(results) {
            if let Err(e) = res {
                if e.is_request_error() {
                    return Err(DeviceError::EINVAL);
                }
                failed.push((r.clone(), e.to_string()));
            }
        }
        drop(members);
        if failed.is_empty() {
            return Ok(());
        }
        self.drop_replicas(failed).await;
        if self
            .members
            .read()
            .await
            .iter()
            .any(|r| r.mode() == Mode::RW)
        {
            Ok(())
        } else {
            Err(DeviceError::EIO)
        }
    }

    /// Zeroes (or discards) `[offset, offset + len)` in pieces of at most
    /// [`MAX_ZERO_PIECE`]: a replica zeroing over older layers writes every byte, so one
    /// request for the whole range could outlast the replica timeout on every replica at
    /// once and fault the volume.
    async fn zero_in_pieces(
        &self,
        offset: u64,
        len: u64,
        discard: bool,
        fua: bool,
    ) -> DeviceResult<()> {
        let end = offset.checked_add(len).ok_or(DeviceError::EINVAL)?;
        let mut at = offset;
        while at < end {
            // At most MAX_ZERO_PIECE, which fits in a u32.
            let n = (end - at).min(MAX_ZERO_PIECE) as u32;
            let _order = self.inflight.acquire(at, u64::from(n)).await;
            self.mutate(|d| async move { d.zero(at, n, discard, fua).await })
                .await?;
            at += u64::from(n);
        }
        Ok(())
    }

    /// I/O counters of the frontend requests served so far.
    pub fn io_stats(&self) -> IoCounters {
        self.io.snapshot()
    }

    /// Current size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    async fn read_impl(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        loop {
            let members = self.members.read().await;
            let rw: Vec<_> = members
                .iter()
                .filter(|r| r.mode() == Mode::RW)
                .filter_map(|r| r.data().map(|d| (r.clone(), d)))
                .collect();
            if rw.is_empty() {
                return Err(DeviceError::EIO);
            }
            let (r, d) = &rw[self.read_rr.fetch_add(1, Ordering::Relaxed) % rw.len()];
            match d.read(offset, len).await {
                Ok(b) if b.len() == len as usize => return Ok(b),
                Ok(b) => {
                    let why = format!("read returned {} bytes, asked {len}", b.len());
                    drop(members);
                    self.drop_replicas(vec![(r.clone(), why)]).await;
                }
                Err(e) if e.is_request_error() => return Err(DeviceError::EINVAL),
                Err(e) => {
                    drop(members);
                    self.drop_replicas(vec![(r.clone(), format!("read failed: {e}"))])
                        .await;
                }
            }
        }
    }

    /// Sends a control request to every replica in `modes`; the first goes alone, so that a
    /// refused request (bad name, missing snapshot) changes nothing anywhere. Replicas that
    /// fail are returned, not dropped: the caller drops them, under the exclusive lock.
    #[allow(clippy::type_complexity)]
    async fn control_all<T, F, Fut>(
        &self,
        members: &[Arc<Replica>],
        modes: &[Mode],
        what: &'static str,
        f: F,
    ) -> Result<(Vec<T>, Vec<(Arc<Replica>, String)>), EngineError>
    where
        F: Fn(ReplicaControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let targets: Vec<_> = members
            .iter()
            .filter(|r| modes.contains(&r.mode()))
            .cloned()
            .collect();
        if targets.is_empty() {
            return Err(EngineError::NoHealthyReplica(format!("nothing to {what}")));
        }
        // The first replica goes alone: if it refuses the request (bad name, missing
        // snapshot), nothing has changed anywhere and the error goes back to the caller.
        let first = &targets[0];
        let first_res = tokio::time::timeout(self.timeout * 4, f(first.control()?))
            .await
            .map_err(|_| EngineError::Timeout(first.address.clone(), what))?;
        let mut out = Vec::new();
        let mut failed = Vec::new();
        match first_res {
            Ok(r) => out.push(r.into_inner()),
            Err(s) if is_request_status(&s) => return Err(status_err(&first.address, what, s)),
            Err(s) => {
                let e = status_err(&first.address, what, s);
                failed.push((first.clone(), format!("{what} failed: {e}")));
            }
        }
        let rest = join_all(targets[1..].iter().map(|r| async {
            let c = r.control()?;
            tokio::time::timeout(self.timeout * 4, f(c))
                .await
                .map_err(|_| EngineError::Timeout(r.address.clone(), what))?
                .map_err(|s| status_err(&r.address, what, s))
        }))
        .await;
        for (r, res) in targets[1..].iter().zip(rest) {
            match res {
                Ok(v) => out.push(v.into_inner()),
                Err(e) => failed.push((r.clone(), format!("{what} failed: {e}"))),
            }
        }
        if out.is_empty() {
            return Err(EngineError::NoHealthyReplica(format!(
                "{what} failed on every replica: {}",
                failed
                    .iter()
                    .map(|(r, e)| format!("{}: {e}", r.address))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        Ok((out, failed))
    }

    /// Marks `failed` ERR and fences, for a caller that holds the membership lock exclusive.
    async fn drop_locked(&self, members: &[Arc<Replica>], failed: Vec<(Arc<Replica>, String)>) {
        if failed.is_empty() {
            return;
        }
        for (r, why) in failed {
            error!(volume = %self.name, replica = %r.address, reason = %why, "dropping replica");
            r.set_mode(Mode::ERR, why);
        }
        self.fence(members).await;
    }

    /// [`Volume::control_all`] under the exclusive lock: failed replicas are dropped at once.
    async fn control_all_locked<T, F, Fut>(
        &self,
        members: &[Arc<Replica>],
        what: &'static str,
        f: F,
    ) -> Result<Vec<T>, EngineError>
    where
        F: Fn(ReplicaControlClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let res = self
            .control_all(members, &[Mode::RW, Mode::WO], what, f)
            .await;
        match res {
            Ok((out, failed)) => {
                self.drop_locked(members, failed).await;
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }

    fn check_not_rebuilding(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, EngineError> {
        self.rebuilding
            .try_lock()
            .map_err(|_| EngineError::Busy("a replica is being rebuilt"))
    }

    /// Takes a snapshot on every RW/WO replica between two whole requests.
    pub async fn snapshot(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<String, EngineError> {
        let _quiet = self.check_not_rebuilding()?;
        let name = if name.is_empty() {
            format!("snap-{}", unix_ms())
        } else {
            name.to_owned()
        };
        self.flush_before_snapshot().await;
        let members = self.members.write().await;
        self.snapshot_locked(&members, &name, labels).await?;
        Ok(name)
    }

    /// Flushes every replica before a snapshot, while writes still flow: each replica's
    /// snapshot makes its head durable (fdatasync) under the exclusive lock, with every
    /// write held; after this flush that has only the writes of the last moments to do,
    /// not everything the page cache held (measured: a 135–200 ms write stall at the start
    /// of a rebuild after 20 MiB of writes, benches/RESULTS.md). A failure here is left to
    /// the snapshot itself to report.
    async fn flush_before_snapshot(&self) {
        if let Err(e) = self.mutate(|d| async move { d.flush().await }).await {
            tracing::debug!(volume = %self.name, error = ?e, "flush before a snapshot");
        }
    }

    async fn snapshot_locked(
        &self,
        members: &[Arc<Replica>],
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), EngineError> {
        let labels: std::collections::HashMap<_, _> = labels.into_iter().collect();
        self.control_all_locked(members, "snapshot", |mut c| {
            let req = CreateSnapshotRequest {
                name: name.to_owned(),
                labels: labels.clone(),
            };
            async move { c.create_snapshot(req).await }
        })
        .await?;
        info!(volume = %self.name, snapshot = name, "snapshot taken");
        Ok(())
    }

    /// Snapshots as the first RW replica lists them.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, EngineError> {
        let members = self.members.read().await;
        let r = members
            .iter()
            .find(|r| r.mode() == Mode::RW)
            .ok_or_else(|| EngineError::NoHealthyReplica("no RW replica to list".into()))?;
        let mut c = r.control()?;
        let resp = tokio::time::timeout(self.timeout, c.list_layers(ListLayersRequest {}))
            .await
            .map_err(|_| EngineError::Timeout(r.address.clone(), "list snapshots"))?
            .map_err(|s| status_err(&r.address, "list snapshots", s))?
            .into_inner();
        Ok(resp
            .layers
            .into_iter()
            .map(|l| SnapshotInfo {
                name: l.name,
                parent: l.parent,
                children: l.children,
                created_unix_ms: l.created_unix_ms,
                labels: l.labels.into_iter().collect(),
                size_bytes: l.allocated_bytes,
                removed: l.removed,
                is_head: l.is_head,
            })
            .collect())
    }

    /// Removes a snapshot on every replica: marks it, then purges (merges it into its child).
    pub async fn remove_snapshot(&self, name: &str) -> Result<(), EngineError> {
        let _quiet = self.check_not_rebuilding()?;
        {
            let members = self.members.write().await;
            self.control_all_locked(&members, "remove snapshot", |mut c| {
                let req = RemoveSnapshotRequest {
                    name: name.to_owned(),
                };
                async move { c.remove_snapshot(req).await }
            })
            .await?;
        }
        // The merge copies data while I/O goes on: shared lock; failures dropped after.
        let members = self.members.read().await;
        let (_, failed) = self
            .control_all(
                &members,
                &[Mode::RW, Mode::WO],
                "purge",
                |mut c| async move { c.purge(PurgeRequest {}).await },
            )
            .await?;
        drop(members);
        self.drop_replicas(failed).await;
        Ok(())
    }

    /// Reverts the volume to snapshot `name` (the head's data since then is discarded).
    pub async fn revert(&self, name: &str) -> Result<(), EngineError> {
        let _quiet = self.check_not_rebuilding()?;
        let members = self.members.write().await;
        self.control_all_locked(&members, "revert", |mut c| {
            let req = RevertRequest {
                name: name.to_owned(),
            };
            async move { c.revert(req).await }
        })
        .await?;
        info!(volume = %self.name, snapshot = name, "reverted");
        Ok(())
    }

    /// Grows the volume on every replica, then the frontends see the new size.
    pub async fn expand(&self, size: u64) -> Result<(), EngineError> {
        let _quiet = self.check_not_rebuilding()?;
        let members = self.members.write().await;
        if size < self.size_bytes() {
            return Err(EngineError::Invalid(format!(
                "size {size} is smaller than the current size {}; volumes do not shrink",
                self.size_bytes()
            )));
        }
        self.control_all_locked(&members, "expand", |mut c| async move {
            c.expand(ExpandRequest { size }).await
        })
        .await?;
        self.size.store(size, Ordering::Release);
        info!(volume = %self.name, size, "expanded");
        Ok(())
    }

    /// Removes a replica from the volume. The last RW replica cannot be removed.
    pub async fn remove_replica(&self, address: &str) -> Result<(), EngineError> {
        let mut members = self.members.write().await;
        let idx = members
            .iter()
            .position(|r| r.address == address)
            .ok_or_else(|| EngineError::NotFound(format!("replica {address}")))?;
        let rw = members.iter().filter(|r| r.mode() == Mode::RW).count();
        if members[idx].mode() == Mode::RW && rw == 1 {
            return Err(EngineError::Invalid(format!(
                "{address} is the last RW replica; removing it would fault the volume"
            )));
        }
        let r = members.remove(idx);
        let was_rw = r.mode() == Mode::RW;
        r.set_mode(Mode::ERR, "removed");
        if was_rw {
            self.fence(&members).await;
        }
        info!(volume = %self.name, replica = address, "replica removed");
        Ok(())
    }

    /// Adds a replica (new, or stale and dropped earlier): it joins WO, is synced from a
    /// healthy replica in the background, verified, and promoted to RW.
    pub async fn add_replica(self: &Arc<Self>, address: &str) -> Result<(), EngineError> {
        let guard = self
            .rebuilding
            .clone()
            .try_lock_owned()
            .map_err(|_| EngineError::Busy("a replica is being rebuilt already"))?;
        {
            let members = self.members.read().await;
            if members
                .iter()
                .any(|r| r.address == address && r.mode() != Mode::ERR)
            {
                return Err(EngineError::Exists(format!("replica {address}")));
            }
        }
        let probe = self.probe(address).await?;
        let size = self.size_bytes();
        if probe.info.size > size {
            return Err(EngineError::Invalid(format!(
                "replica {address} is {} bytes, larger than the volume ({size})",
                probe.info.size
            )));
        }
        let r = probe.replica.clone();
        let mut c = r.control()?;
        // Bounded like every control call (they write and fsync metadata): a replica that
        // hangs now must not hang `add` and keep the rebuild lock.
        let limit = self.timeout * 4;
        if probe.info.size < size {
            tokio::time::timeout(limit, c.expand(ExpandRequest { size }))
                .await
                .map_err(|_| EngineError::Timeout(address.to_owned(), "expand"))?
                .map_err(|s| status_err(address, "expand", s))?;
        }
        let mut sync = r.sync_client()?;
        tokio::time::timeout(limit, sync.begin_rebuild(BeginRebuildRequest {}))
            .await
            .map_err(|_| EngineError::Timeout(address.to_owned(), "begin rebuild"))?
            .map_err(|s| status_err(address, "begin rebuild", s))?;
        self.connect_data(&r, &probe.info.data_address).await?;
        self.flush_before_snapshot().await;
        let source = {
            let mut members = self.members.write().await;
            let source = members
                .iter()
                .find(|m| m.mode() == Mode::RW)
                .cloned()
                .ok_or_else(|| EngineError::NoHealthyReplica("no RW replica to copy".into()))?;
            // The chain below this snapshot is what gets copied; writes after it reach the
            // new replica directly.
            let mut labels = BTreeMap::new();
            labels.insert(SYSTEM_LABEL.to_owned(), "rebuild".to_owned());
            let snap = format!("rebuild-{}", unix_ms());
            self.snapshot_locked(&members, &snap, labels).await?;
            members.retain(|m| m.address != address);
            r.set_mode(Mode::WO, format!("rebuilding from {}", source.address));
            members.push(r.clone());
            source
        };
        let vol = self.clone();
        let span = info_span!("rebuild", volume = %self.name, replica = %address);
        tokio::spawn(
            async move {
                let _guard = guard;
                match vol.rebuild(&r, &source).await {
                    Ok(()) => info!("rebuild finished; replica is RW"),
                    Err(e) => {
                        error!(error = %e, "rebuild failed");
                        let _m = vol.members.write().await;
                        r.set_mode(Mode::ERR, format!("rebuild failed: {e}"));
                    }
                }
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn rebuild(&self, r: &Arc<Replica>, source: &Arc<Replica>) -> Result<(), EngineError> {
        info!(source = %source.address, "rebuild started");
        // The sync and the verification wait on both replicas with no deadline (copying a
        // layer takes as long as it takes). If either is dropped meanwhile (a hung replica
        // times out on live I/O), give up at once: waiting could last forever and would hold
        // the rebuild lock, refusing every snapshot and `add` until then.
        let copy = async {
            self.sync_replica(r, source, false).await?;
            self.verify(r, source).await
        };
        tokio::select! {
            res = copy => res?,
            why = Self::left_rebuild(r, source) => return Err(EngineError::Invalid(why)),
        }
        let mut members = self.members.write().await;
        if r.mode() != Mode::WO {
            return Err(EngineError::Invalid(
                "replica left WO during the rebuild".into(),
            ));
        }
        // Under the exclusive lock: unbounded, a target hanging right now would stop all I/O.
        let mut sync = r.sync_client()?;
        tokio::time::timeout(
            self.timeout * 4,
            sync.finish_rebuild(FinishRebuildRequest {}),
        )
        .await
        .map_err(|_| EngineError::Timeout(r.address.clone(), "finish rebuild"))?
        .map_err(|s| status_err(&r.address, "finish rebuild", s))?;
        self.set_epoch(r, self.epoch()).await?;
        r.set_mode(Mode::RW, "");
        self.fence(&members).await;
        members.sort_by_key(|m| m.mode() != Mode::RW);
        Ok(())
    }

    /// Returns (why) once the rebuilt replica is no longer WO or its source no longer RW.
    async fn left_rebuild(r: &Replica, source: &Replica) -> String {
        loop {
            if r.mode() != Mode::WO {
                return format!("replica left WO during the rebuild: {}", r.status().message);
            }
            if source.mode() != Mode::RW {
                return format!(
                    "source {} left RW during the rebuild: {}",
                    source.address,
                    source.status().message
                );
            }
            tokio::time::sleep(REBUILD_WATCH_INTERVAL).await;
        }
    }

    /// Compares the checksums of every snapshot on the source's chain with the target's.
    async fn verify(&self, r: &Replica, source: &Replica) -> Result<(), EngineError> {
        let chain = source
            .control()?
            .list_layers(ListLayersRequest {})
            .await
            .map_err(|s| status_err(&source.address, "list layers", s))?
            .into_inner()
            .head_chain;
        for layer in chain.iter().filter(|l| l.as_str() != "volume-head") {
            let a = checksums(source, layer).await?;
            let b = checksums(r, layer).await?;
            if a != b {
                return Err(EngineError::Invalid(format!(
                    "verification failed: snapshot {layer} differs after the rebuild"
                )));
            }
        }
        Ok(())
    }
}

async fn checksums(r: &Replica, layer: &str) -> Result<Vec<(u64, u32)>, EngineError> {
    let mut s = r
        .control()?
        .layer_checksums(LayerChecksumsRequest {
            layer: layer.to_owned(),
        })
        .await
        .map_err(|s| status_err(&r.address, "checksums", s))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = s
        .message()
        .await
        .map_err(|s| status_err(&r.address, "checksums", s))?
    {
        out.extend(batch.chunks.into_iter().map(|c| (c.index, c.crc)));
    }
    Ok(out)
}

fn is_request_status(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition
    )
}

impl BlockDevice for Volume {
    fn size(&self) -> u64 {
        self.size_bytes()
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        let t = Instant::now();
        let r = self.read_impl(offset, len).await;
        self.io.record(IoKind::Read, u64::from(len), t, r.is_ok());
        r
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        let t = Instant::now();
        let len = data.len() as u64;
        let _order = self.inflight.acquire(offset, len).await;
        // One crc for every replica the write goes to.
        let data = Checksummed::new(data);
        let data = &data;
        let r = self
            .mutate(|d| async move { d.write(offset, data, fua).await })
            .await;
        self.io.record(IoKind::Write, len, t, r.is_ok());
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DeviceResult<()> {
        let t = Instant::now();
        let r = self.zero_in_pieces(offset, len, false, fua).await;
        self.io.record(IoKind::Unmap, len, t, r.is_ok());
        r
    }

    async fn trim(&self, offset: u64, len: u64, fua: bool) -> DeviceResult<()> {
        let t = Instant::now();
        let r = self.zero_in_pieces(offset, len, true, fua).await;
        self.io.record(IoKind::Unmap, len, t, r.is_ok());
        r
    }

    async fn flush(&self) -> DeviceResult<()> {
        let t = Instant::now();
        let r = self.mutate(|d| async move { d.flush().await }).await;
        self.io.record(IoKind::Flush, 0, t, r.is_ok());
        r
    }

    async fn block_status(&self, offset: u64, len: u64) -> DeviceResult<Vec<Extent>> {
        // Asked of one RW replica's control service: every RW replica holds the same blocks.
        let r = {
            let members = self.members.read().await;
            members.iter().find(|r| r.mode() == Mode::RW).cloned()
        };
        let Some(r) = r else {
            return Err(DeviceError::EIO);
        };
        let mut c = r.control().map_err(|_| DeviceError::EIO)?;
        let resp = tokio::time::timeout(
            self.timeout,
            c.block_status(rpb::BlockStatusRequest {
                offset,
                length: len,
            }),
        )
        .await
        .map_err(|_| DeviceError::EIO)?
        .map_err(|s| {
            warn!(replica = %r.address, error = %s, "block status failed");
            DeviceError::EIO
        })?
        .into_inner();
        let extents: Vec<Extent> = resp
            .extents
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                hole: e.hole,
                zero: e.hole,
            })
            .collect();
        if extents.is_empty() {
            return Err(DeviceError::EIO);
        }
        Ok(extents)
    }
}
