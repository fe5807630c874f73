//! Snapshot controller: a Snapshot resource is taken on its volume's running engine (the
//! engine snapshots every replica at the same point of the write stream), and a deleted one
//! is removed (purged into its child) on the engine before the resource goes. The
//! engine's snapshot is named like the resource.

use kube::ResourceExt;
use tracing::{info, warn};

use super::patch::{patch_spec, patch_status};
use super::world::World;
use super::{Context, Controller, ControllerError};
use crate::resources::condition::{ConditionStatus, set_condition};
use crate::resources::engine::InstanceState;
use crate::resources::snapshot::Snapshot;

/// Finalizer that keeps a Snapshot until the engine removed it.
pub const FINALIZER: &str = "ironhorn.io/snapshot";

/// See the module documentation.
#[derive(Debug)]
pub struct SnapshotController;

#[async_trait::async_trait]
impl Controller for SnapshotController {
    fn name(&self) -> &'static str {
        "snapshot"
    }

    async fn reconcile(&self, ctx: &Context, world: &World) -> Result<(), ControllerError> {
        for s in &world.snapshots {
            let name = s.name_any();
            let volume = world.volume(&s.spec.volume);
            let engine = world
                .engine_of(&s.spec.volume)
                .and_then(|e| e.status.as_ref())
                .filter(|st| st.state == InstanceState::Running)
                .and_then(|st| st.control_address.clone());
            if s.metadata.deletion_timestamp.is_some() {
                let removed = match (&engine, volume) {
                    (_, None) => true,
                    (Some(a), Some(_)) => match ctx.engines.remove_snapshot(a, &name).await {
                        Ok(()) => true,
                        Err(e) if e.code == tonic::Code::NotFound => true,
                        Err(e) => {
                            warn!(snapshot = %name, error = %e, "remove snapshot");
                            false
                        }
                    },
                    (None, Some(v)) => match detached_targets(world, v) {
                        Some(targets) => {
                            let mut done = true;
                            for a in targets {
                                match super::replica_client::remove_snapshot(&a, &name).await {
                                    Ok(()) => {}
                                    Err(e) if e.code == tonic::Code::NotFound => {}
                                    Err(e) => {
                                        warn!(snapshot = %name, error = %e, "remove snapshot");
                                        done = false;
                                    }
                                }
                            }
                            done
                        }
                        // Removed once the replicas run (or the volume is attached).
                        None => false,
                    },
                };
                if removed {
                    info!(snapshot = %name, volume = %s.spec.volume, "snapshot removed");
                    patch_spec::<Snapshot, _>(&ctx.store, &name, |o| {
                        if let Some(f) = o.metadata.finalizers.as_mut() {
                            f.retain(|f| f != FINALIZER);
                        }
                    })
                    .await?;
                }
                continue;
            }
            if volume.is_none() {
                super::patch::delete::<Snapshot>(&ctx.store, &name).await?;
                continue;
            }
            let ready = s.status.as_ref().is_some_and(|st| st.ready_to_use);
            if ready {
                continue;
            }
            let mut st = s.status.clone().unwrap_or_default();
            match &engine {
                None => match volume.and_then(|v| detached_targets(world, v)) {
                    Some(targets) => {
                        // Detached: no writes can come in between, so snapshotting each
                        // replica in turn gives the same snapshot everywhere.
                        let mut errors = Vec::new();
                        for a in &targets {
                            match super::replica_client::snapshot(a, &name, s.spec.labels.clone())
                                .await
                            {
                                Ok(()) => {}
                                Err(e) if e.code == tonic::Code::AlreadyExists => {}
                                Err(e) => errors.push(e.to_string()),
                            }
                        }
                        if errors.is_empty() {
                            ctx.store
                                .add_finalizer::<Snapshot>(&name, FINALIZER)
                                .await?;
                            st.ready_to_use = true;
                            st.error = None;
                            st.creation_time =
                                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                                    jiff::Timestamp::now(),
                                ));
                            set_condition(
                                &mut st.conditions,
                                "Ready",
                                ConditionStatus::True,
                                "Taken",
                                "every replica holds the snapshot",
                            );
                            info!(snapshot = %name, volume = %s.spec.volume, "snapshot taken on the replicas of a detached volume");
                        } else {
                            st.error = Some(errors.join("; "));
                            set_condition(
                                &mut st.conditions,
                                "Ready",
                                ConditionStatus::False,
                                "SnapshotFailed",
                                &errors.join("; "),
                            );
                        }
                    }
                    None => {
                        set_condition(
                            &mut st.conditions,
                            "Ready",
                            ConditionStatus::False,
                            "WaitingForVolume",
                            "the volume's engine or replicas are not running yet; the snapshot is taken once they are",
                        );
                    }
                },
                Some(a) => {
                    if !s.finalizers().iter().any(|f| f == FINALIZER) {
                        patch_spec::<Snapshot, _>(&ctx.store, &name, |o| {
                            let f = o.metadata.finalizers.get_or_insert_with(Vec::new);
                            if !f.iter().any(|f| f == FINALIZER) {
                                f.push(FINALIZER.to_owned());
                            }
                        })
                        .await?;
                    }
                    match ctx
                        .engines
                        .create_snapshot(a, &name, s.spec.labels.clone())
                        .await
                    {
                        Ok(_) => {}
                        // Taken already (a pass that died before recording it).
                        Err(e) if e.code == tonic::Code::AlreadyExists => {}
                        Err(e) => {
                            st.error = Some(e.to_string());
                            set_condition(
                                &mut st.conditions,
                                "Ready",
                                ConditionStatus::False,
                                "SnapshotFailed",
                                &e.to_string(),
                            );
                            patch_status::<Snapshot, _>(&ctx.store, &name, |o| {
                                o.status = Some(st.clone());
                            })
                            .await?;
                            continue;
                        }
                    }
                    let list = ctx.engines.snapshots(a).await?;
                    let taken = list.snapshots.iter().find(|x| x.name == name);
                    st.ready_to_use = taken.is_some();
                    st.error = None;
                    if let Some(t) = taken {
                        st.parent = (!t.parent.is_empty()).then(|| t.parent.clone());
                        st.creation_time = jiff::Timestamp::from_millisecond(t.created_unix_ms)
                            .ok()
                            .map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
                    }
                    st.size = world
                        .volume(&s.spec.volume)
                        .and_then(|v| v.status.as_ref())
                        .map(|v| v.current_size)
                        .unwrap_or(0);
                    set_condition(
                        &mut st.conditions,
                        "Ready",
                        ConditionStatus::True,
                        "Taken",
                        "every replica holds the snapshot",
                    );
                    info!(snapshot = %name, volume = %s.spec.volume, "snapshot taken");
                    patch_status::<Snapshot, _>(&ctx.store, &name, |o| {
                        o.status = Some(st.clone());
                    })
                    .await?;
                    continue;
                }
            }
            if s.status.as_ref() != Some(&st) {
                patch_status::<Snapshot, _>(&ctx.store, &name, |o| {
                    o.status = Some(st.clone());
                })
                .await?;
            }
        }
        Ok(())
    }
}

/// Control addresses of the replicas to snapshot directly: the volume is detached (no
/// engine resource, no node asked for) and every trusted replica runs. `None` otherwise.
fn detached_targets(world: &World, v: &crate::resources::volume::Volume) -> Option<Vec<String>> {
    let name = v.name_any();
    if v.spec.node_id.is_some() || world.engine_of(&name).is_some() {
        return None;
    }
    let reps: Vec<&crate::resources::replica::Replica> = world.replicas_of(&name).collect();
    let trusted = super::volume::trusted(&reps);
    let addrs: Vec<String> = trusted
        .iter()
        .filter_map(|r| super::volume::running_address(r).map(str::to_owned))
        .collect();
    (!addrs.is_empty() && addrs.len() == trusted.len()).then_some(addrs)
}
