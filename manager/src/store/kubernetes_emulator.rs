//! A small stand-in for kube-apiserver, for tests: it serves the part of the Kubernetes REST
//! API that kube-rs uses for our custom resources and for Leases, over plain HTTP on
//! 127.0.0.1, from memory.
//!
//! What it does the way the real API server does:
//! - paths `/apis/{group}/{version}[/namespaces/{ns}]/{plural}[/{name}[/status]]` for the
//!   kinds it is given (from our CRDs, plus `coordination.k8s.io/v1` Leases);
//! - create (name or `generateName`; `uid`, `creationTimestamp`, `generation` set;
//!   409 `AlreadyExists`), get (404 `NotFound`), list (label and field selectors), replace
//!   (409 `Conflict` when `metadata.resourceVersion` is stale; custom resources must name
//!   one, 422 otherwise), JSON merge patch, delete (preconditions);
//! - one cluster-wide resourceVersion counter; a write that changes nothing keeps it;
//! - the status subresource: writes to the object ignore `.status`, writes to `/status`
//!   ignore everything else; `metadata.generation` grows when anything outside metadata and
//!   status changes; create drops `.status`;
//! - finalizers: deleting an object that has some sets `deletionTimestamp` and keeps it;
//!   the update that removes the last one deletes it; no finalizer may be added while the
//!   object is being deleted;
//! - watch: newline-delimited events (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`,
//!   `ERROR`) from a given resourceVersion (replayed from an event history) or from "now"
//!   (with the current objects as `ADDED`); `410 Gone` for a resourceVersion older than the
//!   history; `timeoutSeconds` closes the stream.
//!
//! What it leaves out: authentication, admission, schema validation and pruning, garbage
//! collection of owner references, server-side apply and JSON/strategic patches (415),
//! pagination (`limit` is ignored: every list is one page), dry runs (400).
//!
//! Tests can also misbehave on purpose: [`ApiServerEmulator::compact`] forgets the event
//! history (resumed watches get 410 and must re-list),
//! [`ApiServerEmulator::break_watches`] cuts every open watch stream and
//! [`ApiServerEmulator::pause_watches`] holds new ones back.

// Handlers return `Result<Response, Response>`: the error is the API server's answer.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, oneshot, watch};

/// Events kept for resumed watches before the oldest are dropped (a resume from before the
/// oldest kept event gets 410 Gone).
const HISTORY_LEN: usize = 10_000;
/// How often an idle watch that asked for bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);

/// One kind of object the emulator serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceKind {
    /// API group; empty for the core group.
    pub group: String,
    /// API version, e.g. `v1beta1`.
    pub version: String,
    /// Lower-case plural used in paths, e.g. `volumes`.
    pub plural: String,
    /// Kind, e.g. `Volume`.
    pub kind: String,
    /// Whether objects live in a namespace.
    pub namespaced: bool,
    /// Whether `.status` is a subresource.
    pub status_subresource: bool,
    /// Custom resources must name a resourceVersion on update; most built-in kinds need not.
    pub custom: bool,
}

impl ResourceKind {
    /// The kinds one CRD defines: one per served version.
    pub fn from_crd(crd: &CustomResourceDefinition) -> Vec<ResourceKind> {
        let spec = &crd.spec;
        spec.versions
            .iter()
            .filter(|v| v.served)
            .map(|v| ResourceKind {
                group: spec.group.clone(),
                version: v.name.clone(),
                plural: spec.names.plural.clone(),
                kind: spec.names.kind.clone(),
                namespaced: spec.scope == "Namespaced",
                status_subresource: v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                custom: true,
            })
            .collect()
    }

    /// `coordination.k8s.io/v1` Lease (leader election).
    pub fn lease() -> ResourceKind {
        ResourceKind {
            group: "coordination.k8s.io".into(),
            version: "v1".into(),
            plural: "leases".into(),
            kind: "Lease".into(),
            namespaced: true,
            status_subresource: false,
            custom: false,
        }
    }

    /// Core `v1` Secret (the manager's API token).
    pub fn secret() -> ResourceKind {
        ResourceKind {
            group: String::new(),
            version: "v1".into(),
            plural: "secrets".into(),
            kind: "Secret".into(),
            namespaced: true,
            status_subresource: false,
            custom: false,
        }
    }

    /// Every kind the manager uses: the ironhorn CRDs, Leases and Secrets.
    pub fn manager_kinds() -> Vec<ResourceKind> {
        let mut kinds: Vec<ResourceKind> = super::kubernetes::crds()
            .iter()
            .flat_map(ResourceKind::from_crd)
            .collect();
        kinds.push(ResourceKind::lease());
        kinds.push(ResourceKind::secret());
        kinds
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// A running emulator; stops when dropped.
#[derive(Debug)]
pub struct ApiServerEmulator {
    addr: SocketAddr,
    inner: Arc<Inner>,
    stop: Option<oneshot::Sender<()>>,
}

impl ApiServerEmulator {
    /// Starts serving `kinds` on 127.0.0.1 on a free port.
    pub async fn start(kinds: Vec<ResourceKind>) -> std::io::Result<ApiServerEmulator> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (events, _) = broadcast::channel(HISTORY_LEN);
        let (cut, _) = watch::channel(0u64);
        let (paused, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            kinds,
            state: Mutex::new(Db::default()),
            events,
            cut,
            paused,
            lists: AtomicU64::new(0),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = served.await {
                tracing::warn!(error = %e, "api server emulator stopped");
            }
        });
        Ok(ApiServerEmulator {
            addr,
            inner,
            stop: Some(stop),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client configuration pointing at this emulator, with `namespace` as default.
    pub fn kube_config(&self, namespace: &str) -> kube::Config {
        let mut config = kube::Config::new(self.url().parse().expect("a valid URL"));
        config.default_namespace = namespace.to_string();
        config
    }

    /// A kube client for this emulator, with `namespace` as default.
    pub fn kube_client(&self, namespace: &str) -> Result<kube::Client, kube::Error> {
        kube::Client::try_from(self.kube_config(namespace))
    }

    /// A kubeconfig file's text pointing at this emulator (no credentials).
    pub fn kubeconfig(&self, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: {}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    user: nobody\n    namespace: {namespace}\ncurrent-context: emulator\nusers:\n- name: nobody\n  user: {{}}\n",
            self.url()
        )
    }

    /// Forgets the event history: a watch resumed from any earlier resourceVersion gets
    /// 410 Gone (as after etcd compaction), so clients must list again.
    pub fn compact(&self) {
        let mut db = self.inner.lock();
        db.history.clear();
        db.compacted_to = db.rv;
    }

    /// Ends every open watch stream (as when an API server restarts).
    pub fn break_watches(&self) {
        self.inner.cut.send_modify(|n| *n += 1);
    }

    /// While paused, open watches are cut and new watch requests wait (as during an API
    /// server outage); unpausing lets them through.
    pub fn pause_watches(&self, paused: bool) {
        self.inner.paused.send_replace(paused);
        if paused {
            self.break_watches();
        }
    }

    /// How many list requests were served (a watcher's re-list shows here).
    pub fn list_requests(&self) -> u64 {
        self.inner.lists.load(AtomicOrdering::SeqCst)
    }

    /// The current cluster-wide resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    /// A stored object, as the API server would return it.
    pub fn object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        let db = self.inner.lock();
        db.objects
            .iter()
            .find(|(k, _)| {
                self.inner.kinds[k.kind].plural == plural
                    && k.namespace == namespace
                    && k.name == name
            })
            .map(|(_, v)| v.clone())
    }
}

impl Drop for ApiServerEmulator {
    fn drop(&mut self) {
        self.break_watches();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[derive(Debug)]
struct Inner {
    kinds: Vec<ResourceKind>,
    state: Mutex<Db>,
    events: broadcast::Sender<Arc<StoredEvent>>,
    /// Bumped to cut every open watch.
    cut: watch::Sender<u64>,
    /// While true, watch requests wait.
    paused: watch::Sender<bool>,
    /// List requests served.
    lists: AtomicU64,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    kind: usize,
    namespace: String,
    name: String,
}

#[derive(Debug, Default)]
struct Db {
    rv: u64,
    uid_counter: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<StoredEvent>>,
    compacted_to: u64,
}

#[derive(Debug)]
struct StoredEvent {
    rv: u64,
    key: Key,
    kind: &'static str,
    object: Value,
}

impl Db {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, inner: &Inner, key: Key, kind: &'static str, object: Value) {
        let event = Arc::new(StoredEvent {
            rv: self.rv,
            key,
            kind,
            object,
        });
        if self.history.len() == HISTORY_LEN
            && let Some(old) = self.history.pop_front()
        {
            self.compacted_to = old.rv;
        }
        self.history.push_back(event.clone());
        // No receiver is fine: nobody watches.
        let _ = inner.events.send(event);
    }
}

/// What a request path names.
#[derive(Debug)]
struct Target {
    kind: usize,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(kinds: &[ResourceKind], path: &str) -> Result<Target, Response> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => {
            return Err(status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route for {path}"),
            ));
        }
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(*sub)),
        _ => {
            return Err(status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route for {path}"),
            ));
        }
    };
    let kind = kinds
        .iter()
        .position(|k| k.group == group && k.version == version && k.plural == plural)
        .ok_or_else(|| {
            status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!(
                    "the server could not find the requested resource ({group}/{version} {plural})"
                ),
            )
        })?;
    if kinds[kind].namespaced != namespace.is_some() && (name.is_some() || !kinds[kind].namespaced)
    {
        return Err(status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!(
                "{plural} is {}namespaced",
                if kinds[kind].namespaced { "" } else { "not " }
            ),
        ));
    }
    let status = match sub {
        None => false,
        Some("status") if kinds[kind].status_subresource => true,
        Some(other) => {
            return Err(status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{plural} has no subresource {other}"),
            ));
        }
    };
    Ok(Target {
        kind,
        namespace,
        name,
        status,
    })
}

/// A `Status` failure, the body kube turns into `Error::Api`.
fn status_error(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn json_response(code: StatusCode, value: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn query_params(query: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k), percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let params = query_params(request.uri().query());
    let headers = request.headers().clone();
    let body = match axum::body::to_bytes(request.into_body(), 16 << 20).await {
        Ok(b) => b,
        Err(e) => {
            return status_error(StatusCode::BAD_REQUEST, "BadRequest", &format!("body: {e}"));
        }
    };
    let target = match parse_path(&inner.kinds, &path) {
        Ok(t) => t,
        Err(r) => return r,
    };
    if params.contains_key("dryRun") {
        return status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "dry runs are not emulated",
        );
    }
    let response = match (&method, &target.name) {
        (&Method::GET, None) if is_true(params.get("watch")) => {
            let mut paused = inner.paused.subscribe();
            // Only errors if the emulator is gone.
            let _ = paused.wait_for(|p| !*p).await;
            return watch_stream(inner, target, params);
        }
        (&Method::GET, None) => {
            inner.lists.fetch_add(1, AtomicOrdering::SeqCst);
            list(&inner, &target, &params)
        }
        (&Method::POST, None) => create(&inner, &target, &body),
        (&Method::GET, Some(name)) => get(&inner, &target, name),
        (&Method::PUT, Some(name)) => replace(&inner, &target, name, &body),
        (&Method::PATCH, Some(name)) => patch(&inner, &target, name, &headers, &body),
        (&Method::DELETE, Some(name)) => delete(&inner, &target, name, &body),
        _ => Err(status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("{method} {path} is not emulated"),
        )),
    };
    response.unwrap_or_else(|r| r)
}

fn is_true(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("true" | "1"))
}

fn key_of(target: &Target, name: &str) -> Key {
    Key {
        kind: target.kind,
        namespace: target.namespace.clone().unwrap_or_default(),
        name: name.to_string(),
    }
}

fn not_found(kind: &ResourceKind, name: &str) -> Response {
    status_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{}.{} \"{name}\" not found", kind.plural, kind.group),
    )
}

fn conflict(kind: &ResourceKind, name: &str) -> Response {
    status_error(
        StatusCode::CONFLICT,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            kind.plural, kind.group
        ),
    )
}

fn invalid(message: &str) -> Response {
    status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message)
}

fn parse_object(body: &Bytes) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not a JSON object",
        )),
        Err(e) => Err(status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the body is not JSON: {e}"),
        )),
    }
}

fn metadata_mut(obj: &mut Map<String, Value>) -> &mut Map<String, Value> {
    let meta = obj
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut().expect("made an object above")
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.get("metadata")
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn check_type(kind: &ResourceKind, obj: &Map<String, Value>) -> Result<(), Response> {
    let api_version = kind.api_version();
    if let Some(v) = obj.get("apiVersion")
        && v.as_str() != Some(api_version.as_str())
    {
        return Err(status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("apiVersion {v} does not match {api_version}"),
        ));
    }
    if let Some(k) = obj.get("kind")
        && k.as_str() != Some(kind.kind.as_str())
    {
        return Err(status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("kind {k} does not match {}", kind.kind),
        ));
    }
    Ok(())
}

fn list(
    inner: &Inner,
    target: &Target,
    params: &BTreeMap<String, String>,
) -> Result<Response, Response> {
    let filter = Filter::new(target, params)?;
    let kind = &inner.kinds[target.kind];
    let db = inner.lock();
    let items: Vec<Value> = db
        .objects
        .iter()
        .filter(|(k, v)| filter.matches(k, v))
        .map(|(_, v)| v.clone())
        .collect();
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.kind),
        "metadata": {"resourceVersion": db.rv.to_string()},
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

fn get(inner: &Inner, target: &Target, name: &str) -> Result<Response, Response> {
    let db = inner.lock();
    match db.objects.get(&key_of(target, name)) {
        Some(obj) => Ok(json_response(StatusCode::OK, obj)),
        None => Err(not_found(&inner.kinds[target.kind], name)),
    }
}

fn create(inner: &Inner, target: &Target, body: &Bytes) -> Result<Response, Response> {
    let kind = &inner.kinds[target.kind];
    if target.status {
        return Err(status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "create on /status",
        ));
    }
    let mut obj = parse_object(body)?;
    check_type(kind, &obj)?;
    let mut db = inner.lock();
    db.uid_counter += 1;
    let uid_n = db.uid_counter;
    let meta = metadata_mut(&mut obj);
    let name = match (
        meta.get("name").and_then(Value::as_str),
        meta.get("generateName").and_then(Value::as_str),
    ) {
        (Some(n), _) if !n.is_empty() => n.to_string(),
        (_, Some(prefix)) if !prefix.is_empty() => format!("{prefix}{:05x}", uid_n & 0xfffff),
        _ => {
            return Err(invalid(
                "metadata.name: Required value: name or generateName is required",
            ));
        }
    };
    if !valid_name(&name) {
        return Err(invalid(&format!(
            "metadata.name: Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
        )));
    }
    let namespace = target.namespace.clone().unwrap_or_default();
    if let Some(ns) = meta.get("namespace").and_then(Value::as_str)
        && kind.namespaced
        && !ns.is_empty()
        && ns != namespace
    {
        return Err(status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let key = Key {
        kind: target.kind,
        namespace: namespace.clone(),
        name: name.clone(),
    };
    if db.objects.contains_key(&key) {
        return Err(status_error(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("{}.{} \"{name}\" already exists", kind.plural, kind.group),
        ));
    }
    let rv = db.next_rv();
    meta.insert("name".into(), Value::String(name));
    if kind.namespaced {
        meta.insert("namespace".into(), Value::String(namespace));
    }
    meta.insert(
        "uid".into(),
        Value::String(format!("00000000-0000-4000-8000-{uid_n:012x}")),
    );
    meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    meta.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
    meta.insert("generation".into(), json!(1));
    meta.remove("deletionTimestamp");
    meta.remove("deletionGracePeriodSeconds");
    if kind.status_subresource {
        obj.remove("status");
    }
    obj.insert("apiVersion".into(), Value::String(kind.api_version()));
    obj.insert("kind".into(), Value::String(kind.kind.clone()));
    let obj = Value::Object(obj);
    db.objects.insert(key.clone(), obj.clone());
    db.record(inner, key, "ADDED", obj.clone());
    Ok(json_response(StatusCode::CREATED, &obj))
}

fn valid_name(name: &str) -> bool {
    name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn replace(inner: &Inner, target: &Target, name: &str, body: &Bytes) -> Result<Response, Response> {
    let obj = parse_object(body)?;
    write(inner, target, name, obj)
}

fn patch(
    inner: &Inner,
    target: &Target,
    name: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/merge-patch+json") {
        return Err(status_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!(
                "patch type {content_type} is not emulated (only application/merge-patch+json)"
            ),
        ));
    }
    let patch: Value = serde_json::from_slice(body).map_err(|e| {
        status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the patch is not JSON: {e}"),
        )
    })?;
    let current = {
        let db = inner.lock();
        db.objects
            .get(&key_of(target, name))
            .cloned()
            .ok_or_else(|| not_found(&inner.kinds[target.kind], name))?
    };
    let mut merged = current;
    // A patch that names no resourceVersion applies to whatever is stored now.
    let precondition = patch
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .cloned();
    merge_patch(&mut merged, &patch);
    let Value::Object(mut obj) = merged else {
        return Err(status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the patch replaced the object",
        ));
    };
    if precondition.is_none() {
        // Patches are applied to the latest version; keep it whatever raced in between.
        obj.get_mut("metadata")
            .and_then(Value::as_object_mut)
            .map(|m| m.remove("resourceVersion"));
        return write_unconditional(inner, target, name, obj);
    }
    write(inner, target, name, obj)
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let map = target.as_object_mut().expect("made an object above");
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn write(
    inner: &Inner,
    target: &Target,
    name: &str,
    obj: Map<String, Value>,
) -> Result<Response, Response> {
    let kind = &inner.kinds[target.kind];
    let wanted_rv = obj
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
        .and_then(Value::as_str)
        .map(String::from);
    if wanted_rv.is_none() && kind.custom {
        return Err(invalid(&format!(
            "{}.{} \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update",
            kind.plural, kind.group
        )));
    }
    update(inner, target, name, obj, wanted_rv)
}

fn write_unconditional(
    inner: &Inner,
    target: &Target,
    name: &str,
    obj: Map<String, Value>,
) -> Result<Response, Response> {
    update(inner, target, name, obj, None)
}

fn update(
    inner: &Inner,
    target: &Target,
    name: &str,
    mut obj: Map<String, Value>,
    wanted_rv: Option<String>,
) -> Result<Response, Response> {
    let kind = &inner.kinds[target.kind];
    check_type(kind, &obj)?;
    if let Some(n) = meta_str(&Value::Object(obj.clone()), "name")
        && n != name
    {
        return Err(status_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("the name of the object ({n}) does not match the name on the URL ({name})"),
        ));
    }
    let key = key_of(target, name);
    let mut db = inner.lock();
    let Some(old) = db.objects.get(&key).cloned() else {
        return Err(not_found(kind, name));
    };
    if let Some(rv) = &wanted_rv
        && meta_str(&old, "resourceVersion") != Some(rv.as_str())
    {
        return Err(conflict(kind, name));
    }
    let Value::Object(old_map) = &old else {
        return Err(status_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "stored object is not a map",
        ));
    };
    let mut new = if target.status {
        // /status: only .status changes.
        let mut new = old_map.clone();
        match obj.remove("status") {
            Some(s) => new.insert("status".into(), s),
            None => new.remove("status"),
        };
        new
    } else {
        if kind.status_subresource {
            match old_map.get("status") {
                Some(s) => obj.insert("status".into(), s.clone()),
                None => obj.remove("status"),
            };
        }
        // Server-owned metadata stays as stored.
        let old_meta = old_map
            .get("metadata")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let meta = metadata_mut(&mut obj);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
        ] {
            match old_meta.get(field) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        obj
    };
    new.insert("apiVersion".into(), Value::String(kind.api_version()));
    new.insert("kind".into(), Value::String(kind.kind.clone()));
    let old_rv = meta_str(&old, "resourceVersion").unwrap_or("").to_string();
    metadata_mut(&mut new).insert("resourceVersion".into(), Value::String(old_rv));
    let mut new = Value::Object(new);
    if new == old {
        // Nothing changed: no new resourceVersion, no event.
        return Ok(json_response(StatusCode::OK, &old));
    }
    let deleting = meta_str(&old, "deletionTimestamp").is_some();
    let old_finalizers = finalizers(&old);
    let new_finalizers = finalizers(&new);
    if deleting && new_finalizers.iter().any(|f| !old_finalizers.contains(f)) {
        return Err(invalid(&format!(
            "{}.{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
            kind.plural, kind.group
        )));
    }
    if !target.status && outside_meta_and_status(&new) != outside_meta_and_status(&old) {
        let generation = old
            .get("metadata")
            .and_then(|m| m.get("generation"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("generation".into(), json!(generation + 1));
        }
    }
    let rv = db.next_rv();
    if let Some(meta) = new.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
    if deleting && new_finalizers.is_empty() {
        db.objects.remove(&key);
        db.record(inner, key, "DELETED", new.clone());
    } else {
        db.objects.insert(key.clone(), new.clone());
        db.record(inner, key, "MODIFIED", new.clone());
    }
    Ok(json_response(StatusCode::OK, &new))
}

fn outside_meta_and_status(obj: &Value) -> Map<String, Value> {
    let mut m = obj.as_object().cloned().unwrap_or_default();
    m.remove("metadata");
    m.remove("status");
    m
}

fn delete(inner: &Inner, target: &Target, name: &str, body: &Bytes) -> Result<Response, Response> {
    let kind = &inner.kinds[target.kind];
    if target.status {
        return Err(status_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "delete on /status",
        ));
    }
    let options: Value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(body).map_err(|e| {
            status_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("DeleteOptions are not JSON: {e}"),
            )
        })?
    };
    let key = key_of(target, name);
    let mut db = inner.lock();
    let Some(old) = db.objects.get(&key).cloned() else {
        return Err(not_found(kind, name));
    };
    if let Some(pre) = options.get("preconditions") {
        let uid_ok = pre
            .get("uid")
            .and_then(Value::as_str)
            .is_none_or(|u| Some(u) == meta_str(&old, "uid"));
        let rv_ok = pre
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_none_or(|r| Some(r) == meta_str(&old, "resourceVersion"));
        if !uid_ok || !rv_ok {
            return Err(conflict(kind, name));
        }
    }
    if finalizers(&old).is_empty() {
        let rv = db.next_rv();
        let mut gone = old;
        if let Some(meta) = gone.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        db.objects.remove(&key);
        db.record(inner, key, "DELETED", gone.clone());
        return Ok(json_response(StatusCode::OK, &gone));
    }
    if meta_str(&old, "deletionTimestamp").is_some() {
        // Already being deleted: nothing changes.
        return Ok(json_response(StatusCode::ACCEPTED, &old));
    }
    let rv = db.next_rv();
    let mut marked = old;
    if let Some(meta) = marked.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
        meta.insert("deletionGracePeriodSeconds".into(), json!(0));
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
    }
    db.objects.insert(key.clone(), marked.clone());
    db.record(inner, key, "MODIFIED", marked.clone());
    Ok(json_response(StatusCode::ACCEPTED, &marked))
}

/// Which objects a list or watch returns.
#[derive(Debug, Clone)]
struct Filter {
    kind: usize,
    namespace: Option<String>,
    labels: Vec<LabelTerm>,
    fields: Vec<(String, bool, String)>,
}

#[derive(Debug, Clone)]
enum LabelTerm {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Filter {
    fn new(target: &Target, params: &BTreeMap<String, String>) -> Result<Filter, Response> {
        let labels = match params.get("labelSelector") {
            Some(s) => parse_label_selector(s).map_err(|e| {
                status_error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("labelSelector {s:?}: {e}"),
                )
            })?,
            None => Vec::new(),
        };
        let mut fields = Vec::new();
        for term in params
            .get("fieldSelector")
            .map(|s| s.split(',').filter(|t| !t.is_empty()).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let (field, negate, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, false, v)
            } else {
                return Err(status_error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("fieldSelector term {term:?}"),
                ));
            };
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(status_error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("field label not supported: {field}"),
                ));
            }
            fields.push((field.to_string(), negate, value.to_string()));
        }
        Ok(Filter {
            kind: target.kind,
            namespace: target.namespace.clone(),
            labels,
            fields,
        })
    }

    fn matches(&self, key: &Key, obj: &Value) -> bool {
        if key.kind != self.kind {
            return false;
        }
        if let Some(ns) = &self.namespace
            && &key.namespace != ns
        {
            return false;
        }
        let labels = obj
            .get("metadata")
            .and_then(|m| m.get("labels"))
            .and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|t| match t {
            LabelTerm::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelTerm::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelTerm::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelTerm::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            LabelTerm::Exists(k) => label(k).is_some(),
            LabelTerm::NotExists(k) => label(k).is_none(),
        });
        let fields_ok = self.fields.iter().all(|(field, negate, value)| {
            let actual = if field == "metadata.name" {
                &key.name
            } else {
                &key.namespace
            };
            (actual == value) != *negate
        });
        labels_ok && fields_ok
    }
}

fn parse_label_selector(s: &str) -> Result<Vec<LabelTerm>, String> {
    // Split on commas outside parentheses.
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or("unbalanced ')'")?,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    let mut out = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("{term:?}: expected (values)"))?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        let parsed = if let Some(k) = term.strip_prefix('!') {
            LabelTerm::NotExists(k.trim().to_string())
        } else if let Some((k, v)) = term.split_once("!=") {
            LabelTerm::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==") {
            LabelTerm::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once('=') {
            LabelTerm::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            LabelTerm::NotIn(k.trim().into(), set(rest)?)
        } else if let Some((k, rest)) = term.split_once(" in ") {
            LabelTerm::In(k.trim().into(), set(rest)?)
        } else if term
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            LabelTerm::Exists(term.to_string())
        } else {
            return Err(format!("cannot parse term {term:?}"));
        };
        out.push(parsed);
    }
    Ok(out)
}

fn watch_event(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn gone_event(rv: &str) -> Bytes {
    let status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": format!("too old resource version: {rv}"),
        "reason": "Expired",
        "code": 410,
    });
    watch_event("ERROR", &status)
}

fn watch_stream(inner: Arc<Inner>, target: Target, params: BTreeMap<String, String>) -> Response {
    let filter = match Filter::new(&target, &params) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let kind = inner.kinds[target.kind].clone();
    let bookmarks = is_true(params.get("allowWatchBookmarks"));
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let from = params.get("resourceVersion").cloned().unwrap_or_default();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);

    // Under the lock: subscribe, then take what happened since `from` (or the current
    // objects), so that no event falls between the two.
    let (mut live, backlog, mut last_rv) = {
        let db = inner.lock();
        let live = inner.events.subscribe();
        let mut backlog = Vec::new();
        let start_rv;
        if from.is_empty() || from == "0" {
            for (k, v) in &db.objects {
                if filter.matches(k, v) {
                    backlog.push(watch_event("ADDED", v));
                }
            }
            start_rv = db.rv;
        } else {
            match from.parse::<u64>() {
                Ok(rv) if rv >= db.compacted_to && rv <= db.rv => {
                    for e in db.history.iter().filter(|e| e.rv > rv) {
                        if filter.matches(&e.key, &e.object) {
                            backlog.push(watch_event(e.kind, &e.object));
                        }
                    }
                    start_rv = db.rv;
                }
                Ok(rv) if rv > db.rv => {
                    // From the future: wait for it (the real server would too).
                    start_rv = rv;
                }
                _ => {
                    backlog.push(gone_event(&from));
                    start_rv = u64::MAX;
                }
            }
        }
        (live, backlog, start_rv)
    };
    let mut cut = inner.cut.subscribe();
    let current_rv = {
        let inner = inner.clone();
        move || inner.lock().rv
    };
    tokio::spawn(async move {
        for line in backlog {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        if last_rv == u64::MAX {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(BOOKMARK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let line = tokio::select! {
                _ = &mut deadline => return,
                _ = cut.changed() => return,
                _ = tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    let rv = current_rv().max(last_rv);
                    let mark = json!({
                        "apiVersion": kind.api_version(),
                        "kind": kind.kind,
                        "metadata": {"resourceVersion": rv.to_string()},
                    });
                    watch_event("BOOKMARK", &mark)
                }
                event = live.recv() => match event {
                    Ok(e) => {
                        if e.rv <= last_rv || !filter.matches(&e.key, &e.object) {
                            continue;
                        }
                        last_rv = e.rv;
                        watch_event(e.kind, &e.object)
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Ok(gone_event(&last_rv.to_string()))).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_parse() {
        let terms = parse_label_selector("a=b,c!=d,e in (f, g),h notin (i),j,!k").expect("parses");
        assert_eq!(terms.len(), 6);
        assert!(matches!(&terms[2], LabelTerm::In(k, v) if k == "e" && v == &["f", "g"]));
        assert!(matches!(&terms[5], LabelTerm::NotExists(k) if k == "k"));
        assert!(parse_label_selector("a in (b").is_err());
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Db%2Cc"), "a=b,c");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
