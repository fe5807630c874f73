//! Model test: random operation sequences against the store and against a plain in-memory
//! volume (one byte image for the head and one per snapshot, frozen when it was taken), with
//! every read, the layer tree, each layer's own blocks and the chunk checksums compared.
//!
//! Most cases use a small volume (64 KiB – 1 MiB). Some use a 16 TiB volume of which only a
//! few windows are touched (the start, around the 8 TiB layer-segment boundary, the middle,
//! the last blocks): the model is then the concatenation of the windows.
//!
//! `PROPTEST_CASES` sets the number of cases (default 64).

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};

use common::{
    assert_no_leftovers, assert_same, chain_of, own_blocks, own_blocks_in, sums_from_chunks_in,
    view_from_chunks,
};
use ironhorn_replica::layer_file::SEGMENT_SIZE;
use ironhorn_replica::{BLOCK_SIZE, CHUNK_SIZE, LayerInfo, SECTOR_SIZE, Store, StoreError};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

mod common;

const HEAD: &str = "volume-head";
/// Largest (modelled) volume a case grows to (2 MiB).
const MAX_BLOCKS: u64 = 512;
const TIB: u64 = 1 << 40;
const DEFAULT_CASES: u32 = 64;

// ---------------------------------------------------------------------------------------
// Helpers shared by the proptest and the deterministic tests.

/// Fills `buf` with a pseudo-random stream that depends on `tag`.
fn pattern(buf: &mut [u8], tag: u64) {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

// ---------------------------------------------------------------------------------------
// Where the modelled bytes live in the volume.

/// The modelled bytes are the concatenation of windows of the volume ("virtual" offsets);
/// the rest of the volume is never touched and must stay empty.
#[derive(Debug, Clone)]
struct Geometry {
    size: u64,
    /// (volume offset, length), block aligned, ascending.
    windows: Vec<(u64, u64)>,
}

impl Geometry {
    fn small(size: u64) -> Geometry {
        Geometry {
            size,
            windows: vec![(0, size)],
        }
    }

    /// 16 TiB; windows at the start, across the 8 TiB segment boundary, inside a chunk in
    /// the middle, and at the very end.
    fn big() -> Geometry {
        Geometry {
            size: 16 * TIB,
            windows: vec![
                (0, 64 << 10),
                (SEGMENT_SIZE - (128 << 10), 256 << 10),
                (12 * TIB + CHUNK_SIZE / 2, 64 << 10),
                (16 * TIB - (128 << 10), 128 << 10),
            ],
        }
    }

    fn vsize(&self) -> u64 {
        self.windows.iter().map(|w| w.1).sum()
    }

    /// Volume offset of virtual offset `v`, and how many bytes its window has from there.
    fn locate(&self, v: u64) -> (u64, u64) {
        let mut base = 0;
        for &(start, len) in &self.windows {
            if v < base + len {
                return (start + v - base, base + len - v);
            }
            base += len;
        }
        panic!("virtual offset {v} past {}", self.vsize());
    }

    fn to_virtual(&self, off: u64) -> Option<u64> {
        let mut base = 0;
        for &(start, len) in &self.windows {
            if (start..start + len).contains(&off) {
                return Some(base + off - start);
            }
            base += len;
        }
        None
    }

    /// The chunks the windows touch, ascending.
    fn chunks(&self) -> Vec<u64> {
        let set: BTreeSet<u64> = self
            .windows
            .iter()
            .flat_map(|&(s, l)| s / CHUNK_SIZE..(s + l).div_ceil(CHUNK_SIZE))
            .collect();
        set.into_iter().collect()
    }

    fn expand(&mut self, add: u64) {
        match self.windows.last_mut() {
            Some((s, l)) if *s + *l == self.size => *l += add,
            _ => self.windows.push((self.size, add)),
        }
        self.size += add;
    }
}

// ---------------------------------------------------------------------------------------
// The model.

#[derive(Debug, Clone)]
struct SnapModel {
    /// The volume as it read when the snapshot was taken (at the size of that time).
    image: Vec<u8>,
    parent: Option<String>,
    removed: bool,
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct Model {
    size: u64,
    head: Vec<u8>,
    head_parent: Option<String>,
    snaps: BTreeMap<String, SnapModel>,
    /// Every snapshot name ever used, purged ones included.
    all_names: Vec<String>,
    tag: u64,
}

impl Model {
    fn new(size: u64) -> Model {
        Model {
            size,
            head: vec![0; size as usize],
            head_parent: None,
            snaps: BTreeMap::new(),
            all_names: Vec::new(),
            tag: 0,
        }
    }

    fn children(&self, name: &str) -> Vec<String> {
        let mut c: Vec<String> = self
            .snaps
            .iter()
            .filter(|(_, s)| s.parent.as_deref() == Some(name))
            .map(|(n, _)| n.clone())
            .collect();
        if self.head_parent.as_deref() == Some(name) {
            c.push(HEAD.to_owned());
        }
        c
    }

    /// The image of a snapshot, zero-extended to the current size.
    fn snap_image(&self, name: &str) -> Vec<u8> {
        let mut img = self.snaps[name].image.clone();
        img.resize(self.size as usize, 0);
        img
    }

    /// Applies a purge; returns (purged names, snapshots that received a merge).
    fn purge(&mut self) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut purged = BTreeSet::new();
        let mut touched = BTreeSet::new();
        loop {
            let next = self
                .snaps
                .iter()
                .filter(|(_, s)| s.removed)
                .map(|(n, _)| n.clone())
                .find(|n| self.children(n).len() <= 1);
            let Some(name) = next else { break };
            let parent = self.snaps[&name].parent.clone();
            match self.children(&name).first().map(String::as_str) {
                None => {}
                Some(HEAD) => self.head_parent = parent,
                Some(c) => {
                    let c = c.to_owned();
                    self.snaps.get_mut(&c).unwrap().parent = parent;
                    touched.insert(c);
                }
            }
            self.snaps.remove(&name);
            purged.insert(name);
        }
        (purged, touched)
    }

    fn head_chain(&self) -> Vec<String> {
        let mut chain = vec![HEAD.to_owned()];
        let mut cur = self.head_parent.clone();
        while let Some(c) = cur {
            cur = self.snaps[&c].parent.clone();
            chain.push(c);
        }
        chain.reverse();
        chain
    }

    /// A name to act on: mostly an existing snapshot, sometimes a purged one or the head.
    fn pick(&self, pick: usize) -> String {
        let existing: Vec<&String> = self.snaps.keys().collect();
        if !pick.is_multiple_of(5) && !existing.is_empty() {
            return existing[(pick / 5) % existing.len()].clone();
        }
        let n = self.all_names.len() + 1;
        match (pick / 5) % n {
            0 => HEAD.to_owned(),
            i => self.all_names[i - 1].clone(),
        }
    }
}

fn check_structure(store: &Store, model: &Model, geo: &Geometry) {
    let layers = store.layers();
    let heads: Vec<&LayerInfo> = layers.iter().filter(|l| l.is_head).collect();
    assert_eq!(heads.len(), 1, "exactly one head: {layers:?}");
    assert_eq!(heads[0].name, HEAD);
    assert_eq!(heads[0].parent, model.head_parent, "head parent");
    assert!(heads[0].children.is_empty());
    let names: BTreeSet<&str> = layers
        .iter()
        .filter(|l| !l.is_head)
        .map(|l| l.name.as_str())
        .collect();
    let want: BTreeSet<&str> = model.snaps.keys().map(String::as_str).collect();
    assert_eq!(names, want, "snapshot names");
    for l in layers.iter().filter(|l| !l.is_head) {
        let m = &model.snaps[&l.name];
        assert_eq!(l.parent, m.parent, "parent of {}", l.name);
        assert_eq!(l.removed, m.removed, "removed flag of {}", l.name);
        assert_eq!(l.labels, m.labels, "labels of {}", l.name);
        let got: BTreeSet<&String> = l.children.iter().collect();
        let kids = model.children(&l.name);
        let want: BTreeSet<&String> = kids.iter().collect();
        assert_eq!(got, want, "children of {}", l.name);
    }
    assert_eq!(store.head_chain(), model.head_chain(), "head chain");
    assert_eq!(store.snapshot_count(), model.snaps.len());
    assert_eq!(store.size(), geo.size);
    assert_eq!(geo.vsize(), model.size);
}

// ---------------------------------------------------------------------------------------
// Operations.

/// A byte range drawn without knowing the volume size: `at` is reduced modulo the size,
/// `len` is in sectors, `aligned` rounds to whole blocks where it can.
#[derive(Debug, Clone, Copy)]
struct Span {
    at: u64,
    len: u64,
    aligned: bool,
}

impl Span {
    fn resolve(self, size: u64) -> (u64, u64) {
        let sectors = size / SECTOR_SIZE;
        let per_block = BLOCK_SIZE / SECTOR_SIZE;
        let mut s = self.at % sectors;
        if self.aligned {
            s -= s % per_block;
        }
        let mut l = self.len.min(sectors - s);
        if self.aligned && l >= per_block {
            l -= l % per_block;
        }
        (s * SECTOR_SIZE, l * SECTOR_SIZE)
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(Span),
    WriteZeroes(Span),
    Discard(Span),
    Read(Span),
    /// `reuse`: take the name of a purged snapshot when there is one.
    Snapshot {
        labelled: bool,
        reuse: bool,
    },
    Remove(usize),
    Purge {
        with_sums: bool,
    },
    RemoveAndPurge(usize, bool),
    Revert(usize),
    Expand(u64),
    Flush,
    Reopen,
    Checksums(usize),
    Bad(u8),
}

fn span() -> impl Strategy<Value = Span> {
    (
        any::<u64>(),
        prop_oneof![4 => 1..=8u64, 4 => 1..=64u64, 1 => 1..=512u64],
        any::<bool>(),
    )
        .prop_map(|(at, len, aligned)| Span { at, len, aligned })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => span().prop_map(Op::Write),
        2 => span().prop_map(Op::WriteZeroes),
        2 => span().prop_map(Op::Discard),
        4 => span().prop_map(Op::Read),
        4 => (any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(labelled, reuse)| Op::Snapshot { labelled, reuse }),
        2 => any::<usize>().prop_map(Op::Remove),
        1 => any::<bool>().prop_map(|with_sums| Op::Purge { with_sums }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(p, s)| Op::RemoveAndPurge(p, s)),
        2 => any::<usize>().prop_map(Op::Revert),
        1 => (0..=64u64).prop_map(Op::Expand),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => any::<usize>().prop_map(Op::Checksums),
        1 => any::<u8>().prop_map(Op::Bad),
    ]
}

struct Harness {
    dir: tempfile::TempDir,
    store: Option<Store>,
    model: Model,
    geo: Geometry,
}

impl Harness {
    fn new(geo: Geometry) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_or_create(dir.path(), Some(geo.size)).unwrap();
        Harness {
            dir,
            store: Some(store),
            model: Model::new(geo.vsize()),
            geo,
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn reopen(&mut self) {
        self.store = None;
        self.store = Some(Store::open(self.dir.path()).unwrap());
    }

    /// A drawn span, kept inside one window: (virtual offset, volume offset, length).
    fn place(&self, span: Span) -> (u64, u64, u64) {
        let (v, len) = span.resolve(self.model.size);
        let (off, room) = self.geo.locate(v);
        (v, off, len.min(room))
    }

    /// The layer's own blocks (volume offsets) in the windows; also checks that the layer
    /// holds nothing outside them.
    fn own(&self, layer: &str, info: Option<&LayerInfo>) -> Vec<(u64, Vec<u8>)> {
        let runs = own_blocks_in(self.store(), layer, self.geo.chunks(), self.geo.size);
        for (off, data) in &runs {
            for b in (*off..off + data.len() as u64).step_by(BLOCK_SIZE as usize) {
                assert!(
                    self.geo.to_virtual(b).is_some(),
                    "{layer} holds block {} outside the touched windows",
                    b / BLOCK_SIZE
                );
            }
        }
        if let Some(info) = info {
            let held: u64 = runs.iter().map(|(_, d)| d.len() as u64).sum();
            assert_eq!(
                info.allocated_bytes, held,
                "{layer}: blocks held vs read_chunk"
            );
        }
        runs
    }

    /// What a read of layer `name` sees (virtual image), rebuilt from its chain's own blocks.
    fn view(&self, layers: &[LayerInfo], name: &str) -> Vec<u8> {
        let mut img = vec![0u8; self.model.size as usize];
        for l in chain_of(layers, name) {
            let info = layers.iter().find(|i| i.name == l);
            for (off, data) in self.own(&l, info) {
                for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                    let v = self.geo.to_virtual(off + i as u64 * BLOCK_SIZE).unwrap() as usize;
                    img[v..v + block.len()].copy_from_slice(block);
                }
            }
        }
        img
    }

    fn sums(&self, layer: &str) -> Vec<(u64, u32)> {
        sums_from_chunks_in(self.store(), layer, self.geo.chunks())
    }

    /// Everything: structure, the head through `read`, every layer's view rebuilt from its
    /// chain's own blocks, checksums equal to ones computed from `read_chunk`, no stray files.
    fn verify_all(&self, with_sums: bool) {
        let store = self.store();
        check_structure(store, &self.model, &self.geo);
        let mut buf = Vec::with_capacity(self.model.size as usize);
        for &(off, len) in &self.geo.windows {
            let mut w = vec![0u8; len as usize];
            store.read(off, &mut w).unwrap();
            buf.extend_from_slice(&w);
        }
        assert_same("head read", &buf, &self.model.head);
        let layers = store.layers();
        for l in &layers {
            let view = self.view(&layers, &l.name);
            let want = if l.is_head {
                self.model.head.clone()
            } else {
                self.model.snap_image(&l.name)
            };
            assert_same(&format!("view of {} from read_chunk", l.name), &view, &want);
            if with_sums {
                let got = store.checksums(&l.name).unwrap();
                assert_eq!(*got, self.sums(&l.name), "checksums of {}", l.name);
            }
        }
        assert_no_leftovers(self.dir.path(), store);
    }

    /// Blocks of the head's chain below the head, from the layers' own blocks.
    fn lower_blocks(&self) -> BTreeSet<u64> {
        let chain = self.model.head_chain();
        let mut out = BTreeSet::new();
        for l in &chain[..chain.len() - 1] {
            for (off, data) in self.own(l, None) {
                out.extend(off / BLOCK_SIZE..(off + data.len() as u64) / BLOCK_SIZE);
            }
        }
        out
    }

    fn zero(&mut self, span: Span, discard: bool) {
        let (v, off, len) = self.place(span);
        let lower = self.lower_blocks();
        if discard {
            self.store().discard(off, len).unwrap();
        } else {
            self.store().write_zeroes(off, len).unwrap();
        }
        self.model.head[v as usize..(v + len) as usize].fill(0);
        // Whole blocks that nothing below holds must be holes in the head now.
        let head_has: BTreeSet<u64> = self
            .own(HEAD, None)
            .into_iter()
            .flat_map(|(o, d)| o / BLOCK_SIZE..(o + d.len() as u64) / BLOCK_SIZE)
            .collect();
        for b in off.div_ceil(BLOCK_SIZE)..(off + len) / BLOCK_SIZE {
            if !lower.contains(&b) {
                assert!(
                    !head_has.contains(&b),
                    "block {b} zeroed with nothing below, still allocated in the head"
                );
            }
        }
    }

    fn sums_of_all(&self) -> BTreeMap<String, Vec<(u64, u32)>> {
        self.model
            .snaps
            .keys()
            .map(|n| (n.clone(), self.store().checksums(n).unwrap().to_vec()))
            .collect()
    }

    fn purge(&mut self, with_sums: bool) {
        let before = if with_sums {
            self.sums_of_all()
        } else {
            BTreeMap::new()
        };
        let got: BTreeSet<String> = self.store().purge().unwrap().into_iter().collect();
        let (want, touched) = self.model.purge();
        assert_eq!(got, want, "purged snapshots");
        for (name, sums) in &before {
            if !self.model.snaps.contains_key(name) {
                continue;
            }
            let after = self.store().checksums(name).unwrap().to_vec();
            if !touched.contains(name) {
                assert_eq!(
                    &after, sums,
                    "checksums of untouched snapshot {name} changed"
                );
            }
            assert_eq!(after, self.sums(name), "checksums of {name} after purge");
        }
    }

    fn remove(&mut self, pick: usize) {
        let name = self.model.pick(pick);
        let r = self.store().remove_snapshot(&name);
        if name == HEAD {
            assert!(matches!(r, Err(StoreError::SnapshotState { .. })), "{r:?}");
        } else if let Some(s) = self.model.snaps.get_mut(&name) {
            r.unwrap();
            s.removed = true;
        } else {
            assert!(matches!(r, Err(StoreError::SnapshotNotFound(_))), "{r:?}");
        }
    }

    fn snapshot(&mut self, labelled: bool, reuse: bool) {
        let m = &self.model;
        let purged = m.all_names.iter().find(|n| !m.snaps.contains_key(*n));
        let name = match purged {
            Some(n) if reuse => n.clone(),
            _ => format!("s{}", m.all_names.len()),
        };
        let mut labels = BTreeMap::new();
        if labelled {
            labels.insert("k".to_owned(), name.clone());
        }
        let info = self.store().snapshot(&name, labels.clone()).unwrap();
        assert_eq!(info.name, name);
        assert!(!info.is_head);
        assert_eq!(info.children, vec![HEAD.to_owned()]);
        let m = &mut self.model;
        let snap = SnapModel {
            image: m.head.clone(),
            parent: m.head_parent.clone(),
            removed: false,
            labels,
        };
        m.snaps.insert(name.clone(), snap);
        m.head_parent = Some(name.clone());
        if !m.all_names.contains(&name) {
            m.all_names.push(name);
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write(span) => {
                let (v, off, len) = self.place(*span);
                self.model.tag += 1;
                let mut data = vec![0u8; len as usize];
                pattern(&mut data, self.model.tag);
                self.store().write(off, &data).unwrap();
                self.model.head[v as usize..(v + len) as usize].copy_from_slice(&data);
            }
            Op::WriteZeroes(span) => self.zero(*span, false),
            Op::Discard(span) => self.zero(*span, true),
            Op::Read(span) => {
                let (v, off, len) = self.place(*span);
                let mut buf = vec![0xAAu8; len as usize];
                self.store().read(off, &mut buf).unwrap();
                let want = &self.model.head[v as usize..(v + len) as usize];
                assert_same(&format!("read {off}+{len}"), &buf, want);
                // Allocation status: consecutive pieces from `off`; holes read as zeros.
                let pieces = self.store().block_status(off, len).unwrap();
                let mut at = 0u64;
                for (plen, hole) in &pieces {
                    assert!(*plen > 0, "empty piece in {pieces:?}");
                    if *hole {
                        let z = &want[at as usize..(at + plen) as usize];
                        assert!(z.iter().all(|&b| b == 0), "hole at {} holds data", off + at);
                    }
                    at += plen;
                }
                assert!(
                    at == len || pieces.len() == 1024,
                    "block status covers {at} of {len}: {pieces:?}"
                );
            }
            Op::Snapshot { labelled, reuse } => self.snapshot(*labelled, *reuse),
            Op::Remove(pick) => self.remove(*pick),
            Op::Purge { with_sums } => self.purge(*with_sums),
            Op::RemoveAndPurge(pick, with_sums) => {
                self.remove(*pick);
                self.purge(*with_sums);
            }
            Op::Revert(pick) => {
                let name = self.model.pick(*pick);
                let r = self.store().revert(&name);
                match self.model.snaps.get(&name) {
                    _ if name == HEAD => {
                        assert!(matches!(r, Err(StoreError::SnapshotState { .. })), "{r:?}")
                    }
                    None => assert!(matches!(r, Err(StoreError::SnapshotNotFound(_))), "{r:?}"),
                    Some(s) if s.removed => {
                        assert!(matches!(r, Err(StoreError::SnapshotState { .. })), "{r:?}")
                    }
                    Some(_) => {
                        r.unwrap();
                        self.model.head = self.model.snap_image(&name);
                        self.model.head_parent = Some(name);
                    }
                }
            }
            Op::Expand(blocks) => {
                let add = blocks * BLOCK_SIZE;
                let size = self.geo.size;
                if self.model.size + add > MAX_BLOCKS * BLOCK_SIZE {
                    let r = self.store().expand(size - BLOCK_SIZE);
                    assert!(matches!(r, Err(StoreError::InvalidSize { .. })), "{r:?}");
                } else {
                    self.store().expand(size + add).unwrap();
                    self.geo.expand(add);
                    self.model.size += add;
                    self.model.head.resize(self.model.size as usize, 0);
                }
            }
            Op::Flush => self.store().flush().unwrap(),
            Op::Reopen => {
                self.reopen();
                self.verify_all(false);
            }
            Op::Checksums(pick) => {
                let name = self.model.pick(*pick);
                let r = self.store().checksums(&name);
                if name == HEAD || self.model.snaps.contains_key(&name) {
                    // The head's sums are computed on every call, a snapshot's are cached.
                    assert_eq!(*r.unwrap(), self.sums(&name));
                } else {
                    assert!(matches!(r, Err(StoreError::SnapshotNotFound(_))), "{r:?}");
                }
            }
            Op::Bad(kind) => self.bad(*kind),
        }
        check_structure(self.store(), &self.model, &self.geo);
    }

    /// Refused requests: each must fail with the right error and change nothing.
    fn bad(&mut self, kind: u8) {
        let s = self.store();
        let size = self.geo.size;
        let mut buf = vec![0u8; 1024];
        let range = |r: ironhorn_replica::Result<()>| {
            assert!(matches!(r, Err(StoreError::InvalidRange { .. })), "{r:?}")
        };
        match kind % 8 {
            0 => range(s.read(1, &mut buf)),
            1 => range(s.read(size - 512, &mut buf)),
            2 => range(s.write(size, &buf[..512])),
            3 => range(s.write(0, &buf[..100])),
            4 => range(s.write_zeroes(u64::MAX - 511, 1024)),
            5 => {
                let r = s.expand(size + 512);
                assert!(matches!(r, Err(StoreError::InvalidSize { .. })), "{r:?}");
            }
            6 => {
                let r = s.snapshot(HEAD, BTreeMap::new());
                assert!(matches!(r, Err(StoreError::InvalidName { .. })), "{r:?}");
                let r = s.snapshot("a/b", BTreeMap::new());
                assert!(matches!(r, Err(StoreError::InvalidName { .. })), "{r:?}");
            }
            _ => {
                if let Some(name) = self.model.snaps.keys().next() {
                    let r = s.snapshot(name, BTreeMap::new());
                    assert!(matches!(r, Err(StoreError::SnapshotExists(_))), "{r:?}");
                }
            }
        }
    }
}

fn run_case(geo: Geometry, ops: &[Op]) {
    let mut h = Harness::new(geo);
    for op in ops {
        h.apply(op);
    }
    h.verify_all(true);
    h.reopen();
    h.verify_all(true);
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(
        geo in prop_oneof![
            2 => (16..=64u64).prop_map(|b| Geometry::small(b * BLOCK_SIZE)),
            2 => (64..=256u64).prop_map(|b| Geometry::small(b * BLOCK_SIZE)),
            1 => Just(Geometry::big()),
        ],
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        run_case(geo, &ops);
    }
}

// ---------------------------------------------------------------------------------------
// Rebuild: a target brought up to a source by the store's sync primitives, the way the
// ReplicaSync service drives them, while live writes go to both.

#[derive(Debug, Clone)]
enum Live {
    Write(Span),
    Zero(Span, bool),
}

fn live() -> impl Strategy<Value = Live> {
    prop_oneof![
        4 => span().prop_map(Live::Write),
        1 => (span(), any::<bool>()).prop_map(|(s, d)| Live::Zero(s, d)),
    ]
}

/// History ops for a rebuild source: no expand (the engine sizes replicas), no bad input.
fn history_op() -> impl Strategy<Value = Op> {
    op().prop_filter("no expand / bad input", |o| {
        !matches!(o, Op::Expand(_) | Op::Bad(_) | Op::Reopen)
    })
}

impl Harness {
    /// Applies a live write to this (modelled) store and the same bytes to `other`.
    fn live_both(&mut self, op: &Live, other: &Store) {
        match op {
            Live::Write(span) => {
                let (v, off, len) = self.place(*span);
                self.model.tag += 1;
                let mut data = vec![0u8; len as usize];
                pattern(&mut data, self.model.tag);
                self.store().write(off, &data).unwrap();
                other.write(off, &data).unwrap();
                self.model.head[v as usize..(v + len) as usize].copy_from_slice(&data);
            }
            Live::Zero(span, discard) => {
                let (_, off, len) = self.place(*span);
                if *discard {
                    other.discard(off, len).unwrap();
                } else {
                    other.write_zeroes(off, len).unwrap();
                }
                self.zero(*span, *discard);
            }
        }
    }
}

/// Same layers (names, tree, flags, labels, times), same views of every layer, same
/// checksums of every snapshot.
fn assert_replicas_equal(what: &str, src: &Store, dst: &Store) {
    let (a, b) = (src.layers(), dst.layers());
    let key = |l: &LayerInfo| {
        let mut c = l.children.clone();
        c.sort();
        (
            l.name.clone(),
            l.parent.clone(),
            c,
            l.is_head,
            l.removed,
            l.labels.clone(),
        )
    };
    let ka: BTreeSet<_> = a.iter().map(key).collect();
    let kb: BTreeSet<_> = b.iter().map(key).collect();
    assert_eq!(ka, kb, "{what}: layer trees differ");
    assert_eq!(src.head_chain(), dst.head_chain(), "{what}: head chains");
    assert_eq!(src.size(), dst.size(), "{what}: sizes");
    for l in a.iter().filter(|l| !l.is_head) {
        let lb = b.iter().find(|x| x.name == l.name).unwrap();
        assert_eq!(
            l.created_unix_ms, lb.created_unix_ms,
            "{what}: time of {}",
            l.name
        );
    }
    for l in &a {
        let va = view_from_chunks(src, &a, &l.name, src.size());
        let vb = view_from_chunks(dst, &b, &l.name, dst.size());
        assert_same(&format!("{what}: view of {}", l.name), &vb, &va);
        if !l.is_head {
            assert_eq!(
                src.checksums(&l.name).unwrap(),
                dst.checksums(&l.name).unwrap(),
                "{what}: checksums of {}",
                l.name
            );
        }
    }
    let mut ra = vec![0u8; src.size() as usize];
    let mut rb = vec![0u8; dst.size() as usize];
    src.read(0, &mut ra).unwrap();
    dst.read(0, &mut rb).unwrap();
    assert_same(&format!("{what}: head read"), &rb, &ra);
}

/// Runs a rebuild of a target (fresh, or replaying the first `stale` history ops) from a
/// source with `history`, with `live` writes spread over the sync.
fn run_rebuild(blocks: u64, history: &[Op], stale: Option<usize>, live: &[Live]) {
    let geo = Geometry::small(blocks * BLOCK_SIZE);
    let mut src = Harness::new(geo.clone());
    let mut dst = Harness::new(geo);
    let stale = stale.map(|k| k.min(history.len()));
    for (i, op) in history.iter().enumerate() {
        if stale.is_some_and(|k| i < k) {
            dst.apply(op);
        }
        src.apply(op);
    }
    let t = dst.store.take().unwrap();
    t.begin_rebuild().unwrap();
    assert!(t.is_rebuilding());
    let mut live = live.iter();
    let mut some_live = |src: &mut Harness, n: usize| {
        for op in live.by_ref().take(n) {
            src.live_both(op, &t);
        }
    };
    some_live(&mut src, 2);
    // The system snapshot the rebuild syncs.
    src.apply(&Op::Snapshot {
        labelled: false,
        reuse: false,
    });
    some_live(&mut src, 2);
    let layers = src.store().layers();
    let snaps: Vec<&LayerInfo> = layers.iter().filter(|l| !l.is_head).collect();
    for l in &snaps {
        t.prepare_layer(&l.name, l.created_unix_ms, l.labels.clone())
            .unwrap();
        some_live(&mut src, 1);
    }
    for l in &snaps {
        let theirs: BTreeMap<u64, u32> = src
            .store()
            .checksums(&l.name)
            .unwrap()
            .iter()
            .copied()
            .collect();
        let mine: BTreeMap<u64, u32> = t.checksums(&l.name).unwrap().iter().copied().collect();
        for c in mine.keys().filter(|c| !theirs.contains_key(c)) {
            t.import_chunk(&l.name, *c, &[]).unwrap();
            some_live(&mut src, 1);
        }
        for (c, crc) in &theirs {
            if mine.get(c) != Some(crc) {
                let runs = src.store().read_chunk(&l.name, *c).unwrap();
                t.import_chunk(&l.name, *c, &runs).unwrap();
                some_live(&mut src, 1);
            }
        }
    }
    let tree: Vec<(String, Option<String>, bool)> = snaps
        .iter()
        .map(|l| (l.name.clone(), l.parent.clone(), l.removed))
        .collect();
    let chain = src.store().head_chain();
    let head_parent = chain.iter().rev().nth(1).cloned();
    t.finish_sync(&tree, head_parent.as_deref()).unwrap();
    some_live(&mut src, 2);
    t.finish_rebuild().unwrap();
    assert!(!t.is_rebuilding());
    some_live(&mut src, usize::MAX);
    src.verify_all(true);
    assert_replicas_equal("after the rebuild", src.store(), &t);
    drop(t);
    let t = Store::open(dst.dir.path()).unwrap();
    assert_replicas_equal("target reopened", src.store(), &t);
    assert_no_leftovers(dst.dir.path(), &t);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases().div_ceil(2),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn rebuild_matches_source(
        blocks in 16..=128u64,
        history in proptest::collection::vec(history_op(), 0..30),
        stale in proptest::option::of(0..30usize),
        live in proptest::collection::vec(live(), 0..40),
    ) {
        run_rebuild(blocks, &history, stale, &live);
    }
}

// ---------------------------------------------------------------------------------------
// Deterministic cases.

/// A few sequences that once mattered, kept so they run on every build.
#[test]
fn fixed_sequences() {
    let w = |at: u64, len: u64| {
        Op::Write(Span {
            at: at / SECTOR_SIZE,
            len: len / SECTOR_SIZE,
            aligned: false,
        })
    };
    let z = |at: u64, len: u64| {
        Op::Discard(Span {
            at: at / SECTOR_SIZE,
            len: len / SECTOR_SIZE,
            aligned: false,
        })
    };
    // Discard over a snapshot's block must not uncover it, before or after a purge.
    run_case(
        Geometry::small(16 * BLOCK_SIZE),
        &[
            w(0, 16384),
            Op::Snapshot {
                labelled: false,
                reuse: false,
            },
            z(4096, 8192),
            Op::Snapshot {
                labelled: true,
                reuse: true,
            },
            Op::RemoveAndPurge(1, true),
            Op::Reopen,
            Op::Revert(1),
            w(512, 1024),
            Op::Reopen,
        ],
    );
    // Revert leaves a branch; purge keeps a snapshot with two children, then merges it.
    run_case(
        Geometry::small(32 * BLOCK_SIZE),
        &[
            w(0, 8192),
            Op::Snapshot {
                labelled: false,
                reuse: false,
            },
            w(4096, 8192),
            Op::Snapshot {
                labelled: false,
                reuse: false,
            },
            Op::Revert(1),
            w(3584, 1024),
            Op::RemoveAndPurge(1, true),
            Op::Expand(16),
            w(40960, 8192),
            Op::RemoveAndPurge(6, true),
            Op::Reopen,
        ],
    );
    // 16 TiB: I/O across the 8 TiB segment boundary and in the very last block, through
    // snapshot, discard, purge, expand past 16 TiB, revert and reopen. Virtual offsets: the
    // boundary is at 192 KiB, the volume's last block at 508 KiB.
    let snap = Op::Snapshot {
        labelled: false,
        reuse: false,
    };
    let k = |n: u64| n << 10;
    run_case(
        Geometry::big(),
        &[
            w(k(192) - 4096, 8192),
            w(k(192) - 1024, 2048),
            w(k(508), 4096),
            snap.clone(),
            z(k(192) - 8192, 16384),
            w(k(508) + 512, 512),
            Op::Reopen,
            snap.clone(),
            Op::RemoveAndPurge(1, true),
            Op::Expand(4),
            w(k(508), 8192),
            Op::Reopen,
            Op::Revert(1),
            w(k(192), 512),
            Op::RemoveAndPurge(1, true),
            Op::Reopen,
        ],
    );
}

/// 1000 snapshots each holding one small write; read back, reopen, purge every other one.
#[test]
fn thousand_snapshot_chain() {
    const N: u64 = 1000;
    const BLOCKS: u64 = 2048; // 8 MiB
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::create(dir.path(), BLOCKS * BLOCK_SIZE).unwrap();
    // writes[i] = (offset, data) written before snapshot i.
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for i in 0..N {
        let block = (i * 7919) % BLOCKS;
        let off = block * BLOCK_SIZE + (i % 8) * SECTOR_SIZE;
        let mut data = vec![0u8; if i % 3 == 0 { 4096 } else { 1024 }];
        if off % BLOCK_SIZE + data.len() as u64 > BLOCK_SIZE && block + 1 == BLOCKS {
            data.truncate((BLOCK_SIZE - off % BLOCK_SIZE) as usize);
        }
        pattern(&mut data, i + 1);
        store.write(off, &data).unwrap();
        writes.push((off, data));
        store
            .snapshot(&format!("snap-{i:04}"), BTreeMap::new())
            .unwrap();
    }
    let image_upto = |k: usize| {
        let mut img = vec![0u8; (BLOCKS * BLOCK_SIZE) as usize];
        for (off, d) in &writes[..k] {
            img[*off as usize..*off as usize + d.len()].copy_from_slice(d);
        }
        img
    };
    let full = image_upto(N as usize);
    let check_head = |store: &Store| {
        let mut buf = vec![0u8; (BLOCKS * BLOCK_SIZE) as usize];
        store.read(0, &mut buf).unwrap();
        assert_same("head", &buf, &full);
    };
    eprintln!("{N} snapshots taken: {:?}", t0.elapsed());
    check_head(&store);
    assert_eq!(store.head_chain().len(), N as usize + 1);

    drop(store);
    let store = Store::open(dir.path()).unwrap();
    eprintln!("reopened: {:?}", t0.elapsed());
    check_head(&store);
    assert_eq!(store.snapshot_count(), N as usize);

    for i in (1..N).step_by(2) {
        store.remove_snapshot(&format!("snap-{i:04}")).unwrap();
    }
    eprintln!("removed: {:?}", t0.elapsed());
    let purged = store.purge().unwrap();
    assert_eq!(purged.len(), N as usize / 2);
    eprintln!("purged: {:?}", t0.elapsed());
    check_head(&store);
    let chain = store.head_chain();
    assert_eq!(chain.len(), N as usize / 2 + 1);
    let layers = store.layers();
    // Every kept snapshot still reads as it was taken; spot-check a spread of them fully.
    for k in [0usize, 2, 10, 500, 998] {
        let name = format!("snap-{k:04}");
        let view = view_from_chunks(&store, &layers, &name, BLOCKS * BLOCK_SIZE);
        assert_same(&name, &view, &image_upto(k + 1));
    }
    // The newest snapshot absorbed the removed one above it.
    let last = format!("snap-{:04}", N - 2);
    let own = own_blocks(&store, &last, BLOCKS * BLOCK_SIZE);
    let blocks: BTreeSet<u64> = own.iter().map(|(o, _)| o / BLOCK_SIZE).collect();
    assert!(blocks.contains(&(writes[N as usize - 3].0 / BLOCK_SIZE)));
    assert!(blocks.contains(&(writes[N as usize - 2].0 / BLOCK_SIZE)));

    drop(store);
    let store = Store::open(dir.path()).unwrap();
    check_head(&store);
    assert_eq!(store.head_chain(), chain);
    assert_no_leftovers(dir.path(), &store);
}
