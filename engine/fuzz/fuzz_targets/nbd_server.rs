//! Feeds arbitrary bytes, as a client would send them, to the engine's NBD server (newstyle
//! handshake, option haggling, then transmission requests) over an in-memory stream, with
//! an in-memory 1 MiB device behind it. The server must never panic, must end once the
//! client's bytes end, and must never touch the device outside its size.
#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ironhorn_engine::device::{BlockDevice, DeviceResult};
use ironhorn_engine::nbd::{NbdExport, serve_connection};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 1 << 20;

struct Mem(Mutex<Vec<u8>>);

impl Mem {
    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.checked_add(len).expect("server passed an overflowing range");
        assert!(end <= SIZE, "server passed {offset}+{len} beyond the device");
        offset as usize..end as usize
    }
}

impl BlockDevice for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        let r = self.range(offset, u64::from(len));
        Ok(Bytes::copy_from_slice(&self.0.lock().expect("lock")[r]))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> DeviceResult<()> {
        let r = self.range(offset, data.len() as u64);
        self.0.lock().expect("lock")[r].copy_from_slice(&data);
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> DeviceResult<()> {
        let r = self.range(offset, len);
        self.0.lock().expect("lock")[r].fill(0);
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64, fua: bool) -> DeviceResult<()> {
        self.write_zeroes(offset, len, fua).await
    }
    async fn flush(&self) -> DeviceResult<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let export = NbdExport {
            name: "vol".to_owned(),
            device: Arc::new(Mem(Mutex::new(vec![0; SIZE as usize]))),
            read_only: data.first().is_some_and(|b| b & 1 == 1),
        };
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let shutdown = CancellationToken::new();
        let input = data.to_vec();
        let feed = async move {
            // The client's bytes, then end of stream; answers are read and dropped so the
            // server never blocks on a full pipe.
            let (mut rd, mut wr) = tokio::io::split(&mut client);
            let write = async {
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            };
            let drain = async {
                let mut sink = vec![0u8; 1 << 16];
                while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
            };
            tokio::join!(write, drain);
        };
        let serve = serve_connection(server, &export, &shutdown);
        let run = async { tokio::join!(feed, serve) };
        // The handshake has its own timeout; everything must end well before this.
        // Its result is the client's fault or not: only the end matters here.
        let (_, _served) = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("the server did not end after the client's bytes ended");
    });
});
