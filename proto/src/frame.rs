//! The engine↔replica data protocol: fixed little-endian binary frames.
//!
//! A request is a 32-byte [`RequestHeader`] followed, for [`Op::Write`] only, by `length`
//! payload bytes; a response is a 24-byte [`ResponseHeader`] followed, for a successful
//! read only, by `length` payload bytes. Every payload carries a crc32 (`crc32fast`),
//! computed once when a message is built and checked on receipt. The full table is in
//! `proto/README.md`.
//!
//! [`RequestCodec`] and [`ResponseCodec`] implement `tokio_util`'s [`Decoder`] and
//! [`Encoder`] in both directions (the replica decodes requests and encodes responses,
//! the engine the reverse). Decoding is incremental and zero-copy: a header is validated
//! as soon as its bytes are buffered (an oversized length is refused before any payload is
//! read), the buffer is then grown once to fit the payload, and the payload is split off
//! the read buffer as a [`Bytes`] without copying.
//!
//! # Error policy
//!
//! A frame whose header is valid but whose payload fails its crc is *not* a decoder error:
//! the decoder consumes the whole frame and yields `Ok(Some(Err(CrcMismatch)))`, so the
//! receiver can answer (or fail) that id and keep reading. This is deliberate:
//! `tokio_util::codec::FramedRead` ends its stream after any decoder error and stops
//! decoding frames that are already buffered, which would stall a pipelined connection.
//! Every [`FrameError`] returned by a decoder means the byte stream can no longer be
//! trusted: log the reason and close that connection.
//!
//! For writes that should not copy the payload, encode only the header
//! ([`Request::encode_header`], [`Response::encode_header`]) and write it together with
//! the payload [`Bytes`] in one vectored write.

use std::fmt;
use std::io;
use std::ops::BitOr;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Magic number that starts every request header (`"QHRI"` as little-endian bytes).
pub const REQUEST_MAGIC: u32 = 0x4952_4851;
/// Magic number that starts every response header (`"PSRI"` as little-endian bytes).
pub const RESPONSE_MAGIC: u32 = 0x4952_5350;
/// Size of an encoded [`RequestHeader`] in bytes.
pub const REQUEST_HEADER_LEN: usize = 32;
/// Size of an encoded [`ResponseHeader`] in bytes.
pub const RESPONSE_HEADER_LEN: usize = 24;
/// Largest payload a frame may carry (32 MiB); also the largest length a read may ask for.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Linux errno values that [`ErrorCode::errno`] maps to (kept here to avoid a libc
/// dependency).
pub mod errno {
    /// I/O error.
    pub const EIO: i32 = 5;
    /// Invalid argument.
    pub const EINVAL: i32 = 22;
    /// No space left on device.
    pub const ENOSPC: i32 = 28;
    /// Read-only file system.
    pub const EROFS: i32 = 30;
    /// Bad message.
    pub const EBADMSG: i32 = 74;
    /// Operation not supported.
    pub const EOPNOTSUPP: i32 = 95;
    /// Stale handle.
    pub const ESTALE: i32 = 116;
}

/// Request operation (the header's `op` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Read `length` bytes at `offset`; no request payload, the answer carries the data.
    Read = 1,
    /// Write the payload (`length` bytes) at `offset`.
    Write = 2,
    /// Write `length` zero bytes at `offset`; no payload.
    WriteZeroes = 3,
    /// Discard (trim) `length` bytes at `offset`; no payload.
    Discard = 4,
    /// Make every acknowledged write durable; `offset` and `length` are 0.
    Flush = 5,
    /// Liveness check; `offset` and `length` are 0.
    Ping = 6,
}

impl Op {
    /// Whether a request with this op carries a payload.
    pub const fn has_payload(self) -> bool {
        matches!(self, Op::Write)
    }

    /// Whether [`Flags::FUA`] is allowed on this op.
    pub const fn allows_fua(self) -> bool {
        matches!(self, Op::Write | Op::WriteZeroes | Op::Discard)
    }

    /// Whether this op addresses a byte range (`offset`, `length`).
    pub const fn has_range(self) -> bool {
        !matches!(self, Op::Flush | Op::Ping)
    }
}

impl TryFrom<u8> for Op {
    type Error = FrameError;

    fn try_from(value: u8) -> Result<Self, FrameError> {
        Ok(match value {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::WriteZeroes,
            4 => Op::Discard,
            5 => Op::Flush,
            6 => Op::Ping,
            other => return Err(FrameError::UnknownOp(other)),
        })
    }
}

/// Request flags (the header's `flags` byte).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(u8);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Force unit access: the write is durable before it is acknowledged (bit 0).
    pub const FUA: Flags = Flags(1);
    const KNOWN: u8 = Self::FUA.0;

    /// The raw flag bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Flags from raw bits, or `None` if an unknown bit is set.
    pub const fn from_bits(bits: u8) -> Option<Flags> {
        if bits & !Self::KNOWN == 0 {
            Some(Flags(bits))
        } else {
            None
        }
    }

    /// Whether every flag of `other` is set in `self`.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether [`Flags::FUA`] is set.
    pub const fn fua(self) -> bool {
        self.contains(Self::FUA)
    }
}

impl BitOr for Flags {
    type Output = Flags;

    fn bitor(self, rhs: Flags) -> Flags {
        Flags(self.0 | rhs.0)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.fua() {
            f.write_str("Flags(FUA)")
        } else {
            f.write_str("Flags(NONE)")
        }
    }
}

/// Why a replica refused or failed a request (a non-zero response `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u32)]
pub enum ErrorCode {
    /// The disk I/O failed.
    #[error("I/O error")]
    Io = 1,
    /// The request was out of range or misaligned.
    #[error("invalid argument (out of range or misaligned)")]
    InvalidArgument = 2,
    /// The replica ran out of space.
    #[error("no space left on replica")]
    NoSpace = 3,
    /// The request payload failed its crc check.
    #[error("payload crc mismatch")]
    BadCrc = 4,
    /// The replica does not support the operation.
    #[error("operation not supported")]
    Unsupported = 5,
    /// The sender was fenced off by a newer epoch.
    #[error("fenced: stale engine or epoch")]
    Fenced = 6,
    /// The replica is read-only.
    #[error("replica is read-only")]
    ReadOnly = 7,
}

impl ErrorCode {
    /// The wire value of this code.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The code for a wire value, or `None` for 0 (success) and unknown values.
    pub const fn from_code(code: u32) -> Option<ErrorCode> {
        Some(match code {
            1 => ErrorCode::Io,
            2 => ErrorCode::InvalidArgument,
            3 => ErrorCode::NoSpace,
            4 => ErrorCode::BadCrc,
            5 => ErrorCode::Unsupported,
            6 => ErrorCode::Fenced,
            7 => ErrorCode::ReadOnly,
            _ => return None,
        })
    }

    /// The (positive) Linux errno a frontend reports for this code.
    pub const fn errno(self) -> i32 {
        match self {
            ErrorCode::Io => errno::EIO,
            ErrorCode::InvalidArgument => errno::EINVAL,
            ErrorCode::NoSpace => errno::ENOSPC,
            ErrorCode::BadCrc => errno::EBADMSG,
            ErrorCode::Unsupported => errno::EOPNOTSUPP,
            ErrorCode::Fenced => errno::ESTALE,
            ErrorCode::ReadOnly => errno::EROFS,
        }
    }

    /// The code a replica answers with when a disk operation failed with `err`.
    pub fn from_io_error(err: &io::Error) -> ErrorCode {
        match err.raw_os_error() {
            Some(errno::ENOSPC) => return ErrorCode::NoSpace,
            Some(errno::EROFS) => return ErrorCode::ReadOnly,
            Some(errno::EINVAL) => return ErrorCode::InvalidArgument,
            Some(errno::EOPNOTSUPP) => return ErrorCode::Unsupported,
            _ => {}
        }
        match err.kind() {
            io::ErrorKind::StorageFull => ErrorCode::NoSpace,
            io::ErrorKind::ReadOnlyFilesystem => ErrorCode::ReadOnly,
            io::ErrorKind::InvalidInput => ErrorCode::InvalidArgument,
            io::ErrorKind::Unsupported => ErrorCode::Unsupported,
            _ => ErrorCode::Io,
        }
    }
}

/// A frame whose header was valid but whose payload did not match its crc.
///
/// The decoder has consumed the whole frame; the connection stays usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "payload crc mismatch in frame {id}: header says {expected:#010x}, payload has {actual:#010x}"
)]
pub struct CrcMismatch {
    /// Id of the frame, to answer (or fail) it.
    pub id: u64,
    /// Crc in the header.
    pub expected: u32,
    /// Crc of the received payload.
    pub actual: u32,
}

/// A malformed frame or argument. From a decoder, every variant means the stream can no
/// longer be trusted and the connection must be closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header did not start with the expected magic number.
    #[error("bad magic {found:#010x} (expected {expected:#010x})")]
    BadMagic {
        /// Magic of this header kind.
        expected: u32,
        /// Value found.
        found: u32,
    },
    /// The op byte is not a known [`Op`].
    #[error("unknown op {0}")]
    UnknownOp(u8),
    /// Unknown flag bits, or FUA on an op that does not take it.
    #[error("flags {flags:#04x} not valid for {op:?}")]
    BadFlags {
        /// Op of the request.
        op: Op,
        /// Raw flag bits.
        flags: u8,
    },
    /// The reserved header field was not zero.
    #[error("reserved field is {0:#06x}, must be 0")]
    NonZeroReserved(u16),
    /// A payload (or a read's length) is larger than [`MAX_PAYLOAD`].
    #[error("length {len} exceeds the maximum payload of {max} bytes")]
    PayloadTooLarge {
        /// Length asked for.
        len: u64,
        /// The limit, [`MAX_PAYLOAD`].
        max: u32,
    },
    /// `offset + length` overflows, or Flush/Ping carries a non-zero offset or length.
    #[error("invalid range for {op:?}: offset {offset}, length {length}")]
    BadRange {
        /// Op of the request.
        op: Op,
        /// Offset in the header.
        offset: u64,
        /// Length in the header.
        length: u32,
    },
    /// An op without payload carried a non-zero payload crc.
    #[error("{op:?} carries no payload but has payload crc {crc:#010x}")]
    UnexpectedPayload {
        /// Op of the request.
        op: Op,
        /// Crc in the header.
        crc: u32,
    },
    /// A payload failed its crc (never returned by the decoders, which yield it as an item).
    #[error(transparent)]
    BadCrc(#[from] CrcMismatch),
    /// The response status is neither 0 nor a known [`ErrorCode`].
    #[error("unknown response status {0}")]
    UnknownStatus(u32),
    /// An error response announced a payload.
    #[error("error response {id} ({code}) announces a payload of {len} bytes")]
    ErrorWithPayload {
        /// Id of the response.
        id: u64,
        /// Error code of the response.
        code: ErrorCode,
        /// Length in the header.
        len: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the frame that had arrived (header included once parsed).
        buffered: usize,
    },
    /// Reading from or writing to the connection failed.
    #[error("connection I/O: {0}")]
    Io(#[from] io::Error),
}

/// A request header as it is on the wire (field order of the encoding).
///
/// [`RequestHeader::decode`] validates every field; [`RequestHeader::encode`] writes the
/// fields as they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Operation.
    pub op: Op,
    /// Flags.
    pub flags: Flags,
    /// Request id, echoed by the response.
    pub id: u64,
    /// Byte offset in the volume (0 for Flush and Ping).
    pub offset: u64,
    /// Read length, write payload length, or range length (0 for Flush and Ping).
    pub length: u32,
    /// crc32 of the payload (0 without payload).
    pub payload_crc: u32,
}

impl RequestHeader {
    /// Encode into the 32-byte wire form.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0u8; REQUEST_HEADER_LEN];
        let mut w = &mut out[..];
        w.put_u32_le(REQUEST_MAGIC);
        w.put_u8(self.op as u8);
        w.put_u8(self.flags.bits());
        w.put_u16_le(0);
        w.put_u64_le(self.id);
        w.put_u64_le(self.offset);
        w.put_u32_le(self.length);
        w.put_u32_le(self.payload_crc);
        out
    }

    /// Decode and validate a 32-byte wire header.
    pub fn decode(raw: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, FrameError> {
        let mut r = &raw[..];
        let magic = r.get_u32_le();
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadMagic {
                expected: REQUEST_MAGIC,
                found: magic,
            });
        }
        let op = Op::try_from(r.get_u8())?;
        let flag_bits = r.get_u8();
        let reserved = r.get_u16_le();
        if reserved != 0 {
            return Err(FrameError::NonZeroReserved(reserved));
        }
        let flags = Flags::from_bits(flag_bits).ok_or(FrameError::BadFlags {
            op,
            flags: flag_bits,
        })?;
        let header = RequestHeader {
            op,
            flags,
            id: r.get_u64_le(),
            offset: r.get_u64_le(),
            length: r.get_u32_le(),
            payload_crc: r.get_u32_le(),
        };
        header.validate()?;
        Ok(header)
    }

    /// Number of payload bytes that follow this header.
    pub const fn payload_len(&self) -> usize {
        if self.op.has_payload() {
            self.length as usize
        } else {
            0
        }
    }

    /// Op-dependent checks on the typed fields.
    fn validate(&self) -> Result<(), FrameError> {
        let Self {
            op,
            flags,
            offset,
            length,
            payload_crc,
            ..
        } = *self;
        if flags.fua() && !op.allows_fua() {
            return Err(FrameError::BadFlags {
                op,
                flags: flags.bits(),
            });
        }
        if matches!(op, Op::Read | Op::Write) && length > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLarge {
                len: u64::from(length),
                max: MAX_PAYLOAD,
            });
        }
        let range_ok = if op.has_range() {
            offset.checked_add(u64::from(length)).is_some()
        } else {
            offset == 0 && length == 0
        };
        if !range_ok {
            return Err(FrameError::BadRange { op, offset, length });
        }
        if !op.has_payload() && payload_crc != 0 {
            return Err(FrameError::UnexpectedPayload {
                op,
                crc: payload_crc,
            });
        }
        Ok(())
    }
}

/// A payload with its crc32, computed once at construction, so that the same write sent to
/// several replicas is hashed once (DESIGN.md §8). The crc always matches the data.
#[derive(Debug, Clone)]
pub struct Checksummed {
    data: Bytes,
    crc: u32,
}

impl Checksummed {
    /// Hashes `data`.
    pub fn new(data: Bytes) -> Checksummed {
        let crc = crc32fast::hash(&data);
        Checksummed { data, crc }
    }

    /// The payload.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// Its crc32.
    pub fn crc(&self) -> u32 {
        self.crc
    }
}

/// A valid request: a validated header and its payload (empty unless [`Op::Write`]).
///
/// Built by the constructors or the decoder only, so the header always matches the
/// payload; the payload crc is computed once, at construction or on receipt.
#[derive(Clone, PartialEq, Eq)]
pub struct Request {
    header: RequestHeader,
    payload: Bytes,
}

impl Request {
    fn checked(header: RequestHeader, payload: Bytes) -> Result<Request, FrameError> {
        header.validate()?;
        Ok(Request { header, payload })
    }

    fn range(id: u64, op: Op, offset: u64, length: u32, fua: bool) -> Result<Request, FrameError> {
        let flags = if fua { Flags::FUA } else { Flags::NONE };
        let header = RequestHeader {
            op,
            flags,
            id,
            offset,
            length,
            payload_crc: 0,
        };
        Request::checked(header, Bytes::new())
    }

    /// Read `length` bytes at `offset`. Fails if `length` exceeds [`MAX_PAYLOAD`] or the
    /// range overflows.
    pub fn read(id: u64, offset: u64, length: u32) -> Result<Request, FrameError> {
        Request::range(id, Op::Read, offset, length, false)
    }

    /// Write `payload` at `offset` (computes the payload crc). Fails if the payload exceeds
    /// [`MAX_PAYLOAD`] or the range overflows.
    pub fn write(id: u64, offset: u64, payload: Bytes, fua: bool) -> Result<Request, FrameError> {
        Request::write_checksummed(id, offset, &Checksummed::new(payload), fua)
    }

    /// Write a payload whose crc was computed once ([`Checksummed`]), e.g. one write sent to
    /// several replicas. Fails if the payload exceeds [`MAX_PAYLOAD`] or the range overflows.
    pub fn write_checksummed(
        id: u64,
        offset: u64,
        payload: &Checksummed,
        fua: bool,
    ) -> Result<Request, FrameError> {
        let crc = payload.crc;
        let payload = payload.data.clone();
        let length = u32::try_from(payload.len())
            .ok()
            .filter(|&len| len <= MAX_PAYLOAD)
            .ok_or(FrameError::PayloadTooLarge {
                len: payload.len() as u64,
                max: MAX_PAYLOAD,
            })?;
        let header = RequestHeader {
            op: Op::Write,
            flags: if fua { Flags::FUA } else { Flags::NONE },
            id,
            offset,
            length,
            payload_crc: crc,
        };
        Request::checked(header, payload)
    }

    /// Zero `length` bytes at `offset`. Fails if the range overflows.
    pub fn write_zeroes(
        id: u64,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> Result<Request, FrameError> {
        Request::range(id, Op::WriteZeroes, offset, length, fua)
    }

    /// Discard `length` bytes at `offset`. Fails if the range overflows.
    pub fn discard(id: u64, offset: u64, length: u32, fua: bool) -> Result<Request, FrameError> {
        Request::range(id, Op::Discard, offset, length, fua)
    }

    /// Flush every acknowledged write to stable storage.
    pub const fn flush(id: u64) -> Request {
        Request::bare(id, Op::Flush)
    }

    /// Liveness check.
    pub const fn ping(id: u64) -> Request {
        Request::bare(id, Op::Ping)
    }

    const fn bare(id: u64, op: Op) -> Request {
        Request {
            header: RequestHeader {
                op,
                flags: Flags::NONE,
                id,
                offset: 0,
                length: 0,
                payload_crc: 0,
            },
            payload: Bytes::new(),
        }
    }

    /// The request id.
    pub const fn id(&self) -> u64 {
        self.header.id
    }

    /// The operation.
    pub const fn op(&self) -> Op {
        self.header.op
    }

    /// The flags.
    pub const fn flags(&self) -> Flags {
        self.header.flags
    }

    /// Whether the request asks for force-unit-access.
    pub const fn fua(&self) -> bool {
        self.header.flags.fua()
    }

    /// Byte offset (0 for Flush and Ping).
    pub const fn offset(&self) -> u64 {
        self.header.offset
    }

    /// Read length, payload length or range length (0 for Flush and Ping).
    pub const fn length(&self) -> u32 {
        self.header.length
    }

    /// The payload (empty unless [`Op::Write`]).
    pub const fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Take the payload out of the request.
    pub fn into_payload(self) -> Bytes {
        self.payload
    }

    /// The header (crc included).
    pub const fn header(&self) -> &RequestHeader {
        &self.header
    }

    /// The 32-byte wire header; write it followed by [`Request::payload`] (e.g. in one
    /// vectored write) to send the request without copying the payload.
    pub fn encode_header(&self) -> [u8; REQUEST_HEADER_LEN] {
        self.header.encode()
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        f.debug_struct("Request")
            .field("id", &h.id)
            .field("op", &h.op)
            .field("flags", &h.flags)
            .field("offset", &h.offset)
            .field("length", &h.length)
            .field("payload_crc", &format_args!("{:#010x}", h.payload_crc))
            .finish_non_exhaustive()
    }
}

/// A response header as it is on the wire (field order of the encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Outcome: `Ok` (status 0) or the error code.
    pub status: Result<(), ErrorCode>,
    /// Id of the request this answers.
    pub id: u64,
    /// Payload length (non-zero only for a successful read).
    pub length: u32,
    /// crc32 of the payload (0 without payload).
    pub payload_crc: u32,
}

impl ResponseHeader {
    /// Encode into the 24-byte wire form.
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut out = [0u8; RESPONSE_HEADER_LEN];
        let mut w = &mut out[..];
        w.put_u32_le(RESPONSE_MAGIC);
        w.put_u32_le(self.status.err().map_or(0, ErrorCode::code));
        w.put_u64_le(self.id);
        w.put_u32_le(self.length);
        w.put_u32_le(self.payload_crc);
        out
    }

    /// Decode and validate a 24-byte wire header.
    pub fn decode(raw: &[u8; RESPONSE_HEADER_LEN]) -> Result<ResponseHeader, FrameError> {
        let mut r = &raw[..];
        let magic = r.get_u32_le();
        if magic != RESPONSE_MAGIC {
            return Err(FrameError::BadMagic {
                expected: RESPONSE_MAGIC,
                found: magic,
            });
        }
        let code = r.get_u32_le();
        let status = match code {
            0 => Ok(()),
            _ => Err(ErrorCode::from_code(code).ok_or(FrameError::UnknownStatus(code))?),
        };
        let header = ResponseHeader {
            status,
            id: r.get_u64_le(),
            length: r.get_u32_le(),
            payload_crc: r.get_u32_le(),
        };
        header.validate()?;
        Ok(header)
    }

    /// Number of payload bytes that follow this header.
    pub const fn payload_len(&self) -> usize {
        self.length as usize
    }

    fn validate(&self) -> Result<(), FrameError> {
        if self.length > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLarge {
                len: u64::from(self.length),
                max: MAX_PAYLOAD,
            });
        }
        if let Err(code) = self.status
            && self.length != 0
        {
            return Err(FrameError::ErrorWithPayload {
                id: self.id,
                code,
                len: self.length,
            });
        }
        Ok(())
    }
}

/// A valid response: a header and its payload (the data of a successful read, else empty).
///
/// The codec does not know which request a response answers: the receiver checks that a
/// read's answer carries exactly the length it asked for.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    header: ResponseHeader,
    payload: Bytes,
}

impl Response {
    /// Success without data (every op but Read).
    pub const fn ok(id: u64) -> Response {
        Response {
            header: ResponseHeader {
                status: Ok(()),
                id,
                length: 0,
                payload_crc: 0,
            },
            payload: Bytes::new(),
        }
    }

    /// Success of a read, carrying its data (computes the payload crc). Fails if the data
    /// exceeds [`MAX_PAYLOAD`].
    pub fn ok_data(id: u64, payload: Bytes) -> Result<Response, FrameError> {
        let length = u32::try_from(payload.len())
            .ok()
            .filter(|&len| len <= MAX_PAYLOAD)
            .ok_or(FrameError::PayloadTooLarge {
                len: payload.len() as u64,
                max: MAX_PAYLOAD,
            })?;
        Ok(Response {
            header: ResponseHeader {
                status: Ok(()),
                id,
                length,
                payload_crc: crc32fast::hash(&payload),
            },
            payload,
        })
    }

    /// Failure of request `id`.
    pub const fn error(id: u64, code: ErrorCode) -> Response {
        Response {
            header: ResponseHeader {
                status: Err(code),
                id,
                length: 0,
                payload_crc: 0,
            },
            payload: Bytes::new(),
        }
    }

    /// Id of the request this answers.
    pub const fn id(&self) -> u64 {
        self.header.id
    }

    /// `Ok` or the error code.
    pub const fn status(&self) -> Result<(), ErrorCode> {
        self.header.status
    }

    /// The payload (a successful read's data, else empty).
    pub const fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The payload on success, the error code otherwise.
    pub fn into_result(self) -> Result<Bytes, ErrorCode> {
        self.header.status.map(|()| self.payload)
    }

    /// The header (crc included).
    pub const fn header(&self) -> &ResponseHeader {
        &self.header
    }

    /// The 24-byte wire header; write it followed by [`Response::payload`] (e.g. in one
    /// vectored write) to send the response without copying the payload.
    pub fn encode_header(&self) -> [u8; RESPONSE_HEADER_LEN] {
        self.header.encode()
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.header;
        f.debug_struct("Response")
            .field("id", &h.id)
            .field("status", &h.status)
            .field("length", &h.length)
            .field("payload_crc", &format_args!("{:#010x}", h.payload_crc))
            .finish_non_exhaustive()
    }
}

/// Crc of a received payload, checked against the header.
fn check_crc(id: u64, expected: u32, payload: &[u8]) -> Result<(), CrcMismatch> {
    // crc32 of no bytes is 0, so an empty payload must come with crc 0.
    let actual = if payload.is_empty() {
        0
    } else {
        crc32fast::hash(payload)
    };
    if actual == expected {
        Ok(())
    } else {
        Err(CrcMismatch {
            id,
            expected,
            actual,
        })
    }
}

/// Splits a `len`-byte payload off `src`, or grows `src` to fit it and returns `None`.
fn take_payload(src: &mut BytesMut, len: usize) -> Option<Bytes> {
    if len == 0 {
        return Some(Bytes::new());
    }
    if src.len() < len {
        src.reserve(len - src.len());
        return None;
    }
    Some(src.split_to(len).freeze())
}

/// The error for a stream that ended inside a frame.
fn truncated(src: &BytesMut, header_len: Option<usize>) -> FrameError {
    FrameError::Truncated {
        buffered: src.len() + header_len.unwrap_or(0),
    }
}

/// Codec for requests: decodes [`Request`]s (replica side) and encodes them (engine side).
///
/// Items are `Ok(request)` or `Err(CrcMismatch)` for a well-formed frame with a corrupt
/// payload (already consumed: answer its id with [`ErrorCode::BadCrc`]). Decoder errors
/// are fatal for the connection.
#[derive(Debug, Default)]
pub struct RequestCodec {
    /// Header of the frame whose payload is still arriving.
    pending: Option<RequestHeader>,
}

impl RequestCodec {
    /// A codec at a frame boundary.
    pub const fn new() -> RequestCodec {
        RequestCodec { pending: None }
    }
}

impl Decoder for RequestCodec {
    type Item = Result<Request, CrcMismatch>;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        let header = match self.pending.take() {
            Some(header) => header,
            None => {
                let Some(raw) = src.first_chunk::<REQUEST_HEADER_LEN>() else {
                    return Ok(None);
                };
                let header = RequestHeader::decode(raw)?;
                src.advance(REQUEST_HEADER_LEN);
                header
            }
        };
        let Some(payload) = take_payload(src, header.payload_len()) else {
            self.pending = Some(header);
            return Ok(None);
        };
        Ok(Some(
            check_crc(header.id, header.payload_crc, &payload)
                .map(|()| Request { header, payload }),
        ))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() && self.pending.is_none() => Ok(None),
            None => Err(truncated(src, self.pending.map(|_| REQUEST_HEADER_LEN))),
        }
    }
}

impl Encoder<&Request> for RequestCodec {
    type Error = FrameError;

    fn encode(&mut self, item: &Request, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.reserve(REQUEST_HEADER_LEN + item.payload.len());
        dst.put_slice(&item.encode_header());
        dst.put_slice(&item.payload);
        Ok(())
    }
}

impl Encoder<Request> for RequestCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Request, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(&item, dst)
    }
}

/// Codec for responses: decodes [`Response`]s (engine side) and encodes them (replica
/// side).
///
/// Items are `Ok(response)` or `Err(CrcMismatch)` for a well-formed frame with a corrupt
/// payload (already consumed: fail that request). Decoder errors are fatal for the
/// connection.
#[derive(Debug, Default)]
pub struct ResponseCodec {
    /// Header of the frame whose payload is still arriving.
    pending: Option<ResponseHeader>,
}

impl ResponseCodec {
    /// A codec at a frame boundary.
    pub const fn new() -> ResponseCodec {
        ResponseCodec { pending: None }
    }
}

impl Decoder for ResponseCodec {
    type Item = Result<Response, CrcMismatch>;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        let header = match self.pending.take() {
            Some(header) => header,
            None => {
                let Some(raw) = src.first_chunk::<RESPONSE_HEADER_LEN>() else {
                    return Ok(None);
                };
                let header = ResponseHeader::decode(raw)?;
                src.advance(RESPONSE_HEADER_LEN);
                header
            }
        };
        let Some(payload) = take_payload(src, header.payload_len()) else {
            self.pending = Some(header);
            return Ok(None);
        };
        Ok(Some(
            check_crc(header.id, header.payload_crc, &payload)
                .map(|()| Response { header, payload }),
        ))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, FrameError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None if src.is_empty() && self.pending.is_none() => Ok(None),
            None => Err(truncated(src, self.pending.map(|_| RESPONSE_HEADER_LEN))),
        }
    }
}

impl Encoder<&Response> for ResponseCodec {
    type Error = FrameError;

    fn encode(&mut self, item: &Response, dst: &mut BytesMut) -> Result<(), FrameError> {
        dst.reserve(RESPONSE_HEADER_LEN + item.payload.len());
        dst.put_slice(&item.encode_header());
        dst.put_slice(&item.payload);
        Ok(())
    }
}

impl Encoder<Response> for ResponseCodec {
    type Error = FrameError;

    fn encode(&mut self, item: Response, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(&item, dst)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn a_checksummed_write_is_the_same_frame_as_a_plain_one() {
        let data = Bytes::from(vec![0x5au8; 4096]);
        let c = Checksummed::new(data.clone());
        assert_eq!(c.crc(), crc32fast::hash(&data));
        let a = Request::write(7, 8192, data, true).unwrap();
        let b = Request::write_checksummed(7, 8192, &c, true).unwrap();
        assert_eq!(a.encode_header(), b.encode_header());
        assert_eq!(a.payload(), b.payload());
    }

    use super::*;
    use proptest::prelude::*;

    fn enc_req(req: &Request) -> BytesMut {
        let mut buf = BytesMut::new();
        RequestCodec::new().encode(req, &mut buf).unwrap();
        buf
    }

    fn enc_resp(resp: &Response) -> BytesMut {
        let mut buf = BytesMut::new();
        ResponseCodec::new().encode(resp, &mut buf).unwrap();
        buf
    }

    fn dec_req(buf: &mut BytesMut) -> Result<Option<Result<Request, CrcMismatch>>, FrameError> {
        RequestCodec::new().decode(buf)
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::read(1, 4096, 8192).unwrap(),
            Request::write(2, 512, Bytes::from(vec![0xab; 1536]), false).unwrap(),
            Request::write(3, 0, Bytes::from_static(b"hello"), true).unwrap(),
            Request::write(4, 0, Bytes::new(), false).unwrap(),
            Request::write_zeroes(5, 1 << 40, u32::MAX, true).unwrap(),
            Request::discard(6, 8192, 4096, false).unwrap(),
            Request::flush(7),
            Request::ping(u64::MAX),
        ]
    }

    fn all_responses() -> Vec<Response> {
        let mut v = vec![
            Response::ok(1),
            Response::ok_data(2, Bytes::from(vec![7u8; 4096])).unwrap(),
            Response::ok_data(3, Bytes::new()).unwrap(),
        ];
        v.extend(
            (1..=7).map(|c| Response::error(10 + u64::from(c), ErrorCode::from_code(c).unwrap())),
        );
        v
    }

    /// A raw request header with arbitrary field values.
    #[allow(clippy::too_many_arguments)] // one argument per wire field, on purpose
    fn raw_req(
        magic: u32,
        op: u8,
        flags: u8,
        reserved: u16,
        id: u64,
        offset: u64,
        length: u32,
        crc: u32,
    ) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32_le(magic);
        b.put_u8(op);
        b.put_u8(flags);
        b.put_u16_le(reserved);
        b.put_u64_le(id);
        b.put_u64_le(offset);
        b.put_u32_le(length);
        b.put_u32_le(crc);
        b
    }

    fn raw_resp(magic: u32, status: u32, id: u64, length: u32, crc: u32) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32_le(magic);
        b.put_u32_le(status);
        b.put_u64_le(id);
        b.put_u32_le(length);
        b.put_u32_le(crc);
        b
    }

    #[test]
    fn header_layout_is_fixed() {
        let req = Request::write(
            0x0102_0304_0506_0708,
            0x1122,
            Bytes::from_static(b"abc"),
            true,
        )
        .unwrap();
        let h = req.encode_header();
        assert_eq!(&h[0..4], b"QHRI");
        assert_eq!(h[4], 2);
        assert_eq!(h[5], 1);
        assert_eq!(&h[6..8], &[0, 0]);
        assert_eq!(&h[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&h[16..24], &0x1122u64.to_le_bytes());
        assert_eq!(&h[24..28], &3u32.to_le_bytes());
        assert_eq!(&h[28..32], &crc32fast::hash(b"abc").to_le_bytes());
        let r = Response::error(9, ErrorCode::Fenced).encode_header();
        assert_eq!(&r[0..4], b"PSRI");
        assert_eq!(&r[4..8], &6u32.to_le_bytes());
        assert_eq!(&r[8..16], &9u64.to_le_bytes());
    }

    #[test]
    fn codec_encode_is_header_then_payload() {
        for req in all_requests() {
            let mut expected = req.encode_header().to_vec();
            expected.extend_from_slice(req.payload());
            assert_eq!(&enc_req(&req)[..], &expected[..]);
        }
        for resp in all_responses() {
            let mut expected = resp.encode_header().to_vec();
            expected.extend_from_slice(resp.payload());
            assert_eq!(&enc_resp(&resp)[..], &expected[..]);
        }
    }

    #[test]
    fn roundtrip_every_request() {
        for req in all_requests() {
            let mut buf = enc_req(&req);
            let got = dec_req(&mut buf).unwrap().unwrap().unwrap();
            assert_eq!(got, req);
            assert_eq!(got.payload(), req.payload());
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn roundtrip_every_response() {
        for resp in all_responses() {
            let mut buf = enc_resp(&resp);
            let got = ResponseCodec::new()
                .decode(&mut buf)
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(got, resp);
            assert!(buf.is_empty());
        }
        let data = Response::ok_data(5, Bytes::from_static(b"data")).unwrap();
        assert_eq!(data.into_result().unwrap(), Bytes::from_static(b"data"));
        assert_eq!(
            Response::error(5, ErrorCode::NoSpace).into_result(),
            Err(ErrorCode::NoSpace)
        );
    }

    #[test]
    fn byte_by_byte() {
        let req = Request::write(42, 4096, Bytes::from(vec![1u8; 100]), true).unwrap();
        let wire = enc_req(&req);
        let mut codec = RequestCodec::new();
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.put_u8(*b);
            let out = codec.decode(&mut buf).unwrap();
            if i + 1 < wire.len() {
                assert!(
                    out.is_none(),
                    "frame complete after {} of {} bytes",
                    i + 1,
                    wire.len()
                );
            } else {
                assert_eq!(out.unwrap().unwrap(), req);
            }
        }
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());

        let resp = Response::ok_data(43, Bytes::from(vec![2u8; 100])).unwrap();
        let wire = enc_resp(&resp);
        let mut codec = ResponseCodec::new();
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.put_u8(*b);
            let out = codec.decode(&mut buf).unwrap();
            assert_eq!(out.is_some(), i + 1 == wire.len());
            if let Some(out) = out {
                assert_eq!(out.unwrap(), resp);
            }
        }
    }

    #[test]
    fn reserves_payload_once_header_is_parsed() {
        let req = Request::write(1, 0, Bytes::from(vec![0u8; 1 << 20]), false).unwrap();
        let wire = enc_req(&req);
        let mut buf = BytesMut::from(&wire[..REQUEST_HEADER_LEN + 10]);
        let mut codec = RequestCodec::new();
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(buf.capacity() >= 1 << 20);
        buf.extend_from_slice(&wire[REQUEST_HEADER_LEN + 10..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap(), req);
    }

    #[test]
    fn back_to_back_frames() {
        let a = Request::write(1, 0, Bytes::from_static(b"first"), false).unwrap();
        let b = Request::read(2, 0, 4096).unwrap();
        let c = Request::flush(3);
        let mut buf = enc_req(&a);
        buf.extend_from_slice(&enc_req(&b));
        buf.extend_from_slice(&enc_req(&c));
        let mut codec = RequestCodec::new();
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap(), a);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap(), b);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap(), c);
        assert!(codec.decode(&mut buf).unwrap().is_none());

        let x = Response::ok_data(1, Bytes::from_static(b"xyz")).unwrap();
        let y = Response::error(2, ErrorCode::Io);
        let mut buf = enc_resp(&x);
        buf.extend_from_slice(&enc_resp(&y));
        let mut codec = ResponseCodec::new();
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap(), x);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().unwrap(), y);
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn bad_magic() {
        let mut buf = raw_req(0xdead_beef, 1, 0, 0, 1, 0, 0, 0);
        assert!(matches!(
            dec_req(&mut buf),
            Err(FrameError::BadMagic {
                found: 0xdead_beef,
                ..
            })
        ));
        // A response where a request is expected is a bad magic too.
        let mut buf = enc_resp(&Response::ok(1));
        buf.extend_from_slice(&[0; 8]);
        assert!(matches!(
            dec_req(&mut buf),
            Err(FrameError::BadMagic {
                found: RESPONSE_MAGIC,
                ..
            })
        ));
        let mut buf = raw_resp(REQUEST_MAGIC, 0, 1, 0, 0);
        assert!(matches!(
            ResponseCodec::new().decode(&mut buf),
            Err(FrameError::BadMagic {
                found: REQUEST_MAGIC,
                ..
            })
        ));
    }

    #[test]
    fn unknown_op() {
        for op in [0u8, 7, 255] {
            let mut buf = raw_req(REQUEST_MAGIC, op, 0, 0, 1, 0, 0, 0);
            assert!(matches!(dec_req(&mut buf), Err(FrameError::UnknownOp(o)) if o == op));
        }
    }

    #[test]
    fn bad_flags() {
        // Unknown bit on any op.
        let mut buf = raw_req(REQUEST_MAGIC, 2, 0x02, 0, 1, 0, 0, 0);
        assert!(matches!(
            dec_req(&mut buf),
            Err(FrameError::BadFlags {
                op: Op::Write,
                flags: 0x02
            })
        ));
        // FUA where it means nothing.
        for op in [Op::Read, Op::Flush, Op::Ping] {
            let mut buf = raw_req(REQUEST_MAGIC, op as u8, 1, 0, 1, 0, 0, 0);
            assert!(
                matches!(dec_req(&mut buf), Err(FrameError::BadFlags { op: o, flags: 1 }) if o == op)
            );
        }
        // FUA where it is allowed.
        for op in [Op::WriteZeroes, Op::Discard] {
            let mut buf = raw_req(REQUEST_MAGIC, op as u8, 1, 0, 1, 0, 512, 0);
            assert!(dec_req(&mut buf).unwrap().unwrap().unwrap().fua());
        }
    }

    #[test]
    fn reserved_must_be_zero() {
        let mut buf = raw_req(REQUEST_MAGIC, 5, 0, 0x0100, 1, 0, 0, 0);
        assert!(matches!(
            dec_req(&mut buf),
            Err(FrameError::NonZeroReserved(0x0100))
        ));
    }

    #[test]
    fn too_large_is_refused_from_the_header_alone() {
        // Only the 32 header bytes are buffered: the error comes before any payload.
        let mut buf = raw_req(REQUEST_MAGIC, 2, 0, 0, 1, 0, MAX_PAYLOAD + 1, 0);
        let cap = buf.capacity();
        assert!(matches!(
            dec_req(&mut buf),
            Err(FrameError::PayloadTooLarge { len, max: MAX_PAYLOAD }) if len == u64::from(MAX_PAYLOAD) + 1
        ));
        assert_eq!(
            buf.capacity(),
            cap,
            "must not reserve for a refused payload"
        );
        // A read whose answer would be too large.
        let mut buf = raw_req(REQUEST_MAGIC, 1, 0, 0, 1, 0, u32::MAX, 0);
        assert!(matches!(
            dec_req(&mut buf),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        // Exactly MAX_PAYLOAD is fine (header parsed, waits for the payload).
        let mut buf = raw_req(REQUEST_MAGIC, 2, 0, 0, 1, 0, MAX_PAYLOAD, 0);
        assert!(dec_req(&mut buf).unwrap().is_none());
        // Responses.
        let mut buf = raw_resp(RESPONSE_MAGIC, 0, 1, MAX_PAYLOAD + 1, 0);
        assert!(matches!(
            ResponseCodec::new().decode(&mut buf),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        // Constructors refuse too.
        assert!(matches!(
            Request::read(1, 0, MAX_PAYLOAD + 1),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        let big = Bytes::from(vec![0u8; MAX_PAYLOAD as usize + 1]);
        assert!(matches!(
            Request::write(1, 0, big.clone(), false),
            Err(FrameError::PayloadTooLarge { .. })
        ));
        assert!(matches!(
            Response::ok_data(1, big),
            Err(FrameError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn bad_range() {
        let mut buf = raw_req(REQUEST_MAGIC, 5, 0, 0, 1, 4096, 0, 0);
        assert!(matches!(
            dec_req(&mut buf),
            Err(FrameError::BadRange { op: Op::Flush, .. })
        ));
        let mut buf = raw_req(REQUEST_MAGIC, 6, 0, 0, 1, 0, 1, 0);
        assert!(matches!(
            dec_req(&mut buf),
            Err(FrameError::BadRange { op: Op::Ping, .. })
        ));
        let mut buf = raw_req(REQUEST_MAGIC, 4, 0, 0, 1, u64::MAX, 1, 0);
        assert!(matches!(
            dec_req(&mut buf),
            Err(FrameError::BadRange {
                op: Op::Discard,
                ..
            })
        ));
        assert!(matches!(
            Request::read(1, u64::MAX - 10, 11),
            Err(FrameError::BadRange { op: Op::Read, .. })
        ));
        assert!(Request::read(1, u64::MAX - 10, 10).is_ok());
    }

    #[test]
    fn unexpected_payload_crc() {
        for op in [Op::Read, Op::WriteZeroes, Op::Discard, Op::Flush, Op::Ping] {
            let mut buf = raw_req(REQUEST_MAGIC, op as u8, 0, 0, 1, 0, 0, 0x1234);
            assert!(matches!(
                dec_req(&mut buf),
                Err(FrameError::UnexpectedPayload { op: o, crc: 0x1234 }) if o == op
            ));
        }
    }

    #[test]
    fn bad_crc_consumes_the_frame_and_decoding_continues() {
        let mut bad =
            enc_req(&Request::write(77, 0, Bytes::from_static(b"payload"), false).unwrap());
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let next = Request::write(78, 0, Bytes::from_static(b"second"), false).unwrap();
        bad.extend_from_slice(&enc_req(&next));
        let mut codec = RequestCodec::new();
        let err = codec.decode(&mut bad).unwrap().unwrap().unwrap_err();
        assert_eq!(err.id, 77);
        assert_eq!(err.expected, crc32fast::hash(b"payload"));
        assert_ne!(err.actual, err.expected);
        assert_eq!(codec.decode(&mut bad).unwrap().unwrap().unwrap(), next);
        assert!(bad.is_empty());
        // Converts to the flat error type, with the id in the message.
        assert!(FrameError::from(err).to_string().contains("frame 77"));

        // Same on the response side.
        let mut bad = enc_resp(&Response::ok_data(5, Bytes::from_static(b"data")).unwrap());
        bad[RESPONSE_HEADER_LEN] ^= 1;
        bad.extend_from_slice(&enc_resp(&Response::ok(6)));
        let mut codec = ResponseCodec::new();
        assert_eq!(codec.decode(&mut bad).unwrap().unwrap().unwrap_err().id, 5);
        assert_eq!(
            codec.decode(&mut bad).unwrap().unwrap().unwrap(),
            Response::ok(6)
        );

        // An empty payload must come with crc 0.
        let mut buf = raw_req(REQUEST_MAGIC, 2, 0, 0, 9, 0, 0, 1);
        assert_eq!(dec_req(&mut buf).unwrap().unwrap().unwrap_err().id, 9);
    }

    #[test]
    fn response_errors() {
        let mut buf = raw_resp(RESPONSE_MAGIC, 8, 1, 0, 0);
        assert!(matches!(
            ResponseCodec::new().decode(&mut buf),
            Err(FrameError::UnknownStatus(8))
        ));
        let mut buf = raw_resp(RESPONSE_MAGIC, 1, 3, 16, 0);
        assert!(matches!(
            ResponseCodec::new().decode(&mut buf),
            Err(FrameError::ErrorWithPayload {
                id: 3,
                code: ErrorCode::Io,
                len: 16
            })
        ));
    }

    #[test]
    fn truncated_at_eof() {
        let wire = enc_req(&Request::write(1, 0, Bytes::from_static(b"abcdef"), false).unwrap());
        let mut codec = RequestCodec::new();
        let mut buf = BytesMut::from(&wire[..10]);
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::Truncated { buffered: 10 })
        ));
        let mut codec = RequestCodec::new();
        let mut buf = BytesMut::from(&wire[..REQUEST_HEADER_LEN]);
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::Truncated {
                buffered: REQUEST_HEADER_LEN
            })
        ));
        let mut codec = ResponseCodec::new();
        assert!(codec.decode_eof(&mut BytesMut::new()).unwrap().is_none());
    }

    #[test]
    fn error_codes() {
        let expected = [
            (ErrorCode::Io, 1, errno::EIO),
            (ErrorCode::InvalidArgument, 2, errno::EINVAL),
            (ErrorCode::NoSpace, 3, errno::ENOSPC),
            (ErrorCode::BadCrc, 4, errno::EBADMSG),
            (ErrorCode::Unsupported, 5, errno::EOPNOTSUPP),
            (ErrorCode::Fenced, 6, errno::ESTALE),
            (ErrorCode::ReadOnly, 7, errno::EROFS),
        ];
        for (code, wire, errno) in expected {
            assert_eq!(code.code(), wire);
            assert_eq!(ErrorCode::from_code(wire), Some(code));
            assert_eq!(code.errno(), errno);
            assert!(!code.to_string().is_empty());
        }
        assert_eq!(ErrorCode::from_code(0), None);
        assert_eq!(ErrorCode::from_code(8), None);
        let io = |e| ErrorCode::from_io_error(&io::Error::from_raw_os_error(e));
        assert_eq!(io(errno::ENOSPC), ErrorCode::NoSpace);
        assert_eq!(io(errno::EROFS), ErrorCode::ReadOnly);
        assert_eq!(io(errno::EINVAL), ErrorCode::InvalidArgument);
        assert_eq!(io(errno::EOPNOTSUPP), ErrorCode::Unsupported);
        assert_eq!(io(errno::EIO), ErrorCode::Io);
        assert_eq!(
            ErrorCode::from_io_error(&io::Error::other("x")),
            ErrorCode::Io
        );
    }

    #[test]
    fn flags() {
        assert_eq!(Flags::from_bits(0), Some(Flags::NONE));
        assert_eq!(Flags::from_bits(1), Some(Flags::FUA));
        assert_eq!(Flags::from_bits(2), None);
        assert!((Flags::NONE | Flags::FUA).fua());
        assert!(!Flags::default().fua());
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        let id = any::<u64>();
        let off = 0u64..(1 << 50);
        prop_oneof![
            (id, off.clone(), 0..=MAX_PAYLOAD)
                .prop_map(|(i, o, l)| Request::read(i, o, l).unwrap()),
            (
                id,
                off.clone(),
                proptest::collection::vec(any::<u8>(), 0..3000),
                any::<bool>()
            )
                .prop_map(|(i, o, p, f)| Request::write(i, o, Bytes::from(p), f).unwrap()),
            (id, off.clone(), any::<u32>(), any::<bool>())
                .prop_map(|(i, o, l, f)| Request::write_zeroes(i, o, l, f).unwrap()),
            (id, off, any::<u32>(), any::<bool>())
                .prop_map(|(i, o, l, f)| Request::discard(i, o, l, f).unwrap()),
            id.prop_map(Request::flush),
            id.prop_map(Request::ping),
        ]
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        prop_oneof![
            any::<u64>().prop_map(Response::ok),
            (
                any::<u64>(),
                proptest::collection::vec(any::<u8>(), 0..3000)
            )
                .prop_map(|(i, p)| Response::ok_data(i, Bytes::from(p)).unwrap()),
            (any::<u64>(), 1u32..=7)
                .prop_map(|(i, c)| Response::error(i, ErrorCode::from_code(c).unwrap())),
        ]
    }

    /// Feeds `wire` to `codec` in chunks ending at `cuts`, collecting every item.
    fn feed<D>(codec: &mut D, wire: &[u8], cuts: &mut [usize]) -> Vec<D::Item>
    where
        D: Decoder<Error = FrameError>,
    {
        cuts.iter_mut().for_each(|c| *c %= wire.len() + 1);
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut buf = BytesMut::new();
        let mut start = 0;
        for end in cuts.iter().copied().chain([wire.len()]) {
            buf.extend_from_slice(&wire[start..end]);
            start = end;
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                out.push(item);
            }
        }
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
        out
    }

    proptest! {
        #[test]
        fn requests_roundtrip_split_anywhere(
            reqs in proptest::collection::vec(arb_request(), 1..8),
            mut cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut wire = BytesMut::new();
            let mut codec = RequestCodec::new();
            for r in &reqs {
                codec.encode(r, &mut wire).unwrap();
            }
            let got: Vec<Request> = feed(&mut codec, &wire, &mut cuts).into_iter().map(|r| r.unwrap()).collect();
            prop_assert_eq!(got, reqs);
        }

        #[test]
        fn responses_roundtrip_split_anywhere(
            resps in proptest::collection::vec(arb_response(), 1..8),
            mut cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut wire = BytesMut::new();
            let mut codec = ResponseCodec::new();
            for r in &resps {
                codec.encode(r, &mut wire).unwrap();
            }
            let got: Vec<Response> = feed(&mut codec, &wire, &mut cuts).into_iter().map(|r| r.unwrap()).collect();
            prop_assert_eq!(got, resps);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = RequestCodec::new();
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            let mut buf = BytesMut::from(&bytes[..]);
            let mut codec = ResponseCodec::new();
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
