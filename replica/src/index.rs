//! The in-memory extent index: which blocks each layer holds, and for the head's chain which
//! layer a read of each block goes to.
//!
//! Everything is kept as interval maps over block numbers (`rangemap`), so memory follows the
//! number of extents, not the size of the volume.

use std::collections::HashMap;
use std::ops::Range;

use rangemap::{RangeMap, RangeSet};

use crate::meta::LayerId;

/// Block ranges held by each layer, and the merged view of the head's chain.
#[derive(Debug, Default, Clone)]
pub struct Index {
    /// Blocks present in each layer file.
    pub layers: HashMap<LayerId, RangeSet<u64>>,
    /// For the head's chain: block range -> newest layer on the chain that holds it.
    pub merged: RangeMap<u64, LayerId>,
    /// Union of the blocks held by the chain's layers below the head.
    pub lower: RangeSet<u64>,
    /// The chain, root first, head last.
    pub chain: Vec<LayerId>,
}

/// A piece of a read: a block range and the layer that holds it (`None`: zeros).
pub type Segment = (Range<u64>, Option<LayerId>);

/// Figures about the index's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexStats {
    /// Extents in all per-layer sets.
    pub layer_extents: usize,
    /// Extents in the merged map of the head's chain.
    pub merged_extents: usize,
    /// Extents in the set of blocks below the head.
    pub lower_extents: usize,
    /// Estimated heap bytes, counting B-tree node overhead.
    pub estimated_bytes: usize,
}

impl Index {
    /// Recomputes `merged` and `lower` for `chain` (root first, head last) from the per-layer
    /// sets.
    pub fn rebuild_chain(&mut self, chain: Vec<LayerId>) {
        let mut merged = RangeMap::new();
        let mut lower = RangeSet::new();
        let empty = RangeSet::new();
        for (i, id) in chain.iter().enumerate() {
            let set = self.layers.get(id).unwrap_or(&empty);
            for r in set.iter() {
                merged.insert(r.clone(), *id);
                if i + 1 < chain.len() {
                    lower.insert(r.clone());
                }
            }
        }
        self.merged = merged;
        self.lower = lower;
        self.chain = chain;
    }

    /// Whether `layer` holds every block of `blocks`.
    pub fn layer_has_all(&self, layer: LayerId, blocks: Range<u64>) -> bool {
        match self.layers.get(&layer) {
            Some(set) => set.gaps(&blocks).next().is_none(),
            None => blocks.is_empty(),
        }
    }

    /// Records that the head now holds `blocks`.
    pub fn head_written(&mut self, head: LayerId, blocks: Range<u64>) {
        if blocks.is_empty() {
            return;
        }
        self.layers.entry(head).or_default().insert(blocks.clone());
        self.merged.insert(blocks, head);
    }

    /// Records that the head no longer holds `blocks` and that nothing below does either.
    pub fn head_punched(&mut self, head: LayerId, blocks: Range<u64>) {
        if blocks.is_empty() {
            return;
        }
        if let Some(set) = self.layers.get_mut(&head) {
            set.remove(blocks.clone());
        }
        self.merged.remove(blocks);
    }

    /// Splits `blocks` into runs that are / are not held by a layer below the head.
    pub fn split_by_lower(&self, blocks: Range<u64>) -> Vec<(Range<u64>, bool)> {
        let mut out = Vec::new();
        let mut pos = blocks.start;
        for r in self.lower.overlapping(&blocks) {
            let s = r.start.max(blocks.start);
            let e = r.end.min(blocks.end);
            if s > pos {
                out.push((pos..s, false));
            }
            out.push((s..e, true));
            pos = e;
        }
        if pos < blocks.end {
            out.push((pos..blocks.end, false));
        }
        out
    }

    /// The segments a read of `blocks` through the head's chain is made of, in order.
    pub fn lookup(&self, blocks: Range<u64>, out: &mut Vec<Segment>) {
        out.clear();
        let mut pos = blocks.start;
        for (r, id) in self.merged.overlapping(&blocks) {
            let s = r.start.max(blocks.start);
            let e = r.end.min(blocks.end);
            if s > pos {
                out.push((pos..s, None));
            }
            out.push((s..e, Some(*id)));
            pos = e;
        }
        if pos < blocks.end {
            out.push((pos..blocks.end, None));
        }
    }

    /// Size figures; the byte estimate counts each B-tree entry at its key + value size
    /// times 1.5 for node slack and pointers.
    pub fn stats(&self) -> IndexStats {
        let layer_extents: usize = self.layers.values().map(|s| s.len()).sum();
        let merged_extents = self.merged.len();
        let lower_extents = self.lower.len();
        let range = std::mem::size_of::<Range<u64>>();
        let entry_set = range + std::mem::size_of::<()>();
        let entry_map = range + std::mem::size_of::<LayerId>();
        let estimated_bytes = (layer_extents + lower_extents) * entry_set * 3 / 2
            + merged_extents * entry_map * 3 / 2
            + self.layers.len() * (std::mem::size_of::<(LayerId, RangeSet<u64>)>() * 2)
            + self.chain.len() * std::mem::size_of::<LayerId>();
        IndexStats {
            layer_extents,
            merged_extents,
            lower_extents,
            estimated_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_falls_through_to_older_layers_and_zeros() {
        let mut idx = Index::default();
        idx.layers.entry(1).or_default().insert(0..10);
        idx.layers.entry(2).or_default().insert(5..7);
        idx.rebuild_chain(vec![1, 2, 3]);
        let mut segs = Vec::new();
        idx.lookup(3..12, &mut segs);
        assert_eq!(
            segs,
            vec![
                (3..5, Some(1)),
                (5..7, Some(2)),
                (7..10, Some(1)),
                (10..12, None)
            ]
        );
        assert_eq!(
            idx.split_by_lower(8..12),
            vec![(8..10, true), (10..12, false)]
        );
        idx.head_written(3, 9..11);
        idx.lookup(8..12, &mut segs);
        assert_eq!(
            segs,
            vec![(8..9, Some(1)), (9..11, Some(3)), (11..12, None)]
        );
        assert!(idx.layer_has_all(3, 9..11));
        assert!(!idx.layer_has_all(3, 8..11));
        idx.head_punched(3, 10..11);
        idx.lookup(10..11, &mut segs);
        assert_eq!(segs, vec![(10..11, None)]);
    }

    #[test]
    fn stats_stay_small_for_scattered_writes() {
        let mut idx = Index::default();
        // 10 snapshots of a 1 TiB volume (2^28 blocks), 500 scattered 4 KiB writes each.
        let mut x: u64 = 12345;
        for layer in 1..=11u64 {
            let set = idx.layers.entry(layer).or_default();
            for _ in 0..500 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (x >> 20) % (1 << 28);
                set.insert(b..b + 1);
            }
        }
        idx.rebuild_chain((1..=11).collect());
        let st = idx.stats();
        assert!(st.estimated_bytes < 1 << 20, "{st:?}");
    }
}
