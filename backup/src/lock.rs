//! The target lock: leases that keep garbage collection away from running backups.
//!
//! Every lock is one object `locks/<kind>-<uuid>.lock` holding a JSON [`LockRecord`] with an
//! expiry time. A backup holds a **shared** lease (kind `backup`) from before it decides
//! which blocks the target already has until its manifest is written; a delete or garbage
//! collection holds the **exclusive** lease (kind `gc`).
//!
//! Taking a lease:
//! 1. Write our record (conditional create: never replaces another object).
//! 2. List `locks/`. Records whose expiry (plus [`LeaseOptions::skew`]) has passed are
//!    stale: they are deleted and ignored.
//! 3. A backup that sees a live `gc` record deletes its own record and tries again after
//!    [`LeaseOptions::retry`]. A `gc` that sees a live `backup` record keeps its own (so
//!    no new backup starts) and lists again until the backups are gone; a `gc` that sees
//!    another `gc` record deletes its own and tries again after a random pause.
//!
//! Because each side writes before it lists, and listings see completed writes (S3 and
//! file systems both guarantee read-after-write), of a backup and a collector that start
//! together at least one sees the other, so they never run at once.
//!
//! A held lease is renewed every third of [`LeaseOptions::ttl`]: a conditional replace
//! (`If-Match` on the ETag) where the store supports it, otherwise a check that the record
//! still exists and a plain write. If a renewal finds the record gone or changed, or the
//! lease ran out before it could be renewed, the lease is lost: the holder stops before its
//! next step that depends on it (a backup does not write its manifest; a collector stops
//! deleting). Safety needs the clocks of the machines sharing a target to differ by less
//! than `skew`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use object_store::path::Path;
use object_store::{PutMode, UpdateVersion};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::{BackupError, Result};
use crate::target::{Target, layout};
use crate::unix_ms;

/// Lease timings.
#[derive(Debug, Clone, Copy)]
pub struct LeaseOptions {
    /// How long a lease lasts without renewal (default 60 s).
    pub ttl: Duration,
    /// Allowed clock difference between machines sharing a target (default 30 s).
    pub skew: Duration,
    /// Pause between attempts while the lock is taken (default 1 s).
    pub retry: Duration,
    /// How long to wait for the lock before giving up (default 10 min).
    pub wait: Duration,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions {
            ttl: Duration::from_secs(60),
            skew: Duration::from_secs(30),
            retry: Duration::from_secs(1),
            wait: Duration::from_secs(600),
        }
    }
}

/// Kind of lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    /// Shared: a backup being written.
    Backup,
    /// Exclusive: a delete or garbage collection.
    Gc,
}

/// Content of a lock object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// Shared or exclusive.
    pub kind: LockKind,
    /// Who holds it (`host:pid`) and what for.
    pub owner: String,
    /// When it was first taken (ms since the Unix epoch).
    pub acquired_unix_ms: i64,
    /// When it runs out unless renewed (ms since the Unix epoch).
    pub expires_unix_ms: i64,
}

fn owner(what: &str) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into());
    format!("{host}:{} {what}", std::process::id())
}

struct Shared {
    lost: AtomicBool,
    /// Local time (ms) until which the lease is surely ours.
    valid_until: AtomicI64,
}

/// A held lease. Renewed in the background until [`Lease::release`] (or drop, which stops
/// renewing and leaves the record to expire).
pub struct Lease {
    target: Target,
    key: Path,
    shared: Arc<Shared>,
    stop: CancellationToken,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Lease {
    /// Takes a lease of `kind` on `target` (see the module notes), waiting up to
    /// [`LeaseOptions::wait`].
    pub async fn acquire(
        target: &Target,
        kind: LockKind,
        what: &str,
        cancel: &CancellationToken,
    ) -> Result<Lease> {
        let o = target.opts.lease;
        let deadline = tokio::time::Instant::now() + o.wait;
        let prefix = match kind {
            LockKind::Backup => "backup",
            LockKind::Gc => "gc",
        };
        let owner = owner(what);
        loop {
            let id = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
            let lease = Lease::write_new(target, &id, kind, &owner).await?;
            loop {
                let (blocker, keep) = match lease.conflicts(kind).await {
                    Err(e) => {
                        lease.release().await;
                        return Err(e);
                    }
                    Ok(None) => return Ok(lease),
                    Ok(Some(b)) => b,
                };
                debug!(lock = %lease.key, blocker = %blocker, "target lock is taken; waiting");
                let timed_out = tokio::time::Instant::now() >= deadline;
                if cancel.is_cancelled() || timed_out {
                    lease.release().await;
                    if cancel.is_cancelled() {
                        return Err(BackupError::Cancelled);
                    }
                    return Err(BackupError::LockTimeout(format!(
                        "{owner} waited {:?} for {blocker}",
                        o.wait
                    )));
                }
                let jitter =
                    Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 64);
                let pause = async {
                    tokio::select! {
                        () = tokio::time::sleep(o.retry + jitter) => {}
                        () = cancel.cancelled() => {}
                    }
                };
                if !keep || lease.lost() {
                    lease.release().await;
                    pause.await;
                    break;
                }
                pause.await;
            }
        }
    }

    async fn write_new(target: &Target, id: &str, kind: LockKind, owner: &str) -> Result<Lease> {
        let o = target.opts.lease;
        let now = unix_ms();
        let record = LockRecord {
            kind,
            owner: owner.to_owned(),
            acquired_unix_ms: now,
            expires_unix_ms: now + ms(o.ttl),
        };
        let key = layout::lock(id);
        let body = serde_json::to_vec(&record).unwrap_or_default();
        let put = target.put(&key, body.into(), PutMode::Create).await?;
        let shared = Arc::new(Shared {
            lost: AtomicBool::new(false),
            valid_until: AtomicI64::new(now + ms(o.ttl)),
        });
        let stop = CancellationToken::new();
        let renewer = tokio::spawn(renew_loop(
            target.clone(),
            key.clone(),
            record,
            put.e_tag,
            shared.clone(),
            stop.clone(),
        ));
        Ok(Lease {
            target: target.clone(),
            key,
            shared,
            stop,
            renewer: Some(renewer),
        })
    }

    /// The first live lock that stops us, and whether we keep our own record meanwhile.
    async fn conflicts(&self, kind: LockKind) -> Result<Option<(String, bool)>> {
        let o = self.target.opts.lease;
        let now = unix_ms();
        let mine = self.key.as_ref().to_owned();
        let mut blocker: Option<(String, bool)> = None;
        for meta in self.target.list(layout::LOCKS).await? {
            let key = meta.location.as_ref().to_owned();
            if key == mine {
                continue;
            }
            let record = match self.target.get(&meta.location).await {
                Ok(b) => serde_json::from_slice::<LockRecord>(&b).ok(),
                // Deleted since the listing: gone.
                Err(BackupError::Store {
                    error: object_store::Error::NotFound { .. },
                    ..
                }) => continue,
                Err(e) => return Err(e),
            };
            let (their_kind, expires) = match &record {
                Some(r) => (r.kind, r.expires_unix_ms),
                // Unreadable record: treat as exclusive until it is old.
                None => (
                    LockKind::Gc,
                    meta.last_modified.timestamp_millis() + ms(o.ttl),
                ),
            };
            if now > expires + ms(o.skew) {
                warn!(lock = %key, "removing a stale lock");
                self.target.delete(&meta.location).await?;
                continue;
            }
            let stop = match (kind, their_kind) {
                (LockKind::Backup, LockKind::Gc) => Some(false),
                (LockKind::Backup, LockKind::Backup) => None,
                (LockKind::Gc, LockKind::Backup) => Some(true),
                // A holder never looks again, so a newcomer must always yield to any
                // other collector's record (two newcomers both yield and retry after a
                // random pause).
                (LockKind::Gc, LockKind::Gc) => Some(false),
            };
            if let Some(keep) = stop {
                let who = record.map(|r| r.owner).unwrap_or_default();
                // A reason to give up our own record wins over one to keep it.
                if blocker.as_ref().is_none_or(|(_, k)| *k) {
                    blocker = Some((format!("{key} ({who})"), keep));
                }
            }
        }
        Ok(blocker)
    }

    /// Whether the lease has been lost.
    pub fn lost(&self) -> bool {
        self.shared.lost.load(Ordering::SeqCst)
            || unix_ms() >= self.shared.valid_until.load(Ordering::SeqCst)
    }

    /// Fails with [`BackupError::LeaseLost`] unless the lease is surely still held.
    pub fn check(&self) -> Result<()> {
        if self.lost() {
            Err(BackupError::LeaseLost(self.key.to_string()))
        } else {
            Ok(())
        }
    }

    /// Stops renewing and deletes the lock record.
    pub async fn release(mut self) {
        self.stop.cancel();
        if let Some(h) = self.renewer.take() {
            let _ = h.await;
        }
        if let Err(e) = self.target.delete(&self.key).await {
            warn!(lock = %self.key, error = %e, "could not delete the lock; it will expire");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn renew_loop(
    target: Target,
    key: Path,
    mut record: LockRecord,
    mut e_tag: Option<String>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let o = target.opts.lease;
    let every = o.ttl / 3;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return,
        }
        let started = unix_ms();
        record.expires_unix_ms = started + ms(o.ttl);
        let body: bytes::Bytes = serde_json::to_vec(&record).unwrap_or_default().into();
        let result = match &e_tag {
            Some(tag) => {
                let mode = PutMode::Update(UpdateVersion {
                    e_tag: Some(tag.clone()),
                    version: None,
                });
                match target.put(&key, body.clone(), mode).await {
                    Ok(r) => Ok(r.e_tag),
                    Err(
                        e @ BackupError::Store {
                            error:
                                object_store::Error::Precondition { .. }
                                | object_store::Error::NotFound { .. },
                            ..
                        },
                    ) => Err(e),
                    Err(e) => {
                        // The store may not support conditional replace: fall back for good.
                        debug!(lock = %key, error = %e, "conditional renewal failed; renewing without it");
                        e_tag = None;
                        renew_plain(&target, &key, body).await
                    }
                }
            }
            None => renew_plain(&target, &key, body).await,
        };
        match result {
            Ok(tag) => {
                if e_tag.is_some() {
                    e_tag = tag;
                }
                shared
                    .valid_until
                    .store(started + ms(o.ttl), Ordering::SeqCst);
            }
            Err(
                e @ BackupError::Store {
                    error:
                        object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
                    ..
                },
            ) => {
                warn!(lock = %key, error = %e, "lease lost");
                shared.lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(e) => {
                // Transient: the lease stays valid until valid_until; try again next time.
                warn!(lock = %key, error = %e, "lease renewal failed");
            }
        }
    }
}

/// Renewal without conditional replace: the record must still exist.
async fn renew_plain(target: &Target, key: &Path, body: bytes::Bytes) -> Result<Option<String>> {
    if !target.exists(key).await? {
        return Err(BackupError::store(
            "renew",
            key.as_ref(),
            object_store::Error::NotFound {
                path: key.to_string(),
                source: "lock record removed".into(),
            },
        ));
    }
    target
        .put(key, body, PutMode::Overwrite)
        .await
        .map(|r| r.e_tag)
}
