//! Restore controller: a Volume created with `spec.fromBackup` gets its replicas scheduled
//! stopped (see [`replica_start_state`]); each replica's directory is filled from the
//! backup by the backup crate (`ReplicaRestore` builds it in a hidden staging directory
//! beside it and renames it into place only when complete, so a replica never starts on a
//! half-restored directory), and once every wanted replica is restored they are started
//! and the volume is `Restored`, usable like any other. Progress is in
//! `status.restoreProgress`.
//!
//! The manager writes the replica directories itself, so it must see the nodes' disk
//! paths (true for `ironhorn up` and one-machine clusters); a disk it cannot see gets a
//! `Restored` condition saying so.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::backup::{BACKUP_ID_ANNOTATION, TARGET_ANNOTATION, open_target};
use super::patch::{patch_spec, patch_status};
use super::world::World;
use super::{Context, Controller, ControllerError};
use crate::resources::condition::{ConditionStatus, get_condition, set_condition};
use crate::resources::engine::DesiredState;
use crate::resources::replica::Replica;
use crate::resources::{Backup, BackupState, Volume};

/// Condition type on a Volume restored from a backup.
pub const RESTORED: &str = "Restored";
/// Wait before a failed replica restore is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// Whether a volume restored from a backup has finished restoring.
pub fn restored(v: &Volume) -> bool {
    v.status
        .as_ref()
        .and_then(|s| get_condition(&s.conditions, RESTORED))
        .is_some_and(|c| c.status == ConditionStatus::True)
}

/// The desired state of a new replica of `v`: stopped while the volume still waits for
/// its restore, running otherwise.
pub fn replica_start_state(v: &Volume) -> DesiredState {
    if v.spec.from_backup.is_some() && !restored(v) {
        DesiredState::Stopped
    } else {
        DesiredState::Running
    }
}

/// The staging directory a restore into `data_dir` fills (`.NAME.restoring` beside it).
pub fn staging_dir(data_dir: &str) -> Option<String> {
    let p = Path::new(data_dir);
    let name = p.file_name()?.to_str()?;
    Some(
        p.parent()?
            .join(format!(".{name}.restoring"))
            .display()
            .to_string(),
    )
}

/// One replica's restore running in the background.
struct Job {
    progress: Arc<ironhorn_backup::Progress>,
    result: Arc<Mutex<Option<Result<(), String>>>>,
    cancel: CancellationToken,
    failed_at: Option<Instant>,
}

/// See the module documentation.
#[derive(Default)]
pub struct RestoreController {
    jobs: Mutex<HashMap<String, Job>>,
}

impl std::fmt::Debug for RestoreController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreController").finish_non_exhaustive()
    }
}

/// Where one replica's restore stands.
enum ReplicaState {
    Done,
    Running(u8),
    Failed(String),
}

fn dir_has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

impl RestoreController {
    fn replica_state(&self, r: &Replica, url: &str, id: &str) -> ReplicaState {
        let name = r.name_any();
        let dir = Path::new(&r.spec.data_dir);
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = jobs.get_mut(&name) {
            let res = j.result.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return match res {
                Some(Ok(())) => ReplicaState::Done,
                Some(Err(e)) => {
                    let since = *j.failed_at.get_or_insert_with(Instant::now);
                    if since.elapsed() >= RETRY_AFTER {
                        jobs.remove(&name);
                    }
                    ReplicaState::Failed(e)
                }
                None => {
                    let s = j.progress.snapshot();
                    let pct = s
                        .done_bytes
                        .saturating_mul(100)
                        .checked_div(s.total_bytes)
                        .map_or(0, |p| p.min(99) as u8);
                    ReplicaState::Running(pct)
                }
            };
        }
        // Renamed into place only when complete: a directory with content is restored
        // (by a pass before a manager restart).
        if dir_has_entries(dir) {
            return ReplicaState::Done;
        }
        let disk_root = dir.parent().and_then(Path::parent);
        if !disk_root.is_some_and(Path::is_dir) {
            return ReplicaState::Failed(format!(
                "the manager cannot see the disk of replica {name} ({}); restores need the \
                 node's disk on the manager's machine",
                dir.display()
            ));
        }
        let job = Job {
            progress: Arc::new(ironhorn_backup::Progress::new()),
            result: Arc::new(Mutex::new(None)),
            cancel: CancellationToken::new(),
            failed_at: None,
        };
        let (progress, result, cancel) =
            (job.progress.clone(), job.result.clone(), job.cancel.clone());
        let (url, id, dest, rname) = (url.to_owned(), id.to_owned(), dir.to_owned(), name.clone());
        info!(replica = %name, backup = %id, dir = %dest.display(), "restoring replica");
        tokio::spawn(async move {
            let r = async {
                let t = open_target(&url)?;
                let bid = id.clone();
                t.restore_backup(
                    &id,
                    move |m| ironhorn_replica::backup::ReplicaRestore::create(&dest, m.size, &bid),
                    progress,
                    None,
                    cancel,
                )
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
            }
            .await;
            match &r {
                Ok(()) => info!(replica = %rname, backup = %id, "replica restored"),
                Err(e) => {
                    warn!(replica = %rname, backup = %id, error = %e, "replica restore failed")
                }
            }
            *result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        });
        jobs.insert(name, job);
        ReplicaState::Running(0)
    }

    /// Cancels restores of replicas that are gone and forgets them.
    fn forget_except(&self, keep: &std::collections::BTreeSet<String>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.retain(|name, j| {
            let k = keep.contains(name);
            if !k {
                j.cancel.cancel();
            }
            k
        });
    }
}

#[async_trait::async_trait]
impl Controller for RestoreController {
    fn name(&self) -> &'static str {
        "restore"
    }

    async fn reconcile(&self, ctx: &Context, world: &World) -> Result<(), ControllerError> {
        let mut keep = std::collections::BTreeSet::new();
        for v in &world.volumes {
            let Some(from) = &v.spec.from_backup else {
                continue;
            };
            if v.metadata.deletion_timestamp.is_some() || restored(v) {
                continue;
            }
            let name = v.name_any();
            let old = v.status.clone().unwrap_or_default();
            let mut st = old.clone();
            let backup = ctx.store.get::<Backup>(from).await?;
            let source = backup.as_ref().and_then(|b| {
                let done = b
                    .status
                    .as_ref()
                    .is_some_and(|s| s.state == BackupState::Completed);
                let a = b.annotations();
                Some((
                    done,
                    a.get(TARGET_ANNOTATION)?.clone(),
                    a.get(BACKUP_ID_ANNOTATION)?.clone(),
                ))
            });
            let (cond, reason, msg) = match source {
                Some((true, url, id)) => {
                    let want = v.spec.number_of_replicas as usize;
                    let reps: Vec<&Replica> = world
                        .replicas_of(&name)
                        .filter(|r| r.metadata.deletion_timestamp.is_none())
                        .collect();
                    let mut done = 0usize;
                    let mut pct_sum = 0usize;
                    let mut errors = Vec::new();
                    for r in &reps {
                        keep.insert(r.name_any());
                        if r.spec.desired_state == DesiredState::Running {
                            done += 1;
                            pct_sum += 100;
                            continue;
                        }
                        match self.replica_state(r, &url, &id) {
                            ReplicaState::Done => {
                                done += 1;
                                pct_sum += 100;
                            }
                            ReplicaState::Running(p) => pct_sum += p as usize,
                            ReplicaState::Failed(e) => errors.push(e),
                        }
                    }
                    let n = want.max(reps.len()).max(1);
                    st.restore_progress = Some((pct_sum / n).min(100) as u8);
                    if done >= want && done == reps.len() {
                        for r in &reps {
                            if r.spec.desired_state != DesiredState::Running {
                                patch_spec::<Replica, _>(&ctx.store, &r.name_any(), |o| {
                                    o.spec.desired_state = DesiredState::Running;
                                })
                                .await?;
                            }
                        }
                        info!(volume = %name, backup = %from, "volume restored; replicas start");
                        st.restore_progress = Some(100);
                        (
                            ConditionStatus::True,
                            "Restored",
                            format!("every replica holds backup {from:?} ({id})"),
                        )
                    } else if !errors.is_empty() {
                        (
                            ConditionStatus::False,
                            "RestoreFailed",
                            format!("{} (retried)", errors.join("; ")),
                        )
                    } else {
                        (
                            ConditionStatus::False,
                            "Restoring",
                            format!("{done} of {want} replicas restored from {from:?}"),
                        )
                    }
                }
                Some((false, _, _)) | None => (
                    ConditionStatus::False,
                    "BackupNotReady",
                    format!("backup {from:?} does not exist or is not completed"),
                ),
            };
            set_condition(&mut st.conditions, RESTORED, cond, reason, &msg);
            if st != old {
                let (progress, conds) = (st.restore_progress, st.conditions.clone());
                patch_status::<Volume, _>(&ctx.store, &name, |o| {
                    let s = o.status.get_or_insert_with(Default::default);
                    s.restore_progress = progress;
                    if let Some(c) = conds.iter().find(|c| c.type_ == RESTORED) {
                        s.conditions.retain(|x| x.type_ != RESTORED);
                        s.conditions.push(c.clone());
                    }
                })
                .await?;
            }
        }
        self.forget_except(&keep);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_dir_is_a_hidden_sibling() {
        assert_eq!(
            staging_dir("/d/replicas/v-r-1").as_deref(),
            Some("/d/replicas/.v-r-1.restoring")
        );
        assert_eq!(staging_dir("/"), None);
    }
}
