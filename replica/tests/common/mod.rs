//! Helpers shared by the store's integration tests: what a layer holds and what a read of
//! it sees, rebuilt from `read_chunk`, checksums recomputed the way `checksum.rs` defines
//! them, and the replica directory's contents.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use ironhorn_replica::{BLOCK_SIZE, CHUNK_SIZE, LayerInfo, Store};

/// Panics with the first differing offset instead of dumping megabytes.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (block {}): got {:#04x}, want {:#04x}",
            i as u64 / BLOCK_SIZE,
            got[i],
            want[i]
        );
    }
}

/// The layer's own blocks, all chunks: (byte offset, data).
pub fn own_blocks(store: &Store, layer: &str, size: u64) -> Vec<(u64, Vec<u8>)> {
    own_blocks_in(store, layer, 0..size.div_ceil(CHUNK_SIZE), size)
}

/// The layer's own blocks in the given chunks: (byte offset, data).
pub fn own_blocks_in(
    store: &Store,
    layer: &str,
    chunks: impl IntoIterator<Item = u64>,
    size: u64,
) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for c in chunks {
        for (off, data) in store.read_chunk(layer, c).unwrap() {
            assert_eq!(
                off % BLOCK_SIZE,
                0,
                "{layer}: run offset {off} not block aligned"
            );
            assert_eq!(data.len() as u64 % BLOCK_SIZE, 0, "{layer}: run length");
            assert!(
                off / CHUNK_SIZE == c,
                "{layer}: run at {off} outside chunk {c}"
            );
            assert!(
                (off + data.len() as u64).div_ceil(CHUNK_SIZE) <= c + 1,
                "{layer}: run crosses its chunk"
            );
            assert!(off + data.len() as u64 <= size, "{layer}: run past the end");
            out.push((off, data.to_vec()));
        }
    }
    out
}

/// Names from the root down to `name`, following `parent` in `layers()`.
pub fn chain_of(layers: &[LayerInfo], name: &str) -> Vec<String> {
    let mut chain = vec![name.to_owned()];
    let mut cur = name.to_owned();
    while let Some(p) = layers
        .iter()
        .find(|l| l.name == cur)
        .and_then(|l| l.parent.clone())
    {
        assert!(chain.len() <= layers.len(), "parent cycle at {p}");
        chain.push(p.clone());
        cur = p;
    }
    chain.reverse();
    chain
}

/// What a read of layer `name` sees, rebuilt from the own blocks of its chain's layers.
pub fn view_from_chunks(store: &Store, layers: &[LayerInfo], name: &str, size: u64) -> Vec<u8> {
    let mut img = vec![0u8; size as usize];
    for l in chain_of(layers, name) {
        for (off, data) in own_blocks(store, &l, size) {
            img[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    img
}

/// Chunk checksums as `checksum.rs` defines them, computed from `read_chunk`.
pub fn sums_from_chunks(store: &Store, layer: &str, size: u64) -> Vec<(u64, u32)> {
    sums_from_chunks_in(store, layer, 0..size.div_ceil(CHUNK_SIZE))
}

/// [`sums_from_chunks`] over the given chunks only (ascending).
pub fn sums_from_chunks_in(
    store: &Store,
    layer: &str,
    chunks: impl IntoIterator<Item = u64>,
) -> Vec<(u64, u32)> {
    let per_chunk = CHUNK_SIZE / BLOCK_SIZE;
    let mut out = Vec::new();
    for c in chunks {
        let runs = store.read_chunk(layer, c).unwrap();
        if runs.is_empty() {
            continue;
        }
        let mut bitmap = [0u8; (CHUNK_SIZE / BLOCK_SIZE / 8) as usize];
        for (off, data) in &runs {
            let first = off / BLOCK_SIZE - c * per_chunk;
            for i in first..first + data.len() as u64 / BLOCK_SIZE {
                bitmap[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&bitmap);
        for (_, data) in &runs {
            h.update(data);
        }
        out.push((c, h.finalize()));
    }
    out
}

/// The directory holds the metadata and the files of listed layers, nothing else: no temp
/// files, no layer or checksum file of a layer that is gone.
pub fn assert_no_leftovers(dir: &Path, store: &Store) {
    let mut imgs = Vec::new();
    let mut crcs = Vec::new();
    let mut segs = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if name == "replica.json" {
            continue;
        }
        let id = name
            .strip_prefix("layer-")
            .and_then(|r| r.split_once('.'))
            .and_then(|(id, ext)| Some((id.parse::<u64>().ok()?, ext)));
        match id {
            Some((id, "img")) => imgs.push(id),
            // A further segment of a layer past 8 TiB.
            Some((id, seg))
                if seg
                    .strip_prefix("img.")
                    .is_some_and(|k| k.parse::<u32>().is_ok()) =>
            {
                segs.push(id)
            }
            Some((id, "crc")) => crcs.push(id),
            _ => panic!("unexpected file {name} in the replica directory"),
        }
    }
    assert_eq!(
        imgs.len(),
        store.layers().len(),
        "layer files {imgs:?} vs layers"
    );
    for c in crcs {
        assert!(
            imgs.contains(&c),
            "checksum file of layer {c}, which has no data file"
        );
    }
    for c in segs {
        assert!(
            imgs.contains(&c),
            "segment file of layer {c}, which has no first file"
        );
    }
}
