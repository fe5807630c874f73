//! The client side of the NBD fixed-newstyle handshake, up to `NBD_OPT_GO`: what a socket
//! must have been through before the kernel takes it for the transmission phase (the kernel
//! speaks only simple replies, so no structured replies are negotiated).

use std::io::{self, Read, Write};

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_BIT: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;
/// Longest option reply accepted (an error message, an info item).
const MAX_REPLY: u32 = 64 << 10;

/// Transmission flag: the server accepts several connections to the same export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// What `NBD_OPT_GO` told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`), handed to the kernel as they are.
    pub flags: u16,
    /// Preferred block size, if the server said.
    pub preferred_block: Option<u32>,
}

/// A failed handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Socket error or timeout.
    #[error("NBD handshake I/O: {0}")]
    Io(#[from] io::Error),
    /// The server does not speak fixed newstyle.
    #[error("not an NBD fixed-newstyle server ({0})")]
    NotNewstyle(&'static str),
    /// The server refused `NBD_OPT_GO`.
    #[error("server refused export {export:?}: error {code:#x}: {message}")]
    Refused {
        /// Export asked for.
        export: String,
        /// `NBD_REP_ERR_*` code.
        code: u32,
        /// The server's message.
        message: String,
    },
    /// Something the protocol does not allow.
    #[error("NBD protocol error: {0}")]
    Protocol(String),
}

/// Runs the handshake on `s` for `export` and returns what the server said about it.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> Result<ExportInfo, HandshakeError> {
    let mut hdr = [0u8; 18];
    s.read_exact(&mut hdr)?;
    if u64::from_be_bytes(hdr[0..8].try_into().expect("8 bytes")) != NBD_MAGIC {
        return Err(HandshakeError::NotNewstyle("bad magic"));
    }
    if u64::from_be_bytes(hdr[8..16].try_into().expect("8 bytes")) != IHAVEOPT {
        return Err(HandshakeError::NotNewstyle("oldstyle server"));
    }
    let server_flags = u16::from_be_bytes([hdr[16], hdr[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotNewstyle("no fixed newstyle"));
    }
    let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len())
        .ok()
        .filter(|&l| l <= 4096)
        .ok_or_else(|| HandshakeError::Protocol("export name longer than 4096 bytes".into()))?;
    let mut msg = Vec::with_capacity(32 + name.len());
    msg.extend_from_slice(&client_flags.to_be_bytes());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(4 + name_len + 2 + 2).to_be_bytes());
    msg.extend_from_slice(&name_len.to_be_bytes());
    msg.extend_from_slice(name);
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    s.write_all(&msg)?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut preferred_block = None;
    loop {
        let mut rh = [0u8; 20];
        s.read_exact(&mut rh)?;
        let magic = u64::from_be_bytes(rh[0..8].try_into().expect("8 bytes"));
        let opt = u32::from_be_bytes(rh[8..12].try_into().expect("4 bytes"));
        let typ = u32::from_be_bytes(rh[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(rh[16..20].try_into().expect("4 bytes"));
        if magic != OPTION_REPLY_MAGIC || opt != OPT_GO {
            return Err(HandshakeError::Protocol(format!(
                "bad option reply (magic {magic:#x}, option {opt})"
            )));
        }
        if len > MAX_REPLY {
            return Err(HandshakeError::Protocol(format!(
                "option reply of {len} bytes"
            )));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        if typ & REP_ERR_BIT != 0 {
            return Err(HandshakeError::Refused {
                export: export.to_owned(),
                code: typ,
                message: String::from_utf8_lossy(&data).into_owned(),
            });
        }
        match typ {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => {
                let item = u16::from_be_bytes([data[0], data[1]]);
                match item {
                    INFO_EXPORT if data.len() == 12 => {
                        let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        export_info = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE if data.len() == 14 => {
                        preferred_block =
                            Some(u32::from_be_bytes(data[6..10].try_into().expect("4 bytes")));
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(HandshakeError::Protocol(format!(
                            "info item {item} of {} bytes",
                            data.len()
                        )));
                    }
                    _ => {}
                }
            }
            _ => {
                return Err(HandshakeError::Protocol(format!(
                    "unexpected reply type {typ} to NBD_OPT_GO"
                )));
            }
        }
    }
    let (size, flags) = export_info.ok_or_else(|| {
        HandshakeError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
    })?;
    Ok(ExportInfo {
        size,
        flags,
        preferred_block,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted server: bytes to read, and what the client wrote.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn reply(typ: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&OPT_GO.to_be_bytes());
        v.extend_from_slice(&typ.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn greeting() -> Vec<u8> {
        let mut v = NBD_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        v
    }

    #[test]
    fn go_returns_size_and_flags() {
        let mut input = greeting();
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 30).to_be_bytes());
        info.extend_from_slice(&0x1edu16.to_be_bytes());
        input.extend(reply(REP_INFO, &info));
        input.extend(reply(REP_ACK, &[]));
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let got = negotiate(&mut s, "vol").expect("handshake");
        assert_eq!(got.size, 1 << 30);
        assert_eq!(got.flags, 0x1ed);
        // client flags, then IHAVEOPT GO with the name "vol" and one info request
        assert_eq!(&s.output[0..4], &3u32.to_be_bytes());
        assert_eq!(&s.output[12..16], &OPT_GO.to_be_bytes());
        assert_eq!(&s.output[20..24], &3u32.to_be_bytes());
        assert_eq!(&s.output[24..27], b"vol");
    }

    /// Every truncation and every single-byte corruption of a valid server exchange gives
    /// an answer or an error, never a panic or a read past what the server sent.
    #[test]
    fn truncated_or_corrupted_servers_never_panic() {
        let mut valid = greeting();
        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
        info.extend_from_slice(&(1u64 << 30).to_be_bytes());
        info.extend_from_slice(&0x1edu16.to_be_bytes());
        valid.extend(reply(REP_INFO, &info));
        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 32 << 20] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        valid.extend(reply(REP_INFO, &bs));
        valid.extend(reply(REP_ACK, &[]));
        let run = |input: Vec<u8>| {
            let mut s = Script {
                input: io::Cursor::new(input),
                output: Vec::new(),
            };
            negotiate(&mut s, "vol")
        };
        assert!(run(valid.clone()).is_ok());
        for cut in 0..valid.len() {
            assert!(
                run(valid[..cut].to_vec()).is_err(),
                "truncated at {cut} accepted"
            );
        }
        for pos in 0..valid.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut v = valid.clone();
                v[pos] ^= x;
                let _ = run(v);
            }
        }
    }

    #[test]
    fn refusal_and_garbage_are_errors() {
        let mut input = greeting();
        input.extend(reply(REP_ERR_BIT | 6, b"no such export"));
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let e = negotiate(&mut s, "x").expect_err("refused");
        assert!(e.to_string().contains("no such export"), "{e}");

        let mut s = Script {
            input: io::Cursor::new(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
            output: Vec::new(),
        };
        assert!(matches!(
            negotiate(&mut s, "x"),
            Err(HandshakeError::NotNewstyle(_))
        ));

        // ACK without the export info
        let mut input = greeting();
        input.extend(reply(REP_ACK, &[]));
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        assert!(matches!(
            negotiate(&mut s, "x"),
            Err(HandshakeError::Protocol(_))
        ));
    }
}
