//! Backup controller: a Backup resource is taken through its volume's running engine
//! (`CreateBackup` to the default BackupTarget's URL; a replica reads the snapshot and
//! uploads it) and its progress, size and completion recorded in its status and on the
//! Volume (`lastBackup`). A Backup without a snapshot first gets one (a Snapshot resource
//! named like the Backup). A deleted Backup is removed from the target (delete + GC under
//! the target's lock, by the backup crate) before its finalizer is dropped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::patch::{patch_spec, patch_status};
use super::world::World;
use super::{Context, Controller, ControllerError};
use crate::resources::condition::{ConditionStatus, set_condition};
use crate::resources::engine::InstanceState;
use crate::resources::snapshot::{Snapshot, SnapshotSpec};
use crate::resources::{
    Backup, BackupState, BackupStatus, BackupTarget, DEFAULT_BACKUP_TARGET, Volume,
};

/// Finalizer that keeps a Backup until it is removed from the target.
pub const FINALIZER: &str = "ironhorn.io/backup";
/// Annotation holding the backup's id in the target (`bk-…`).
pub const BACKUP_ID_ANNOTATION: &str = "ironhorn.io/backup-id";
/// Annotation holding the target URL the backup was written to.
pub const TARGET_ANNOTATION: &str = "ironhorn.io/backup-target";
/// Label on the snapshot a backup took for itself.
pub const BACKUP_LABEL: &str = "ironhorn.io/backup";
/// Deadline of one removal from the target (delete + GC).
const DELETE_TIMEOUT: Duration = Duration::from_secs(300);

/// Outcome of a background job, keyed by resource name.
type Jobs = Arc<Mutex<HashMap<String, Option<Result<(), String>>>>>;

/// See the module documentation.
#[derive(Debug, Default)]
pub struct BackupController {
    deletions: Jobs,
    sync: Mutex<SyncState>,
    /// Ids this controller removed from the target (a listing taken before must not bring
    /// them back).
    removed: Mutex<std::collections::HashSet<String>>,
}

/// Seconds between listings of the target when the BackupTarget names none.
pub const DEFAULT_POLL_SECONDS: u64 = 300;

type Listing = Result<Vec<ironhorn_backup::BackupSummary>, String>;

/// The periodic listing of the target.
#[derive(Debug, Default)]
struct SyncState {
    url: String,
    running: bool,
    started: Option<std::time::Instant>,
    result: Arc<Mutex<Option<Listing>>>,
}

/// The default backup target's URL, empty when none is set.
pub async fn target_url(ctx: &Context) -> Result<String, ControllerError> {
    Ok(ctx
        .store
        .get::<BackupTarget>(DEFAULT_BACKUP_TARGET)
        .await?
        .map(|t| t.spec.url)
        .unwrap_or_default())
}

/// Opens a backup target with the manager's environment credentials.
pub fn open_target(url: &str) -> Result<ironhorn_backup::Target, String> {
    ironhorn_backup::Target::open(url, &ironhorn_backup::TargetOptions::default())
        .map_err(|e| e.to_string())
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn percent(done: u64, total: u64) -> u8 {
    done.saturating_mul(100)
        .checked_div(total)
        .map_or(0, |p| p.min(100) as u8)
}

impl BackupController {
    /// Starts (once) or polls the removal of a backup from its target; `Some(Ok)` when done.
    fn delete_from_target(
        &self,
        name: &str,
        url: String,
        id: String,
    ) -> Option<Result<(), String>> {
        let mut g = self.deletions.lock().unwrap_or_else(|p| p.into_inner());
        match g.get(name) {
            Some(Some(r)) => {
                let r = r.clone();
                g.remove(name);
                return Some(r);
            }
            Some(None) => return None,
            None => {}
        }
        g.insert(name.to_owned(), None);
        let jobs = self.deletions.clone();
        let key = name.to_owned();
        tokio::spawn(async move {
            let r = async {
                let t = open_target(&url)?;
                match tokio::time::timeout(
                    DELETE_TIMEOUT,
                    t.delete_backup(&id, CancellationToken::new()),
                )
                .await
                {
                    Ok(Ok(rep)) => {
                        info!(backup = %id, blocks_deleted = rep.gc.blocks_deleted, "backup removed from the target");
                        Ok(())
                    }
                    Ok(Err(e)) if is_not_found(&e) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no result in {DELETE_TIMEOUT:?}")),
                }
            }
            .await;
            if let Err(e) = &r {
                warn!(backup = %id, error = %e, "remove backup from the target");
            }
            jobs.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, Some(r));
        });
        None
    }

    async fn reconcile_deleted(
        &self,
        ctx: &Context,
        world: &World,
        b: &Backup,
        url_now: &str,
    ) -> Result<(), ControllerError> {
        let name = b.name_any();
        let ann = b.annotations().clone();
        let mut found = None;
        if !ann.contains_key(BACKUP_ID_ANNOTATION)
            && b.status
                .as_ref()
                .is_some_and(|s| s.state == BackupState::InProgress)
        {
            // Deleted while uploading: wait for the engine's job to end, so the backup it
            // writes is removed too.
            match running_job(ctx, world, b, url_now).await {
                Some(j) if j.state == "running" => return Ok(()),
                Some(j) if j.state == "done" && !j.backup_id.is_empty() => {
                    found = Some((j.backup_id, url_now.to_owned()));
                }
                _ => {}
            }
        }
        let ids = found.or_else(|| {
            Some((
                ann.get(BACKUP_ID_ANNOTATION)?.clone(),
                ann.get(TARGET_ANNOTATION)?.clone(),
            ))
        });
        let done = match ids {
            Some((id, url)) if !url.is_empty() => {
                match self.delete_from_target(&name, url.clone(), id.clone()) {
                    Some(Ok(())) => {
                        self.removed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id.clone());
                        true
                    }
                    Some(Err(e)) => {
                        patch_status::<Backup, _>(&ctx.store, &name, |o| {
                            let st = o.status.get_or_insert_with(Default::default);
                            st.state = BackupState::Deleting;
                            st.error = Some(e.clone());
                            set_condition(
                                &mut st.conditions,
                                "Deleted",
                                ConditionStatus::False,
                                "DeleteFailed",
                                &e,
                            );
                        })
                        .await?;
                        false
                    }
                    None => false,
                }
            }
            // Never reached the target.
            _ => true,
        };
        if done {
            patch_spec::<Backup, _>(&ctx.store, &name, |o| {
                if let Some(f) = o.metadata.finalizers.as_mut() {
                    f.retain(|f| f != FINALIZER);
                }
            })
            .await?;
        }
        Ok(())
    }
}

impl BackupController {
    /// Lists the target every poll interval (in the background) and adds a Backup
    /// resource, `completed`, for each backup there that no resource names — so backups
    /// survive a reinstall of the control plane and can be restored. Records the target's
    /// availability in the BackupTarget's status.
    async fn sync_target(
        &self,
        ctx: &Context,
        t: &BackupTarget,
        backups: &[Backup],
    ) -> Result<(), ControllerError> {
        let url = t.spec.url.clone();
        let poll = Duration::from_secs(match t.spec.poll_interval_seconds {
            0 => DEFAULT_POLL_SECONDS,
            n => n,
        });
        let listing = {
            let mut g = self.sync.lock().unwrap_or_else(|p| p.into_inner());
            let mut finished = g.result.lock().unwrap_or_else(|p| p.into_inner()).take();
            if finished.is_some() {
                g.running = false;
            }
            if g.url != url {
                // A listing of another URL is of no use.
                finished = None;
                g.running = false;
                g.started = None;
                g.url = url.clone();
                g.result = Arc::new(Mutex::new(None));
            }
            if !g.running && g.started.is_none_or(|s| s.elapsed() >= poll) {
                g.running = true;
                g.started = Some(std::time::Instant::now());
                let (slot, u) = (g.result.clone(), url.clone());
                tokio::spawn(async move {
                    let r = async {
                        let target = open_target(&u)?;
                        match tokio::time::timeout(
                            Duration::from_secs(60),
                            target.list_backups(None),
                        )
                        .await
                        {
                            Ok(r) => r.map_err(|e| e.to_string()),
                            Err(_) => Err("no answer in 60 s".to_owned()),
                        }
                    }
                    .await;
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
                });
            }
            finished
        };
        let Some(listing) = listing else {
            return Ok(());
        };
        let mut st = t.status.clone().unwrap_or_default();
        match listing {
            Err(e) => {
                warn!(target = %url, error = %e, "list the backup target");
                st.available = false;
                set_condition(
                    &mut st.conditions,
                    "Available",
                    ConditionStatus::False,
                    "ListFailed",
                    &e,
                );
            }
            Ok(list) => {
                st.available = true;
                st.last_synced_at = Some(now());
                set_condition(
                    &mut st.conditions,
                    "Available",
                    ConditionStatus::True,
                    "Listed",
                    &format!("{} backup(s) in the target", list.len()),
                );
                let known: std::collections::HashSet<&str> = backups
                    .iter()
                    .filter_map(|b| b.annotations().get(BACKUP_ID_ANNOTATION))
                    .map(String::as_str)
                    .collect();
                // Backups being taken (their id not recorded yet).
                let taking: std::collections::HashSet<(&str, &str)> = backups
                    .iter()
                    .filter(|b| !b.annotations().contains_key(BACKUP_ID_ANNOTATION))
                    .filter_map(|b| Some((b.spec.volume.as_str(), b.spec.snapshot.as_deref()?)))
                    .collect();
                let removed = self
                    .removed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                for s in list {
                    if known.contains(s.id.as_str())
                        || removed.contains(&s.id)
                        || taking.contains(&(s.volume.as_str(), s.snapshot.as_str()))
                    {
                        continue;
                    }
                    let name = s.id.to_lowercase();
                    let mut b = Backup::new(
                        &name,
                        crate::resources::BackupSpec {
                            volume: s.volume.clone(),
                            snapshot: Some(s.snapshot.clone()),
                            labels: s.labels.clone(),
                        },
                    );
                    b.metadata.annotations = Some(BTreeMap::from([
                        (BACKUP_ID_ANNOTATION.to_owned(), s.id.clone()),
                        (TARGET_ANNOTATION.to_owned(), url.clone()),
                    ]));
                    b.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
                    match ctx.store.create(&b).await {
                        Ok(_) => {}
                        Err(crate::store::StoreError::AlreadyExists { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                    let status = BackupStatus {
                        state: BackupState::Completed,
                        progress: 100,
                        snapshot: Some(s.snapshot.clone()),
                        url: Some(format!("{url}#{}/{}", s.volume, s.id)),
                        size: s.stored_volume_bytes,
                        uploaded_bytes: s.uploaded_bytes,
                        volume_size: s.size,
                        completed_at: jiff::Timestamp::from_millisecond(s.created_unix_ms)
                            .ok()
                            .map(Time),
                        error: None,
                        conditions: Vec::new(),
                    };
                    patch_status::<Backup, _>(&ctx.store, &name, |o| {
                        let mut st = status.clone();
                        set_condition(
                            &mut st.conditions,
                            "Ready",
                            ConditionStatus::True,
                            "FoundInTarget",
                            "listed in the backup target",
                        );
                        o.status = Some(st);
                    })
                    .await?;
                    info!(backup = %name, id = %s.id, volume = %s.volume, "backup found in the target");
                }
            }
        }
        if t.status.as_ref() != Some(&st) {
            patch_status::<BackupTarget, _>(&ctx.store, DEFAULT_BACKUP_TARGET, |o| {
                o.status = Some(st.clone());
            })
            .await?;
        }
        Ok(())
    }
}

/// The engine's newest job for this backup's snapshot and target, if its engine runs.
async fn running_job(
    ctx: &Context,
    world: &World,
    b: &Backup,
    url: &str,
) -> Option<ironhorn_proto::engine::BackupStatus> {
    let snap = b.spec.snapshot.as_deref()?;
    let addr = world
        .engine_of(&b.spec.volume)
        .and_then(|e| e.status.as_ref())
        .filter(|s| s.state == InstanceState::Running)
        .and_then(|s| s.control_address.clone())?;
    let info = ctx.engines.info(&addr).await.ok()?;
    info.backups
        .into_iter()
        .filter(|j| j.snapshot == snap && j.target == url)
        .max_by_key(|j| j.job)
}

fn is_not_found(e: &ironhorn_backup::BackupError) -> bool {
    matches!(e, ironhorn_backup::BackupError::BackupNotFound(_))
}

#[async_trait::async_trait]
impl Controller for BackupController {
    fn name(&self) -> &'static str {
        "backup"
    }

    async fn reconcile(&self, ctx: &Context, world: &World) -> Result<(), ControllerError> {
        let backups = ctx.store.list::<Backup>().await?;
        let target = ctx.store.get::<BackupTarget>(DEFAULT_BACKUP_TARGET).await?;
        if let Some(t) = &target
            && !t.spec.url.is_empty()
        {
            self.sync_target(ctx, t, &backups).await?;
        }
        if backups.is_empty() {
            return Ok(());
        }
        let url = target.map(|t| t.spec.url).unwrap_or_default();
        let mut infos: BTreeMap<String, Option<ironhorn_proto::engine::EngineInfo>> =
            BTreeMap::new();
        for b in &backups {
            let name = b.name_any();
            if b.metadata.deletion_timestamp.is_some() {
                self.reconcile_deleted(ctx, world, b, &url).await?;
                continue;
            }
            let old = b.status.clone().unwrap_or_default();
            if matches!(old.state, BackupState::Completed | BackupState::Error) {
                continue;
            }
            let mut st = old.clone();
            let step = self.step(ctx, world, b, &url, &mut st, &mut infos).await?;
            if let Some((ok, reason, msg)) = step {
                set_condition(&mut st.conditions, "Ready", ok, reason, &msg);
            }
            if st != old {
                patch_status::<Backup, _>(&ctx.store, &name, |o| {
                    o.status = Some(st.clone());
                })
                .await?;
            }
        }
        Ok(())
    }
}

type Step = Option<(ConditionStatus, &'static str, String)>;

impl BackupController {
    /// Moves one backup on; returns the `Ready` condition to record.
    async fn step(
        &self,
        ctx: &Context,
        world: &World,
        b: &Backup,
        url: &str,
        st: &mut BackupStatus,
        infos: &mut BTreeMap<String, Option<ironhorn_proto::engine::EngineInfo>>,
    ) -> Result<Step, ControllerError> {
        let name = b.name_any();
        let vol = &b.spec.volume;
        if url.is_empty() {
            return Ok(Some((
                ConditionStatus::False,
                "NoBackupTarget",
                "no backup target is set (PUT /v1/backuptarget); the backup starts once one is"
                    .into(),
            )));
        }
        if world.volume(vol).is_none() {
            st.state = BackupState::Error;
            st.error = Some(format!("volume {vol:?} does not exist"));
            return Ok(Some((
                ConditionStatus::False,
                "VolumeNotFound",
                format!("volume {vol:?} does not exist"),
            )));
        }
        if !b.finalizers().iter().any(|f| f == FINALIZER) {
            ctx.store.add_finalizer::<Backup>(&name, FINALIZER).await?;
        }
        // The snapshot: the one named, or one taken for this backup.
        let snap = match &b.spec.snapshot {
            Some(s) => s.clone(),
            None => {
                if world.snapshots.iter().all(|s| s.name_any() != name) {
                    let mut labels = b.spec.labels.clone();
                    labels.insert(BACKUP_LABEL.into(), name.clone());
                    let s = Snapshot::new(
                        &name,
                        SnapshotSpec {
                            volume: vol.clone(),
                            labels,
                        },
                    );
                    match ctx.store.create(&s).await {
                        Ok(_) => {
                            info!(backup = %name, volume = %vol, "snapshot taken for the backup")
                        }
                        Err(crate::store::StoreError::AlreadyExists { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                patch_spec::<Backup, _>(&ctx.store, &name, |o| {
                    o.spec.snapshot.get_or_insert_with(|| name.clone());
                })
                .await?;
                name.clone()
            }
        };
        st.snapshot = Some(snap.clone());
        let snap_ready = match world.snapshots.iter().find(|s| s.name_any() == snap) {
            Some(s) => s.status.as_ref().is_some_and(|x| x.ready_to_use),
            // Just created above (not in this pass's view yet); a snapshot named by the
            // user without a resource is taken as present on the engine.
            None => b.spec.snapshot.is_some(),
        };
        if !snap_ready {
            return Ok(Some((
                ConditionStatus::False,
                "WaitingForSnapshot",
                format!("snapshot {snap:?} is not taken yet"),
            )));
        }
        let Some(addr) = world
            .engine_of(vol)
            .and_then(|e| e.status.as_ref())
            .filter(|s| s.state == InstanceState::Running)
            .and_then(|s| s.control_address.clone())
        else {
            return Ok(Some((
                ConditionStatus::False,
                "VolumeNotAttached",
                format!("volume {vol:?} is not attached; the backup starts once it is"),
            )));
        };
        let info = match infos.get(&addr) {
            Some(i) => i.clone(),
            None => {
                let i = ctx.engines.info(&addr).await.ok();
                infos.insert(addr.clone(), i.clone());
                i
            }
        };
        let Some(info) = info else {
            return Ok(Some((
                ConditionStatus::False,
                "EngineUnreachable",
                format!("the engine of {vol:?} does not answer"),
            )));
        };
        let job = info
            .backups
            .iter()
            .filter(|j| j.snapshot == snap && j.target == url)
            .max_by_key(|j| j.job);
        match job {
            None => {
                let started = ctx
                    .engines
                    .create_backup(&addr, &snap, url, vol, b.spec.labels.clone())
                    .await;
                match started {
                    Ok(j) => {
                        info!(backup = %name, volume = %vol, snapshot = %snap, job = j.job, "backup started");
                        st.state = BackupState::InProgress;
                        st.progress = 0;
                        st.volume_size = world
                            .volume(vol)
                            .and_then(|v| v.status.as_ref())
                            .map(|s| s.current_size)
                            .unwrap_or(0);
                        Ok(Some((
                            ConditionStatus::False,
                            "InProgress",
                            "uploading".into(),
                        )))
                    }
                    // What the engine refuses for good ends the backup; anything else
                    // (an engine restarting, a timeout) is tried again on the next pass.
                    Err(e)
                        if matches!(
                            e.code,
                            tonic::Code::InvalidArgument
                                | tonic::Code::NotFound
                                | tonic::Code::FailedPrecondition
                        ) =>
                    {
                        st.state = BackupState::Error;
                        st.error = Some(e.to_string());
                        Ok(Some((
                            ConditionStatus::False,
                            "BackupFailed",
                            e.to_string(),
                        )))
                    }
                    Err(e) => Ok(Some((
                        ConditionStatus::False,
                        "EngineUnreachable",
                        format!("{e} (retried)"),
                    ))),
                }
            }
            Some(j) if j.state == "running" => {
                st.state = BackupState::InProgress;
                st.progress = percent(j.done_bytes, j.total_bytes);
                st.uploaded_bytes = j.uploaded_bytes;
                Ok(Some((
                    ConditionStatus::False,
                    "InProgress",
                    format!("{} ({}%)", j.phase, st.progress),
                )))
            }
            Some(j) if j.state == "done" && !j.backup_id.is_empty() => {
                let id = j.backup_id.clone();
                let target = url.to_owned();
                patch_spec::<Backup, _>(&ctx.store, &name, |o| {
                    let a = o.metadata.annotations.get_or_insert_with(BTreeMap::new);
                    a.insert(BACKUP_ID_ANNOTATION.into(), id.clone());
                    a.insert(TARGET_ANNOTATION.into(), target.clone());
                })
                .await?;
                st.state = BackupState::Completed;
                st.progress = 100;
                st.error = None;
                st.uploaded_bytes = j.uploaded_bytes;
                st.url = Some(format!("{url}#{vol}/{id}"));
                st.completed_at = Some(now());
                // Size and volume size from the manifest (one small read).
                let manifest = match open_target(url) {
                    Ok(t) => {
                        match tokio::time::timeout(Duration::from_secs(10), t.read_manifest(&id))
                            .await
                        {
                            Ok(r) => r.map_err(|e| e.to_string()),
                            Err(_) => Err("no answer in 10 s".to_owned()),
                        }
                    }
                    Err(e) => Err(e),
                };
                match manifest {
                    Ok(m) => {
                        st.size = m.stored_volume_bytes();
                        st.volume_size = m.size;
                    }
                    Err(e) => warn!(backup = %name, error = %e, "read the backup's manifest"),
                }
                info!(backup = %name, id = %id, "backup completed");
                let at = st.completed_at.clone();
                patch_status::<Volume, _>(&ctx.store, vol, |o| {
                    let s = o.status.get_or_insert_with(Default::default);
                    s.last_backup = Some(name.clone());
                    s.last_backup_at = at.clone();
                })
                .await?;
                Ok(Some((
                    ConditionStatus::True,
                    "Completed",
                    format!("backup {id} is in the target"),
                )))
            }
            Some(j) => {
                let msg = if j.error.is_empty() {
                    format!("backup ended in state {:?}", j.state)
                } else {
                    j.error.clone()
                };
                warn!(backup = %name, error = %msg, "backup failed");
                st.state = BackupState::Error;
                st.error = Some(msg.clone());
                Ok(Some((ConditionStatus::False, "BackupFailed", msg)))
            }
        }
    }
}
