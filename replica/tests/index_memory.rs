//! The in-memory index stays small for a large volume: a real 1 TiB store with 10 snapshots
//! and 3000 scattered 4 KiB writes, measured as built by the writes and as rebuilt from the
//! layer files' extents at open. Run with `--nocapture` to see the figures.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::time::Instant;

use ironhorn_replica::{BLOCK_SIZE, Store};

const TIB: u64 = 1 << 40;
const SNAPSHOTS: u64 = 10;
const WRITES: u64 = 3000;
const LIMIT: usize = 1 << 20;

#[test]
fn index_of_a_scattered_tib_stays_under_one_mib() {
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), TIB).unwrap();
    let fresh = store.index_stats();
    println!("fresh 1 TiB volume: {fresh:?}");

    let blocks = TIB / BLOCK_SIZE;
    let mut x: u64 = 0x243F_6A88_85A3_08D3;
    let mut expect = BTreeMap::new();
    let per_layer = WRITES / (SNAPSHOTS + 1);
    for i in 0..WRITES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % blocks;
        let data = [(i % 251) as u8 + 1; BLOCK_SIZE as usize];
        store.write(block * BLOCK_SIZE, &data).unwrap();
        expect.insert(block, data[0]);
        if (i + 1) % per_layer == 0 && (i + 1) / per_layer <= SNAPSHOTS {
            store
                .snapshot(&format!("snap-{}", (i + 1) / per_layer), BTreeMap::new())
                .unwrap();
        }
    }
    assert_eq!(store.snapshot_count(), SNAPSHOTS as usize);
    let live = store.index_stats();
    println!("after {WRITES} writes and {SNAPSHOTS} snapshots: {live:?}");

    drop(store);
    let t = Instant::now();
    let store = Store::open(dir.path()).unwrap();
    let opened = store.index_stats();
    println!("rebuilt at open ({:?}): {opened:?}", t.elapsed());

    for (name, st) in [("fresh", fresh), ("live", live), ("reopened", opened)] {
        assert!(st.estimated_bytes < LIMIT, "{name}: {st:?}");
    }
    // Each write is one block of one layer; the chain's merged view has one extent per
    // distinct block (adjacent blocks of different layers stay apart).
    assert!(opened.layer_extents <= WRITES as usize, "{opened:?}");
    assert_eq!(opened.merged_extents, live.merged_extents);
    let mut buf = [0u8; BLOCK_SIZE as usize];
    for (&block, &v) in expect.iter().step_by(37) {
        store.read(block * BLOCK_SIZE, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == v), "block {block}");
    }
    println!(
        "distinct blocks {}, allocated {} KiB, total {:?}",
        expect.len(),
        store.allocated_bytes() >> 10,
        t0.elapsed()
    );
    let t = Instant::now();
    drop(store);
    let store_drop = t.elapsed();
    dir.close().unwrap();
    println!(
        "closed in {store_drop:?}, directory removed in {:?}",
        t.elapsed() - store_drop
    );
}
