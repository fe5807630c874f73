//! ironhorn engine: owns one volume while it is attached (DESIGN.md §1, §3).
//!
//! - [`device`]: the block-device trait every frontend serves.
//! - [`nbd`]: the NBD frontend (newstyle fixed handshake, structured replies, block status).
//! - [`replica_client`]: the pipelined data-protocol client of one replica.
//! - [`volume`]: the replicator: fan-out, read balancing, dropping and fencing replicas,
//!   snapshots, rebuild.
//! - [`control`]: the `EngineControl` gRPC service.
//! - [`error`]: errors of control operations.
//! - [`inflight`]: ordering of overlapping in-flight writes.
//! - [`stats`]: cumulative I/O counters reported by `Info`.

pub mod control;
pub mod device;
pub mod error;
pub mod inflight;
pub mod nbd;
pub mod replica_client;
pub mod stats;
pub mod ublk;
pub mod volume;
