//! Feeds arbitrary bytes, as an NBD server would answer, to the kernel-NBD attach's client
//! handshake (`negotiate`, up to `NBD_OPT_GO`), read in pieces of a size the first byte
//! picks. It must never panic or allocate without bound, and must end when the bytes end;
//! an accepted export must be a size the kernel can take.
#![no_main]

use std::io::{self, Read, Write};

use ironhorn_csi::device::kernel_nbd::handshake::negotiate;
use libfuzzer_sys::fuzz_target;

/// The server's side: reads come from the fuzz input, in pieces; writes are counted.
struct Server<'a> {
    input: &'a [u8],
    piece: usize,
    written: usize,
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.piece).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        // A client that keeps sending without reading would be a bug: bound it.
        assert!(self.written < 1 << 20, "the client wrote more than 1 MiB");
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, input)) = data.split_first() else {
        return;
    };
    let mut s = Server {
        input,
        piece: usize::from(piece) + 1,
        written: 0,
    };
    if let Ok(info) = negotiate(&mut s, "vol") {
        let _ = (info.size, info.flags, info.preferred_block);
    }
});
