//! Store micro-benchmarks: the extent index (lookup and update with ~10k extents) and 4 KiB
//! random I/O on a real store in a temporary directory (a fully written 256 MiB volume and a
//! fresh sparse one), plus write + flush.
//!
//! `cargo bench -p ironhorn-replica --bench store -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ironhorn_replica::index::Index;
use ironhorn_replica::{BLOCK_SIZE, Store};

/// Blocks the index benchmarks spread their extents over (1 TiB).
const INDEX_BLOCKS: u64 = 1 << 28;
const WRITTEN_SIZE: u64 = 256 << 20;
const FRESH_SIZE: u64 = 64 << 30;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A chain of 5 layers plus an empty head, 2000 scattered extents of 1–16 blocks each.
fn index_with_extents() -> Index {
    let mut idx = Index::default();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for layer in 1..=5u64 {
        let set = idx.layers.entry(layer).or_default();
        for _ in 0..2000 {
            let start = rng.next() % INDEX_BLOCKS;
            let len = 1 + rng.next() % 16;
            set.insert(start..start + len);
        }
    }
    idx.layers.entry(6).or_default();
    idx.rebuild_chain((1..=6).collect());
    idx
}

fn bench_index(c: &mut Criterion) {
    let idx = index_with_extents();
    let st = idx.stats();
    eprintln!("index under test: {st:?}");
    let mut g = c.benchmark_group("index");
    let mut rng = Rng(1);
    let mut segs = Vec::with_capacity(64);
    g.bench_function("lookup_1_block", |b| {
        b.iter(|| {
            let s = rng.next() % INDEX_BLOCKS;
            idx.lookup(black_box(s..s + 1), &mut segs);
            black_box(segs.len())
        })
    });
    g.bench_function("lookup_256_blocks", |b| {
        b.iter(|| {
            let s = rng.next() % INDEX_BLOCKS;
            idx.lookup(black_box(s..s + 256), &mut segs);
            black_box(segs.len())
        })
    });
    g.bench_function("layer_has_all", |b| {
        b.iter(|| {
            let s = rng.next() % INDEX_BLOCKS;
            black_box(idx.layer_has_all(3, black_box(s..s + 1)))
        })
    });
    // A new extent written into the head and punched again, so the index keeps its size.
    let mut m = idx.clone();
    g.bench_function("head_written_then_punched", |b| {
        b.iter(|| {
            let s = rng.next() % INDEX_BLOCKS;
            m.head_written(6, black_box(s..s + 1));
            m.head_punched(6, black_box(s..s + 1));
        })
    });
    // The head written at random blocks, from an index with 10k extents (a fresh copy per
    // batch, so the head grows by at most a batch's writes).
    g.bench_function("head_written_new_block", |b| {
        b.iter_batched_ref(
            || idx.clone(),
            |m| {
                let s = rng.next() % INDEX_BLOCKS;
                m.head_written(6, s..s + 1);
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("rebuild_chain", |b| {
        b.iter_batched_ref(
            || idx.clone(),
            |m| m.rebuild_chain((1..=6).collect()),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn written_store(dir: &std::path::Path) -> Store {
    let store = Store::create(dir, WRITTEN_SIZE).unwrap();
    let chunk = vec![0x5Au8; 1 << 20];
    for off in (0..WRITTEN_SIZE).step_by(chunk.len()) {
        store.write(off, &chunk).unwrap();
    }
    store.flush().unwrap();
    store
}

fn random_block(rng: &mut Rng, size: u64) -> u64 {
    (rng.next() % (size / BLOCK_SIZE)) * BLOCK_SIZE
}

fn bench_store(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let written = written_store(&tmp.path().join("written"));
    let fresh = Store::create(&tmp.path().join("fresh"), FRESH_SIZE).unwrap();
    let mut rng = Rng(7);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let data = vec![0xA5u8; BLOCK_SIZE as usize];

    let mut g = c.benchmark_group("store_4k");
    g.throughput(Throughput::Bytes(BLOCK_SIZE));
    g.bench_function("read_written", |b| {
        b.iter(|| {
            written
                .read(random_block(&mut rng, WRITTEN_SIZE), &mut buf)
                .unwrap()
        })
    });
    g.bench_function("read_fresh_hole", |b| {
        b.iter(|| {
            fresh
                .read(random_block(&mut rng, FRESH_SIZE), &mut buf)
                .unwrap()
        })
    });
    g.bench_function("write_written", |b| {
        b.iter(|| {
            written
                .write(random_block(&mut rng, WRITTEN_SIZE), &data)
                .unwrap()
        })
    });
    g.bench_function("write_fresh", |b| {
        b.iter(|| {
            fresh
                .write(random_block(&mut rng, FRESH_SIZE), &data)
                .unwrap()
        })
    });
    // 512 bytes into a block the head does not hold yet (a volume with a snapshot below the
    // head): read-modify-write of the whole block.
    let partial = Store::create(&tmp.path().join("partial"), FRESH_SIZE).unwrap();
    partial
        .snapshot("base", std::collections::BTreeMap::new())
        .unwrap();
    g.bench_function("write_512_rmw_new_block", |b| {
        b.iter(|| {
            partial
                .write(random_block(&mut rng, FRESH_SIZE), &data[..512])
                .unwrap()
        })
    });
    g.bench_function("write_512_into_held_block", |b| {
        b.iter(|| {
            written
                .write(random_block(&mut rng, WRITTEN_SIZE) + 512, &data[..512])
                .unwrap()
        })
    });
    g.bench_function("write_written_then_flush", |b| {
        b.iter(|| {
            written
                .write(random_block(&mut rng, WRITTEN_SIZE), &data)
                .unwrap();
            written.flush().unwrap();
        })
    });
    g.finish();
    written.flush().unwrap();
    fresh.flush().unwrap();
    eprintln!(
        "fresh volume after the benchmark: {} MiB allocated",
        fresh.allocated_bytes() >> 20
    );
}

criterion_group!(benches, bench_index, bench_store);
criterion_main!(benches);
