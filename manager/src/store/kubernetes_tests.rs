//! The store semantics (conformance.rs, the same cases tests.rs runs on the embedded
//! backend, and the model-based property test) run on the Kubernetes backend against the
//! API server emulator; plus what only this backend has: watches that survive a compacted history
//! and cut connections, the CRD check, and leader election on a Lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

use super::conformance::{self, Backend, next, rt, volume};
use super::kubernetes::{KubernetesStore, crds};
use super::kubernetes_emulator::{ApiServerEmulator, ResourceKind};
use super::kubernetes_lease::{LeaderElector, LeaseConfig};
use super::*;
use crate::resources::Volume;

const NS: &str = "ironhorn-system";

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

/// The Kubernetes backend on an API server emulator; every client is a new kube client.
struct OnEmulator {
    emu: ApiServerEmulator,
}

impl Backend for OnEmulator {
    fn client(&self) -> Store {
        open(&self.emu)
    }

    fn reopen(&mut self, store: Store) -> Store {
        drop(store);
        open(&self.emu)
    }

    fn namespace(&self) -> Option<&str> {
        Some(NS)
    }

    fn resource_version(&self) -> Option<u64> {
        Some(self.emu.resource_version())
    }
}

async fn on_emulator() -> OnEmulator {
    OnEmulator {
        emu: emulator().await,
    }
}

#[test]
fn create_get_update_and_conflict() {
    rt().block_on(async {
        conformance::create_get_update_and_conflict(&mut on_emulator().await).await;
    });
}

#[test]
fn modify_retries_on_conflicts_from_concurrent_writers() {
    rt().block_on(async {
        conformance::modify_retries_on_conflicts_from_concurrent_writers(&mut on_emulator().await)
            .await;
    });
}

#[test]
fn delete_waits_for_the_last_finalizer() {
    rt().block_on(async {
        conformance::delete_waits_for_the_last_finalizer(&mut on_emulator().await).await;
    });
}

#[test]
fn watch_replays_then_streams_changes_in_order() {
    rt().block_on(async {
        conformance::watch_replays_then_streams_changes_in_order(&mut on_emulator().await).await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Any sequence of operations (new clients among them) leaves the API server equal to
    /// a plain map that applies the store's rules, with resource versions that only grow.
    #[test]
    fn store_matches_an_in_memory_model(ops in proptest::collection::vec(conformance::op(), 1..40)) {
        rt().block_on(async {
            conformance::matches_the_model(&mut on_emulator().await, ops).await
        })?;
    }
}

fn client(emu: &ApiServerEmulator) -> kube::Client {
    kube::Client::try_from(emu.kube_config(NS)).expect("client")
}

fn open(emu: &ApiServerEmulator) -> Store {
    Store::new(Arc::new(KubernetesStore::new(client(emu), NS)))
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
