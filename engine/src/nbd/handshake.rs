//! The fixed newstyle handshake and option haggling, up to the start of transmission.
//!
//! Speed does not matter here (a handful of small messages per connection), so this is plain
//! sequential async code on the unbuffered stream: nothing the client sent after the final
//! option is consumed, and the transmission phase starts reading at the first request.
//!
//! Options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (`base:allocation` only). Anything else gets
//! `NBD_REP_ERR_UNSUP` (that includes `STARTTLS` and extended headers).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::NbdExport;
use super::error::NbdConnError;
use super::proto::*;
use crate::device::BlockDevice;

/// Longest option data accepted; longer options close the connection. Room for an export name
/// and a few maximal (4096-byte) metadata queries.
pub const MAX_OPTION_LEN: u32 = 64 << 10;

/// What option haggling agreed on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// `base:allocation` was selected by the last `NBD_OPT_SET_META_CONTEXT`.
    pub base_allocation: bool,
}

/// How the handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handshake {
    /// Enter transmission with these settings.
    Transmission(Negotiated),
    /// The client aborted or hung up between options; nothing more to do.
    Closed,
}

/// The transmission flags advertised for `export`.
pub(crate) fn transmission_flags(structured: bool, read_only: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    if structured {
        flags |= FLAG_SEND_DF;
    }
    if read_only {
        flags |= FLAG_READ_ONLY;
    }
    flags
}

fn export_matches<D>(export: &NbdExport<D>, name: &[u8]) -> bool {
    name.is_empty() || name == export.name.as_bytes()
}

/// Appends one option reply to `out`.
fn put_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[&[u8]]) {
    let len: usize = data.iter().map(|d| d.len()).sum();
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    // Replies are built from bounded pieces (names <= MAX_STRING), so this always fits.
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    for d in data {
        out.extend_from_slice(d);
    }
}

/// Cursor over option data; every getter returns `None` when the data is too short.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A string prefixed by its 32-bit length, at most [`MAX_STRING`] bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > MAX_STRING {
            return None;
        }
        self.take(len)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO` data: export name and the info items asked for.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u16()?;
    let mut items = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        items.push(c.u16()?);
    }
    c.is_empty().then_some((name, items))
}

/// `NBD_OPT_{LIST,SET}_META_CONTEXT` data: export name and queries.
fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut c = Cursor(data);
    let name = c.string()?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(c.string()?);
    }
    c.is_empty().then_some((name, queries))
}

/// Runs the handshake on `s` for `export`.
pub(crate) async fn handshake<S, D>(
    s: &mut S,
    export: &NbdExport<D>,
) -> Result<Handshake, NbdConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: BlockDevice,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)
        .await
        .map_err(NbdConnError::io("write handshake"))?;

    let client_flags = s
        .read_u32()
        .await
        .map_err(NbdConnError::io("read client flags"))?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdConnError::UnknownClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut neg = Negotiated::default();
    let mut out = Vec::with_capacity(256);
    loop {
        let mut hdr = [0u8; 16];
        match s.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                debug!("client hung up during option haggling");
                return Ok(Handshake::Closed);
            }
            Err(e) => return Err(NbdConnError::io("read option header")(e)),
        }
        let magic = u64::from_be_bytes([
            hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6], hdr[7],
        ]);
        let option = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        let len = u32::from_be_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        if magic != IHAVEOPT {
            return Err(NbdConnError::BadOptionMagic(magic));
        }
        if len > MAX_OPTION_LEN {
            return Err(NbdConnError::OptionTooLong {
                option,
                len,
                max: MAX_OPTION_LEN,
            });
        }
        // `len` is bounded by MAX_OPTION_LEN above.
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)
            .await
            .map_err(NbdConnError::io("read option data"))?;
        debug!(option, len, "option");

        out.clear();
        let mut enter = false;
        match option {
            OPT_EXPORT_NAME => {
                if !export_matches(export, &data) {
                    return Err(NbdConnError::UnknownExport(
                        String::from_utf8_lossy(&data).into_owned(),
                    ));
                }
                let size = export.device.size();
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(
                    &transmission_flags(neg.structured, export.read_only).to_be_bytes(),
                );
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                enter = true;
            }
            OPT_ABORT => {
                put_reply(&mut out, option, REP_ACK, &[]);
                // The client may already have hung up; a failed ACK is not worth a report.
                let _ = s.write_all(&out).await;
                let _ = s.flush().await;
                return Ok(Handshake::Closed);
            }
            OPT_LIST => {
                if data.is_empty() {
                    let name = export.name.as_bytes();
                    let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes();
                    put_reply(&mut out, option, REP_SERVER, &[&name_len, name]);
                    put_reply(&mut out, option, REP_ACK, &[]);
                } else {
                    put_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        &[b"NBD_OPT_LIST takes no data"],
                    );
                }
            }
            OPT_INFO | OPT_GO => match parse_info(&data) {
                None => put_reply(
                    &mut out,
                    option,
                    REP_ERR_INVALID,
                    &[b"malformed NBD_OPT_INFO/GO data"],
                ),
                Some((name, _)) if !export_matches(export, name) => {
                    put_reply(&mut out, option, REP_ERR_UNKNOWN, &[b"unknown export"])
                }
                Some((_, items)) => {
                    let mut info = [0u8; 12];
                    info[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
                    info[2..10].copy_from_slice(&export.device.size().to_be_bytes());
                    info[10..12].copy_from_slice(
                        &transmission_flags(neg.structured, export.read_only).to_be_bytes(),
                    );
                    put_reply(&mut out, option, REP_INFO, &[&info]);
                    if items.contains(&INFO_NAME) {
                        put_reply(
                            &mut out,
                            option,
                            REP_INFO,
                            &[&INFO_NAME.to_be_bytes(), export.name.as_bytes()],
                        );
                    }
                    // Always sent: a server may tell block sizes unasked, and clients then
                    // keep requests aligned to the minimum.
                    let mut bs = [0u8; 14];
                    bs[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                    bs[2..6].copy_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
                    bs[6..10].copy_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
                    bs[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    put_reply(&mut out, option, REP_INFO, &[&bs]);
                    put_reply(&mut out, option, REP_ACK, &[]);
                    enter = option == OPT_GO;
                }
            },
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    neg.structured = true;
                    put_reply(&mut out, option, REP_ACK, &[]);
                } else {
                    put_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        &[b"NBD_OPT_STRUCTURED_REPLY takes no data"],
                    );
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                match parse_meta(&data) {
                    _ if !neg.structured => put_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        &[b"metadata contexts need structured replies first"],
                    ),
                    None => put_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        &[b"malformed metadata context data"],
                    ),
                    Some((name, _)) if !export_matches(export, name) => {
                        put_reply(&mut out, option, REP_ERR_UNKNOWN, &[b"unknown export"])
                    }
                    Some((_, queries)) => {
                        let base = META_BASE_ALLOCATION.as_bytes();
                        let selected = if set {
                            queries.contains(&base)
                        } else {
                            queries.is_empty()
                                || queries.iter().any(|q| *q == base || *q == b"base:")
                        };
                        if selected {
                            // LIST replies carry context id 0 (reserved).
                            let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                            put_reply(
                                &mut out,
                                option,
                                REP_META_CONTEXT,
                                &[&id.to_be_bytes(), base],
                            );
                        }
                        if set {
                            neg.base_allocation = selected;
                        }
                        put_reply(&mut out, option, REP_ACK, &[]);
                    }
                }
            }
            _ => put_reply(&mut out, option, REP_ERR_UNSUP, &[b"option not supported"]),
        }
        s.write_all(&out)
            .await
            .map_err(NbdConnError::io("write option reply"))?;
        s.flush()
            .await
            .map_err(NbdConnError::io("write option reply"))?;
        if enter {
            return Ok(Handshake::Transmission(neg));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_data_is_parsed_exactly() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let (name, items) = parse_info(&d).expect("valid");
        assert_eq!(name, b"vol");
        assert_eq!(items, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        // Trailing garbage, short data and a name longer than the data are all refused.
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info(&long).is_none());
        assert!(parse_info(&d[..d.len() - 1]).is_none());
        assert!(parse_info(&100u32.to_be_bytes()).is_none());
    }

    #[test]
    fn meta_data_is_parsed_exactly() {
        let mut d = Vec::new();
        d.extend_from_slice(&0u32.to_be_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        let (name, queries) = parse_meta(&d).expect("valid");
        assert!(name.is_empty());
        assert_eq!(queries, vec![&b"base:allocation"[..]]);
        assert!(parse_meta(&d[..d.len() - 2]).is_none());
        // A huge query count with no data must not allocate or loop long.
        let mut huge = Vec::new();
        huge.extend_from_slice(&0u32.to_be_bytes());
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta(&huge).is_none());
    }

    #[test]
    fn flags_follow_negotiation() {
        let f = transmission_flags(false, false);
        assert_eq!(f & FLAG_SEND_DF, 0);
        assert_eq!(f & FLAG_READ_ONLY, 0);
        assert_ne!(f & FLAG_CAN_MULTI_CONN, 0);
        let f = transmission_flags(true, true);
        assert_ne!(f & FLAG_SEND_DF, 0);
        assert_ne!(f & FLAG_READ_ONLY, 0);
    }
}
