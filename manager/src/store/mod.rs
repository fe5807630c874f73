//! The store: where resources live. One typed handle, [`Store`], over one object-safe
//! backend trait, [`StoreBackend`], with two backends: [`embedded`] (a single redb file
//! under the data directory, for one machine) and, later, Kubernetes (CRDs via kube-rs).
//!
//! Semantics every backend keeps (the Kubernetes API server's, so controllers do not care
//! which backend they run on):
//! - `create` fails with [`StoreError::AlreadyExists`] if the name is taken; it sets `uid`,
//!   `creationTimestamp`, `generation = 1` and `resourceVersion`, and drops any status.
//! - `update` replaces spec and metadata (labels, annotations, finalizers, owner references)
//!   and keeps the stored status; `update_status` replaces only the status. Both require
//!   the `resourceVersion` that was read: a stale one fails with [`StoreError::Conflict`],
//!   never a silent overwrite. A spec change bumps `generation`.
//! - `delete` of an object with finalizers only sets `deletionTimestamp`; the object goes
//!   away when an `update` removes its last finalizer.
//! - `watch` streams [`EventType::Added`]/[`EventType::Modified`]/[`EventType::Deleted`]
//!   events in commit order; with `replay` it first sends every existing object as `Added`.
//!   A watcher that falls too far behind gets [`StoreError::WatchLagged`] and its stream
//!   ends: watch again (with replay) and reconcile.

pub mod embedded;
#[cfg(feature = "kubernetes")]
pub mod kubernetes;
#[cfg(feature = "k8s-emulator")]
pub mod kubernetes_emulator;
#[cfg(feature = "kubernetes")]
pub mod kubernetes_lease;
#[cfg(feature = "kubernetes")]
pub mod kubernetes_manager;
#[cfg(all(test, feature = "k8s-emulator"))]
mod kubernetes_tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use serde::Serialize;
use serde_json::Value;

use crate::resources::{Kind, Object};

pub use embedded::EmbeddedStore;

/// How long update helpers ([`Store::modify`]) keep retrying on conflicts.
const MODIFY_ATTEMPTS: usize = 16;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No object of that kind and name.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Kind asked for.
        kind: Kind,
        /// Name asked for.
        name: String,
    },
    /// `create` of a name that is taken.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// Kind created.
        kind: Kind,
        /// Name that is taken.
        name: String,
    },
    /// An update carried a resourceVersion that is not the stored one.
    #[error(
        "{kind} {name:?} was changed since it was read (resourceVersion {given:?}, now {current:?}); read it again and retry"
    )]
    Conflict {
        /// Kind updated.
        kind: Kind,
        /// Name updated.
        name: String,
        /// resourceVersion the update carried.
        given: String,
        /// resourceVersion stored.
        current: String,
    },
    /// The object given cannot be stored (bad name, missing fields, wrong kind...).
    #[error("invalid {kind}: {reason}")]
    Invalid {
        /// Kind of the object.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
    /// The watcher fell behind the stream of changes; watch again.
    #[error("watch fell behind by {0} events; watch again")]
    WatchLagged(u64),
    /// The backend itself failed (I/O, database, API server).
    #[error("store {op} failed: {source}")]
    Backend {
        /// Operation that failed.
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    /// Whether this is a [`StoreError::Conflict`].
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    /// Whether this is a [`StoreError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventType {
    /// Created (or, in a replay, already there).
    Added,
    /// Changed (spec, status or metadata; deletion requested).
    Modified,
    /// Gone.
    Deleted,
}

/// A change to an object, as JSON (what backends produce and `/v1/events` sends).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RawEvent {
    /// What happened.
    #[serde(rename = "type")]
    pub type_: EventType,
    /// Kind of the object.
    pub kind: Kind,
    /// The object after the change (for `Deleted`: its last state).
    pub object: Value,
}

/// A change to an object of kind `K`.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent<K> {
    /// Created (or, in a replay, already there).
    Added(K),
    /// Changed.
    Modified(K),
    /// Gone (its last state).
    Deleted(K),
}

impl<K> WatchEvent<K> {
    /// The object the event is about.
    pub fn object(&self) -> &K {
        match self {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => o,
        }
    }
}

/// A store backend: objects as JSON (`apiVersion`, `kind`, `metadata`, `spec`, `status`),
/// keyed by kind and name. Object-safe so the manager can hold `Arc<dyn StoreBackend>`;
/// use it through [`Store`], which adds types and checks names. See the module docs for
/// the semantics each method must keep.
#[async_trait]
pub trait StoreBackend: Send + Sync + 'static {
    /// The object, or `None`.
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Value>>;
    /// Every object of `kind`, sorted by name.
    async fn list(&self, kind: Kind) -> Result<Vec<Value>>;
    /// Stores a new object; returns it as stored.
    async fn create(&self, kind: Kind, object: Value) -> Result<Value>;
    /// Replaces spec and metadata if `metadata.resourceVersion` is current; returns the
    /// object as stored (it may be gone: `Ok(None)` when the last finalizer of an object
    /// being deleted was removed).
    async fn update(&self, kind: Kind, object: Value) -> Result<Option<Value>>;
    /// Replaces the status if `metadata.resourceVersion` is current.
    async fn update_status(&self, kind: Kind, object: Value) -> Result<Value>;
    /// Deletes the object, or marks it deleted while finalizers remain (then returns it).
    async fn delete(&self, kind: Kind, name: &str) -> Result<Option<Value>>;
    /// Changes to objects of `kind` (every kind when `None`), from now on; with `replay`,
    /// first an `Added` for each existing object.
    async fn watch(
        &self,
        kind: Option<Kind>,
        replay: bool,
    ) -> Result<BoxStream<'static, Result<RawEvent>>>;
}

/// The typed store handle controllers, the API and tests use. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn StoreBackend>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// A store over `backend`.
    pub fn new(backend: Arc<dyn StoreBackend>) -> Self {
        Store { backend }
    }

    /// Opens (or creates) the embedded store file at `path`.
    pub fn open_embedded(path: impl AsRef<std::path::Path>) -> Result<Self> {
        Ok(Store::new(Arc::new(EmbeddedStore::open(path)?)))
    }

    /// The backend under this handle.
    pub fn backend(&self) -> &Arc<dyn StoreBackend> {
        &self.backend
    }

    /// The object named `name`, or `None`.
    pub async fn get<K: Object>(&self, name: &str) -> Result<Option<K>> {
        match self.backend.get(K::KIND, name).await? {
            Some(v) => Ok(Some(from_json(v)?)),
            None => Ok(None),
        }
    }

    /// The object named `name`, or [`StoreError::NotFound`].
    pub async fn get_required<K: Object>(&self, name: &str) -> Result<K> {
        self.get(name).await?.ok_or_else(|| StoreError::NotFound {
            kind: K::KIND,
            name: name.to_owned(),
        })
    }

    /// Every object of kind `K`, sorted by name.
    pub async fn list<K: Object>(&self) -> Result<Vec<K>> {
        self.backend
            .list(K::KIND)
            .await?
            .into_iter()
            .map(from_json)
            .collect()
    }

    /// Stores a new object (its status is dropped; set it with [`Store::update_status`]).
    pub async fn create<K: Object>(&self, object: &K) -> Result<K> {
        validate_name(K::KIND, object.name())?;
        from_json(self.backend.create(K::KIND, to_json(object)?).await?)
    }

    /// Replaces spec and metadata of an object read earlier; [`StoreError::Conflict`] if it
    /// changed since. Returns `None` when this removed the last finalizer of an object
    /// being deleted (so it is gone).
    pub async fn update<K: Object>(&self, object: &K) -> Result<Option<K>> {
        match self.backend.update(K::KIND, to_json(object)?).await? {
            Some(v) => Ok(Some(from_json(v)?)),
            None => Ok(None),
        }
    }

    /// Replaces the status of an object read earlier; [`StoreError::Conflict`] if it changed.
    pub async fn update_status<K: Object>(&self, object: &K) -> Result<K> {
        from_json(
            self.backend
                .update_status(K::KIND, to_json(object)?)
                .await?,
        )
    }

    /// Deletes an object: gone at once (`Ok(None)`) without finalizers, else marked with a
    /// `deletionTimestamp` and returned. [`StoreError::NotFound`] if there is none.
    pub async fn delete<K: Object>(&self, name: &str) -> Result<Option<K>> {
        match self.backend.delete(K::KIND, name).await? {
            Some(v) => Ok(Some(from_json(v)?)),
            None => Ok(None),
        }
    }

    /// Reads `name`, applies `change` to it and writes spec and metadata back, retrying on
    /// conflicts with a fresh copy. Writes nothing if `change` changed nothing. An error
    /// from `change` aborts. Returns the object as stored (`None` if it is gone because
    /// `change` removed the last finalizer of an object being deleted).
    pub async fn modify<K, F>(&self, name: &str, mut change: F) -> Result<Option<K>>
    where
        K: Object,
        F: FnMut(&mut K) -> Result<()> + Send,
    {
        self.retry(name, |obj: &mut K| change(obj), false).await
    }

    /// Like [`Store::modify`] for the status.
    pub async fn modify_status<K, F>(&self, name: &str, mut change: F) -> Result<K>
    where
        K: Object,
        F: FnMut(&mut K) -> Result<()> + Send,
    {
        match self.retry(name, |obj: &mut K| change(obj), true).await? {
            Some(obj) => Ok(obj),
            None => Err(StoreError::NotFound {
                kind: K::KIND,
                name: name.to_owned(),
            }),
        }
    }

    async fn retry<K, F>(&self, name: &str, mut change: F, status: bool) -> Result<Option<K>>
    where
        K: Object,
        F: FnMut(&mut K) -> Result<()> + Send,
    {
        let mut last = None;
        for attempt in 0..MODIFY_ATTEMPTS {
            let current: K = self.get_required(name).await?;
            let mut changed = current.clone();
            change(&mut changed)?;
            if to_json(&changed)? == to_json(&current)? {
                return Ok(Some(current));
            }
            let written = if status {
                self.update_status(&changed).await.map(Some)
            } else {
                self.update(&changed).await
            };
            match written {
                Ok(o) => return Ok(o),
                Err(e) if e.is_conflict() => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(2 << attempt.min(6))).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Invalid {
            kind: K::KIND,
            reason: "modify gave up".into(),
        }))
    }

    /// Adds `finalizer` to the object if it lacks it.
    pub async fn add_finalizer<K: Object>(&self, name: &str, finalizer: &str) -> Result<Option<K>> {
        self.modify(name, |o: &mut K| {
            let list = o.meta_mut().finalizers.get_or_insert_with(Vec::new);
            if !list.iter().any(|f| f == finalizer) {
                list.push(finalizer.to_owned());
            }
            Ok(())
        })
        .await
    }

    /// Removes `finalizer` from the object; when it was the last one of an object being
    /// deleted, the object goes away (`Ok(None)`).
    pub async fn remove_finalizer<K: Object>(
        &self,
        name: &str,
        finalizer: &str,
    ) -> Result<Option<K>> {
        self.modify(name, |o: &mut K| {
            if let Some(list) = o.meta_mut().finalizers.as_mut() {
                list.retain(|f| f != finalizer);
            }
            Ok(())
        })
        .await
    }

    /// Changes to objects of kind `K`; with `replay`, first every existing one as `Added`.
    pub async fn watch<K: Object>(
        &self,
        replay: bool,
    ) -> Result<BoxStream<'static, Result<WatchEvent<K>>>> {
        let raw = self.backend.watch(Some(K::KIND), replay).await?;
        Ok(raw
            .map(|event| {
                let event = event?;
                let object: K = from_json(event.object)?;
                Ok(match event.type_ {
                    EventType::Added => WatchEvent::Added(object),
                    EventType::Modified => WatchEvent::Modified(object),
                    EventType::Deleted => WatchEvent::Deleted(object),
                })
            })
            .boxed())
    }

    /// Changes to objects of every kind, as JSON (the `/v1/events` stream).
    pub async fn watch_all(&self, replay: bool) -> Result<BoxStream<'static, Result<RawEvent>>> {
        self.backend.watch(None, replay).await
    }
}

/// Checks a name is a DNS-1123 subdomain: 1..=253 characters of `a-z`, `0-9`, `-`, `.`,
/// starting and ending with a letter or digit.
pub fn validate_name(kind: Kind, name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty()
        || name.len() > 253
        || !name.chars().all(ok_char)
        || !alnum(name.chars().next())
        || !alnum(name.chars().last())
    {
        return Err(StoreError::Invalid {
            kind,
            reason: format!(
                "name {name:?} must be 1-253 characters of a-z, 0-9, '-' and '.', starting and ending with a letter or digit"
            ),
        });
    }
    Ok(())
}

fn to_json<K: Object>(object: &K) -> Result<Value> {
    serde_json::to_value(object).map_err(|e| StoreError::Invalid {
        kind: K::KIND,
        reason: format!("cannot serialise: {e}"),
    })
}

fn from_json<K: Object>(value: Value) -> Result<K> {
    serde_json::from_value(value).map_err(|e| StoreError::Backend {
        op: "decode",
        source: format!("stored {} does not parse: {e}", K::KIND).into(),
    })
}

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod tests;
