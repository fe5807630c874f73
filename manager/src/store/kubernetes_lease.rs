//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several managers only
//! one acts.
//!
//! The protocol is the one client-go's leaderelection package follows:
//! - the leader writes its identity, `acquireTime`, `renewTime` and `leaseDurationSeconds`
//!   into the Lease and renews `renewTime` every `retry_period`;
//! - every write is a replace carrying the resourceVersion that was read, so two candidates
//!   racing for a free Lease cannot both win: the second gets 409 Conflict;
//! - a candidate takes over a Lease held by another only when it has seen the *same* record
//!   for a whole `lease_duration` of its own clock (the holder's timestamps are never
//!   compared with the local clock, so clock skew between nodes does not matter);
//! - a leader that cannot renew for `renew_deadline` (shorter than `lease_duration`) stops
//!   acting before anyone may take over;
//! - a leader that stops cleanly releases the Lease (empty holder), so the next one takes
//!   over at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Default time a Lease stays valid without renewal.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default time a leader keeps acting while its renewals fail.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Default time between two attempts to acquire or renew.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Default name of the manager's Lease.
pub const DEFAULT_LEASE_NAME: &str = "ironhorn-manager";

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The API server refused or failed a Lease call.
    #[error("{op} lease {namespace}/{name}: {source}")]
    Api {
        /// What was attempted (`get`, `create`, `update`).
        op: &'static str,
        /// Namespace of the Lease.
        namespace: String,
        /// Name of the Lease.
        name: String,
        /// The client's error.
        #[source]
        source: Box<kube::Error>,
    },
    /// The settings cannot work (renew deadline not below the lease duration, zero times).
    #[error("leader election settings: {0}")]
    Config(String),
}

/// Settings of one candidate.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease (default [`DEFAULT_LEASE_NAME`]).
    pub name: String,
    /// This candidate's identity, unique among candidates (the pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal (default 15 s).
    pub lease_duration: Duration,
    /// How long a leader keeps acting while renewals fail; below `lease_duration`
    /// (default 10 s).
    pub renew_deadline: Duration,
    /// Time between attempts (default 2 s).
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Default timings for `identity` on the Lease `namespace`/[`DEFAULT_LEASE_NAME`].
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.into(),
            name: DEFAULT_LEASE_NAME.to_string(),
            identity: identity.into(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
        }
    }

    fn check(&self) -> Result<(), LeaseError> {
        if self.identity.is_empty() {
            return Err(LeaseError::Config("the identity is empty".into()));
        }
        if self.retry_period.is_zero() || self.lease_duration < Duration::from_secs(1) {
            return Err(LeaseError::Config(
                "the retry period must be above zero and the lease duration at least 1s".into(),
            ));
        }
        if self.renew_deadline >= self.lease_duration || self.retry_period >= self.renew_deadline {
            return Err(LeaseError::Config(format!(
                "need retry period ({:?}) < renew deadline ({:?}) < lease duration ({:?})",
                self.retry_period, self.renew_deadline, self.lease_duration
            )));
        }
        Ok(())
    }
}

/// The Lease record as last read, and when (on the local clock) it last changed.
#[derive(Debug, Clone)]
struct Observed {
    holder: String,
    renew_time: Option<MicroTime>,
    acquire_time: Option<MicroTime>,
    duration: Duration,
    changed_at: Instant,
}

/// One candidate for leadership.
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
}

impl LeaderElector {
    /// A candidate using `client`; checks the settings.
    pub fn new(client: kube::Client, config: LeaseConfig) -> Result<LeaderElector, LeaseError> {
        config.check()?;
        Ok(LeaderElector {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
        })
    }

    /// The identity this candidate writes into the Lease.
    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    /// The holder last seen in the Lease (empty when free or not read yet).
    pub fn observed_holder(&self) -> &str {
        self.observed.as_ref().map_or("", |o| o.holder.as_str())
    }

    fn api_error(&self, op: &'static str, source: kube::Error) -> LeaseError {
        LeaseError::Api {
            op,
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source: Box::new(source),
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// One attempt: creates the Lease if missing, renews it if held by this candidate, takes
    /// it over if free or expired. `Ok(true)` when this candidate holds it afterwards.
    /// A lost race (409) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let now = MicroTime(jiff::Timestamp::now());
        let current = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.api_error("get", e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(self.api_error("create", e)),
            };
        };
        self.observe(&lease);
        let observed = self.observed.clone().expect("observed above");
        let mine = observed.holder == self.config.identity;
        let free = observed.holder.is_empty();
        let expired = observed.changed_at.elapsed() >= observed.duration;
        if !mine && !free && !expired {
            return Ok(false);
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if !mine {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.holder_identity = Some(self.config.identity.clone());
        spec.lease_duration_seconds = Some(self.duration_seconds());
        spec.renew_time = Some(now);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(self.api_error("update", e)),
        }
    }

    /// Gives the Lease up if this candidate holds it: the holder is cleared so that the next
    /// candidate takes over without waiting for expiry.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.config.name)
            .await
            .map_err(|e| self.api_error("get", e))?
        else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated);
                Ok(())
            }
            // Someone else wrote it meanwhile: it is not ours to release any more.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(self.api_error("update", e)),
        }
    }

    fn observe(&mut self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.unwrap_or_default();
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0).max(1)).unwrap_or(1),
        );
        let same = self.observed.as_ref().is_some_and(|o| {
            o.holder == holder
                && o.renew_time == spec.renew_time
                && o.acquire_time == spec.acquire_time
        });
        let changed_at = match &self.observed {
            Some(o) if same => o.changed_at,
            _ => Instant::now(),
        };
        self.observed = Some(Observed {
            holder,
            renew_time: spec.renew_time,
            acquire_time: spec.acquire_time,
            duration,
            changed_at,
        });
    }

    /// Campaigns until `cancel`: publishes `true` while this candidate leads and `false`
    /// otherwise. Leadership is dropped (`false`) when renewals fail for the renew deadline.
    /// On cancel, a leader releases the Lease before the task ends.
    pub fn spawn(
        mut self,
        cancel: CancellationToken,
    ) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let span = tracing::info_span!(
            "leader_election",
            lease = %self.config.name,
            identity = %self.config.identity
        );
        let task = tokio::spawn(async move {
            let mut last_renew: Option<Instant> = None;
            loop {
                let attempt_started = Instant::now();
                let leading = *tx.borrow();
                let attempt = tokio::time::timeout(
                    self.config.renew_deadline / 2,
                    self.try_acquire_or_renew(),
                )
                .await;
                match attempt {
                    Ok(Ok(true)) => {
                        last_renew = Some(attempt_started);
                        if !leading {
                            tracing::info!("became the leader");
                            let _ = tx.send(true);
                        }
                    }
                    Ok(Ok(false)) => {
                        if leading {
                            tracing::warn!(holder = %self.observed_holder(), "lost the lease");
                            let _ = tx.send(false);
                        }
                        last_renew = None;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "lease attempt failed"),
                    Err(_) => tracing::warn!("lease attempt timed out"),
                }
                if *tx.borrow()
                    && last_renew.is_none_or(|t| t.elapsed() >= self.config.renew_deadline)
                {
                    tracing::warn!(deadline = ?self.config.renew_deadline, "could not renew the lease in time; stepping down");
                    let _ = tx.send(false);
                    last_renew = None;
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(self.config.retry_period) => {}
                }
            }
            if *tx.borrow() {
                let _ = tx.send(false);
                if let Err(e) = self.release().await {
                    tracing::warn!(error = %e, "could not release the lease");
                } else {
                    tracing::info!("released the lease");
                }
            }
        }.instrument(span));
        (rx, task)
    }
}
