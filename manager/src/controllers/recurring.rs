//! Recurring-job controller: a RecurringJob fires on its cron schedule (UTC, see
//! [`super::cron`]) and creates a Snapshot (task `snapshot`) or a Backup (task `backup`)
//! of each volume it applies to (`spec.volumes`, or every volume when empty), labelled
//! `recurring-job: NAME`; the snapshot and backup controllers do the work. Of what a job
//! created for a volume, only the newest `retain` are kept: older ones are deleted (their
//! finalizers remove them from the replicas or the target). A run missed while the manager
//! was down fires once when it is back.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use tracing::{info, warn};

use super::cron::Schedule;
use super::patch::{delete, patch_status};
use super::world::World;
use super::{Context, Controller, ControllerError};
use crate::resources::condition::{ConditionStatus, set_condition};
use crate::resources::recurring_job::{RecurringJob, RecurringTask};
use crate::resources::snapshot::{Snapshot, SnapshotSpec};
use crate::resources::{Backup, BackupSpec, BackupState};

/// Label on the snapshots and backups a recurring job created: the job's name.
pub const JOB_LABEL: &str = "recurring-job";

/// See the module documentation.
#[derive(Debug, Default)]
pub struct RecurringJobController;

fn created_by(labels: &BTreeMap<String, String>, job: &str) -> bool {
    labels.get(JOB_LABEL).is_some_and(|j| j == job)
}

/// Sort key: oldest first.
fn age_key<K: kube::Resource>(o: &K) -> (Option<jiff::Timestamp>, String) {
    (
        o.meta().creation_timestamp.as_ref().map(|t| t.0),
        o.meta().name.clone().unwrap_or_default(),
    )
}

impl RecurringJobController {
    async fn fire(
        &self,
        ctx: &Context,
        world: &World,
        job: &RecurringJob,
        now: jiff::Timestamp,
    ) -> Result<(), ControllerError> {
        let jname = job.name_any();
        let stamp = now.strftime("%Y%m%d-%H%M%S").to_string();
        for v in world.volumes.iter().filter(|v| {
            v.metadata.deletion_timestamp.is_none()
                && (job.spec.volumes.is_empty() || job.spec.volumes.contains(&v.name_any()))
        }) {
            let vname = v.name_any();
            let name = format!("{vname}-{jname}-{stamp}");
            let labels = BTreeMap::from([(JOB_LABEL.to_owned(), jname.clone())]);
            let created = match job.spec.task {
                RecurringTask::Snapshot => ctx
                    .store
                    .create(&Snapshot::new(
                        &name,
                        SnapshotSpec {
                            volume: vname.clone(),
                            labels,
                        },
                    ))
                    .await
                    .map(|_| ()),
                RecurringTask::Backup => ctx
                    .store
                    .create(&Backup::new(
                        &name,
                        BackupSpec {
                            volume: vname.clone(),
                            snapshot: None,
                            labels,
                        },
                    ))
                    .await
                    .map(|_| ()),
            };
            match created {
                Ok(()) => {
                    info!(job = %jname, volume = %vname, %name, task = ?job.spec.task, "recurring job fired")
                }
                Err(crate::store::StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Deletes what `job` created beyond its `retain` newest, per volume.
    async fn retain(&self, ctx: &Context, job: &RecurringJob) -> Result<(), ControllerError> {
        let jname = job.name_any();
        let keep = job.spec.retain.max(1) as usize;
        let backups: Vec<Backup> = ctx.store.list::<Backup>().await?;
        let mut by_volume: BTreeMap<String, Vec<&Backup>> = BTreeMap::new();
        for b in backups.iter().filter(|b| {
            b.metadata.deletion_timestamp.is_none() && created_by(&b.spec.labels, &jname)
        }) {
            by_volume.entry(b.spec.volume.clone()).or_default().push(b);
        }
        for list in by_volume.values_mut() {
            list.sort_by_key(|b| age_key(*b));
            let excess = list.len().saturating_sub(keep);
            for b in &list[..excess] {
                // An unfinished backup is removed once it ended (its id is known then).
                let finished = b.status.as_ref().is_some_and(|st| {
                    matches!(st.state, BackupState::Completed | BackupState::Error)
                });
                if !finished {
                    continue;
                }
                info!(job = %jname, backup = %b.name_any(), "retention: deleting an old backup");
                delete::<Backup>(&ctx.store, &b.name_any()).await?;
            }
        }
        let snaps: Vec<Snapshot> = ctx.store.list::<Snapshot>().await?;
        let mut by_volume: BTreeMap<String, Vec<&Snapshot>> = BTreeMap::new();
        for s in snaps.iter().filter(|s| {
            s.metadata.deletion_timestamp.is_none() && created_by(&s.spec.labels, &jname)
        }) {
            by_volume.entry(s.spec.volume.clone()).or_default().push(s);
        }
        for list in by_volume.values_mut() {
            list.sort_by_key(|s| age_key(*s));
            let excess = list.len().saturating_sub(keep);
            for s in &list[..excess] {
                // Never under a backup that is still reading it.
                let busy = backups.iter().any(|b| {
                    b.spec.snapshot.as_deref() == Some(&s.name_any())
                        && b.metadata.deletion_timestamp.is_none()
                        && !b.status.as_ref().is_some_and(|st| {
                            matches!(st.state, BackupState::Completed | BackupState::Error)
                        })
                });
                if busy {
                    continue;
                }
                info!(job = %jname, snapshot = %s.name_any(), "retention: deleting an old snapshot");
                delete::<Snapshot>(&ctx.store, &s.name_any()).await?;
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Controller for RecurringJobController {
    fn name(&self) -> &'static str {
        "recurring-job"
    }

    async fn reconcile(&self, ctx: &Context, world: &World) -> Result<(), ControllerError> {
        for job in ctx.store.list::<RecurringJob>().await? {
            if job.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let jname = job.name_any();
            let old = job.status.clone().unwrap_or_default();
            let mut st = old.clone();
            let now = jiff::Timestamp::now();
            match Schedule::parse(&job.spec.cron) {
                Err(e) => {
                    st.next_run = None;
                    set_condition(
                        &mut st.conditions,
                        "Ready",
                        ConditionStatus::False,
                        "BadSchedule",
                        &e.to_string(),
                    );
                }
                Ok(schedule) => {
                    let due = st.next_run.as_ref().is_some_and(|t| t.0 <= now);
                    if due {
                        if let Err(e) = self.fire(ctx, world, &job, now).await {
                            warn!(job = %jname, error = %e, "recurring job");
                            return Err(e);
                        }
                        st.last_run = Some(Time(now));
                    }
                    if due || st.next_run.is_none() {
                        st.next_run = schedule.next_after(now).map(Time);
                    }
                    let msg = match &st.next_run {
                        Some(t) => format!("next run at {}", t.0),
                        None => "the schedule never fires".to_owned(),
                    };
                    set_condition(
                        &mut st.conditions,
                        "Ready",
                        ConditionStatus::True,
                        "Scheduled",
                        &msg,
                    );
                    self.retain(ctx, &job).await?;
                }
            }
            if st != old {
                patch_status::<RecurringJob, _>(&ctx.store, &jname, |o| {
                    o.status = Some(st.clone());
                })
                .await?;
            }
        }
        Ok(())
    }
}
