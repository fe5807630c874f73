//! Per-chunk crc32 checksums of a frozen layer, for rebuild (skip equal chunks) and scrub.
//!
//! A chunk's checksum covers which of its blocks the layer holds (a bitmap) and the data of
//! those blocks, so two layers with the same checksums hold the same blocks with the same
//! data. Only chunks where the layer holds at least one block are listed.
//!
//! The list is cached next to the layer in `layer-N.crc`: magic `IHCK`, version u32, chunk
//! size u32, count u64, then `count` × (chunk index u64, crc u32), then a crc32 of everything
//! before it; all little-endian. A cache file that fails its check is ignored and recomputed.

use std::path::Path;

use rangemap::RangeSet;

use crate::error::Result;
use crate::layer_file::LayerFile;
use crate::meta::write_file_synced;
use crate::store::{BLOCK_SIZE, CHUNK_SIZE};

const MAGIC: &[u8; 4] = b"IHCK";
const VERSION: u32 = 1;
const BLOCKS_PER_CHUNK: u64 = CHUNK_SIZE / BLOCK_SIZE;

/// (chunk index, crc32) for every chunk in which the layer holds data.
pub type ChunkSums = Vec<(u64, u32)>;

/// Reads the layer's blocks and computes its chunk checksums.
pub fn compute(file: &LayerFile, blocks: &RangeSet<u64>) -> Result<ChunkSums> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    // Block runs of one chunk, grouped as the layer's extents are walked in order.
    let mut chunk_runs: Vec<(u64, u64)> = Vec::new();
    let mut current: Option<u64> = None;
    let mut finish = |chunk: u64, runs: &[(u64, u64)]| -> Result<()> {
        let base = chunk * BLOCKS_PER_CHUNK;
        let mut bitmap = [0u8; (BLOCKS_PER_CHUNK / 8) as usize];
        for &(s, e) in runs {
            for blk in s..e {
                let i = (blk - base) as usize;
                bitmap[i / 8] |= 1 << (i % 8);
            }
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&bitmap);
        for &(s, e) in runs {
            let len = ((e - s) * BLOCK_SIZE) as usize;
            file.read_at(&mut buf[..len], s * BLOCK_SIZE)?;
            h.update(&buf[..len]);
        }
        out.push((chunk, h.finalize()));
        Ok(())
    };
    for r in blocks.iter() {
        let mut b = r.start;
        while b < r.end {
            let chunk = b / BLOCKS_PER_CHUNK;
            let e = r.end.min((chunk + 1) * BLOCKS_PER_CHUNK);
            if current != Some(chunk) {
                if let Some(c) = current {
                    finish(c, &chunk_runs)?;
                    chunk_runs.clear();
                }
                current = Some(chunk);
            }
            chunk_runs.push((b, e));
            b = e;
        }
    }
    if let Some(c) = current {
        finish(c, &chunk_runs)?;
    }
    Ok(out)
}

/// Loads a cache file; `None` when missing, unreadable or failing its checks.
pub fn load(path: &Path) -> Option<ChunkSums> {
    let data = std::fs::read(path).ok()?;
    if data.len() < 24 || &data[..4] != MAGIC {
        return None;
    }
    let (body, tail) = data.split_at(data.len() - 4);
    let want = u32::from_le_bytes(tail.try_into().ok()?);
    if crc32fast::hash(body) != want {
        return None;
    }
    let version = u32::from_le_bytes(body[4..8].try_into().ok()?);
    let chunk = u32::from_le_bytes(body[8..12].try_into().ok()?);
    let count = u64::from_le_bytes(body[12..20].try_into().ok()?);
    if version != VERSION || u64::from(chunk) != CHUNK_SIZE {
        return None;
    }
    let entries = &body[20..];
    if entries.len() as u64 != count.checked_mul(12)? {
        return None;
    }
    Some(
        entries
            .chunks_exact(12)
            .filter_map(|e| {
                Some((
                    u64::from_le_bytes(e[..8].try_into().ok()?),
                    u32::from_le_bytes(e[8..].try_into().ok()?),
                ))
            })
            .collect(),
    )
}

/// Writes a cache file durably.
pub fn save(path: &Path, sums: &ChunkSums) -> Result<()> {
    let mut data = Vec::with_capacity(24 + sums.len() * 12);
    data.extend_from_slice(MAGIC);
    data.extend_from_slice(&VERSION.to_le_bytes());
    data.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
    data.extend_from_slice(&(sums.len() as u64).to_le_bytes());
    for (i, c) in sums {
        data.extend_from_slice(&i.to_le_bytes());
        data.extend_from_slice(&c.to_le_bytes());
    }
    let crc = crc32fast::hash(&data);
    data.extend_from_slice(&crc.to_le_bytes());
    let tmp = path.with_extension("crc.tmp");
    write_file_synced(&tmp, &data)?;
    std::fs::rename(&tmp, path).map_err(|e| crate::error::StoreError::io("rename", path, e))
}
