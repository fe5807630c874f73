//! Volume controller: everything that keeps one volume's replicas and engine as its spec
//! asks. One pass per volume, in this order:
//!
//! 1. **Observe**: the engine's view (modes, rebuild progress, size) when it runs.
//! 2. **Record**: a replica the engine dropped (ERR) or whose node has been silent longer
//!    than `node-down-timeout` gets `failedAt`; a replica the engine has RW gets `healthyAt`
//!    and loses `failedAt`. These marks are the manager's record of which replicas hold
//!    every acknowledged write: an engine is only ever started with those.
//! 3. **Replace**: a failed replica that cannot come back (its node is gone, its disk is
//!    unhealthy or gone, or its process has not run for `replica-replenishment-wait`) is
//!    removed from the engine and deleted — never the last copies of the data.
//! 4. **Scale**: fewer replicas than `numberOfReplicas` → new ones placed by the scheduler
//!    (the `Scheduled` condition says why not); more → the worst ones are deleted.
//! 5. **Attach/detach**: `spec.nodeId` set → an Engine on that node, started with the
//!    trusted replicas; unset or moved → the Engine is deleted (its agent stops it).
//! 6. **Heal**: a running replica that is not RW/WO in the engine (a new one, or one the
//!    engine dropped whose process is back) is added to the engine and rebuilt online; an
//!    engine member that is no replica of the volume is removed; expand and revert go
//!    through the engine.
//! 7. **Status**: state, robustness, endpoint, rebuild progress, conditions, I/O stats
//!    ([`super::stats`], sampled from the engine every couple of seconds).
//!
//! Replicas and engines whose volume no longer exists are deleted (their agents stop the
//! processes and remove the data).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};

use ironhorn_proto::engine as epb;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use tracing::{debug, info, warn};

use super::patch::{patch_spec, patch_status};
use super::world::World;
use super::{Context, Controller, ControllerError};
use crate::resources::condition::{ConditionStatus, set_condition};
use crate::resources::engine::{
    DesiredState, Engine, EngineSpec, InstanceState, RebuildStatus, ReplicaMode,
};
use crate::resources::replica::{Replica, ReplicaSpec};
use crate::resources::volume::{Robustness, Volume, VolumeState, VolumeStatus};
use crate::scheduler;

/// See the module documentation.
#[derive(Debug)]
pub struct VolumeController;

#[async_trait::async_trait]
impl Controller for VolumeController {
    fn name(&self) -> &'static str {
        "volume"
    }

    async fn reconcile(&self, ctx: &Context, world: &World) -> Result<(), ControllerError> {
        for r in &world.replicas {
            if world.volume(&r.spec.volume_name).is_none() {
                info!(replica = %r.name_any(), volume = %r.spec.volume_name, "deleting a replica of a deleted volume");
                super::patch::delete::<Replica>(&ctx.store, &r.name_any()).await?;
            }
        }
        for e in &world.engines {
            if world.volume(&e.spec.volume_name).is_none() {
                info!(engine = %e.name_any(), "deleting the engine of a deleted volume");
                super::patch::delete::<Engine>(&ctx.store, &e.name_any()).await?;
            }
        }
        // Replicas created or deleted this pass, so that later volumes' scheduling sees them.
        let mut placed = world.replicas.clone();
        // Rebuilds running per node, and those started this pass.
        let mut rebuilds = RebuildSlots::count(world);
        let mut first_error = None;
        for v in &world.volumes {
            if v.metadata.deletion_timestamp.is_some() {
                if let Err(e) = delete_volume(ctx, world, v).await {
                    warn!(volume = %v.name_any(), error = %e, "volume deletion");
                    first_error.get_or_insert(e);
                }
                continue;
            }
            if !v.finalizers().iter().any(|f| f == FINALIZER) {
                ctx.store
                    .add_finalizer::<Volume>(&v.name_any(), FINALIZER)
                    .await?;
            }
            if let Err(e) = reconcile_volume(ctx, world, v, &mut placed, &mut rebuilds).await {
                warn!(volume = %v.name_any(), error = %e, "volume reconcile failed");
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Whether `node`'s agent reports a usable ublk driver.
fn node_has_ublk(world: &World, node: &str) -> bool {
    world
        .node(node)
        .and_then(|n| n.status.as_ref())
        .is_some_and(|s| s.ublk)
}

/// Replica rebuilds running per node (counted on the node of the replica being rebuilt:
/// its disk takes the writes), for `concurrent-replica-rebuild-per-node-limit`.
#[derive(Debug, Default)]
struct RebuildSlots(BTreeMap<String, u32>);

impl RebuildSlots {
    /// The rebuilds the engines reported: replicas in WO mode.
    fn count(world: &World) -> RebuildSlots {
        let mut slots = RebuildSlots::default();
        for e in &world.engines {
            let Some(st) = &e.status else { continue };
            for (replica, mode) in &st.replica_modes {
                if *mode != ReplicaMode::WO {
                    continue;
                }
                if let Some(r) = world.replicas.iter().find(|r| r.name_any() == *replica) {
                    slots.start(&r.spec.node_id);
                }
            }
        }
        slots
    }

    /// Rebuilds running on `node`.
    fn on(&self, node: &str) -> u32 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// Counts one more rebuild on `node`.
    fn start(&mut self, node: &str) {
        *self.0.entry(node.to_owned()).or_default() += 1;
    }
}

/// Finalizer that keeps a deleted Volume until its engine and replicas are gone.
pub const FINALIZER: &str = "ironhorn.io/volume";

/// A deleted volume: its engine and replicas are deleted (the agents stop them and remove
/// the data); once no agent runs its engine any more, the finalizer goes and so does the
/// volume.
async fn delete_volume(ctx: &Context, world: &World, v: &Volume) -> Result<(), ControllerError> {
    let name = v.name_any();
    if v.status
        .as_ref()
        .is_none_or(|s| s.state != VolumeState::Deleting)
    {
        info!(volume = %name, "deleting the volume's engine and replicas");
        patch_status::<Volume, _>(&ctx.store, &name, |o| {
            let s = o.status.get_or_insert_with(Default::default);
            s.state = VolumeState::Deleting;
            s.endpoint = None;
            s.socket = None;
            s.device = None;
        })
        .await?;
    }
    if let Some(e) = world.engine_of(&name) {
        super::patch::delete::<Engine>(&ctx.store, &e.name_any()).await?;
    }
    for r in world.replicas_of(&name) {
        super::patch::delete::<Replica>(&ctx.store, &r.name_any()).await?;
    }
    let ename = engine_name(&name);
    let engine_runs = world
        .nodes
        .iter()
        .filter_map(|n| ctx.liveness.last_report(&n.name_any()))
        .any(|rep| rep.instances.iter().any(|i| i.name == ename));
    if !engine_runs {
        ctx.store
            .remove_finalizer::<Volume>(&name, FINALIZER)
            .await?;
        info!(volume = %name, "volume deleted");
    }
    Ok(())
}

/// Name of the engine of a volume (one per volume).
pub fn engine_name(volume: &str) -> String {
    format!("{volume}-e")
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn age_secs(t: &Time) -> i64 {
    (jiff::Timestamp::now().as_millisecond() - t.0.as_millisecond()) / 1000
}

fn random_suffix() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(jiff::Timestamp::now().as_nanosecond() as u128);
    format!("{:06x}", h.finish() & 0xff_ffff)
}

fn mode_of(m: i32) -> Option<ReplicaMode> {
    match epb::ReplicaMode::try_from(m) {
        Ok(epb::ReplicaMode::Rw) => Some(ReplicaMode::RW),
        Ok(epb::ReplicaMode::Wo) => Some(ReplicaMode::WO),
        Ok(epb::ReplicaMode::Err) => Some(ReplicaMode::ERR),
        _ => None,
    }
}

pub(crate) fn running_address(r: &Replica) -> Option<&str> {
    r.status
        .as_ref()
        .filter(|s| s.state == InstanceState::Running)
        .and_then(|s| s.control_address.as_deref())
}

/// Replicas that hold every acknowledged write as far as the manager knows: not failed,
/// and RW at some point (all of them, for a volume that never had an engine).
pub(crate) fn trusted<'a>(replicas: &[&'a Replica]) -> Vec<&'a Replica> {
    let ever = replicas.iter().any(|r| r.spec.healthy_at.is_some());
    replicas
        .iter()
        .copied()
        .filter(|r| r.spec.failed_at.is_none() && (!ever || r.spec.healthy_at.is_some()))
        .collect()
}

async fn reconcile_volume(
    ctx: &Context,
    world: &World,
    v: &Volume,
    placed: &mut Vec<Replica>,
    rebuilds: &mut RebuildSlots,
) -> Result<(), ControllerError> {
    let name = v.name_any();
    let want = v.spec.number_of_replicas as usize;
    let old_status = v.status.clone().unwrap_or_default();
    let mut st = old_status.clone();
    if st.current_size == 0 {
        st.current_size = v.spec.size;
    }
    let engine = world.engine_of(&name);
    let engine_addr = engine
        .and_then(|e| e.status.as_ref())
        .filter(|s| s.state == InstanceState::Running)
        .and_then(|s| s.control_address.clone());

    // 1. Observe.
    let info = match &engine_addr {
        Some(a) => match ctx.engines.info(a).await {
            Ok(i) => Some(i),
            Err(e) => {
                debug!(volume = %name, error = %e, "engine info");
                None
            }
        },
        None => None,
    };
    let mut stats_changed = false;
    match (&engine_addr, info.as_ref().and_then(|i| i.io.as_ref())) {
        (None, _) => {
            ctx.stats.forget(&name);
            stats_changed = st.stats.take().is_some();
        }
        (Some(_), Some(io)) => {
            if let Some(new) = ctx.stats.observe(&name, io, std::time::Instant::now())
                && super::stats::changed(st.stats.as_ref(), &new)
            {
                st.stats = Some(new);
                stats_changed = true;
            }
        }
        (Some(_), None) => {}
    }
    let mut replicas: Vec<Replica> = world.replicas_of(&name).cloned().collect();
    let by_addr: BTreeMap<String, String> = replicas
        .iter()
        .filter_map(|r| Some((r.status.as_ref()?.control_address.clone()?, r.name_any())))
        .collect();
    // replica name → (mode, rebuild done, rebuild total, message)
    let mut modes: BTreeMap<String, (ReplicaMode, u64, u64, String)> = BTreeMap::new();
    let mut strangers = Vec::new();
    if let Some(i) = &info {
        for m in &i.replicas {
            match (by_addr.get(&m.address), mode_of(m.mode)) {
                (Some(n), Some(mode)) => {
                    modes.insert(
                        n.clone(),
                        (
                            mode,
                            m.rebuild_done_bytes,
                            m.rebuild_total_bytes,
                            m.message.clone(),
                        ),
                    );
                }
                (None, _) => strangers.push(m.address.clone()),
                _ => {}
            }
        }
    }

    // 2. Record failures and health.
    for r in &mut replicas {
        let rname = r.name_any();
        let mode = modes.get(&rname).map(|m| m.0);
        let gone = world.node_gone(&ctx.liveness, &r.spec.node_id);
        let mut spec = r.spec.clone();
        if (mode == Some(ReplicaMode::ERR) || gone) && spec.failed_at.is_none() {
            warn!(volume = %name, replica = %rname, node = %r.spec.node_id, node_gone = gone, "replica failed");
            spec.failed_at = Some(now());
        }
        if mode == Some(ReplicaMode::RW) {
            if spec.failed_at.is_some() {
                info!(volume = %name, replica = %rname, "replica healthy again");
            }
            spec.failed_at = None;
            if spec.healthy_at.is_none() {
                spec.healthy_at = Some(now());
            }
        }
        if spec != r.spec {
            let (failed_at, healthy_at) = (spec.failed_at.clone(), spec.healthy_at.clone());
            if let Some(n) = patch_spec::<Replica, _>(&ctx.store, &rname, |o| {
                o.spec.failed_at = failed_at.clone();
                o.spec.healthy_at = healthy_at.clone();
            })
            .await?
            {
                *r = n;
            }
        }
    }

    // Each replica's mode in the engine and rebuild progress, for the API and UI (none
    // while the volume has no serving engine).
    for r in &replicas {
        let (mode, progress) = match (&info, modes.get(&r.name_any())) {
            (Some(_), Some(m)) => (
                Some(m.0),
                (m.0 == ReplicaMode::WO).then(|| percent(m.1, m.2)),
            ),
            _ => (None, None),
        };
        let cur = r.status.as_ref();
        if cur
            .map(|s| (s.mode, s.rebuild_progress))
            .unwrap_or_default()
            != (mode, progress)
        {
            patch_status::<Replica, _>(&ctx.store, &r.name_any(), |o| {
                let s = o.status.get_or_insert_with(Default::default);
                s.mode = mode;
                s.rebuild_progress = progress;
            })
            .await?;
        }
    }

    // 3. Replace failed replicas that cannot come back, keeping the last copies.
    let mut deleted = BTreeSet::new();
    let any_good = replicas.iter().any(|r| r.spec.failed_at.is_none());
    if any_good {
        for r in &replicas {
            let Some(failed_at) = &r.spec.failed_at else {
                continue;
            };
            let node = world.node(&r.spec.node_id);
            let disk_ok = node.is_some_and(|n| {
                n.spec.disks.contains_key(&r.spec.disk_name)
                    && n.status
                        .as_ref()
                        .and_then(|s| s.disks.get(&r.spec.disk_name))
                        .is_none_or(|d| d.healthy)
            });
            let not_back = running_address(r).is_none()
                && age_secs(failed_at) as u64
                    >= world.settings.replica_replenishment_wait.as_secs();
            let gone = world.node_gone(&ctx.liveness, &r.spec.node_id);
            if gone || !disk_ok || not_back {
                let why = if gone {
                    "its node is down"
                } else if !disk_ok {
                    "its disk is gone or unhealthy"
                } else {
                    "its process did not come back"
                };
                info!(volume = %name, replica = %r.name_any(), why, "replacing a failed replica");
                if let (Some(ea), Some(ra)) = (
                    &engine_addr,
                    r.status.as_ref().and_then(|s| s.control_address.as_deref()),
                ) && modes.contains_key(&r.name_any())
                    && let Err(e) = ctx.engines.remove_replica(ea, ra).await
                {
                    debug!(error = %e, "remove the replaced replica from the engine");
                }
                super::patch::delete::<Replica>(&ctx.store, &r.name_any()).await?;
                deleted.insert(r.name_any());
            }
        }
    }
    replicas.retain(|r| !deleted.contains(&r.name_any()));
    placed.retain(|r| !deleted.contains(&r.name_any()));

    // 4. Scale.
    let mut unschedulable = None;
    while replicas.len() < want {
        let req = scheduler::Request {
            volume: &name,
            size: st.current_size,
            node_selector: &v.spec.node_selector,
            disk_selector: &v.spec.disk_selector,
        };
        match scheduler::schedule(
            &req,
            &world.nodes,
            &world.ready_nodes(),
            placed,
            &world.settings.policy,
        ) {
            Ok(p) => {
                let rname = format!("{name}-r-{}", random_suffix());
                let dir = std::path::Path::new(&p.disk_path)
                    .join("replicas")
                    .join(&rname);
                let r = Replica::new(
                    &rname,
                    ReplicaSpec {
                        volume_name: name.clone(),
                        node_id: p.node.clone(),
                        disk_name: p.disk.clone(),
                        data_dir: dir.display().to_string(),
                        size: st.current_size,
                        // Stopped until restored when the volume comes from a backup.
                        desired_state: super::restore::replica_start_state(v),
                        failed_at: None,
                        healthy_at: None,
                    },
                );
                let r = ctx.store.create(&r).await?;
                info!(volume = %name, replica = %rname, node = %p.node, disk = %p.disk, "replica scheduled");
                placed.push(r.clone());
                replicas.push(r);
            }
            Err(e) => {
                unschedulable = Some(e.reason);
                break;
            }
        }
    }
    match &unschedulable {
        None => set_condition(
            &mut st.conditions,
            "Scheduled",
            ConditionStatus::True,
            "ReplicasScheduled",
            &format!("{} replica(s) placed", replicas.len()),
        ),
        Some(reason) => set_condition(
            &mut st.conditions,
            "Scheduled",
            ConditionStatus::False,
            "ReplicaSchedulingFailure",
            &format!("{} of {want} replica(s) placed; {reason}", replicas.len()),
        ),
    };
    if replicas.len() > want {
        // Worst first: failed, then not RW, then the newest.
        let mut order: Vec<&Replica> = replicas.iter().collect();
        order.sort_by_key(|r| {
            let rw = modes
                .get(&r.name_any())
                .is_some_and(|m| m.0 == ReplicaMode::RW);
            (
                r.spec.failed_at.is_none(),
                rw,
                std::cmp::Reverse(r.metadata.creation_timestamp.clone().map(|t| t.0)),
            )
        });
        let rw_total = modes.values().filter(|m| m.0 == ReplicaMode::RW).count();
        let mut rw_left = rw_total;
        let extra = replicas.len() - want;
        let mut gone = BTreeSet::new();
        for r in order.into_iter().take(extra) {
            let rw = modes
                .get(&r.name_any())
                .is_some_and(|m| m.0 == ReplicaMode::RW);
            if rw && rw_left <= 1 {
                break;
            }
            if rw {
                rw_left -= 1;
            }
            if let (Some(ea), Some(ra)) = (&engine_addr, running_address(r))
                && modes.contains_key(&r.name_any())
                && let Err(e) = ctx.engines.remove_replica(ea, ra).await
            {
                warn!(error = %e, "remove an extra replica from the engine");
                continue;
            }
            info!(volume = %name, replica = %r.name_any(), "deleting an extra replica");
            super::patch::delete::<Replica>(&ctx.store, &r.name_any()).await?;
            gone.insert(r.name_any());
        }
        replicas.retain(|r| !gone.contains(&r.name_any()));
        placed.retain(|r| !gone.contains(&r.name_any()));
    }

    // 5. Attach / detach.
    let refs: Vec<&Replica> = replicas.iter().collect();
    let ename = engine_name(&name);
    match (&v.spec.node_id, engine) {
        (None, Some(e)) => {
            info!(volume = %name, node = %e.spec.node_id, "detaching");
            super::patch::delete::<Engine>(&ctx.store, &e.name_any()).await?;
            if let Some(a) = &engine_addr {
                ctx.engines.forget(a);
            }
            st.state = VolumeState::Detaching;
        }
        (Some(node), Some(e)) if &e.spec.node_id != node => {
            info!(volume = %name, from = %e.spec.node_id, to = %node, "moving the engine");
            super::patch::delete::<Engine>(&ctx.store, &e.name_any()).await?;
            st.state = VolumeState::Detaching;
        }
        (None, None) => {
            let still = world
                .nodes
                .iter()
                .filter_map(|n| ctx.liveness.last_report(&n.name_any()))
                .any(|rep| rep.instances.iter().any(|i| i.name == ename));
            st.state = if still {
                VolumeState::Detaching
            } else if replicas.is_empty() || replicas.iter().all(|r| running_address(r).is_none()) {
                if st.state == VolumeState::Creating {
                    VolumeState::Creating
                } else {
                    VolumeState::Detached
                }
            } else {
                VolumeState::Detached
            };
            st.current_node = None;
            st.endpoint = None;
            st.socket = None;
            st.device = None;
        }
        (Some(node), None) => {
            let start: BTreeMap<String, String> = trusted(&refs)
                .into_iter()
                .filter_map(|r| Some((r.name_any(), running_address(r)?.to_owned())))
                .collect();
            if start.is_empty() {
                set_condition(
                    &mut st.conditions,
                    "Attached",
                    ConditionStatus::False,
                    "WaitingForReplicas",
                    "no replica holding the volume's data is running yet",
                );
            } else if world.node(node).is_none() {
                set_condition(
                    &mut st.conditions,
                    "Attached",
                    ConditionStatus::False,
                    "UnknownNode",
                    &format!("node {node} has not registered"),
                );
            } else if v
                .spec
                .frontend
                .resolve(node_has_ublk(world, node))
                .is_none()
            {
                set_condition(
                    &mut st.conditions,
                    "Attached",
                    ConditionStatus::False,
                    "NoUblk",
                    &format!(
                        "the volume's frontend is ublk but node {node} has no usable ublk driver (modprobe ublk_drv, and run the agent without --no-ublk), or use frontend auto"
                    ),
                );
            } else {
                info!(volume = %name, %node, replicas = ?start.keys().collect::<Vec<_>>(), "attaching");
                let e = Engine::new(
                    &ename,
                    EngineSpec {
                        volume_name: name.clone(),
                        node_id: node.clone(),
                        size: st.current_size,
                        frontend: v
                            .spec
                            .frontend
                            .resolve(node_has_ublk(world, node))
                            .unwrap_or_default(),
                        replica_addresses: start,
                        desired_state: DesiredState::Running,
                    },
                );
                ctx.store.create(&e).await?;
            }
            st.state = VolumeState::Attaching;
        }
        (Some(node), Some(e)) => {
            let es = e.status.clone().unwrap_or_default();
            if es.state == InstanceState::Running && info.is_some() {
                st.state = VolumeState::Attached;
                st.current_node = Some(node.clone());
                st.endpoint = es.endpoint.clone();
                st.socket = es.socket.clone();
                st.device = es.device.clone();
                set_condition(
                    &mut st.conditions,
                    "Attached",
                    ConditionStatus::True,
                    "EngineRunning",
                    &format!("engine running on {node}"),
                );
            } else {
                // Not serving now: the agent of its node reports it not running (after a
                // whole-cluster restart, say), or it was never attached.
                let reported_down = ctx.liveness.last_report(node).is_some_and(|rep| {
                    !rep.instances.iter().any(|i| {
                        i.name == e.name_any()
                            && i.state == ironhorn_proto::agent::InstanceState::Running as i32
                    })
                });
                if st.state != VolumeState::Attached || reported_down {
                    st.state = VolumeState::Attaching;
                    st.robustness = Robustness::Unknown;
                }
            }
        }
    }

    // 6. Heal, expand, revert through the running engine.
    let mut revert_done = false;
    if let (Some(e), Some(ea), Some(i)) = (engine, &engine_addr, &info) {
        let members: BTreeMap<&str, i32> = i
            .replicas
            .iter()
            .map(|m| (m.address.as_str(), m.mode))
            .collect();
        for a in &strangers {
            info!(volume = %name, replica = %a, "removing an engine member that is no replica of the volume");
            if let Err(err) = ctx.engines.remove_replica(ea, a).await {
                debug!(error = %err, "remove a stranger");
            }
        }
        let rebuilding = i
            .replicas
            .iter()
            .any(|m| mode_of(m.mode) == Some(ReplicaMode::WO));
        if !rebuilding {
            // One rebuild at a time (the engine refuses a second).
            let next = replicas.iter().find(|r| {
                let Some(a) = running_address(r) else {
                    return false;
                };
                let ready = world.ready_nodes().contains(&r.spec.node_id);
                let member = members.get(a).and_then(|m| mode_of(*m));
                ready && !matches!(member, Some(ReplicaMode::RW) | Some(ReplicaMode::WO))
            });
            if let Some(r) = next
                && let Some(a) = running_address(r)
            {
                let node = &r.spec.node_id;
                let limit = world.settings.rebuilds_per_node;
                let running = rebuilds.on(node);
                if running >= limit {
                    debug!(volume = %name, replica = %r.name_any(), %node, running, limit, "rebuild waits for a slot");
                    set_condition(
                        &mut st.conditions,
                        "Rebuild",
                        ConditionStatus::False,
                        "WaitingForRebuildSlot",
                        &format!(
                            "replica {} waits: node {node} already rebuilds {running} replica(s) (concurrent-replica-rebuild-per-node-limit is {limit})",
                            r.name_any()
                        ),
                    );
                } else {
                    info!(volume = %name, replica = %r.name_any(), address = a, "adding a replica to the engine (online rebuild)");
                    match ctx.engines.add_replica(ea, a).await {
                        Ok(_) => {
                            rebuilds.start(node);
                            set_condition(
                                &mut st.conditions,
                                "Rebuild",
                                ConditionStatus::True,
                                "RebuildStarted",
                                &format!("rebuilding replica {} on node {node}", r.name_any()),
                            );
                        }
                        Err(err) => warn!(volume = %name, error = %err, "add replica"),
                    }
                }
            }
        }
        if v.spec.size > i.size {
            info!(volume = %name, from = i.size, to = v.spec.size, "expanding");
            ctx.engines.expand(ea, v.spec.size).await?;
            st.current_size = v.spec.size;
        } else {
            st.current_size = i.size;
        }
        if let Some(snap) = &v.spec.revert_to_snapshot {
            match ctx.engines.revert(ea, snap).await {
                Ok(()) => {
                    info!(volume = %name, snapshot = %snap, "reverted");
                    set_condition(
                        &mut st.conditions,
                        "Reverted",
                        ConditionStatus::True,
                        "Reverted",
                        &format!("reverted to snapshot {snap}"),
                    );
                    revert_done = true;
                }
                Err(err) => {
                    set_condition(
                        &mut st.conditions,
                        "Reverted",
                        ConditionStatus::False,
                        "RevertFailed",
                        &err.to_string(),
                    );
                    if err.code == tonic::Code::NotFound || err.code == tonic::Code::InvalidArgument
                    {
                        revert_done = true;
                    }
                }
            }
        }
        // Engine status, and the replicas a restart of the engine starts with.
        let mut es = e.status.clone().unwrap_or_default();
        es.current_size = i.size;
        es.replica_modes = modes.iter().map(|(n, m)| (n.clone(), m.0)).collect();
        es.rebuild_status = modes
            .iter()
            .filter(|(_, m)| m.0 == ReplicaMode::WO)
            .map(|(n, m)| {
                (
                    n.clone(),
                    RebuildStatus {
                        in_progress: true,
                        progress: percent(m.1, m.2),
                        from_replica: String::new(),
                        error: None,
                    },
                )
            })
            .collect();
        if e.status.as_ref() != Some(&es) {
            patch_status::<Engine, _>(&ctx.store, &e.name_any(), |o| {
                let s = o.status.get_or_insert_with(Default::default);
                s.current_size = es.current_size;
                s.replica_modes = es.replica_modes.clone();
                s.rebuild_status = es.rebuild_status.clone();
            })
            .await?;
        }
        let rw: BTreeMap<String, String> = replicas
            .iter()
            .filter(|r| {
                modes
                    .get(&r.name_any())
                    .is_some_and(|m| m.0 == ReplicaMode::RW)
            })
            .filter_map(|r| Some((r.name_any(), running_address(r)?.to_owned())))
            .collect();
        if !rw.is_empty() && rw != e.spec.replica_addresses {
            patch_spec::<Engine, _>(&ctx.store, &e.name_any(), |o| {
                o.spec.replica_addresses = rw.clone();
            })
            .await?;
        }
    }
    // A detached volume reverts replica by replica (no engine, so no write in between).
    if engine.is_none()
        && v.spec.node_id.is_none()
        && let Some(snap) = &v.spec.revert_to_snapshot
    {
        let t = trusted(&refs);
        let targets: Vec<(&Replica, &str)> = t
            .iter()
            .filter_map(|r| Some((*r, running_address(r)?)))
            .collect();
        if targets.is_empty() || targets.len() < t.len() {
            set_condition(
                &mut st.conditions,
                "Reverted",
                ConditionStatus::False,
                "WaitingForReplicas",
                &format!("waiting for every replica to run to revert to {snap}"),
            );
        } else {
            let (mut ok, mut missing, mut errors) = (Vec::new(), 0, Vec::new());
            for (r, a) in &targets {
                match super::replica_client::revert(a, snap).await {
                    Ok(()) => ok.push(r.name_any()),
                    Err(e) if e.code == tonic::Code::NotFound => missing += 1,
                    Err(e) => errors.push((r.name_any(), e.to_string())),
                }
            }
            if !ok.is_empty() {
                // Replicas that could not revert missed it: they are rebuilt on attach.
                for (rn, why) in errors.iter() {
                    warn!(volume = %name, replica = %rn, error = %why, "replica did not revert; marking it failed");
                    patch_spec::<Replica, _>(&ctx.store, rn, |o| {
                        if o.spec.failed_at.is_none() {
                            o.spec.failed_at = Some(now());
                        }
                    })
                    .await?;
                }
                info!(volume = %name, snapshot = %snap, replicas = ok.len(), "reverted");
                set_condition(
                    &mut st.conditions,
                    "Reverted",
                    ConditionStatus::True,
                    "Reverted",
                    &format!("reverted to snapshot {snap}"),
                );
                revert_done = true;
            } else if missing > 0 && errors.is_empty() {
                set_condition(
                    &mut st.conditions,
                    "Reverted",
                    ConditionStatus::False,
                    "SnapshotNotFound",
                    &format!("no replica holds snapshot {snap}"),
                );
                revert_done = true;
            } else {
                let msg = errors
                    .iter()
                    .map(|(r, e)| format!("{r}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                set_condition(
                    &mut st.conditions,
                    "Reverted",
                    ConditionStatus::False,
                    "RevertFailed",
                    &msg,
                );
            }
        }
    }
    if revert_done {
        patch_spec::<Volume, _>(&ctx.store, &name, |o| o.spec.revert_to_snapshot = None).await?;
    }

    // 7. Status.
    let rw = modes.values().filter(|m| m.0 == ReplicaMode::RW).count();
    st.healthy_replicas = rw as u32;
    // What the volume takes on one disk: its largest replica (they differ while one is
    // rebuilt, and by snapshots' history).
    st.actual_size = refs
        .iter()
        .filter_map(|r| r.status.as_ref().map(|s| s.actual_size))
        .max()
        .unwrap_or(0);
    st.rebuild_progress = modes
        .values()
        .find(|m| m.0 == ReplicaMode::WO)
        .map(|m| percent(m.1, m.2));
    if info.is_some() {
        st.robustness = robustness(rw, want);
    } else if engine.is_none() {
        let usable = trusted(&refs)
            .into_iter()
            .filter(|r| running_address(r).is_some())
            .count();
        st.healthy_replicas = usable as u32;
        st.robustness = if replicas.is_empty() || st.state == VolumeState::Creating {
            Robustness::Unknown
        } else {
            robustness(usable, want)
        };
    }
    let healthy_msg = match st.robustness {
        Robustness::Healthy => format!("{} of {want} replicas healthy", st.healthy_replicas),
        Robustness::Degraded => {
            let mut m = format!("{} of {want} replicas healthy", st.healthy_replicas);
            if st.rebuild_progress.is_some() {
                m.push_str("; a replica is being rebuilt");
            }
            if let Some(reason) = &unschedulable {
                m.push_str("; cannot heal: ");
                m.push_str(reason);
            }
            m
        }
        Robustness::Faulted => "no healthy replica: I/O fails".to_owned(),
        Robustness::Unknown => "not known yet".to_owned(),
    };
    let (cs, reason) = match st.robustness {
        Robustness::Healthy => (ConditionStatus::True, "Healthy"),
        Robustness::Degraded if unschedulable.is_some() => (ConditionStatus::False, "CannotHeal"),
        Robustness::Degraded => (ConditionStatus::False, "Degraded"),
        Robustness::Faulted => (ConditionStatus::False, "Faulted"),
        Robustness::Unknown => (ConditionStatus::Unknown, "Unknown"),
    };
    set_condition(&mut st.conditions, "Healthy", cs, reason, &healthy_msg);
    st.observed_generation = v.metadata.generation.unwrap_or(0);
    if st != old_status {
        patch_status::<Volume, _>(&ctx.store, &name, |o| {
            // Fields other controllers (backups, restores) own are kept.
            let mut n = st.clone();
            if let Some(prev) = &o.status {
                n.restore_progress = prev.restore_progress;
                n.last_backup = prev.last_backup.clone();
                n.last_backup_at = prev.last_backup_at.clone();
                if !stats_changed {
                    n.stats = prev.stats.clone();
                }
                for c in &prev.conditions {
                    if !n.conditions.iter().any(|x| x.type_ == c.type_) {
                        n.conditions.push(c.clone());
                    }
                }
            }
            o.status = Some(n);
        })
        .await?;
    }
    Ok(())
}

fn percent(done: u64, total: u64) -> u8 {
    if total == 0 {
        0
    } else {
        ((u128::from(done) * 100 / u128::from(total)).min(100)) as u8
    }
}

fn robustness(rw: usize, want: usize) -> Robustness {
    match rw {
        0 => Robustness::Faulted,
        n if n >= want => Robustness::Healthy,
        _ => Robustness::Degraded,
    }
}

/// Status of a volume with no controller pass yet (for tests and the API).
pub fn initial_status() -> VolumeStatus {
    VolumeStatus::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::engine::EngineStatus;

    #[test]
    fn robustness_and_percent() {
        assert_eq!(robustness(0, 3), Robustness::Faulted);
        assert_eq!(robustness(2, 3), Robustness::Degraded);
        assert_eq!(robustness(3, 3), Robustness::Healthy);
        assert_eq!(percent(0, 0), 0);
        assert_eq!(percent(50, 100), 50);
        assert_eq!(percent(200, 100), 100);
    }

    #[test]
    fn rebuild_slots_count_write_only_replicas_on_their_nodes() {
        let replica = |name: &str, node: &str| {
            let spec: ReplicaSpec = serde_json::from_value(serde_json::json!({
                "volumeName": "v", "nodeId": node, "diskName": "d", "dataDir": "/d", "size": 4096
            }))
            .expect("replica spec");
            Replica::new(name, spec)
        };
        let mut e = Engine::new(
            "v-e",
            EngineSpec {
                volume_name: "v".into(),
                node_id: "n1".into(),
                size: 4096,
                frontend: Default::default(),
                replica_addresses: BTreeMap::new(),
                desired_state: DesiredState::Running,
            },
        );
        e.status = Some(EngineStatus {
            replica_modes: BTreeMap::from([
                ("r1".to_owned(), ReplicaMode::RW),
                ("r2".to_owned(), ReplicaMode::WO),
                ("r3".to_owned(), ReplicaMode::WO),
            ]),
            ..Default::default()
        });
        let world = World {
            replicas: vec![
                replica("r1", "n1"),
                replica("r2", "n2"),
                replica("r3", "n2"),
            ],
            engines: vec![e],
            ..Default::default()
        };
        let mut slots = RebuildSlots::count(&world);
        assert_eq!(slots.on("n1"), 0);
        assert_eq!(slots.on("n2"), 2);
        slots.start("n3");
        assert_eq!(slots.on("n3"), 1);
    }
}
