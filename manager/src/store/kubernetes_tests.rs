//! The store semantics (the same cases tests.rs runs on the embedded backend, and its
//! model-based property test) run on the Kubernetes backend against the API server
//! emulator; plus what only this backend has: watches that survive a compacted history
//! and cut connections, the CRD check, and leader election on a Lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

use super::kubernetes::{KubernetesStore, crds};
use super::kubernetes_emulator::{ApiServerEmulator, ResourceKind};
use super::kubernetes_lease::{LeaderElector, LeaseConfig};
use super::*;
use crate::resources::{Robustness, Volume, VolumeSpec, VolumeState, VolumeStatus};

const NS: &str = "ironhorn-system";

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

fn kinds() -> Vec<ResourceKind> {
    let mut kinds: Vec<ResourceKind> = crds().iter().flat_map(ResourceKind::from_crd).collect();
    kinds.push(ResourceKind::lease());
    kinds
}

async fn emulator() -> ApiServerEmulator {
    ApiServerEmulator::start(kinds())
        .await
        .expect("start emulator")
}

fn client(emu: &ApiServerEmulator) -> kube::Client {
    kube::Client::try_from(emu.kube_config(NS)).expect("client")
}

fn open(emu: &ApiServerEmulator) -> Store {
    Store::new(Arc::new(KubernetesStore::new(client(emu), NS)))
}

async fn next<K: std::fmt::Debug>(w: &mut BoxStream<'static, Result<K>>) -> K {
    tokio::time::timeout(Duration::from_secs(10), w.next())
        .await
        .expect("event in time")
        .expect("stream open")
        .expect("no error")
}

#[test]
fn create_get_update_and_conflict() {
    rt().block_on(async {
        let emu = emulator().await;
        let store = open(&emu);
        let mut with_status = volume("v1", 4096);
        with_status.status = Some(VolumeStatus {
            state: VolumeState::Attached,
            ..Default::default()
        });
        let created = store.create(&with_status).await.expect("create");
        assert_eq!(created.metadata.generation, Some(1));
        assert!(created.metadata.uid.is_some());
        assert!(created.metadata.creation_timestamp.is_some());
        assert_eq!(created.metadata.namespace.as_deref(), Some(NS));
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
    });
}

#[test]
fn modify_retries_on_conflicts_from_concurrent_writers() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let emu = emulator().await;
        let store = open(&emu);
        store.create(&volume("v", 0)).await.expect("create");
        let mut tasks = Vec::new();
        for _ in 0..8 {
            // Separate clients, as separate managers would have.
            let store = open(&emu);
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
    });
}

#[test]
fn delete_waits_for_the_last_finalizer() {
    rt().block_on(async {
        let emu = emulator().await;
        let store = open(&emu);
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
    });
}

#[test]
fn watch_replays_then_streams_changes_in_order() {
    rt().block_on(async {
        let emu = emulator().await;
        let store = open(&emu);
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
    });
}

/// A watch whose connection is cut and whose history is compacted meanwhile (410 Gone on
/// resume) re-lists and reports what changed while it was away, then streams again.
#[test]
fn watch_survives_compaction_and_cut_connections() {
    rt().block_on(async {
        let emu = emulator().await;
        let store = open(&emu);
        for n in ["keep", "change", "drop"] {
            store.create(&volume(n, 4096)).await.expect("create");
        }
        let mut w = store.watch::<Volume>(true).await.expect("watch");
        for _ in 0..3 {
            assert!(matches!(next(&mut w).await, WatchEvent::Added(_)));
        }
        // Let the watcher's watch call start, then cut it and hold it off while changes
        // happen and the history is compacted: its resume gets 410 Gone and it must list.
        tokio::time::sleep(Duration::from_millis(300)).await;
        emu.pause_watches(true);
        store
            .modify("change", |v: &mut Volume| {
                v.spec.size = 8192;
                Ok(())
            })
            .await
            .expect("modify");
        store.delete::<Volume>("drop").await.expect("delete");
        store.create(&volume("born", 4096)).await.expect("create");
        emu.compact();
        let lists = emu.list_requests();
        emu.pause_watches(false);
        let mut got = BTreeMap::new();
        for _ in 0..3 {
            match next(&mut w).await {
                WatchEvent::Added(v) => got.insert(v.name().to_owned(), "added"),
                WatchEvent::Modified(v) => got.insert(v.name().to_owned(), "modified"),
                WatchEvent::Deleted(v) => got.insert(v.name().to_owned(), "deleted"),
            };
        }
        let want: BTreeMap<String, &str> = [
            ("born", "added"),
            ("change", "modified"),
            ("drop", "deleted"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(got, want);
        assert!(
            emu.list_requests() > lists,
            "the watcher must have listed again"
        );
        // And it streams again.
        store.create(&volume("later", 4096)).await.expect("create");
        let e = next(&mut w).await;
        assert!(
            matches!(&e, WatchEvent::Added(v) if v.name() == "later"),
            "{e:?}"
        );
    });
}

#[test]
fn objects_survive_a_new_client() {
    rt().block_on(async {
        let emu = emulator().await;
        let rv = {
            let store = open(&emu);
            store.create(&volume("v", 4096)).await.expect("create");
            store.add_finalizer::<Volume>("v", "f").await.expect("fin");
            let v: Volume = store.get_required("v").await.expect("get");
            v.metadata.resource_version
        };
        let store = open(&emu);
        let v: Volume = store
            .get_required("v")
            .await
            .expect("get with a new client");
        assert_eq!(v.metadata.resource_version, rv);
        assert_eq!(v.metadata.finalizers, Some(vec!["f".to_owned()]));
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

#[test]
fn missing_crds_are_named() {
    rt().block_on(async {
        let emu = ApiServerEmulator::start(vec![ResourceKind::lease()])
            .await
            .expect("start");
        let store = KubernetesStore::new(client(&emu), NS);
        let err = store.check_crds().await.expect_err("no CRDs");
        let text = err.to_string();
        assert!(
            text.contains("volumes.ironhorn.io") && text.contains("not installed"),
            "{text}"
        );
        let emu = emulator().await;
        KubernetesStore::new(client(&emu), NS)
            .check_crds()
            .await
            .expect("all CRDs served");
    });
}

fn lease_config(identity: &str) -> LeaseConfig {
    LeaseConfig {
        lease_duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(700),
        retry_period: Duration::from_millis(100),
        ..LeaseConfig::new(NS, identity)
    }
}

#[test]
fn one_leader_at_a_time_and_takeover_after_expiry() {
    rt().block_on(async {
        let emu = emulator().await;
        let mut a = LeaderElector::new(client(&emu), lease_config("a")).expect("a");
        let mut b = LeaderElector::new(client(&emu), lease_config("b")).expect("b");
        assert!(
            a.try_acquire_or_renew().await.expect("a tries"),
            "a creates the lease"
        );
        assert!(
            !b.try_acquire_or_renew().await.expect("b tries"),
            "b must wait"
        );
        assert_eq!(b.observed_holder(), "a");
        assert!(a.try_acquire_or_renew().await.expect("a renews"));
        // a stops renewing; b takes over only after seeing the same record for a whole
        // lease duration on its own clock.
        let started = tokio::time::Instant::now();
        loop {
            if b.try_acquire_or_renew().await.expect("b tries") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "b never took over"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "took over too early"
        );
        assert!(
            !a.try_acquire_or_renew().await.expect("a tries"),
            "a lost it"
        );
        assert_eq!(a.observed_holder(), "b");
        let lease = emu.object("leases", NS, "ironhorn-manager").expect("lease");
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
        // Release hands over at once.
        b.release().await.expect("release");
        assert!(a.try_acquire_or_renew().await.expect("a tries"));
        assert!(
            LeaderElector::new(
                client(&emu),
                LeaseConfig {
                    renew_deadline: Duration::from_secs(2),
                    ..lease_config("c")
                }
            )
            .is_err(),
            "a renew deadline above the lease duration is refused"
        );
    });
}

type Candidate = (
    &'static str,
    CancellationToken,
    tokio::sync::watch::Receiver<bool>,
    tokio::task::JoinHandle<()>,
);

fn leaders(c: &[Candidate]) -> Vec<&'static str> {
    c.iter().filter(|x| *x.2.borrow()).map(|x| x.0).collect()
}

/// Waits until exactly one candidate leads; counts samples where several did.
async fn wait_for_one(c: &[Candidate], overlaps: &AtomicUsize, deadline: Duration) -> &'static str {
    let started = std::time::Instant::now();
    loop {
        let l = leaders(c);
        if l.len() > 1 {
            overlaps.fetch_add(1, Ordering::SeqCst);
        }
        if l.len() == 1 {
            return l[0];
        }
        assert!(
            started.elapsed() < deadline,
            "no leader within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three candidates campaign side by side: at every sample at most one thinks it leads;
/// when the leader is cancelled (it releases) another takes over, and when a leader dies
/// without releasing, another takes over after the lease expires.
#[test]
fn campaigning_candidates_never_overlap() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let emu = emulator().await;
        let overlaps = AtomicUsize::new(0);
        let mut candidates: Vec<Candidate> = Vec::new();
        for id in ["a", "b", "c"] {
            let cancel = CancellationToken::new();
            let elector = LeaderElector::new(client(&emu), lease_config(id)).expect("elector");
            let (leading, task) = elector.spawn(cancel.clone());
            candidates.push((id, cancel, leading, task));
        }
        let first = wait_for_one(&candidates, &overlaps, Duration::from_secs(5)).await;
        for _ in 0..50 {
            assert!(leaders(&candidates).len() <= 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Cancel the leader: it releases, another leads well before the lease would expire.
        let i = candidates
            .iter()
            .position(|c| c.0 == first)
            .expect("leader");
        let (_, cancel, _, task) = candidates.remove(i);
        cancel.cancel();
        task.await.expect("campaign ends");
        let started = std::time::Instant::now();
        let second = wait_for_one(&candidates, &overlaps, Duration::from_secs(5)).await;
        assert_ne!(second, first);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "release should hand over at once"
        );
        // Kill the next leader without a release: the last one takes over after expiry.
        let i = candidates
            .iter()
            .position(|c| c.0 == second)
            .expect("leader");
        let (_, _, _, task) = candidates.remove(i);
        task.abort();
        let third = wait_for_one(&candidates, &overlaps, Duration::from_secs(5)).await;
        assert_ne!(third, second);
        assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two leaders at once");
        for (_, cancel, _, task) in candidates {
            cancel.cancel();
            task.await.expect("campaign ends");
        }
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
    NewClient,
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Any sequence of operations leaves the API server equal to a plain map that applies
    /// the store's rules, with resource versions that only grow.
    #[test]
    fn store_matches_an_in_memory_model(ops in proptest::collection::vec(op(), 1..40)) {
        rt().block_on(async {
            let emu = emulator().await;
            let mut store = open(&emu);
            let mut model: BTreeMap<String, ModelObject> = BTreeMap::new();
            let mut last_rv = 0u64;
            for op in ops {
                match op {
                    Op::Create(n, size) => {
                        let name = format!("v{n}");
                        let got = store.create(&volume(&name, size)).await;
                        match model.entry(name) {
                            std::collections::btree_map::Entry::Occupied(_) => {
                                prop_assert!(matches!(got, Err(StoreError::AlreadyExists { .. })), "{got:?}");
                            }
                            std::collections::btree_map::Entry::Vacant(e) => {
                                prop_assert!(got.is_ok(), "{got:?}");
                                e.insert(ModelObject {
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
                            store.modify(&name, |o: &mut Volume| {
                                let labels = o.metadata.labels.get_or_insert_with(Default::default);
                                let n = labels.len();
                                labels.insert(format!("touched-{n}"), "x".into());
                                Ok(())
                            }).await.expect("concurrent write");
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
                        let got = store.modify_status(&name, |v: &mut Volume| {
                            v.status.get_or_insert_with(Default::default).state =
                                if attached { VolumeState::Attached } else { VolumeState::Detached };
                            Ok(())
                        }).await;
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
                    Op::NewClient => store = open(&emu),
                }
                let stored = store.list::<Volume>().await.expect("list");
                let seen: BTreeMap<String, ModelObject> =
                    stored.iter().map(|v| (v.name().to_owned(), observe(v))).collect();
                prop_assert_eq!(&seen, &model);
                for v in &stored {
                    let rv: u64 = v.metadata.resource_version.as_deref().unwrap_or("0").parse().expect("rv");
                    prop_assert!(rv > 0);
                    last_rv = last_rv.max(rv);
                }
                prop_assert!(emu.resource_version() >= last_rv);
            }
            Ok(())
        })?;
    }
}
