//! Tests of the store semantics on the embedded backend: the shared conformance cases
//! (conformance.rs: CRUD, conflicts, concurrent writers, finalizers, watches, the
//! model-based property test), plus what only this backend has: a lagging watcher is told,
//! and objects survive reopening the file.

use futures::StreamExt;
use proptest::prelude::*;

use super::conformance::{self, Backend, rt, volume};
use super::*;
use crate::resources::Volume;

/// The embedded backend on a redb file in a temporary directory.
struct Embedded {
    dir: tempfile::TempDir,
    /// The one store on the file (redb allows one per process); clients are its clones.
    current: Option<Store>,
}

fn open(dir: &tempfile::TempDir) -> Store {
    Store::open_embedded(dir.path().join("store.redb")).expect("open store")
}

fn embedded() -> Embedded {
    let dir = tempfile::tempdir().expect("tempdir");
    let current = Some(open(&dir));
    Embedded { dir, current }
}

impl Backend for Embedded {
    fn client(&self) -> Store {
        self.current.clone().expect("store open")
    }

    fn reopen(&mut self, store: Store) -> Store {
        drop(store);
        self.current = None;
        let s = open(&self.dir);
        self.current = Some(s.clone());
        s
    }

    fn namespace(&self) -> Option<&str> {
        None
    }

    fn resource_version(&self) -> Option<u64> {
        None
    }
}

#[test]
fn create_get_update_and_conflict() {
    rt().block_on(conformance::create_get_update_and_conflict(&mut embedded()));
}

#[test]
fn modify_retries_on_conflicts_from_concurrent_writers() {
    rt().block_on(
        conformance::modify_retries_on_conflicts_from_concurrent_writers(&mut embedded()),
    );
}

#[test]
fn delete_waits_for_the_last_finalizer() {
    rt().block_on(conformance::delete_waits_for_the_last_finalizer(
        &mut embedded(),
    ));
}

#[test]
fn watch_replays_then_streams_changes_in_order() {
    rt().block_on(conformance::watch_replays_then_streams_changes_in_order(
        &mut embedded(),
    ));
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Any sequence of operations (reopening the file among them) leaves the store equal
    /// to a plain map that applies the documented rules.
    #[test]
    fn store_matches_an_in_memory_model(ops in proptest::collection::vec(conformance::op(), 1..40)) {
        rt().block_on(conformance::matches_the_model(&mut embedded(), ops))?;
    }
}
