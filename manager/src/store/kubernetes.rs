//! The Kubernetes backend: every resource kind is a CustomResourceDefinition (group
//! `ironhorn.io`, namespaced, status subresource) and objects live in the API server of the
//! cluster the manager runs in, in one namespace.
//!
//! How the store's semantics map onto the API server:
//! - get / list / create / delete are the plain REST calls (`Api<DynamicObject>`);
//! - `update` is a replace (PUT) carrying the resourceVersion that was read and
//!   `update_status` a replace of the `/status` subresource: a stale resourceVersion is
//!   409 Conflict, which becomes [`StoreError::Conflict`];
//! - finalizers and `deletionTimestamp` are the API server's own: a delete of an object with
//!   finalizers marks it, and the update that removes the last finalizer makes it go away
//!   (the API server answers that update with the object's final state, which this backend
//!   turns into `Ok(None)`);
//! - `watch` runs kube-runtime's watcher (list, then watch from the list's
//!   resourceVersion, re-list on 410 Gone, reconnect with back-off) and keeps the objects it
//!   has seen, so that after a re-list it sends what changed meanwhile as
//!   `Added`/`Modified`/`Deleted` instead of ending the stream. Events of one kind come in
//!   the API server's order; events of different kinds (watch of every kind) are merged
//!   as they arrive (Kubernetes has no order across resources).
//!
//! The client comes from the environment ([`KubernetesStore::connect`]): in a pod, the
//! service account; outside, the kubeconfig (`KUBECONFIG` or `~/.kube/config`). The
//! namespace is `POD_NAMESPACE` when set, else the client's default namespace.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::ApiResource;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use kube::{CustomResourceExt, Resource};
use serde_json::Value;
use tracing::Instrument;

use super::{EventType, RawEvent, Result, StoreBackend, StoreError};
use crate::resources::{
    API_VERSION, Backup, BackupTarget, Engine, GROUP, Kind, Node, RecurringJob, Replica, Setting,
    Snapshot, VERSION, Volume,
};

/// Environment variable naming the namespace the objects live in (set from the pod's
/// namespace in deploy/manager.yaml).
pub const NAMESPACE_ENV: &str = "POD_NAMESPACE";

/// The CustomResourceDefinitions of every resource kind, in [`Kind::ALL`] order, as
/// generated from the Rust types; `ironhorn crd` prints them and deploy/crds.yaml holds them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    Kind::ALL.into_iter().map(crd).collect()
}

/// The CustomResourceDefinition of one kind.
pub fn crd(kind: Kind) -> CustomResourceDefinition {
    match kind {
        Kind::Volume => Volume::crd(),
        Kind::Engine => Engine::crd(),
        Kind::Replica => Replica::crd(),
        Kind::Node => Node::crd(),
        Kind::Snapshot => Snapshot::crd(),
        Kind::Backup => Backup::crd(),
        Kind::BackupTarget => BackupTarget::crd(),
        Kind::RecurringJob => RecurringJob::crd(),
        Kind::Setting => Setting::crd(),
    }
}

fn api_resource(kind: Kind) -> ApiResource {
    ApiResource {
        group: GROUP.to_string(),
        version: VERSION.to_string(),
        api_version: API_VERSION.to_string(),
        kind: kind.as_str().to_string(),
        plural: kind.plural().to_string(),
    }
}

/// Store backend on the Kubernetes API server.
#[derive(Clone)]
pub struct KubernetesStore {
    client: kube::Client,
    namespace: String,
}

impl std::fmt::Debug for KubernetesStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesStore")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

fn backend_error(
    op: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::Backend {
        op,
        source: Box::new(e),
    }
}

impl KubernetesStore {
    /// A store on `client`, keeping objects in `namespace`.
    pub fn new(client: kube::Client, namespace: impl Into<String>) -> KubernetesStore {
        KubernetesStore {
            client,
            namespace: namespace.into(),
        }
    }

    /// Connects with the client configuration of the environment (in-cluster service
    /// account, else kubeconfig); the namespace is `namespace`, else `POD_NAMESPACE`, else
    /// the configuration's default. Checks that the CRDs are installed.
    pub async fn connect(namespace: Option<String>) -> Result<KubernetesStore> {
        let config = kube::Config::infer()
            .await
            .map_err(|e| backend_error("connect", e))?;
        let namespace = namespace
            .filter(|n| !n.is_empty())
            .or_else(|| std::env::var(NAMESPACE_ENV).ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = kube::Client::try_from(config).map_err(|e| backend_error("connect", e))?;
        let store = KubernetesStore::new(client, namespace);
        store.check_crds().await?;
        Ok(store)
    }

    /// The client (for leader election and anything else beside the store).
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The namespace the objects live in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Lists every kind once: fails with a clear error when a CRD is missing (404) or the
    /// service account may not read it (403).
    pub async fn check_crds(&self) -> Result<()> {
        for kind in Kind::ALL {
            let lp = ListParams::default().limit(1);
            if let Err(e) = self.api(kind).list_metadata(&lp).await {
                let hint = match &e {
                    kube::Error::Api(s) if s.code == 404 => {
                        " (the CRD is not installed: kubectl apply -k deploy/)".to_string()
                    }
                    kube::Error::Api(s) if s.code == 403 => {
                        " (the service account may not list it: see deploy/rbac.yaml)".to_string()
                    }
                    _ => String::new(),
                };
                return Err(StoreError::Backend {
                    op: "check CRDs",
                    source: format!(
                        "listing {}.{GROUP} in namespace {}: {e}{hint}",
                        kind.plural(),
                        self.namespace
                    )
                    .into(),
                });
            }
        }
        Ok(())
    }

    fn api(&self, kind: Kind) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.namespace, &api_resource(kind))
    }

    /// Turns a client error into the store's, naming what failed.
    async fn error(
        &self,
        kind: Kind,
        name: &str,
        op: &'static str,
        given: &str,
        e: kube::Error,
    ) -> StoreError {
        match e {
            kube::Error::Api(s) if s.code == 404 => StoreError::NotFound {
                kind,
                name: name.to_string(),
            },
            kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists" => {
                StoreError::AlreadyExists {
                    kind,
                    name: name.to_string(),
                }
            }
            kube::Error::Api(s) if s.code == 409 => {
                let current = match self.api(kind).get_metadata_opt(name).await {
                    Ok(Some(m)) => m.metadata.resource_version.unwrap_or_default(),
                    Ok(None) => "(deleted)".to_string(),
                    Err(_) => "(unknown)".to_string(),
                };
                StoreError::Conflict {
                    kind,
                    name: name.to_string(),
                    given: given.to_string(),
                    current,
                }
            }
            kube::Error::Api(s) if s.code == 422 || s.code == 400 => StoreError::Invalid {
                kind,
                reason: s.message,
            },
            other => backend_error(op, other),
        }
    }

    fn to_dynamic(kind: Kind, mut object: Value, namespace: &str) -> Result<DynamicObject> {
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), Value::String(namespace.to_string()));
        }
        serde_json::from_value(object).map_err(|e| StoreError::Invalid {
            kind,
            reason: format!("not an object: {e}"),
        })
    }
}

fn to_value(kind: Kind, object: &DynamicObject) -> Result<Value> {
    serde_json::to_value(object).map_err(|e| StoreError::Backend {
        op: "decode",
        source: format!("{kind} from the API server: {e}").into(),
    })
}

fn name_of(object: &Value) -> String {
    object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn rv_of(object: &Value) -> String {
    object
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// Whether the API server's answer to an update is the last state of an object that is
/// now gone (deletion requested, no finalizer left).
fn gone(object: &DynamicObject) -> bool {
    object.meta().deletion_timestamp.is_some()
        && object.meta().finalizers.as_ref().is_none_or(Vec::is_empty)
}

#[async_trait]
impl StoreBackend for KubernetesStore {
    async fn get(&self, kind: Kind, name: &str) -> Result<Option<Value>> {
        match self.api(kind).get_opt(name).await {
            Ok(Some(o)) => Ok(Some(to_value(kind, &o)?)),
            Ok(None) => Ok(None),
            Err(e) => Err(self.error(kind, name, "get", "", e).await),
        }
    }

    async fn list(&self, kind: Kind) -> Result<Vec<Value>> {
        let list = match self.api(kind).list(&ListParams::default()).await {
            Ok(l) => l,
            Err(e) => return Err(self.error(kind, "", "list", "", e).await),
        };
        let mut items = list
            .items
            .iter()
            .map(|o| to_value(kind, o))
            .collect::<Result<Vec<_>>>()?;
        items.sort_by_key(name_of);
        Ok(items)
    }

    async fn create(&self, kind: Kind, mut object: Value) -> Result<Value> {
        let name = name_of(&object);
        // Server-owned fields: the API server refuses a create that sets them.
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            for field in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "managedFields",
            ] {
                meta.remove(field);
            }
        }
        let dynamic = Self::to_dynamic(kind, object, &self.namespace)?;
        match self
            .api(kind)
            .create(&PostParams::default(), &dynamic)
            .await
        {
            Ok(o) => to_value(kind, &o),
            Err(e) => Err(self.error(kind, &name, "create", "", e).await),
        }
    }

    async fn update(&self, kind: Kind, object: Value) -> Result<Option<Value>> {
        let name = name_of(&object);
        let given = rv_of(&object);
        if given.is_empty() {
            return Err(StoreError::Invalid {
                kind,
                reason: format!("update of {name:?} without the resourceVersion that was read"),
            });
        }
        let dynamic = Self::to_dynamic(kind, object, &self.namespace)?;
        match self
            .api(kind)
            .replace(&name, &PostParams::default(), &dynamic)
            .await
        {
            Ok(o) if gone(&o) => Ok(None),
            Ok(o) => Ok(Some(to_value(kind, &o)?)),
            Err(e) => Err(self.error(kind, &name, "update", &given, e).await),
        }
    }

    async fn update_status(&self, kind: Kind, object: Value) -> Result<Value> {
        let name = name_of(&object);
        let given = rv_of(&object);
        if given.is_empty() {
            return Err(StoreError::Invalid {
                kind,
                reason: format!(
                    "status update of {name:?} without the resourceVersion that was read"
                ),
            });
        }
        let dynamic = Self::to_dynamic(kind, object, &self.namespace)?;
        match self
            .api(kind)
            .replace_status(&name, &PostParams::default(), &dynamic)
            .await
        {
            Ok(o) => to_value(kind, &o),
            Err(e) => Err(self.error(kind, &name, "update status", &given, e).await),
        }
    }

    async fn delete(&self, kind: Kind, name: &str) -> Result<Option<Value>> {
        match self.api(kind).delete(name, &DeleteParams::default()).await {
            // The object while finalizers remain; a `Status` (or the object's last state)
            // once it is gone.
            Ok(answer) => match answer.left() {
                Some(o) if !gone(&o) && o.meta().deletion_timestamp.is_some() => {
                    Ok(Some(to_value(kind, &o)?))
                }
                _ => Ok(None),
            },
            Err(e) => Err(self.error(kind, name, "delete", "", e).await),
        }
    }

    async fn watch(
        &self,
        kind: Option<Kind>,
        replay: bool,
    ) -> Result<BoxStream<'static, Result<RawEvent>>> {
        let kinds: Vec<Kind> = match kind {
            Some(k) => vec![k],
            None => Kind::ALL.to_vec(),
        };
        let mut streams = Vec::with_capacity(kinds.len());
        for kind in kinds {
            let events = watch_kind(self.api(kind), kind, replay).await?;
            streams.push(tokio_stream::wrappers::ReceiverStream::new(events).boxed());
        }
        Ok(stream::select_all(streams).boxed())
    }
}

/// How long `watch` waits for the first list of a kind before it gives up.
const INITIAL_LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// Events buffered per watched kind before the watcher waits for the reader.
const WATCH_BUFFER: usize = 1024;

/// Starts kube's watcher on one kind in a task and returns once its first list is done, so
/// that every change after the call is reported. The task diffs each (re-)list against the
/// objects it has seen, so a re-list reports only what changed; it ends when the receiver
/// is dropped.
async fn watch_kind(
    api: Api<DynamicObject>,
    kind: Kind,
    replay: bool,
) -> Result<tokio::sync::mpsc::Receiver<Result<RawEvent>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let span = tracing::info_span!("watch", %kind);
    tokio::spawn(
        async move {
            let mut ready = Some(ready_tx);
            let mut seen: BTreeMap<String, Value> = BTreeMap::new();
            let mut relisting: Option<BTreeMap<String, Value>> = None;
            let mut first = true;
            let mut events = watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    next = events.next() => next,
                };
                let event = match next {
                    None => return,
                    Some(Ok(e)) => e,
                    Some(Err(e)) => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(Err(backend_error("watch", e)));
                            return;
                        }
                        // The watcher recovers by itself (re-list, reconnect with back-off).
                        tracing::warn!(error = %e, "watch of the API server failed; retrying");
                        continue;
                    }
                };
                let mut out: Vec<(EventType, Value)> = Vec::new();
                match event {
                    watcher::Event::Init => relisting = Some(BTreeMap::new()),
                    watcher::Event::InitApply(o) => {
                        if let (Some(buf), Ok(v)) = (relisting.as_mut(), to_value(kind, &o)) {
                            buf.insert(name_of(&v), v);
                        }
                    }
                    watcher::Event::InitDone => {
                        let listed = relisting.take().unwrap_or_default();
                        if !first || replay {
                            for (name, old) in &seen {
                                if !listed.contains_key(name) {
                                    out.push((EventType::Deleted, old.clone()));
                                }
                            }
                            for (name, new) in &listed {
                                match seen.get(name) {
                                    None => out.push((EventType::Added, new.clone())),
                                    Some(old) if rv_of(old) != rv_of(new) => {
                                        out.push((EventType::Modified, new.clone()))
                                    }
                                    Some(_) => {}
                                }
                            }
                        }
                        seen = listed;
                        first = false;
                    }
                    watcher::Event::Apply(o) => {
                        if let Ok(v) = to_value(kind, &o) {
                            let name = name_of(&v);
                            let type_ = if seen.contains_key(&name) {
                                EventType::Modified
                            } else {
                                EventType::Added
                            };
                            seen.insert(name, v.clone());
                            out.push((type_, v));
                        }
                    }
                    watcher::Event::Delete(o) => {
                        if let Ok(v) = to_value(kind, &o) {
                            seen.remove(&name_of(&v));
                            out.push((EventType::Deleted, v));
                        }
                    }
                }
                for (type_, object) in out {
                    let event = RawEvent {
                        type_,
                        kind,
                        object,
                    };
                    if tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if !first && let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                }
            }
        }
        .instrument(span),
    );
    match tokio::time::timeout(INITIAL_LIST_TIMEOUT, ready_rx).await {
        Ok(Ok(Ok(()))) => Ok(rx),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(StoreError::Backend {
            op: "watch",
            source: format!("the watch of {kind} ended before its first list").into(),
        }),
        Err(_) => Err(StoreError::Backend {
            op: "watch",
            source: format!("the first list of {kind} took over {INITIAL_LIST_TIMEOUT:?}").into(),
        }),
    }
}
