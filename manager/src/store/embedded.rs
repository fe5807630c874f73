//! The embedded backend: every object as JSON in one redb file under the data directory.
//!
//! One table maps `Kind/name` to the object's JSON; another holds the store's revision, a
//! counter bumped by every write and used as `resourceVersion` (like etcd's). redb commits
//! are durable and atomic, so a crash leaves either the old or the new object. Writes are
//! serialised by one lock, which also orders the watch events; readers never block.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use super::{EventType, RawEvent, Result, StoreBackend, StoreError};
use crate::resources::{API_VERSION, Kind};

/// `Kind/name` → object JSON.
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
/// `revision` → last revision handed out.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// Events a watcher may fall behind by before it gets `WatchLagged`.
pub(crate) const WATCH_BUFFER: usize = 4096;

/// Store backend on a single redb file.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: Database,
    /// Held across each write transaction and its event, so events go out in commit order.
    write: Mutex<()>,
    events: broadcast::Sender<RawEvent>,
}

fn backend(op: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
    move |e| StoreError::Backend {
        op,
        source: Box::new(e),
    }
}

fn key(kind: Kind, name: &str) -> String {
    format!("{}/{name}", kind.as_str())
}

impl EmbeddedStore {
    /// Opens the store file at `path`, creating it (not its directory) if missing.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let db = Database::create(&path).map_err(|e| StoreError::Backend {
            op: "open",
            source: format!("{}: {e}", path.display()).into(),
        })?;
        // Create the tables so readers never meet a missing one.
        let tx = db.begin_write().map_err(|e| backend("open")(e.into()))?;
        {
            tx.open_table(OBJECTS)
                .map_err(|e| backend("open")(e.into()))?;
            tx.open_table(META).map_err(|e| backend("open")(e.into()))?;
        }
        tx.commit().map_err(|e| backend("open")(e.into()))?;
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                path,
                db,
                write: Mutex::new(()),
                events,
            }),
        })
    }

    /// Path of the store file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Backend {
                op: "task",
                source: Box::new(e),
            })?
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, ()> {
        // A panic while holding the lock leaves nothing half-done (redb rolls back an
        // uncommitted transaction), so a poisoned lock is safe to take.
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Option<Value>> {
        let tx = self.db.begin_read().map_err(|e| backend("get")(e.into()))?;
        let table = tx
            .open_table(OBJECTS)
            .map_err(|e| backend("get")(e.into()))?;
        let got = table
            .get(key(kind, name).as_str())
            .map_err(|e| backend("get")(e.into()))?;
        got.map(|v| decode(kind, v.value())).transpose()
    }

    fn read_all(&self, kind: Option<Kind>) -> Result<Vec<(Kind, Value)>> {
        let tx = self
            .db
            .begin_read()
            .map_err(|e| backend("list")(e.into()))?;
        let table = tx
            .open_table(OBJECTS)
            .map_err(|e| backend("list")(e.into()))?;
        let mut out = Vec::new();
        let kinds: Vec<Kind> = match kind {
            Some(k) => vec![k],
            None => Kind::ALL.to_vec(),
        };
        for kind in kinds {
            let lo = format!("{}/", kind.as_str());
            let hi = format!("{}0", kind.as_str()); // '0' sorts right after '/'
            for entry in table
                .range(lo.as_str()..hi.as_str())
                .map_err(|e| backend("list")(e.into()))?
            {
                let (_, v) = entry.map_err(|e| backend("list")(e.into()))?;
                out.push((kind, decode(kind, v.value())?));
            }
        }
        Ok(out)
    }

    /// Runs one write: `f` sees the current object (if any) and the next revision and says
    /// what to store (`Some`) or remove (`None`) and which event to send.
    fn write<F>(&self, op: &'static str, kind: Kind, name: &str, f: F) -> Result<Option<Value>>
    where
        F: FnOnce(Option<Value>, u64) -> Result<(Option<Value>, EventType, Value)>,
    {
        let _guard = self.lock();
        let tx = self.db.begin_write().map_err(|e| backend(op)(e.into()))?;
        let k = key(kind, name);
        let (stored, event) = {
            let mut objects = tx.open_table(OBJECTS).map_err(|e| backend(op)(e.into()))?;
            let mut meta = tx.open_table(META).map_err(|e| backend(op)(e.into()))?;
            let current = objects
                .get(k.as_str())
                .map_err(|e| backend(op)(e.into()))?
                .map(|v| decode(kind, v.value()))
                .transpose()?;
            let revision = meta
                .get(REVISION)
                .map_err(|e| backend(op)(e.into()))?
                .map(|v| v.value())
                .unwrap_or(0)
                + 1;
            let (stored, event_type, event_object) = f(current, revision)?;
            match &stored {
                Some(obj) => {
                    let bytes = serde_json::to_vec(obj).map_err(|e| StoreError::Backend {
                        op,
                        source: Box::new(e),
                    })?;
                    objects
                        .insert(k.as_str(), bytes.as_slice())
                        .map_err(|e| backend(op)(e.into()))?;
                }
                None => {
                    objects
                        .remove(k.as_str())
                        .map_err(|e| backend(op)(e.into()))?;
                }
            }
            meta.insert(REVISION, revision)
                .map_err(|e| backend(op)(e.into()))?;
            (
                stored,
                RawEvent {
                    type_: event_type,
                    kind,
                    object: event_object,
                },
            )
        };
        tx.commit().map_err(|e| backend(op)(e.into()))?;
        // No receivers is fine: nobody watches.
        let _ = self.events.send(event);
        Ok(stored)
    }
}

fn decode(kind: Kind, bytes: &[u8]) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Backend {
        op: "decode",
        source: format!("stored {kind} is not JSON: {e}").into(),
    })
}

fn invalid(kind: Kind, reason: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        kind,
        reason: reason.into(),
    }
}

/// Splits an object into its metadata and the rest, checking it is of `kind`.
fn split(kind: Kind, mut object: Value) -> Result<(ObjectMeta, serde_json::Map<String, Value>)> {
    let Value::Object(map) = &mut object else {
        return Err(invalid(kind, "object is not a JSON object"));
    };
    if let Some(k) = map.get("kind").and_then(Value::as_str)
        && k != kind.as_str()
    {
        return Err(invalid(kind, format!("object has kind {k:?}")));
    }
    let meta = map.remove("metadata").unwrap_or(Value::Null);
    let meta: ObjectMeta = if meta.is_null() {
        ObjectMeta::default()
    } else {
        serde_json::from_value(meta).map_err(|e| invalid(kind, format!("bad metadata: {e}")))?
    };
    let Value::Object(map) = object else {
        return Err(invalid(kind, "object is not a JSON object"));
    };
    Ok((meta, map))
}

fn join(kind: Kind, meta: &ObjectMeta, mut rest: serde_json::Map<String, Value>) -> Result<Value> {
    rest.insert("apiVersion".into(), Value::String(API_VERSION.into()));
    rest.insert("kind".into(), Value::String(kind.as_str().into()));
    let meta = serde_json::to_value(meta).map_err(|e| invalid(kind, e.to_string()))?;
    rest.insert("metadata".into(), meta);
    Ok(Value::Object(rest))
}

fn name_of(kind: Kind, meta: &ObjectMeta) -> Result<String> {
    meta.name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid(kind, "metadata.name is missing"))
}

fn check_version(kind: Kind, name: &str, given: &ObjectMeta, current: &ObjectMeta) -> Result<()> {
    let current_rv = current.resource_version.clone().unwrap_or_default();
    match &given.resource_version {
        Some(rv) if *rv == current_rv => Ok(()),
        Some(rv) => Err(StoreError::Conflict {
            kind,
            name: name.to_owned(),
            given: rv.clone(),
            current: current_rv,
        }),
        None => Err(invalid(
            kind,
            "metadata.resourceVersion is required on update (read the object first)",
        )),
    }
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

#[async_trait]
impl StoreBackend for EmbeddedStore {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Value>> {
        let name = name.to_owned();
        self.blocking(move |inner| inner.read(kind, &name)).await
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Value>> {
        self.blocking(move |inner| {
            Ok(inner
                .read_all(Some(kind))?
                .into_iter()
                .map(|(_, v)| v)
                .collect())
        })
        .await
    }

    async fn create(&self, kind: Kind, object: Value) -> Result<Value> {
        let (mut meta, mut rest) = split(kind, object)?;
        let name = name_of(kind, &meta)?;
        rest.remove("status");
        self.blocking(move |inner| {
            let stored = inner.write("create", kind, &name.clone(), |current, revision| {
                if current.is_some() {
                    return Err(StoreError::AlreadyExists { kind, name });
                }
                meta.uid = Some(format!(
                    "{revision:016x}-{:016x}",
                    jiff::Timestamp::now().as_nanosecond() as u64
                ));
                meta.creation_timestamp = Some(now());
                meta.resource_version = Some(revision.to_string());
                meta.generation = Some(1);
                meta.deletion_timestamp = None;
                let obj = join(kind, &meta, rest)?;
                Ok((Some(obj.clone()), EventType::Added, obj))
            })?;
            stored.ok_or_else(|| invalid(kind, "created object vanished"))
        })
        .await
    }

    async fn update(&self, kind: Kind, object: Value) -> Result<Option<Value>> {
        let (given, mut rest) = split(kind, object)?;
        let name = name_of(kind, &given)?;
        rest.remove("status");
        self.blocking(move |inner| {
            inner.write("update", kind, &name.clone(), |current, revision| {
                let current = current.ok_or_else(|| StoreError::NotFound {
                    kind,
                    name: name.clone(),
                })?;
                let (old, mut old_rest) = split(kind, current)?;
                check_version(kind, &name, &given, &old)?;
                // As the Kubernetes API server: an object being deleted takes no new
                // finalizer (it would only delay a deletion already under way).
                if old.deletion_timestamp.is_some() {
                    let before = old.finalizers.clone().unwrap_or_default();
                    if let Some(new) = given
                        .finalizers
                        .iter()
                        .flatten()
                        .find(|f| !before.contains(f))
                    {
                        return Err(StoreError::Invalid {
                            kind,
                            reason: format!(
                                "{name} is being deleted: no new finalizer ({new}) can be added"
                            ),
                        });
                    }
                }
                let mut meta = old.clone();
                meta.labels = given.labels.clone();
                meta.annotations = given.annotations.clone();
                meta.finalizers = given.finalizers.clone().filter(|f| !f.is_empty());
                meta.owner_references = given.owner_references.clone();
                meta.resource_version = Some(revision.to_string());
                if old_rest.get("spec") != rest.get("spec") {
                    meta.generation = Some(old.generation.unwrap_or(1) + 1);
                }
                if let Some(status) = old_rest.remove("status") {
                    rest.insert("status".into(), status);
                }
                let obj = join(kind, &meta, rest)?;
                if meta.deletion_timestamp.is_some() && meta.finalizers.is_none() {
                    Ok((None, EventType::Deleted, obj))
                } else {
                    Ok((Some(obj.clone()), EventType::Modified, obj))
                }
            })
        })
        .await
    }

    async fn update_status(&self, kind: Kind, object: Value) -> Result<Value> {
        let (given, mut rest) = split(kind, object)?;
        let name = name_of(kind, &given)?;
        let status = rest.remove("status");
        self.blocking(move |inner| {
            let stored =
                inner.write("update_status", kind, &name.clone(), |current, revision| {
                    let current = current.ok_or_else(|| StoreError::NotFound {
                        kind,
                        name: name.clone(),
                    })?;
                    let (mut meta, mut old_rest) = split(kind, current)?;
                    check_version(kind, &name, &given, &meta)?;
                    meta.resource_version = Some(revision.to_string());
                    match status {
                        Some(s) if !s.is_null() => {
                            old_rest.insert("status".into(), s);
                        }
                        _ => {
                            old_rest.remove("status");
                        }
                    }
                    let obj = join(kind, &meta, old_rest)?;
                    Ok((Some(obj.clone()), EventType::Modified, obj))
                })?;
            stored.ok_or_else(|| invalid(kind, "updated object vanished"))
        })
        .await
    }

    async fn delete(&self, kind: Kind, name: &str) -> Result<Option<Value>> {
        let name = name.to_owned();
        self.blocking(move |inner| {
            // Deleting an object already marked changes nothing: skip the write.
            if let Some(current) = inner.read(kind, &name)? {
                let (meta, _) = split(kind, current.clone())?;
                if meta.deletion_timestamp.is_some() {
                    return Ok(Some(current));
                }
            }
            inner.write("delete", kind, &name.clone(), |current, revision| {
                let current = current.ok_or_else(|| StoreError::NotFound {
                    kind,
                    name: name.clone(),
                })?;
                let (mut meta, rest) = split(kind, current)?;
                meta.resource_version = Some(revision.to_string());
                if meta.finalizers.as_ref().is_some_and(|f| !f.is_empty()) {
                    if meta.deletion_timestamp.is_none() {
                        meta.deletion_timestamp = Some(now());
                    }
                    let obj = join(kind, &meta, rest)?;
                    Ok((Some(obj.clone()), EventType::Modified, obj))
                } else {
                    let obj = join(kind, &meta, rest)?;
                    Ok((None, EventType::Deleted, obj))
                }
            })
        })
        .await
    }

    async fn watch(
        &self,
        kind: Option<Kind>,
        replay: bool,
    ) -> Result<BoxStream<'static, Result<RawEvent>>> {
        let (receiver, existing) = self
            .blocking(move |inner| {
                // Subscribe and list under the write lock: no commit falls between them.
                let _guard = inner.lock();
                let receiver = inner.events.subscribe();
                let existing = if replay {
                    inner.read_all(kind)?
                } else {
                    Vec::new()
                };
                Ok((receiver, existing))
            })
            .await?;
        let replayed = stream::iter(existing.into_iter().map(|(kind, object)| {
            Ok(RawEvent {
                type_: EventType::Added,
                kind,
                object,
            })
        }));
        let live = BroadcastStream::new(receiver)
            .filter_map(move |event| {
                futures::future::ready(match event {
                    Ok(e) if kind.is_none_or(|k| k == e.kind) => Some(Ok(e)),
                    Ok(_) => None,
                    Err(BroadcastStreamRecvError::Lagged(n)) => {
                        Some(Err(StoreError::WatchLagged(n)))
                    }
                })
            })
            // A lagged watcher's stream ends after the error.
            .scan(false, |ended, item| {
                let out = if *ended { None } else { Some(item) };
                if let Some(Err(_)) = &out {
                    *ended = true;
                }
                futures::future::ready(out)
            });
        Ok(replayed.chain(live).boxed())
    }
}
