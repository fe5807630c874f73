//! The block device a frontend (NBD, later ublk) serves: the volume as the engine sees it.

use std::future::Future;

use bytes::Bytes;

/// Error of a block-device request, as an errno (`EIO`, `EINVAL`, `ENOSPC`, ...), which the
/// frontend passes to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("block device error: errno {0}")]
pub struct DeviceError(pub i32);

impl DeviceError {
    /// I/O error.
    pub const EIO: DeviceError = DeviceError(libc::EIO);
    /// Invalid argument (range, alignment).
    pub const EINVAL: DeviceError = DeviceError(libc::EINVAL);
    /// No space left.
    pub const ENOSPC: DeviceError = DeviceError(libc::ENOSPC);
    /// Operation not supported.
    pub const EOPNOTSUPP: DeviceError = DeviceError(libc::EOPNOTSUPP);
}

/// Result of a block-device request.
pub type DeviceResult<T> = Result<T, DeviceError>;

/// One extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// Whether the range is a hole (reads as zeros, no data allocated).
    pub hole: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
}

/// A volume that a frontend exposes. Offsets and lengths are in bytes; the frontend has
/// already checked them against [`BlockDevice::size`] and 512-byte alignment.
pub trait BlockDevice: Send + Sync + 'static {
    /// Current size in bytes (may grow while served).
    fn size(&self) -> u64;
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> impl Future<Output = DeviceResult<Bytes>> + Send;
    /// Writes `data` at `offset`; with `fua` it is durable when this returns.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = DeviceResult<()>> + Send;
    /// Makes `[offset, offset+len)` read as zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = DeviceResult<()>> + Send;
    /// Discards `[offset, offset+len)` (reads as zeros afterwards).
    fn trim(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> impl Future<Output = DeviceResult<()>> + Send;
    /// Makes every acknowledged write durable.
    fn flush(&self) -> impl Future<Output = DeviceResult<()>> + Send;
    /// Allocation status of `[offset, offset+len)`; may describe less than `len`, never more.
    /// The default reports everything as data.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = DeviceResult<Vec<Extent>>> + Send {
        let _ = offset;
        async move {
            Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }])
        }
    }
}
