//! The engine and replica processes of one node, started, watched, restarted and stopped by
//! the agent.
//!
//! Each instance is the `ironhorn` binary itself (`replica serve` / `engine serve`) in its
//! own process group, with its log in `STATE/logs/NAME.log`, so neither the agent's nor the
//! manager's death stops it: volumes keep serving I/O. Every instance takes two consecutive
//! ports from the agent's range (replica: control and data; engine: control and NBD), kept
//! for its lifetime so that engines and clients find it again after a restart. The records
//! live in `STATE/instances.json`; an agent that restarts re-adopts the processes that still
//! run (same pid, same command line) instead of starting them twice.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ironhorn_proto::agent::{InstanceKind, InstanceReport, InstanceSpec, InstanceState};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tracing::{info, warn};

/// First restart delay of an instance that exited; doubled per failure up to
/// [`MAX_BACKOFF`], reset once it ran for [`STABLE_AFTER`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest restart delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Running this long resets the restart delay.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);
/// Time an instance gets to exit after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Name of the records file in the state directory.
const STATE_FILE: &str = "instances.json";

/// Errors of the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The state directory cannot be created or its records file read or written.
    #[error("agent state {path}: {source}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The records file does not parse.
    #[error("agent state {path} is corrupt: {source}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// No two consecutive free ports are left in the range.
    #[error("no two free consecutive ports left in {0:?}")]
    NoPorts(RangeInclusive<u16>),
    /// A spec the agent cannot run.
    #[error("instance {name}: {problem}")]
    BadSpec {
        /// The instance.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// How the supervisor runs instances.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// The `ironhorn` executable.
    pub exe: PathBuf,
    /// Where records, logs and NBD sockets live.
    pub state_dir: PathBuf,
    /// Host the instances listen on (and are reached at).
    pub host: String,
    /// Ports the instances take, two each.
    pub ports: RangeInclusive<u16>,
    /// Whether engines may serve ublk devices here (false with `ironhorn agent --no-ublk`);
    /// the kernel must have the driver too ([`ublk_usable`]).
    pub ublk: bool,
}

/// Most ublk device ids the agent hands out (`/dev/ublkb0` …).
const MAX_UBLK_IDS: u32 = 1024;

/// Whether engines of this node can serve ublk devices: allowed by the configuration, and
/// the kernel's ublk driver is loaded and its control device opens for writing (root, or
/// a device node the agent's user may use).
pub fn ublk_usable(cfg: &SupervisorConfig) -> bool {
    cfg.ublk
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/ublk-control")
            .is_ok()
}

/// Whether the kernel has ublk device `id` (its control node `/dev/ublkcN`).
fn ublk_device_exists(id: u32) -> bool {
    std::path::Path::new(&format!("/dev/ublkc{id}")).exists()
}

/// What is kept about an instance across agent restarts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Record {
    kind: Kind,
    /// The process, when one was started.
    pid: Option<u32>,
    /// Control port; the next one is the data (replica) or NBD (engine) port.
    port: u16,
    /// The spec it was (last) started from.
    spec: SpecRecord,
    /// Engine with a ublk frontend: its device id N (`/dev/ublkbN`), chosen at its first
    /// start and kept, so that a restarted engine recovers the same device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ublk_id: Option<u32>,
}

/// Kind of instance, as stored.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Replica,
    Engine,
}

/// The parts of an [`InstanceSpec`] a process is started from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum SpecRecord {
    Replica {
        dir: String,
        size: u64,
    },
    Engine {
        volume: String,
        size: u64,
        replicas: Vec<String>,
        /// Also serve the volume as a ublk device.
        #[serde(default)]
        ublk: bool,
    },
}

impl SpecRecord {
    fn from_spec(s: &InstanceSpec) -> Result<(Kind, SpecRecord), InstanceError> {
        let bad = |problem: &str| InstanceError::BadSpec {
            name: s.name.clone(),
            problem: problem.to_owned(),
        };
        if s.name.is_empty()
            || !s
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(bad("the name must be letters, digits, '-', '_' or '.'"));
        }
        match InstanceKind::try_from(s.kind) {
            Ok(InstanceKind::Replica) => {
                let r = s
                    .replica
                    .as_ref()
                    .ok_or_else(|| bad("replica spec missing"))?;
                if r.dir.is_empty() || r.size == 0 {
                    return Err(bad("replica needs a directory and a size"));
                }
                Ok((
                    Kind::Replica,
                    SpecRecord::Replica {
                        dir: r.dir.clone(),
                        size: r.size,
                    },
                ))
            }
            Ok(InstanceKind::Engine) => {
                let e = s
                    .engine
                    .as_ref()
                    .ok_or_else(|| bad("engine spec missing"))?;
                if e.volume.is_empty() || e.size == 0 {
                    return Err(bad("engine needs a volume and a size"));
                }
                Ok((
                    Kind::Engine,
                    SpecRecord::Engine {
                        volume: e.volume.clone(),
                        size: e.size,
                        replicas: e.replicas.clone(),
                        ublk: e.ublk,
                    },
                ))
            }
            _ => Err(bad("unknown kind")),
        }
    }
}

/// One supervised instance.
#[derive(Debug)]
struct Instance {
    rec: Record,
    /// Our child, when this agent started it (adopted processes have none).
    child: Option<Child>,
    state: InstanceState,
    message: String,
    restarts: u32,
    started: Option<Instant>,
    backoff: Duration,
    next_start: Option<Instant>,
    /// Whether it ever listened: one that never did may move to other ports (another
    /// process may have taken them between the check and the bind).
    ever_running: bool,
}

/// Starts, watches, restarts and stops the instances of one node.
#[derive(Debug)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    instances: BTreeMap<String, Instance>,
    /// Instances being stopped, reported as STOPPING until they are gone.
    stopping: BTreeMap<String, (Record, tokio::task::JoinHandle<()>)>,
}

impl Supervisor {
    /// Opens the state directory and re-adopts the instances that still run.
    pub fn open(cfg: SupervisorConfig) -> Result<Self, InstanceError> {
        for d in [
            cfg.state_dir.clone(),
            cfg.state_dir.join("logs"),
            cfg.state_dir.join("sockets"),
        ] {
            std::fs::create_dir_all(&d).map_err(|source| InstanceError::State {
                path: d.clone(),
                source,
            })?;
        }
        let path = cfg.state_dir.join(STATE_FILE);
        let records: BTreeMap<String, Record> = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|source| InstanceError::Corrupt { path, source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(InstanceError::State { path, source }),
        };
        let mut instances = BTreeMap::new();
        for (name, rec) in records {
            let addr = format!("{}:{}", cfg.host, rec.port);
            let alive = rec.pid.is_some_and(|p| is_our_process(p, &addr));
            let (state, message) = if alive {
                info!(instance = %name, pid = rec.pid, "re-adopted a running instance");
                (InstanceState::Starting, String::new())
            } else {
                (
                    InstanceState::Failed,
                    "not running when the agent started".to_owned(),
                )
            };
            let mut rec = rec;
            if !alive {
                rec.pid = None;
            }
            instances.insert(
                name,
                Instance {
                    rec,
                    child: None,
                    state,
                    message,
                    restarts: 0,
                    started: alive.then(Instant::now),
                    backoff: MIN_BACKOFF,
                    next_start: None,
                    ever_running: alive,
                },
            );
        }
        Ok(Supervisor {
            cfg,
            instances,
            stopping: BTreeMap::new(),
        })
    }

    /// Names of the instances this agent supervises (not those being stopped).
    pub fn names(&self) -> Vec<String> {
        self.instances.keys().cloned().collect()
    }

    /// Control address of an instance.
    pub fn address(&self, name: &str) -> Option<String> {
        self.instances
            .get(name)
            .map(|i| format!("{}:{}", self.cfg.host, i.rec.port))
    }

    /// Replica directories in use by supervised or stopping instances.
    pub fn dirs_in_use(&self) -> Vec<PathBuf> {
        self.instances
            .values()
            .map(|i| &i.rec)
            .chain(self.stopping.values().map(|(r, _)| r))
            .filter_map(|r| match &r.spec {
                SpecRecord::Replica { dir, .. } => Some(PathBuf::from(dir)),
                SpecRecord::Engine { .. } => None,
            })
            .collect()
    }

    /// Looks at every process: exits become FAILED, listening ones RUNNING.
    pub async fn poll(&mut self) {
        let host = self.cfg.host.clone();
        for (name, inst) in &mut self.instances {
            let addr = format!("{host}:{}", inst.rec.port);
            let exited = match (&mut inst.child, inst.rec.pid) {
                (Some(child), _) => match child.try_wait() {
                    Ok(Some(status)) => Some(format!("exited: {status}")),
                    Ok(None) => None,
                    Err(e) => Some(format!("cannot wait for it: {e}")),
                },
                (None, Some(pid)) => {
                    (!is_our_process(pid, &addr)).then(|| "exited (adopted process)".to_owned())
                }
                (None, None) => None,
            };
            if let Some(why) = exited {
                warn!(instance = %name, kind = ?inst.rec.kind, "{why}; see {}", log_path(&self.cfg, name).display());
                inst.child = None;
                inst.rec.pid = None;
                inst.state = InstanceState::Failed;
                inst.message = why;
                let ran_long = inst.started.is_some_and(|s| s.elapsed() >= STABLE_AFTER);
                if ran_long {
                    inst.backoff = MIN_BACKOFF;
                }
                inst.next_start = Some(Instant::now() + inst.backoff);
                inst.backoff = (inst.backoff * 2).min(MAX_BACKOFF);
                inst.started = None;
                continue;
            }
            if inst.state == InstanceState::Starting && inst.rec.pid.is_some() {
                let connect = tokio::time::timeout(
                    Duration::from_millis(300),
                    tokio::net::TcpStream::connect(addr.as_str()),
                )
                .await;
                if matches!(connect, Ok(Ok(_))) {
                    info!(instance = %name, address = %addr, "instance running");
                    inst.ever_running = true;
                    inst.state = InstanceState::Running;
                    inst.message.clear();
                }
            }
        }
        let before = self.stopping.len();
        self.stopping.retain(|_, (_, task)| !task.is_finished());
        if self.stopping.len() != before {
            self.save();
        }
    }

    /// Converges to the manager's desired set: starts what is missing (or restarts what
    /// failed, after its back-off), stops what is not listed.
    pub fn converge(&mut self, desired: &[InstanceSpec]) {
        let mut wanted = BTreeMap::new();
        for s in desired {
            match SpecRecord::from_spec(s) {
                Ok(v) => {
                    wanted.insert(s.name.clone(), v);
                }
                Err(e) => warn!(error = %e, "ignoring a desired instance"),
            }
        }
        let gone: Vec<String> = self
            .instances
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.stop(&name);
        }
        for (name, (kind, spec)) in wanted {
            if self.stopping.contains_key(&name) {
                // Started again once the old process is gone.
                continue;
            }
            match self.instances.get_mut(&name) {
                Some(inst) => {
                    if inst.rec.kind != kind {
                        warn!(instance = %name, "desired kind changed; ignoring");
                        continue;
                    }
                    // A running instance keeps running: later changes (replicas added,
                    // expansion) go through its control service. The new spec is used at
                    // its next start.
                    inst.rec.spec = spec;
                }
                None => {
                    let port = match self.alloc_ports() {
                        Ok(p) => p,
                        Err(e) => {
                            warn!(instance = %name, error = %e, "cannot start");
                            continue;
                        }
                    };
                    self.instances.insert(
                        name.clone(),
                        Instance {
                            rec: Record {
                                kind,
                                pid: None,
                                port,
                                spec,
                                ublk_id: None,
                            },
                            child: None,
                            state: InstanceState::Failed,
                            message: "not started yet".into(),
                            restarts: 0,
                            started: None,
                            backoff: MIN_BACKOFF,
                            next_start: None,
                            ever_running: false,
                        },
                    );
                }
            }
        }
        self.restart_failed();
        self.save();
    }

    /// Starts every FAILED instance whose back-off has passed (also used while the manager
    /// cannot be reached: instances keep running and crashed ones come back).
    pub fn restart_failed(&mut self) {
        let now = Instant::now();
        let names: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, i)| {
                i.state == InstanceState::Failed && i.next_start.is_none_or(|t| t <= now)
            })
            .map(|(n, _)| n.clone())
            .collect();
        let mut changed = false;
        for name in names {
            changed = true;
            let cfg = self.cfg.clone();
            let moved = match self.instances.get(&name) {
                Some(i) if !i.ever_running && i.restarts > 0 => self.alloc_ports().ok(),
                _ => None,
            };
            let ublk_id = match self.instances.get(&name) {
                Some(i)
                    if matches!(i.rec.spec, SpecRecord::Engine { ublk: true, .. })
                        && i.rec.ublk_id.is_none() =>
                {
                    free_ublk_id(&self.instances, &self.stopping)
                }
                _ => None,
            };
            let Some(inst) = self.instances.get_mut(&name) else {
                continue;
            };
            if let Some(port) = moved {
                info!(instance = %name, from = inst.rec.port, to = port, "never came up; trying other ports");
                inst.rec.port = port;
            }
            if let Some(id) = ublk_id {
                info!(instance = %name, id, "ublk device id chosen");
                inst.rec.ublk_id = Some(id);
            }
            match start(&cfg, &name, &inst.rec) {
                Ok(child) => {
                    if inst.started.is_none() && inst.message != "not started yet" {
                        inst.restarts += 1;
                    }
                    inst.rec.pid = child.id();
                    inst.child = Some(child);
                    inst.state = InstanceState::Starting;
                    inst.started = Some(Instant::now());
                    inst.next_start = None;
                    info!(instance = %name, kind = ?inst.rec.kind, pid = inst.rec.pid, port = inst.rec.port, "started");
                }
                Err(e) => {
                    inst.message = e;
                    inst.next_start = Some(Instant::now() + inst.backoff);
                    inst.backoff = (inst.backoff * 2).min(MAX_BACKOFF);
                    warn!(instance = %name, error = %inst.message, "cannot start");
                }
            }
        }
        if changed {
            self.save();
        }
    }

    /// Stops one instance in the background (SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]).
    pub fn stop(&mut self, name: &str) {
        let Some(inst) = self.instances.remove(name) else {
            return;
        };
        info!(instance = %name, pid = inst.rec.pid, "stopping");
        let ublk_id = inst.rec.ublk_id;
        let exe = self.cfg.exe.clone();
        let child = inst.child;
        let pid = inst.rec.pid;
        let task = tokio::spawn(async move {
            terminate(child, pid).await;
            if let Some(id) = ublk_id {
                remove_leftover_ublk(&exe, id).await;
            }
        });
        self.stopping.insert(name.to_owned(), (inst.rec, task));
        self.save();
    }

    /// Stops every instance of `kind` ("engine" or "replica") and waits until they exited.
    pub async fn stop_all(&mut self, engines_only: bool) {
        let names: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, i)| !engines_only || i.rec.kind == Kind::Engine)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &names {
            self.stop(n);
        }
        let tasks: Vec<_> = std::mem::take(&mut self.stopping)
            .into_values()
            .map(|(_, t)| t)
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        self.save();
    }

    /// Forgets the instances without stopping them (the agent exits, they keep serving).
    pub fn detach(&mut self) {
        self.save();
        self.instances.clear();
    }

    /// What the manager is told about every instance.
    pub fn reports(&self) -> Vec<InstanceReport> {
        let mut out: Vec<InstanceReport> = self
            .instances
            .iter()
            .map(|(name, i)| self.report(name, &i.rec, i.state, &i.message, i.restarts))
            .collect();
        out.extend(
            self.stopping
                .iter()
                .map(|(name, (rec, _))| self.report(name, rec, InstanceState::Stopping, "", 0)),
        );
        out
    }

    fn report(
        &self,
        name: &str,
        rec: &Record,
        state: InstanceState,
        message: &str,
        restarts: u32,
    ) -> InstanceReport {
        let host = &self.cfg.host;
        let next = rec.port.saturating_add(1);
        let (kind, data_address, frontends) = match &rec.spec {
            SpecRecord::Replica { .. } => (InstanceKind::Replica, format!("{host}:{next}"), vec![]),
            SpecRecord::Engine { volume, ublk, .. } => {
                let mut frontends = vec![
                    format!("nbd://{host}:{next}/{volume}"),
                    format!(
                        "nbd+unix:///{volume}?socket={}",
                        socket_path(&self.cfg, name).display()
                    ),
                ];
                if let (true, Some(id)) = (ublk, rec.ublk_id) {
                    frontends.push(format!("ublk:///dev/ublkb{id}"));
                }
                (InstanceKind::Engine, String::new(), frontends)
            }
        };
        let allocated_bytes = match &rec.spec {
            SpecRecord::Replica { dir, .. } => super::disks::allocated_bytes(Path::new(dir)),
            SpecRecord::Engine { .. } => 0,
        };
        InstanceReport {
            allocated_bytes,
            name: name.to_owned(),
            kind: kind as i32,
            state: state as i32,
            pid: rec.pid.unwrap_or(0),
            address: format!("{host}:{}", rec.port),
            data_address,
            frontends,
            message: message.to_owned(),
            restarts,
        }
    }

    /// Two consecutive ports in the range, used by no record, that bind now.
    fn alloc_ports(&self) -> Result<u16, InstanceError> {
        let used: Vec<u16> = self
            .instances
            .values()
            .map(|i| i.rec.port)
            .chain(self.stopping.values().map(|(r, _)| r.port))
            .collect();
        let (lo, hi) = (*self.cfg.ports.start(), *self.cfg.ports.end());
        let mut p = lo;
        while p < hi {
            let (a, b) = (u32::from(p), u32::from(p) + 1);
            let taken = used.iter().any(|u| {
                let (x, y) = (u32::from(*u), u32::from(*u) + 1);
                a == x || a == y || b == x
            });
            if !taken && bindable(&self.cfg.host, p) && bindable(&self.cfg.host, p + 1) {
                return Ok(p);
            }
            p += 1;
        }
        Err(InstanceError::NoPorts(self.cfg.ports.clone()))
    }

    /// Writes the records (temp file and rename); failures are logged.
    fn save(&self) {
        let records: BTreeMap<&String, &Record> = self
            .instances
            .iter()
            .map(|(n, i)| (n, &i.rec))
            .chain(self.stopping.iter().map(|(n, (r, _))| (n, r)))
            .collect();
        let path = self.cfg.state_dir.join(STATE_FILE);
        let tmp = path.with_extension("json.tmp");
        let res = serde_json::to_vec_pretty(&records)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = res {
            warn!(path = %path.display(), error = %e, "cannot save the agent's instance records");
        }
    }
}

/// The lowest ublk device id no record holds and the kernel does not have.
fn free_ublk_id(
    instances: &BTreeMap<String, Instance>,
    stopping: &BTreeMap<String, (Record, tokio::task::JoinHandle<()>)>,
) -> Option<u32> {
    let held: Vec<u32> = instances
        .values()
        .map(|i| &i.rec)
        .chain(stopping.values().map(|(r, _)| r))
        .filter_map(|r| r.ublk_id)
        .collect();
    (0..MAX_UBLK_IDS).find(|id| !held.contains(id) && !ublk_device_exists(*id))
}

fn log_path(cfg: &SupervisorConfig, name: &str) -> PathBuf {
    cfg.state_dir.join("logs").join(format!("{name}.log"))
}

fn socket_path(cfg: &SupervisorConfig, name: &str) -> PathBuf {
    cfg.state_dir.join("sockets").join(format!("{name}.sock"))
}

fn bindable(host: &str, port: u16) -> bool {
    let Ok(addr) = format!("{host}:{port}").parse::<SocketAddr>() else {
        // A name: let the instance find out.
        return true;
    };
    TcpListener::bind(addr).is_ok()
}

/// The command line of an instance.
fn args(cfg: &SupervisorConfig, name: &str, rec: &Record) -> Vec<String> {
    let host = &cfg.host;
    let listen = format!("{host}:{}", rec.port);
    let next = rec.port.saturating_add(1);
    match &rec.spec {
        SpecRecord::Replica { dir, size } => vec![
            "replica".into(),
            "serve".into(),
            "--dir".into(),
            dir.clone(),
            "--size".into(),
            size.to_string(),
            "--listen".into(),
            listen,
            "--data-listen".into(),
            format!("{host}:{next}"),
        ],
        SpecRecord::Engine {
            volume,
            size,
            replicas,
            ublk,
        } => {
            let mut a = vec![
                "engine".into(),
                "serve".into(),
                "--volume".into(),
                volume.clone(),
                "--size".into(),
                size.to_string(),
                "--nbd".into(),
                format!("tcp://{host}:{next}"),
                "--nbd".into(),
                format!("unix://{}", socket_path(cfg, name).display()),
                "--listen".into(),
                listen,
            ];
            for r in replicas {
                a.push("--replica".into());
                a.push(r.clone());
            }
            if let (true, Some(id)) = (ublk, rec.ublk_id) {
                a.extend([
                    "--frontend".into(),
                    "nbd,ublk".into(),
                    "--ublk-id".into(),
                    id.to_string(),
                ]);
            }
            a
        }
    }
}

/// Starts the process of an instance in its own process group, its stderr in its log.
fn start(cfg: &SupervisorConfig, name: &str, rec: &Record) -> Result<Child, String> {
    if let SpecRecord::Engine { replicas, .. } = &rec.spec
        && replicas.is_empty()
    {
        return Err("no replica to start the engine with".into());
    }
    if let SpecRecord::Replica { dir, .. } = &rec.spec {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    }
    if let SpecRecord::Engine { ublk: true, .. } = &rec.spec
        && rec.ublk_id.is_none()
    {
        return Err(format!("no free ublk device id below {MAX_UBLK_IDS}"));
    }
    if let SpecRecord::Engine { .. } = &rec.spec {
        let _ = std::fs::remove_file(socket_path(cfg, name));
    }
    let log = log_path(cfg, name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let args = args(cfg, name, rec);
    Command::new(&cfg.exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(file))
        // Its own group: a Ctrl-C or a kill of the agent's group does not reach it, so the
        // volume keeps serving while the agent or the manager is down.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(|e| format!("cannot start {} {}: {e}", cfg.exe.display(), args.join(" ")))
}

/// Deletes ublk device `id` if it is still there after its engine stopped: an engine that
/// stops cleanly removes its device, one that was killed (or had died) leaves it quiesced,
/// holding I/O for a recovery that will not come now that the engine is no longer wanted.
/// Runs `ironhorn ublk rm ID`, which refuses a device a live process still serves.
async fn remove_leftover_ublk(exe: &std::path::Path, id: u32) {
    if !ublk_device_exists(id) {
        return;
    }
    let run = Command::new(exe)
        .args(["ublk", "rm", &id.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(STOP_TIMEOUT, run).await {
        Ok(Ok(out)) if out.status.success() => {
            info!(id, "deleted the ublk device its stopped engine left behind")
        }
        Ok(Ok(out)) => warn!(
            id,
            error = %String::from_utf8_lossy(&out.stderr).trim(),
            "cannot delete the ublk device of a stopped engine"
        ),
        Ok(Err(e)) => warn!(id, error = %e, "cannot run ironhorn ublk rm"),
        Err(_) => warn!(id, "ironhorn ublk rm did not finish in time"),
    }
}

/// SIGTERM, wait up to [`STOP_TIMEOUT`], then SIGKILL.
async fn terminate(child: Option<Child>, pid: Option<u32>) {
    let Some(pid) = pid else { return };
    let p = Pid::from_raw(pid as i32);
    let _ = kill(p, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_TIMEOUT;
    match child {
        Some(mut c) => {
            if tokio::time::timeout(STOP_TIMEOUT, c.wait()).await.is_err() {
                warn!(pid, "did not stop after SIGTERM; killing it");
                let _ = c.kill().await;
            }
        }
        None => {
            while alive(pid) {
                if Instant::now() > deadline {
                    warn!(pid, "did not stop after SIGTERM; killing it");
                    let _ = kill(p, Signal::SIGKILL);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Whether `pid` runs (and is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|s| s != 'Z' && s != 'X'),
        Err(_) => false,
    }
}

/// Whether `pid` runs and is an ironhorn instance listening on `addr` (a pid reused by
/// another program is not adopted).
fn is_our_process(pid: u32, addr: &str) -> bool {
    if !alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_serve = args.windows(2).any(|w| w[1] == b"serve");
    is_serve && args.contains(&addr.as_bytes())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg() -> SupervisorConfig {
        SupervisorConfig {
            exe: PathBuf::from("/usr/bin/ironhorn"),
            state_dir: PathBuf::from("/tmp/state"),
            host: "127.0.0.1".into(),
            ports: 20000..=20100,
            ublk: true,
        }
    }

    fn engine(ublk: bool, ublk_id: Option<u32>) -> Record {
        Record {
            kind: Kind::Engine,
            pid: None,
            port: 20010,
            spec: SpecRecord::Engine {
                volume: "v1".into(),
                size: 1 << 20,
                replicas: vec!["127.0.0.1:20000".into()],
                ublk,
            },
            ublk_id,
        }
    }

    #[test]
    fn engine_with_ublk_gets_its_device_id() {
        let a = args(&cfg(), "e1", &engine(true, Some(3)));
        let at = a
            .iter()
            .position(|x| x == "--frontend")
            .expect("--frontend");
        assert_eq!(a[at + 1], "nbd,ublk");
        let at = a.iter().position(|x| x == "--ublk-id").expect("--ublk-id");
        assert_eq!(a[at + 1], "3");
        let plain = args(&cfg(), "e1", &engine(false, None));
        assert!(!plain.iter().any(|x| x == "--frontend" || x == "--ublk-id"));
    }

    #[test]
    fn ublk_device_is_reported_as_a_frontend() {
        let sup = Supervisor {
            cfg: cfg(),
            instances: BTreeMap::new(),
            stopping: BTreeMap::new(),
        };
        let r = sup.report("e1", &engine(true, Some(7)), InstanceState::Running, "", 0);
        assert!(r.frontends.iter().any(|f| f == "ublk:///dev/ublkb7"));
        assert!(
            r.frontends
                .iter()
                .any(|f| f.starts_with("nbd://127.0.0.1:20011/"))
        );
        let r = sup.report("e1", &engine(false, None), InstanceState::Running, "", 0);
        assert!(!r.frontends.iter().any(|f| f.starts_with("ublk://")));
    }

    #[test]
    fn ublk_ids_are_not_shared() {
        let mut instances = BTreeMap::new();
        for (name, id) in [("a", 0), ("b", 1)] {
            instances.insert(
                name.to_owned(),
                Instance {
                    rec: engine(true, Some(id)),
                    child: None,
                    state: InstanceState::Running,
                    message: String::new(),
                    restarts: 0,
                    started: None,
                    backoff: MIN_BACKOFF,
                    next_start: None,
                    ever_running: true,
                },
            );
        }
        let id = free_ublk_id(&instances, &BTreeMap::new()).expect("an id");
        assert!(id >= 2, "{id}");
    }

    #[test]
    fn records_written_before_ublk_still_read() {
        let old = r#"{"kind":"engine","pid":12,"port":20010,
            "spec":{"kind":"engine","volume":"v1","size":4096,"replicas":["127.0.0.1:1"]}}"#;
        let rec: Record = serde_json::from_str(old).unwrap();
        assert_eq!(rec.ublk_id, None);
        assert!(matches!(rec.spec, SpecRecord::Engine { ublk: false, .. }));
    }
}
