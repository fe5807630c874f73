//! The manager's side of the agent protocol: each report updates the Node (registered on
//! its first report, disks added as they appear), the status of the node's Engine and
//! Replica resources, and is answered with the instances the node should run and the
//! replica directories no replica owns any more (data of deleted replicas).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use ironhorn_proto::agent::agent_manager_server::{AgentManager, AgentManagerServer};
use ironhorn_proto::agent::{self as pb, InstanceKind, InstanceSpec, NodeDesired, NodeReport};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::{Instrument, info, info_span, warn};

use crate::controllers::Liveness;
use crate::controllers::patch::{patch_spec, patch_status};
use crate::resources::condition::{ConditionStatus, set_condition};
use crate::resources::engine::{DesiredState, Engine, InstanceState};
use crate::resources::node::{DiskSpec, DiskStatus, Node, NodeSpec};
use crate::resources::replica::Replica;
use crate::resources::volume::Frontend;
use crate::store::{Store, StoreError};

/// Heartbeats are written to the store at most this often (liveness itself is in memory).
pub const HEARTBEAT_WRITE_PERIOD: Duration = Duration::from_secs(10);
/// Longest an engine waits for all its replicas to run before it starts with those that do.
pub const ENGINE_START_GRACE: Duration = Duration::from_secs(10);

/// The agent service of the manager.
#[derive(Debug, Clone)]
pub struct AgentService {
    store: Store,
    liveness: Liveness,
    token: Option<String>,
    report_interval: Duration,
    /// Engines waiting for their replicas, since when.
    waiting:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>>,
}

impl AgentService {
    /// A service over `store`; agents must send `token` when one is given.
    pub fn new(store: Store, liveness: Liveness, token: Option<String>) -> Self {
        AgentService {
            store,
            liveness,
            token,
            report_interval: super::DEFAULT_REPORT_INTERVAL,
            waiting: Default::default(),
        }
    }

    /// Serves agents on `listener` until `shutdown`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(AgentManagerServer::new(self))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
    }

    fn check_token<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(want) = &self.token else {
            return Ok(());
        };
        let got = req
            .metadata()
            .get(super::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match got {
            Some(t) if t == want => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated("missing bearer token")),
        }
    }

    async fn handle(
        &self,
        r: NodeReport,
        peer: Option<SocketAddr>,
    ) -> Result<NodeDesired, StoreError> {
        self.liveness.reported(&r);
        let node = self.register(&r, peer).await?;
        let all_replicas = self.store.list::<Replica>().await?;
        let replicas: Vec<Replica> = all_replicas
            .iter()
            .filter(|x| x.spec.node_id == r.node)
            .cloned()
            .collect();
        let engines: Vec<Engine> = self
            .store
            .list::<Engine>()
            .await?
            .into_iter()
            .filter(|x| x.spec.node_id == r.node)
            .collect();
        for x in &replicas {
            let rep = r.instances.iter().find(|i| i.name == x.name_any());
            let mut st = x.status.clone().unwrap_or_default();
            match rep {
                Some(i) => {
                    st.state = state_of(i.state);
                    st.control_address = Some(i.address.clone());
                    st.data_address = (!i.data_address.is_empty()).then(|| i.data_address.clone());
                    st.port = i
                        .address
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse().ok())
                        .unwrap_or(0);
                    // Written when it moved by 1% of the replica's size (at least 1 MiB),
                    // not at every report of a replica taking writes.
                    let step = (x.spec.size / 100).max(1 << 20);
                    if i.allocated_bytes.abs_diff(st.actual_size) >= step
                        || (i.allocated_bytes == 0) != (st.actual_size == 0)
                    {
                        st.actual_size = i.allocated_bytes;
                    }
                }
                None => {
                    st.state = if x.spec.desired_state == DesiredState::Running {
                        InstanceState::Pending
                    } else {
                        InstanceState::Stopped
                    };
                }
            }
            if x.status.as_ref() != Some(&st) {
                patch_status::<Replica, _>(&self.store, &x.name_any(), |o| {
                    let s = o.status.get_or_insert_with(Default::default);
                    s.state = st.state;
                    s.control_address = st.control_address.clone();
                    s.data_address = st.data_address.clone();
                    s.port = st.port;
                    s.actual_size = st.actual_size;
                })
                .await?;
            }
        }
        for x in &engines {
            let rep = r.instances.iter().find(|i| i.name == x.name_any());
            let mut st = x.status.clone().unwrap_or_default();
            match rep {
                Some(i) => {
                    let new_state = state_of(i.state);
                    if new_state == InstanceState::Running && st.state != InstanceState::Running {
                        st.started_at = Some(Time(jiff::Timestamp::now()));
                    }
                    st.state = new_state;
                    st.control_address = Some(i.address.clone());
                    st.endpoint = i
                        .frontends
                        .iter()
                        .find(|f| f.starts_with("nbd://"))
                        .cloned();
                    st.socket = i
                        .frontends
                        .iter()
                        .find_map(|f| f.split_once("?socket=").map(|(_, p)| p.to_owned()));
                    st.device = i
                        .frontends
                        .iter()
                        .find_map(|f| f.strip_prefix("ublk://").map(str::to_owned));
                    let cond = if i.message.is_empty() {
                        (
                            ConditionStatus::True,
                            "Running",
                            "the engine serves".to_owned(),
                        )
                    } else {
                        (ConditionStatus::False, "ProcessFailed", i.message.clone())
                    };
                    set_condition(&mut st.conditions, "Running", cond.0, cond.1, &cond.2);
                }
                None => {
                    st.state = InstanceState::Pending;
                }
            }
            if x.status.as_ref() != Some(&st) {
                patch_status::<Engine, _>(&self.store, &x.name_any(), |o| {
                    let s = o.status.get_or_insert_with(Default::default);
                    s.state = st.state;
                    s.control_address = st.control_address.clone();
                    s.endpoint = st.endpoint.clone();
                    s.socket = st.socket.clone();
                    s.device = st.device.clone();
                    s.started_at = st.started_at.clone();
                    s.conditions = st.conditions.clone();
                })
                .await?;
            }
        }
        let mut instances = Vec::new();
        for x in &replicas {
            if x.spec.desired_state == DesiredState::Running
                && x.metadata.deletion_timestamp.is_none()
            {
                instances.push(InstanceSpec {
                    name: x.name_any(),
                    kind: InstanceKind::Replica as i32,
                    replica: Some(pb::ReplicaSpec {
                        dir: x.spec.data_dir.clone(),
                        size: x.spec.size,
                    }),
                    engine: None,
                });
            }
        }
        for x in &engines {
            let reported = r.instances.iter().any(|i| i.name == x.name_any());
            if x.spec.desired_state == DesiredState::Running
                && x.metadata.deletion_timestamp.is_none()
                && (reported || self.replicas_ready(x, &all_replicas))
            {
                instances.push(InstanceSpec {
                    name: x.name_any(),
                    kind: InstanceKind::Engine as i32,
                    replica: None,
                    engine: Some(pb::EngineSpec {
                        volume: x.spec.volume_name.clone(),
                        size: x.spec.size,
                        replicas: x.spec.replica_addresses.values().cloned().collect(),
                        ublk: x.spec.frontend == Frontend::Ublk,
                    }),
                });
            }
        }
        let mut owned: BTreeSet<&str> = replicas.iter().map(|x| x.spec.data_dir.as_str()).collect();
        // A restore in progress fills a staging directory beside the replica's.
        let staging: Vec<String> = replicas
            .iter()
            .filter_map(|x| crate::controllers::restore::staging_dir(&x.spec.data_dir))
            .collect();
        owned.extend(staging.iter().map(String::as_str));
        let remove_dirs = if node.is_some() {
            r.replica_dirs
                .iter()
                .filter(|d| !owned.contains(d.as_str()))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let interval = self
            .store
            .get::<crate::resources::setting::Setting>(crate::settings::AGENT_REPORT_INTERVAL)
            .await?
            .and_then(|s| s.spec.value.parse::<u32>().ok())
            .unwrap_or(self.report_interval.as_millis() as u32);
        Ok(NodeDesired {
            instances,
            remove_dirs,
            report_interval_ms: interval,
        })
    }

    /// Whether an engine that does not run yet may start: every replica it starts with runs
    /// (as its node reported since the manager started), or some do and it has waited
    /// [`ENGINE_START_GRACE`]. Starting before all are up would drop the late ones and
    /// rebuild them for nothing (after a whole-cluster restart, for example).
    fn replicas_ready(&self, e: &Engine, all: &[Replica]) -> bool {
        let running = |name: &str| {
            all.iter()
                .find(|x| x.name_any() == name)
                .and_then(|x| self.liveness.last_report(&x.spec.node_id))
                .is_some_and(|rep| {
                    rep.instances
                        .iter()
                        .any(|i| i.name == name && i.state == pb::InstanceState::Running as i32)
                })
        };
        let up = e
            .spec
            .replica_addresses
            .keys()
            .filter(|n| running(n))
            .count();
        if up == e.spec.replica_addresses.len() {
            return true;
        }
        let Ok(mut waiting) = self.waiting.lock() else {
            return up > 0;
        };
        let since = *waiting
            .entry(e.name_any())
            .or_insert_with(std::time::Instant::now);
        up > 0 && since.elapsed() >= ENGINE_START_GRACE
    }

    /// Creates the Node on its first report, adds new disks, records disk status and the
    /// heartbeat. Returns the node as it was before this report (none when new).
    async fn register(
        &self,
        r: &NodeReport,
        peer: Option<SocketAddr>,
    ) -> Result<Option<Node>, StoreError> {
        let before = self.store.get::<Node>(&r.node).await?;
        let node = match &before {
            Some(n) => {
                let missing: Vec<&pb::DiskReport> = r
                    .disks
                    .iter()
                    .filter(|d| !n.spec.disks.values().any(|s| s.path == d.path))
                    .collect();
                if !missing.is_empty() || (n.spec.zone.is_empty() && !r.zone.is_empty()) {
                    let zone = r.zone.clone();
                    let add: Vec<(String, DiskSpec)> = missing
                        .iter()
                        .map(|d| (disk_name(&d.path), disk_spec(d)))
                        .collect();
                    patch_spec::<Node, _>(&self.store, &r.node, move |o| {
                        for (k, v) in &add {
                            o.spec.disks.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                        if o.spec.zone.is_empty() {
                            o.spec.zone = zone.clone();
                        }
                    })
                    .await?
                    .unwrap_or_else(|| n.clone())
                } else {
                    n.clone()
                }
            }
            None => {
                info!(node = %r.node, disks = r.disks.len(), "node registered");
                let spec = NodeSpec {
                    allow_scheduling: true,
                    tags: Vec::new(),
                    zone: r.zone.clone(),
                    disks: r
                        .disks
                        .iter()
                        .map(|d| (disk_name(&d.path), disk_spec(d)))
                        .collect(),
                    eviction_requested: false,
                };
                self.store.create(&Node::new(&r.node, spec)).await?
            }
        };
        let old = node.status.clone().unwrap_or_default();
        let mut st = old.clone();
        st.address = r.address.clone();
        st.ublk = r.ublk;
        if let Some(p) = peer {
            st.agent_address = p.ip().to_string();
        }
        for (name, spec) in &node.spec.disks {
            let d = st
                .disks
                .entry(name.clone())
                .or_insert_with(DiskStatus::default);
            match r.disks.iter().find(|x| x.path == spec.path) {
                Some(x) => {
                    d.storage_maximum = x.capacity_bytes;
                    d.storage_available = x.free_bytes;
                    d.healthy = x.healthy;
                    let (s, reason, msg) = if x.healthy {
                        (
                            ConditionStatus::True,
                            "DiskReady",
                            "the agent reads and writes the disk".to_owned(),
                        )
                    } else {
                        (ConditionStatus::False, "DiskUnhealthy", x.message.clone())
                    };
                    set_condition(&mut d.conditions, "Ready", s, reason, &msg);
                }
                None => {
                    d.healthy = false;
                    set_condition(
                        &mut d.conditions,
                        "Ready",
                        ConditionStatus::False,
                        "DiskMissing",
                        "the agent does not report this disk (not given with --disk)",
                    );
                }
            }
        }
        set_condition(
            &mut st.conditions,
            "Ready",
            ConditionStatus::True,
            "AgentReporting",
            "the node's agent reports",
        );
        let heartbeat_due = old.last_heartbeat.as_ref().is_none_or(|t| {
            jiff::Timestamp::now().as_millisecond() - t.0.as_millisecond()
                >= HEARTBEAT_WRITE_PERIOD.as_millis() as i64
        });
        if heartbeat_due || differs(&old, &st) {
            st.last_heartbeat = Some(Time(jiff::Timestamp::now()));
            patch_status::<Node, _>(&self.store, &r.node, |o| {
                let s = o.status.get_or_insert_with(Default::default);
                s.address = st.address.clone();
                s.ublk = st.ublk;
                s.agent_address = st.agent_address.clone();
                s.last_heartbeat = st.last_heartbeat.clone();
                s.conditions = st.conditions.clone();
                for (k, d) in &st.disks {
                    let t = s.disks.entry(k.clone()).or_default();
                    t.storage_maximum = d.storage_maximum;
                    t.storage_available = d.storage_available;
                    t.healthy = d.healthy;
                    t.conditions = d.conditions.clone();
                }
            })
            .await?;
        }
        Ok(before)
    }
}

/// Whether the status changed in a way worth a write (free space moving by less than
/// 1% of the disk is not).
fn differs(a: &crate::resources::node::NodeStatus, b: &crate::resources::node::NodeStatus) -> bool {
    if a.address != b.address
        || a.ublk != b.ublk
        || a.conditions != b.conditions
        || a.disks.len() != b.disks.len()
    {
        return true;
    }
    a.disks.iter().any(|(k, x)| match b.disks.get(k) {
        None => true,
        Some(y) => {
            x.healthy != y.healthy
                || x.storage_maximum != y.storage_maximum
                || x.conditions != y.conditions
                || x.storage_available.abs_diff(y.storage_available) > y.storage_maximum / 100
        }
    })
}

fn disk_spec(d: &pb::DiskReport) -> DiskSpec {
    DiskSpec {
        path: d.path.clone(),
        allow_scheduling: true,
        storage_reserved: 0,
        tags: d.tags.clone(),
    }
}

/// A disk's name in the Node: its path's last component, lowercased to letters, digits and
/// '-', with a short hash of the whole path so two disks never share a name.
pub fn disk_name(path: &str) -> String {
    let last = std::path::Path::new(path)
        .file_name()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let mut base: String = last
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .chars()
        .take(40)
        .collect();
    if base.is_empty() {
        base = "disk".into();
    }
    format!("{base}-{:08x}", crc32(path.as_bytes()))
}

fn crc32(b: &[u8]) -> u32 {
    // FNV-1a, enough to tell paths apart.
    let mut h: u32 = 0x811c_9dc5;
    for x in b {
        h ^= u32::from(*x);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

fn state_of(s: i32) -> InstanceState {
    match pb::InstanceState::try_from(s) {
        Ok(pb::InstanceState::Starting) => InstanceState::Starting,
        Ok(pb::InstanceState::Running) => InstanceState::Running,
        Ok(pb::InstanceState::Failed) => InstanceState::Error,
        Ok(pb::InstanceState::Stopping) => InstanceState::Stopping,
        _ => InstanceState::Unknown,
    }
}

#[tonic::async_trait]
impl AgentManager for AgentService {
    async fn report(&self, req: Request<NodeReport>) -> Result<Response<NodeDesired>, Status> {
        self.check_token(&req)?;
        let peer = req.remote_addr();
        let r = req.into_inner();
        if r.node.is_empty()
            || !r
                .node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(Status::invalid_argument(format!(
                "bad node name {:?}: use letters, digits, '-' and '.'",
                r.node
            )));
        }
        let span = info_span!("agent_report", node = %r.node);
        match self.handle(r, peer).instrument(span).await {
            Ok(d) => Ok(Response::new(d)),
            Err(e) => {
                warn!(error = %e, "agent report");
                Err(Status::unavailable(format!("store: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names_are_stable_and_distinct() {
        let a = disk_name("/data/node-1/disk");
        assert_eq!(a, disk_name("/data/node-1/disk"));
        assert!(a.starts_with("disk-"));
        assert_ne!(a, disk_name("/data/node-2/disk"));
        assert!(disk_name("/").starts_with("disk-"));
        assert!(disk_name("/x/My Disk_1").starts_with("my-disk-1-"));
    }
}
