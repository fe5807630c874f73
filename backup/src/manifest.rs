//! Backup manifests: what one backup holds (volume, snapshot, size, block size,
//! compression, labels and the block list), and their checked encoding.
//!
//! A manifest object is one header line, `IHMANIFEST1 <crc32 as 8 hex digits> <length>\n`,
//! then `length` bytes of JSON whose crc32 the header gives. [`Manifest::decode`] parses
//! untrusted bytes (whatever is in the bucket): it checks the header, the crc, the JSON
//! and every field ([`Manifest::validate`]) and never panics (fuzz target
//! `backup/fuzz/fuzz_targets/decode_manifest.rs`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{BlockHash, Compression, check_block_size};

/// Current manifest format.
pub const MANIFEST_FORMAT: u32 = 1;
/// First bytes of every manifest object.
pub const MANIFEST_MAGIC: &str = "IHMANIFEST1";
/// Largest manifest accepted (a 64 TiB volume at 2 MiB blocks, fully allocated, is ~2.6 GB;
/// this bounds what a corrupt header can make us allocate).
pub const MAX_MANIFEST_LEN: usize = 4 << 30;
/// Longest volume name, snapshot name, backup id or label key.
pub const MAX_NAME_LEN: usize = 128;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 1024;
/// Largest volume size a manifest may describe (1 PiB, as the replica store).
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;

/// One stored block of a backup: its index in the volume (offset = index × block size) and
/// the hash naming its content. Serialised as `[index, "hex"]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRef(pub u64, pub BlockHash);

/// Counters of the run that wrote a backup (informational).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestStats {
    /// Volume bytes read from the snapshot.
    pub bytes_read: u64,
    /// Blocks uploaded by this backup (the target lacked them).
    pub blocks_uploaded: u64,
    /// Bytes uploaded (stored, compressed) by this backup.
    pub bytes_uploaded: u64,
    /// Blocks read and found already stored.
    pub blocks_skipped: u64,
}

/// What one backup holds. Written last, so it exists only for a complete backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version, [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Backup id, unique in the target.
    pub id: String,
    /// Backup volume name (groups backups of one volume; incremental within it).
    pub volume: String,
    /// Snapshot the backup was taken from.
    pub snapshot: String,
    /// Creation time of that snapshot on the replica (ms since the Unix epoch): with the
    /// name, it tells a later backup whether the snapshot is still the same one.
    pub snapshot_created_unix_ms: i64,
    /// Volume size in bytes.
    pub size: u64,
    /// Block size in bytes (a power of two).
    pub block_size: u64,
    /// Compression new blocks of this backup were written with.
    pub compression: Compression,
    /// When the backup completed (ms since the Unix epoch).
    pub created_unix_ms: i64,
    /// User labels.
    pub labels: BTreeMap<String, String>,
    /// The backup this one was taken incrementally on, if any.
    pub base: Option<String>,
    /// Counters of the run that wrote it.
    #[serde(default)]
    pub stats: ManifestStats,
    /// Stored blocks, by increasing index. Blocks not listed read as zeros.
    pub blocks: Vec<BlockRef>,
}

/// Checks a volume name, snapshot name or backup id: 1..=128 of `[A-Za-z0-9._-]`, not
/// starting with `.`.
pub fn check_name(what: &'static str, name: &str) -> Result<(), String> {
    let _ = what;
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} characters"));
    }
    if name.starts_with('.') {
        return Err("must not start with '.'".into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed".into());
    }
    Ok(())
}

/// Checks a label: key 1..=128 of `[A-Za-z0-9._/-]`, value up to 1024 characters without
/// control characters.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_NAME_LEN {
        return Err(format!("key must be 1 to {MAX_NAME_LEN} characters"));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
    {
        return Err("key: only letters, digits, '-', '_', '.' and '/' are allowed".into());
    }
    if value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
        return Err(format!(
            "value must be at most {MAX_LABEL_VALUE_LEN} characters without control characters"
        ));
    }
    Ok(())
}

impl Manifest {
    /// Number of blocks the volume is cut into.
    pub fn block_count(&self) -> u64 {
        self.size.div_ceil(self.block_size)
    }

    /// Length of block `index` (the last one may be short).
    pub fn block_len(&self, index: u64) -> u64 {
        let start = index * self.block_size;
        self.block_size.min(self.size.saturating_sub(start))
    }

    /// Bytes of the volume that are stored (not holes or zeros).
    pub fn stored_volume_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| self.block_len(b.0)).sum()
    }

    /// Checks every field: names, sizes, block size, and a strictly increasing block list
    /// inside the volume.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!("unknown format {}", self.format));
        }
        check_name("backup id", &self.id).map_err(|e| format!("id: {e}"))?;
        check_name("volume", &self.volume).map_err(|e| format!("volume: {e}"))?;
        check_name("snapshot", &self.snapshot).map_err(|e| format!("snapshot: {e}"))?;
        check_block_size(self.block_size).map_err(|e| format!("block size: {e}"))?;
        if self.size == 0 || self.size > MAX_VOLUME_SIZE || !self.size.is_multiple_of(512) {
            return Err(format!(
                "size {} must be a multiple of 512 between 512 and 1 PiB",
                self.size
            ));
        }
        for (k, v) in &self.labels {
            check_label(k, v).map_err(|e| format!("label {k:?}: {e}"))?;
        }
        if let Some(b) = &self.base {
            check_name("base", b).map_err(|e| format!("base: {e}"))?;
        }
        let count = self.block_count();
        let mut prev: Option<u64> = None;
        for b in &self.blocks {
            if b.0 >= count {
                return Err(format!(
                    "block index {} beyond the volume ({count} blocks)",
                    b.0
                ));
            }
            if prev.is_some_and(|p| p >= b.0) {
                return Err(format!("block index {} out of order", b.0));
            }
            prev = Some(b.0);
        }
        Ok(())
    }

    /// Encodes the manifest object (header line with crc32, then JSON).
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut out = format!(
            "{MANIFEST_MAGIC} {:08x} {}\n",
            crc32fast::hash(&json),
            json.len()
        )
        .into_bytes();
        out.extend_from_slice(&json);
        out
    }

    /// Parses and checks a manifest object from untrusted bytes.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let nl = bytes
            .iter()
            .take(64)
            .position(|b| *b == b'\n')
            .ok_or("no header line")?;
        let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not UTF-8")?;
        let mut parts = header.split(' ');
        if parts.next() != Some(MANIFEST_MAGIC) {
            return Err("not a manifest (bad magic)".into());
        }
        let crc = parts
            .next()
            .filter(|s| s.len() == 8)
            .and_then(|s| u32::from_str_radix(s, 16).ok())
            .ok_or("bad crc in header")?;
        let len: usize = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or("bad length in header")?;
        if parts.next().is_some() {
            return Err("extra fields in header".into());
        }
        if len > MAX_MANIFEST_LEN {
            return Err(format!("length {len} too large"));
        }
        let body = &bytes[nl + 1..];
        if body.len() != len {
            return Err(format!(
                "truncated or padded: header says {len} bytes, {} follow",
                body.len()
            ));
        }
        let actual = crc32fast::hash(body);
        if actual != crc {
            return Err(format!(
                "crc32 mismatch: header {crc:08x}, content {actual:08x}"
            ));
        }
        let m: Manifest = serde_json::from_slice(body).map_err(|e| format!("bad JSON: {e}"))?;
        m.validate()?;
        Ok(m)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT,
            id: "bk-20260101T000000-0123abcd".into(),
            volume: "vol1".into(),
            snapshot: "snap1".into(),
            snapshot_created_unix_ms: 1,
            size: 10 << 20,
            block_size: 2 << 20,
            compression: Compression::Zstd,
            created_unix_ms: 2,
            labels: [("app".to_string(), "db".to_string())].into(),
            base: None,
            stats: ManifestStats::default(),
            blocks: vec![
                BlockRef(0, BlockHash::of(b"a")),
                BlockRef(3, BlockHash::of(b"b")),
                BlockRef(4, BlockHash::of(b"a")),
            ],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(m.stored_volume_bytes(), 6 << 20);
    }

    #[test]
    fn corruption_is_caught() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(Manifest::decode(&bad).is_err(), "flip at {i}");
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Manifest::decode(b"").is_err());
        assert!(Manifest::decode(b"IHMANIFEST1 00000000 99999999999999999999\n").is_err());
    }

    #[test]
    fn invalid_fields_are_refused() {
        let enc = |m: &Manifest| Manifest::decode(&m.encode());
        let mut m = sample();
        m.blocks.swap(0, 1);
        assert!(enc(&m).unwrap_err().contains("out of order"));
        let mut m = sample();
        m.blocks.push(BlockRef(5, BlockHash::of(b"c")));
        assert!(enc(&m).unwrap_err().contains("beyond"));
        let mut m = sample();
        m.block_size = 3000;
        assert!(enc(&m).is_err());
        let mut m = sample();
        m.volume = "../x".into();
        assert!(enc(&m).is_err());
        let mut m = sample();
        m.labels.insert("k".into(), "a\nb".into());
        assert!(enc(&m).is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("v", "pvc-1.a_b").is_ok());
        assert!(check_name("v", "").is_err());
        assert!(check_name("v", ".hidden").is_err());
        assert!(check_name("v", "a/b").is_err());
        assert!(check_name("v", &"a".repeat(129)).is_err());
        assert!(check_label("app.kubernetes.io/name", "x y").is_ok());
        assert!(check_label("", "x").is_err());
    }
}
