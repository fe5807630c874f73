//! Stored block objects: content hash, compression and the crc32 of the stored bytes.
//!
//! A block object is a 16-byte header followed by the (possibly compressed) payload:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic `IHB1` |
//! | 4 | compression: 0 none, 1 zstd, 2 lz4 |
//! | 5..8 | zero |
//! | 8..12 | length of the uncompressed content, u32 little-endian |
//! | 12..16 | crc32 of the payload (the stored bytes after the header), u32 little-endian |
//!
//! The object's name is the BLAKE3 hash of the uncompressed content, so the same content is
//! stored once whatever volume or backup it came from.

use std::fmt;
use std::str::FromStr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Magic bytes that open every block object.
pub const BLOCK_MAGIC: &[u8; 4] = b"IHB1";
/// Length of a block object's header.
pub const HEADER_LEN: usize = 16;
/// Smallest block size a backup volume may use.
pub const MIN_BLOCK_SIZE: u64 = 1 << 12;
/// Largest block size a backup volume may use.
pub const MAX_BLOCK_SIZE: u64 = 1 << 26;
/// Default block size: 2 MiB.
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// zstd level used for new blocks (fast; backups are usually limited by the network).
pub const ZSTD_LEVEL: i32 = 1;

/// How block payloads are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Stored as is.
    None,
    /// zstd, level [`ZSTD_LEVEL`] (the default).
    #[default]
    Zstd,
    /// lz4 block format.
    Lz4,
}

impl Compression {
    fn code(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
            Compression::Lz4 => 2,
        }
    }

    fn from_code(code: u8) -> Option<Compression> {
        match code {
            0 => Some(Compression::None),
            1 => Some(Compression::Zstd),
            2 => Some(Compression::Lz4),
            _ => None,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        })
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            other => Err(format!("unknown compression {other:?} (none, zstd, lz4)")),
        }
    }
}

/// Checks that `size` is a power of two between [`MIN_BLOCK_SIZE`] and [`MAX_BLOCK_SIZE`].
pub fn check_block_size(size: u64) -> Result<(), String> {
    if !size.is_power_of_two() {
        return Err("must be a power of two".into());
    }
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) {
        return Err(format!(
            "must be between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE} bytes"
        ));
    }
    Ok(())
}

/// A 32-byte BLAKE3 content hash, shown as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Hash of `data`.
    pub fn of(data: &[u8]) -> BlockHash {
        BlockHash(*blake3::hash(data).as_bytes())
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 15)]));
        }
        s
    }

    /// Parses exactly 64 lowercase hex digits.
    pub fn from_hex(s: &str) -> Option<BlockHash> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (nibble(b[2 * i])? << 4) | nibble(b[2 * i + 1])?;
        }
        Some(BlockHash(out))
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for BlockHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for BlockHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        BlockHash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("not a 64-digit hex hash"))
    }
}

/// Encodes `data` as a block object with `compression`. When compression does not make
/// the payload smaller the block is stored uncompressed.
pub fn encode_block(data: &[u8], compression: Compression) -> Bytes {
    let compressed = match compression {
        Compression::None => None,
        Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL).ok(),
        Compression::Lz4 => Some(lz4_flex::block::compress(data)),
    };
    let (codec, payload): (Compression, &[u8]) = match &compressed {
        Some(c) if c.len() < data.len() => (compression, c),
        _ => (Compression::None, data),
    };
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_slice(BLOCK_MAGIC);
    out.put_u8(codec.code());
    out.put_slice(&[0, 0, 0]);
    out.put_u32_le(data.len() as u32);
    out.put_u32_le(crc32fast::hash(payload));
    out.put_slice(payload);
    out.freeze()
}

/// Why a stored block was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockProblem {
    /// Shorter than a header, bad magic, or an unknown compression.
    #[error("not a block object: {0}")]
    Malformed(&'static str),
    /// The crc32 of the stored bytes does not match the header.
    #[error("crc32 mismatch: header says {expected:08x}, stored bytes have {actual:08x}")]
    Crc {
        /// crc in the header.
        expected: u32,
        /// crc of the payload as read.
        actual: u32,
    },
    /// The payload does not decompress to the recorded length.
    #[error("does not decompress: {0}")]
    Decompress(String),
    /// The content's length is not what the manifest expects.
    #[error("content is {actual} bytes, expected {expected}")]
    Length {
        /// What the manifest expects.
        expected: usize,
        /// What the block holds.
        actual: usize,
    },
    /// The content's hash is not the block's name.
    #[error("content hash {actual} does not match the block's name")]
    Hash {
        /// Hash of the content as read.
        actual: BlockHash,
    },
}

/// Decodes a block object and checks it completely: header, crc32 of the stored bytes,
/// decompressed length (`expected_len`) and content hash (`name`). Returns the content.
pub fn decode_block(
    obj: &[u8],
    name: &BlockHash,
    expected_len: usize,
) -> Result<Vec<u8>, BlockProblem> {
    if obj.len() < HEADER_LEN {
        return Err(BlockProblem::Malformed("shorter than its header"));
    }
    if &obj[0..4] != BLOCK_MAGIC {
        return Err(BlockProblem::Malformed("bad magic"));
    }
    let codec =
        Compression::from_code(obj[4]).ok_or(BlockProblem::Malformed("unknown compression"))?;
    let raw_len = u32::from_le_bytes([obj[8], obj[9], obj[10], obj[11]]) as usize;
    let crc = u32::from_le_bytes([obj[12], obj[13], obj[14], obj[15]]);
    let payload = &obj[HEADER_LEN..];
    let actual = crc32fast::hash(payload);
    if actual != crc {
        return Err(BlockProblem::Crc {
            expected: crc,
            actual,
        });
    }
    if raw_len != expected_len {
        return Err(BlockProblem::Length {
            expected: expected_len,
            actual: raw_len,
        });
    }
    let data = match codec {
        Compression::None => payload.to_vec(),
        Compression::Zstd => zstd::bulk::decompress(payload, raw_len)
            .map_err(|e| BlockProblem::Decompress(e.to_string()))?,
        Compression::Lz4 => lz4_flex::block::decompress(payload, raw_len)
            .map_err(|e| BlockProblem::Decompress(e.to_string()))?,
    };
    if data.len() != expected_len {
        return Err(BlockProblem::Length {
            expected: expected_len,
            actual: data.len(),
        });
    }
    let actual = BlockHash::of(&data);
    if actual != *name {
        return Err(BlockProblem::Hash { actual });
    }
    Ok(data)
}

/// Whether every byte of `data` is zero.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words
        .by_ref()
        .all(|w| <[u8; 16]>::try_from(w).is_ok_and(|a| u128::from_ne_bytes(a) == 0))
        && words.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..65536u32)
            .map(|i| (i % 251) as u8 ^ (i >> 9) as u8)
            .collect()
    }

    #[test]
    fn round_trip_every_compression() {
        let data = sample();
        let name = BlockHash::of(&data);
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let obj = encode_block(&data, c);
            assert_eq!(decode_block(&obj, &name, data.len()).unwrap(), data, "{c}");
            if c != Compression::None {
                assert!(obj.len() < data.len(), "{c} compresses");
            }
        }
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let data: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let obj = encode_block(&data, Compression::Zstd);
        assert!(obj[4] == 0 || obj.len() < data.len() + HEADER_LEN);
        assert_eq!(
            decode_block(&obj, &BlockHash::of(&data), data.len()).unwrap(),
            data
        );
    }

    #[test]
    fn any_flipped_byte_is_caught() {
        let data = sample();
        let name = BlockHash::of(&data);
        let obj = encode_block(&data, Compression::Zstd).to_vec();
        for i in (0..obj.len())
            .step_by(97)
            .chain([0, 4, 8, 12, obj.len() - 1])
        {
            let mut bad = obj.clone();
            bad[i] ^= 0x10;
            assert!(decode_block(&bad, &name, data.len()).is_err(), "byte {i}");
        }
        // A well-formed block under the wrong name.
        let other = BlockHash::of(b"other");
        assert!(matches!(
            decode_block(&obj, &other, data.len()),
            Err(BlockProblem::Hash { .. })
        ));
        assert!(matches!(
            decode_block(&obj, &name, 4096),
            Err(BlockProblem::Length { .. })
        ));
        assert!(decode_block(&obj[..10], &name, data.len()).is_err());
    }

    #[test]
    fn hash_hex_round_trip() {
        let h = BlockHash::of(b"abc");
        assert_eq!(BlockHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(BlockHash::from_hex("zz"), None);
        assert_eq!(BlockHash::from_hex(&"A".repeat(64)), None);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[7] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }

    #[test]
    fn block_sizes() {
        assert!(check_block_size(DEFAULT_BLOCK_SIZE).is_ok());
        assert!(check_block_size(4096).is_ok());
        assert!(check_block_size(3 << 20).is_err());
        assert!(check_block_size(2048).is_err());
        assert!(check_block_size(1 << 27).is_err());
    }
}
