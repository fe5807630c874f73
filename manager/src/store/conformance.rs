//! Store semantics every backend keeps, written once: tests.rs runs them on the embedded
//! backend (a redb file), kubernetes_tests.rs on the Kubernetes backend against the API
//! server emulator. CRUD with conflicts and generations, concurrent writers, finalizers,
//! ordered watches, and a model-based property test against a plain in-memory map.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use proptest::prelude::*;

use super::*;
use crate::resources::{Robustness, Volume, VolumeSpec, VolumeState, VolumeStatus};

/// A backend under test.
pub(super) trait Backend {
    /// A client of the backend's data, as a second manager would have one (the embedded
    /// backend has one store per file and hands out clones of it).
    fn client(&self) -> Store;
    /// The data again once `store` is gone: the file reopened, or a new client.
    fn reopen(&mut self, store: Store) -> Store;
    /// The namespace objects are created in, if the backend has namespaces.
    fn namespace(&self) -> Option<&str>;
    /// The highest resource version the backend has handed out, when it can tell.
    fn resource_version(&self) -> Option<u64>;
}

/// A volume of `size` bytes named `name`.
pub(super) fn volume(name: &str, size: u64) -> Volume {
    Volume::new(name, VolumeSpec::with_size(size))
}

/// A runtime with two workers (concurrent writers really interleave).
pub(super) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The next item of a watch, within 10 s.
pub(super) async fn next<K: std::fmt::Debug>(w: &mut BoxStream<'static, Result<K>>) -> K {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("event in time")
        .expect("stream open")
        .expect("no error")
}

/// create (status dropped, generation 1), AlreadyExists, update (generation bumps on spec
/// changes only), stale updates refused with the versions named, update_status keeps the
/// spec, updates keep the status, blind updates refused, NotFound, bad names, sorted list.
pub(super) async fn create_get_update_and_conflict(backend: &mut impl Backend) {
    let store = backend.client();
    let mut with_status = volume("v1", 4096);
    with_status.status = Some(VolumeStatus {
        state: VolumeState::Attached,
        ..Default::default()
    });
    let created = store.create(&with_status).await.expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.namespace.as_deref(), backend.namespace());
    assert!(created.status.is_none(), "create drops the status");
    let again = store.create(&volume("v1", 8192)).await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists { .. })),
        "{again:?}"
    );

    let mut a = store.get_required::<Volume>("v1").await.expect("get");
    let mut b = a.clone();
    a.spec.size = 8192;
    let a = store
        .update(&a)
        .await
        .expect("update")
        .expect("still there");
    assert_eq!(a.metadata.generation, Some(2));
    b.spec.size = 16384;
    let stale = store.update(&b).await;
    match &stale {
        Err(StoreError::Conflict { given, current, .. }) => {
            assert_eq!(Some(given), b.metadata.resource_version.as_ref());
            assert_eq!(Some(current), a.metadata.resource_version.as_ref());
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let stored: Volume = store.get_required("v1").await.expect("get");
    assert_eq!(stored.spec.size, 8192, "a stale update must not overwrite");

    // A label change is not a spec change.
    let mut l = stored.clone();
    l.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("k".into(), "v".into());
    let l = store.update(&l).await.expect("update").expect("there");
    assert_eq!(l.metadata.generation, Some(2));

    let mut s = l.clone();
    s.status = Some(VolumeStatus {
        state: VolumeState::Detached,
        robustness: Robustness::Healthy,
        ..Default::default()
    });
    s.spec.size = 1; // ignored by update_status
    let s = store.update_status(&s).await.expect("status");
    assert_eq!(s.spec.size, 8192);
    assert_eq!(s.metadata.generation, Some(2));
    let stale_status = store.update_status(&stored).await;
    assert!(stale_status.is_err_and(|e| e.is_conflict()));
    let mut t = s.clone();
    t.spec.node_id = Some("n1".into());
    t.status = None;
    let t = store.update(&t).await.expect("update").expect("there");
    assert_eq!(
        t.status.as_ref().map(|s| s.state),
        Some(VolumeState::Detached)
    );

    let mut blind = volume("v1", 1 << 20);
    blind.metadata.resource_version = None;
    assert!(matches!(
        store.update(&blind).await,
        Err(StoreError::Invalid { .. })
    ));
    assert!(store.get::<Volume>("nope").await.expect("get").is_none());
    assert!(
        store
            .delete::<Volume>("nope")
            .await
            .is_err_and(|e| e.is_not_found())
    );
    let mut missing = t.clone();
    missing.metadata.name = Some("nope".into());
    assert!(
        store
            .update(&missing)
            .await
            .is_err_and(|e| e.is_not_found())
    );
    let bad = store.create(&volume("Bad_Name", 4096)).await;
    assert!(matches!(bad, Err(StoreError::Invalid { .. })));

    // list: sorted by name.
    store.create(&volume("a0", 4096)).await.expect("create");
    let names: Vec<String> = store
        .list::<Volume>()
        .await
        .expect("list")
        .iter()
        .map(|v| v.name().to_owned())
        .collect();
    assert_eq!(names, ["a0", "v1"]);
}

/// Eight clients each add 4096 five times through `modify`: every increment lands once.
pub(super) async fn modify_retries_on_conflicts_from_concurrent_writers(
    backend: &mut impl Backend,
) {
    let store = backend.client();
    store.create(&volume("v", 0)).await.expect("create");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        // Separate clients, as separate managers would have.
        let store = backend.client();
        tasks.push(tokio::spawn(async move {
            for _ in 0..5 {
                store
                    .modify("v", |v: &mut Volume| {
                        v.spec.size += 4096;
                        Ok(())
                    })
                    .await
                    .expect("modify");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let v: Volume = store.get_required("v").await.expect("get");
    assert_eq!(
        v.spec.size,
        40 * 4096,
        "every increment must land exactly once"
    );
    assert_eq!(v.metadata.generation, Some(41));
}

/// Delete with finalizers only marks; no new finalizer then; the last removal deletes.
pub(super) async fn delete_waits_for_the_last_finalizer(backend: &mut impl Backend) {
    let store = backend.client();
    store.create(&volume("v", 4096)).await.expect("create");
    store
        .add_finalizer::<Volume>("v", "a")
        .await
        .expect("fin a");
    store
        .add_finalizer::<Volume>("v", "b")
        .await
        .expect("fin b");
    let marked = store
        .delete::<Volume>("v")
        .await
        .expect("delete")
        .expect("kept");
    assert!(marked.metadata.deletion_timestamp.is_some());
    let again = store
        .delete::<Volume>("v")
        .await
        .expect("delete")
        .expect("kept");
    assert_eq!(
        again.metadata.resource_version,
        marked.metadata.resource_version
    );
    // No new finalizer while being deleted.
    let added = store.add_finalizer::<Volume>("v", "c").await;
    assert!(
        matches!(added, Err(StoreError::Invalid { .. })),
        "{added:?}"
    );
    let left = store
        .remove_finalizer::<Volume>("v", "a")
        .await
        .expect("rm a");
    assert!(left.is_some());
    assert!(store.get::<Volume>("v").await.expect("get").is_some());
    let gone = store
        .remove_finalizer::<Volume>("v", "b")
        .await
        .expect("rm b");
    assert!(gone.is_none());
    assert!(store.get::<Volume>("v").await.expect("get").is_none());
    store.create(&volume("w", 4096)).await.expect("create");
    assert!(store.delete::<Volume>("w").await.expect("delete").is_none());
    assert!(store.list::<Volume>().await.expect("list").is_empty());
}

/// A watch with replay sends what is there, then every change in order; one without
/// replay sends every change after the call; watch_all sends raw events.
pub(super) async fn watch_replays_then_streams_changes_in_order(backend: &mut impl Backend) {
    let store = backend.client();
    store.create(&volume("old", 4096)).await.expect("create");
    let mut w = store.watch::<Volume>(true).await.expect("watch");
    let mut quiet = store.watch::<Volume>(false).await.expect("watch");
    let mut all = store.watch_all(false).await.expect("watch all");
    store.create(&volume("new", 4096)).await.expect("create");
    store
        .modify("new", |v: &mut Volume| {
            v.spec.size = 8192;
            Ok(())
        })
        .await
        .expect("modify");
    store.delete::<Volume>("new").await.expect("delete");
    let e = next(&mut w).await;
    assert!(
        matches!(&e, WatchEvent::Added(v) if v.name() == "old"),
        "{e:?}"
    );
    let e = next(&mut w).await;
    assert!(
        matches!(&e, WatchEvent::Added(v) if v.name() == "new"),
        "{e:?}"
    );
    let e = next(&mut w).await;
    assert!(
        matches!(&e, WatchEvent::Modified(v) if v.spec.size == 8192),
        "{e:?}"
    );
    let e = next(&mut w).await;
    assert!(
        matches!(&e, WatchEvent::Deleted(v) if v.name() == "new"),
        "{e:?}"
    );
    // Without replay, the object that was there before is not reported, but
    // everything after the call is, even what happened before the stream was polled.
    let e = next(&mut quiet).await;
    assert!(
        matches!(&e, WatchEvent::Added(v) if v.name() == "new"),
        "{e:?}"
    );
    let raw = next(&mut all).await;
    assert_eq!(raw.type_, EventType::Added);
    assert_eq!(raw.kind, Kind::Volume);
    assert_eq!(raw.object["metadata"]["name"], "new");
}

/// One step of the model-based test.
#[derive(Debug, Clone)]
pub(super) enum Op {
    Create(u8, u64),
    Update { name: u8, size: u64, stale: bool },
    SetState(u8, bool),
    Delete(u8),
    AddFinalizer(u8, u8),
    RemoveFinalizer(u8, u8),
    NewClient,
}

pub(super) fn op() -> impl Strategy<Value = Op> {
    let name = 0u8..3;
    prop_oneof![
        (name.clone(), 0u64..4).prop_map(|(n, s)| Op::Create(n, s * 4096)),
        (name.clone(), 0u64..4, any::<bool>()).prop_map(|(name, s, stale)| Op::Update {
            name,
            size: s * 4096,
            stale
        }),
        (name.clone(), any::<bool>()).prop_map(|(n, a)| Op::SetState(n, a)),
        name.clone().prop_map(Op::Delete),
        (name.clone(), 0u8..2).prop_map(|(n, f)| Op::AddFinalizer(n, f)),
        (name, 0u8..2).prop_map(|(n, f)| Op::RemoveFinalizer(n, f)),
        Just(Op::NewClient),
    ]
}

/// What the model keeps of an object.
#[derive(Debug, Clone, PartialEq)]
struct ModelObject {
    size: u64,
    attached: Option<bool>,
    finalizers: Vec<String>,
    deleting: bool,
    generation: i64,
}

fn observe(v: &Volume) -> ModelObject {
    ModelObject {
        size: v.spec.size,
        attached: v.status.as_ref().map(|s| s.state == VolumeState::Attached),
        finalizers: v.metadata.finalizers.clone().unwrap_or_default(),
        deleting: v.metadata.deletion_timestamp.is_some(),
        generation: v.metadata.generation.unwrap_or(0),
    }
}

/// Any sequence of operations leaves the backend equal to a plain map that applies the
/// store's rules, with resource versions that only grow.
pub(super) async fn matches_the_model(
    backend: &mut impl Backend,
    ops: Vec<Op>,
) -> std::result::Result<(), TestCaseError> {
    let mut store = backend.client();
    let mut model: BTreeMap<String, ModelObject> = BTreeMap::new();
    let mut last_rv = 0u64;
    for op in ops {
        match op {
            Op::Create(n, size) => {
                let name = format!("v{n}");
                let got = store.create(&volume(&name, size)).await;
                match model.entry(name) {
                    std::collections::btree_map::Entry::Occupied(_) => {
                        prop_assert!(
                            matches!(got, Err(StoreError::AlreadyExists { .. })),
                            "{got:?}"
                        );
                    }
                    std::collections::btree_map::Entry::Vacant(e) => {
                        prop_assert!(got.is_ok(), "{got:?}");
                        e.insert(ModelObject {
                            size,
                            attached: None,
                            finalizers: vec![],
                            deleting: false,
                            generation: 1,
                        });
                    }
                }
            }
            Op::Update { name, size, stale } => {
                let name = format!("v{name}");
                let Some(mut v) = store.get::<Volume>(&name).await.expect("get") else {
                    prop_assert!(!model.contains_key(&name));
                    continue;
                };
                if stale {
                    store
                        .modify(&name, |o: &mut Volume| {
                            let labels = o.metadata.labels.get_or_insert_with(Default::default);
                            let n = labels.len();
                            labels.insert(format!("touched-{n}"), "x".into());
                            Ok(())
                        })
                        .await
                        .expect("concurrent write");
                    v.spec.size = size;
                    let got = store.update(&v).await;
                    prop_assert!(got.as_ref().is_err_and(|e| e.is_conflict()), "{got:?}");
                } else {
                    let m = model.get_mut(&name).expect("in model");
                    if v.spec.size != size {
                        m.generation += 1;
                    }
                    v.spec.size = size;
                    m.size = size;
                    let got = store.update(&v).await;
                    prop_assert!(got.is_ok(), "{got:?}");
                }
            }
            Op::SetState(n, attached) => {
                let name = format!("v{n}");
                let got = store
                    .modify_status(&name, |v: &mut Volume| {
                        v.status.get_or_insert_with(Default::default).state = if attached {
                            VolumeState::Attached
                        } else {
                            VolumeState::Detached
                        };
                        Ok(())
                    })
                    .await;
                match model.get_mut(&name) {
                    Some(m) => {
                        prop_assert!(got.is_ok(), "{got:?}");
                        m.attached = Some(attached);
                    }
                    None => prop_assert!(got.is_err_and(|e| e.is_not_found())),
                }
            }
            Op::Delete(n) => {
                let name = format!("v{n}");
                let got = store.delete::<Volume>(&name).await;
                match model.get_mut(&name) {
                    None => prop_assert!(got.is_err_and(|e| e.is_not_found())),
                    Some(m) if m.finalizers.is_empty() => {
                        prop_assert!(matches!(got, Ok(None)), "{got:?}");
                        model.remove(&name);
                    }
                    Some(m) => {
                        prop_assert!(matches!(got, Ok(Some(_))), "{got:?}");
                        m.deleting = true;
                    }
                }
            }
            Op::AddFinalizer(n, f) => {
                let name = format!("v{n}");
                let fin = format!("f{f}");
                let got = store.add_finalizer::<Volume>(&name, &fin).await;
                match model.get_mut(&name) {
                    None => prop_assert!(got.is_err_and(|e| e.is_not_found())),
                    Some(m) if m.finalizers.contains(&fin) => prop_assert!(got.is_ok()),
                    Some(m) if m.deleting => {
                        prop_assert!(matches!(got, Err(StoreError::Invalid { .. })), "{got:?}");
                    }
                    Some(m) => {
                        prop_assert!(got.is_ok(), "{got:?}");
                        m.finalizers.push(fin);
                    }
                }
            }
            Op::RemoveFinalizer(n, f) => {
                let name = format!("v{n}");
                let fin = format!("f{f}");
                let got = store.remove_finalizer::<Volume>(&name, &fin).await;
                match model.get_mut(&name) {
                    None => prop_assert!(got.is_err_and(|e| e.is_not_found())),
                    Some(m) => {
                        prop_assert!(got.is_ok(), "{got:?}");
                        m.finalizers.retain(|x| x != &fin);
                        if m.deleting && m.finalizers.is_empty() {
                            model.remove(&name);
                        }
                    }
                }
            }
            Op::NewClient => {
                store = backend.reopen(store);
            }
        }
        let stored = store.list::<Volume>().await.expect("list");
        let seen: BTreeMap<String, ModelObject> = stored
            .iter()
            .map(|v| (v.name().to_owned(), observe(v)))
            .collect();
        prop_assert_eq!(&seen, &model);
        for v in &stored {
            let rv: u64 = v
                .metadata
                .resource_version
                .as_deref()
                .unwrap_or("0")
                .parse()
                .expect("rv");
            prop_assert!(rv > 0);
            last_rv = last_rv.max(rv);
        }
        if let Some(rv) = backend.resource_version() {
            prop_assert!(rv >= last_rv);
        }
    }
    Ok(())
}
