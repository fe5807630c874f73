//! ironhorn replica: one replica of one volume, in a directory on one disk.
//!
//! - [`store`]: the layered sparse-file block store (snapshots, purge, revert, expand).
//! - [`index`]: the in-memory extent index the store reads through.
//! - [`meta`]: the atomically replaced metadata file.
//! - [`checksum`]: per-chunk crc32 of frozen layers, for rebuild and scrub.
//! - [`layer_file`]: one layer's sparse file.
//! - [`backup`]: a snapshot as a backup source; a new replica as a restore destination.

pub mod backup;
pub mod checksum;
pub mod error;
#[doc(hidden)]
pub mod failpoint;
pub mod index;
pub mod layer_file;
pub mod meta;
pub mod server;
pub mod store;
pub mod writeback;

pub use error::{Result, StoreError};
pub use store::{BLOCK_SIZE, CHUNK_SIZE, LayerInfo, SECTOR_SIZE, Store};
