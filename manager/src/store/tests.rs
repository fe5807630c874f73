//! Tests of the store semantics, run against the embedded backend: a model-based property
//! test against a plain in-memory model, conflicts, finalizers, watches and reopening.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;

use super::*;
use crate::resources::{Robustness, Volume, VolumeSpec, VolumeState, VolumeStatus};

fn volume(name: &str, size: u64) -> Volume {
    Volume::new(
        name,
        VolumeSpec {
            size,
            number_of_replicas: 3,
            frontend: Default::default(),
            data_locality: Default::default(),
            disk_selector: vec![],
            node_selector: vec![],
            stale_replica_timeout_seconds: 0,
            from_backup: None,
            node_id: None,
            revert_to_snapshot: None,
            labels: Default::default(),
        },
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open_embedded(dir.path().join("store.redb")).expect("open store")
}

#[test]
fn create_get_update_and_conflict() {
    let dir = tempfile::tempdir().expect("tempdir");
    rt().block_on(async {
        let store = open(&dir);
        let created = store.create(&volume("v1", 4096)).await.expect("create");
        assert_eq!(created.metadata.generation, Some(1));
        assert!(created.metadata.uid.is_some());
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
        assert!(
            matches!(stale, Err(StoreError::Conflict { .. })),
            "{stale:?}"
        );
        let stored: Volume = store.get_required("v1").await.expect("get");
        assert_eq!(stored.spec.size, 8192, "a stale update must not overwrite");

        // Status updates keep the spec and do not bump the generation; spec updates keep
        // the status.
        let mut s = stored.clone();
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
        assert_eq!(t.status.map(|s| s.state), Some(VolumeState::Detached));

        // No resourceVersion → refused, not applied blindly.
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
        let bad = store.create(&volume("Bad_Name", 4096)).await;
        assert!(matches!(bad, Err(StoreError::Invalid { .. })));
    });
}

#[test]
fn modify_retries_on_conflicts_from_concurrent_writers() {
    let dir = tempfile::tempdir().expect("tempdir");
    rt().block_on(async {
        let store = open(&dir);
        store.create(&volume("v", 0)).await.expect("create");
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
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
    });
}

#[test]
fn delete_waits_for_the_last_finalizer() {
    let dir = tempfile::tempdir().expect("tempdir");
    rt().block_on(async {
        let store = open(&dir);
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
        // A second delete changes nothing.
        let again = store
            .delete::<Volume>("v")
            .await
            .expect("delete")
            .expect("kept");
        assert_eq!(
            again.metadata.resource_version,
            marked.metadata.resource_version
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
        // Without finalizers, delete is immediate.
        store.create(&volume("w", 4096)).await.expect("create");
        assert!(store.delete::<Volume>("w").await.expect("delete").is_none());
        assert!(store.list::<Volume>().await.expect("list").is_empty());
    });
}

async fn next(w: &mut BoxStream<'static, Result<WatchEvent<Volume>>>) -> WatchEvent<Volume> {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("event in time")
        .expect("stream open")
        .expect("no error")
}

#[test]
fn watch_replays_then_streams_changes_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    rt().block_on(async {
        let store = open(&dir);
        store.create(&volume("old", 4096)).await.expect("create");
        let mut w = store.watch::<Volume>(true).await.expect("watch");
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
        let raw = tokio::time::timeout(Duration::from_secs(5), all.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        assert_eq!(raw.type_, EventType::Added);
        assert_eq!(raw.kind, Kind::Volume);
        assert_eq!(raw.object["metadata"]["name"], "new");
    });
}

#[test]
fn a_watcher_that_falls_behind_is_told_and_its_stream_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    rt().block_on(async {
        let store = open(&dir);
        let mut w = store.watch::<Volume>(false).await.expect("watch");
        store.create(&volume("v", 0)).await.expect("create");
        for _ in 0..(super::embedded::WATCH_BUFFER + 10) {
            store
                .modify("v", |v: &mut Volume| {
                    v.spec.size += 1;
                    Ok(())
                })
                .await
                .expect("modify");
        }
        let first = w.next().await.expect("an item");
        assert!(
            matches!(first, Err(StoreError::WatchLagged(_))),
            "{first:?}"
        );
        assert!(w.next().await.is_none());
    });
}

#[test]
fn objects_survive_reopening_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rv = rt().block_on(async {
        let store = open(&dir);
        store.create(&volume("v", 4096)).await.expect("create");
        store.add_finalizer::<Volume>("v", "f").await.expect("fin");
        let v: Volume = store.get_required("v").await.expect("get");
        v.metadata.resource_version
    });
    rt().block_on(async {
        let store = open(&dir);
        let v: Volume = store.get_required("v").await.expect("get after reopen");
        assert_eq!(v.metadata.resource_version, rv);
        assert_eq!(v.metadata.finalizers, Some(vec!["f".to_owned()]));
        // Revisions keep growing after a reopen.
        let w = store.create(&volume("w", 4096)).await.expect("create");
        let rv_v: u64 = rv.as_deref().unwrap_or("0").parse().expect("number");
        let rv_w: u64 = w
            .metadata
            .resource_version
            .as_deref()
            .unwrap_or("0")
            .parse()
            .expect("n");
        assert!(rv_w > rv_v);
    });
}

/// One step of the model-based test.
#[derive(Debug, Clone)]
enum Op {
    Create(u8, u64),
    Update { name: u8, size: u64, stale: bool },
    SetState(u8, bool),
    Delete(u8),
    AddFinalizer(u8, u8),
    RemoveFinalizer(u8, u8),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
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
        Just(Op::Reopen),
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Any sequence of operations leaves the store equal to a plain map that applies the
    /// documented rules, with resource versions that only grow.
    #[test]
    fn store_matches_an_in_memory_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        rt().block_on(async {
            let mut store = open(&dir);
            let mut model: BTreeMap<String, ModelObject> = BTreeMap::new();
            let mut last_rv = 0u64;
            let mut writes = 0u64;
            for op in ops {
                match op {
                    Op::Create(n, size) => {
                        let name = format!("v{n}");
                        let got = store.create(&volume(&name, size)).await;
                        match model.entry(name) {
                            std::collections::btree_map::Entry::Occupied(_) => {
                                prop_assert!(matches!(got, Err(StoreError::AlreadyExists { .. })), "{:?}", got);
                            }
                            std::collections::btree_map::Entry::Vacant(slot) => {
                                prop_assert!(got.is_ok(), "{got:?}");
                                slot.insert(ModelObject {
                                    size, attached: None, finalizers: vec![], deleting: false,
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
                            // Someone else writes first: our copy is stale and must be refused.
                            writes += 1;
                            let stamp = writes.to_string();
                            store.modify(&name, |o: &mut Volume| {
                                o.metadata.labels.get_or_insert_with(Default::default)
                                    .insert("touched".into(), stamp.clone());
                                Ok(())
                            }).await.expect("concurrent write");
                            v.spec.size = size;
                            let got = store.update(&v).await;
                            prop_assert!(got.as_ref().is_err_and(|e| e.is_conflict()), "{got:?}");
                        } else {
                            v.spec.size = size;
                            let got = store.update(&v).await;
                            prop_assert!(got.is_ok(), "{got:?}");
                            let m = model.get_mut(&name).expect("in model");
                            if m.size != size { m.generation += 1; }
                            m.size = size;
                        }
                    }
                    Op::SetState(n, attached) => {
                        let name = format!("v{n}");
                        let got = store.modify_status(&name, |v: &mut Volume| {
                            v.status.get_or_insert_with(Default::default).state =
                                if attached { VolumeState::Attached } else { VolumeState::Detached };
                            Ok(())
                        }).await;
                        match model.get_mut(&name) {
                            Some(m) => { prop_assert!(got.is_ok()); m.attached = Some(attached); }
                            None => prop_assert!(got.is_err_and(|e| e.is_not_found())),
                        }
                    }
                    Op::Delete(n) => {
                        let name = format!("v{n}");
                        let got = store.delete::<Volume>(&name).await;
                        match model.get_mut(&name) {
                            None => prop_assert!(got.is_err_and(|e| e.is_not_found())),
                            Some(m) if m.finalizers.is_empty() => {
                                prop_assert!(matches!(got, Ok(None)));
                                model.remove(&name);
                            }
                            Some(m) => {
                                prop_assert!(matches!(got, Ok(Some(_))));
                                m.deleting = true;
                            }
                        }
                    }
                    Op::AddFinalizer(n, f) | Op::RemoveFinalizer(n, f) => {
                        let add = matches!(op, Op::AddFinalizer(..));
                        let name = format!("v{n}");
                        let fin = format!("f{f}");
                        let got = if add {
                            store.add_finalizer::<Volume>(&name, &fin).await
                        } else {
                            store.remove_finalizer::<Volume>(&name, &fin).await
                        };
                        match model.get_mut(&name) {
                            None => prop_assert!(got.is_err_and(|e| e.is_not_found())),
                            Some(m) => {
                                prop_assert!(got.is_ok(), "{got:?}");
                                if add {
                                    if !m.finalizers.contains(&fin) { m.finalizers.push(fin); }
                                } else {
                                    m.finalizers.retain(|x| *x != fin);
                                    if m.deleting && m.finalizers.is_empty() {
                                        model.remove(&name);
                                    }
                                }
                            }
                        }
                    }
                    Op::Reopen => {
                        drop(store);
                        store = open(&dir);
                    }
                }
                let listed = store.list::<Volume>().await.expect("list");
                let seen: BTreeMap<String, ModelObject> =
                    listed.iter().map(|v| (v.name().to_owned(), observe(v))).collect();
                prop_assert_eq!(&seen, &model);
                for v in &listed {
                    let rv: u64 = v.metadata.resource_version.as_deref().unwrap_or("0")
                        .parse().expect("numeric resourceVersion");
                    prop_assert!(rv > 0);
                    last_rv = last_rv.max(rv);
                }
                // A write always gets a revision above every earlier one.
                if let Some(max) = listed.iter().filter_map(|v| v.metadata.resource_version.as_deref()?.parse::<u64>().ok()).max() {
                    prop_assert!(max <= last_rv);
                }
            }
            Ok(())
        })?;
    }
}
