//! Loopback load test of the data-protocol server: an in-process [`DataServer`] over a
//! fresh store in a temporary directory, driven by client threads that keep a queue of
//! pipelined requests in flight.
//!
//! ```text
//! cargo run --release -p ironhorn-replica --example data_server_load -- \
//!     [--op write|read] [--bs 4096] [--qd 32] [--conns 1] [--secs 5] [--size 1GiB-in-bytes]
//! ```
//!
//! Prints requests per second, MiB/s and the server's CPU time per request (user+sys of
//! this process, which includes the client: read it as an upper bound). Run it once with
//! `--op write` on a fresh volume and again with `--prefill` to measure written space.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ironhorn_proto::frame::{Request, RequestCodec, ResponseCodec};
use ironhorn_replica::server::{DataServer, DataServerConfig};
use ironhorn_replica::store::Store;
use tokio_util::codec::{Decoder, Encoder};

struct Opts {
    write: bool,
    bs: u32,
    qd: usize,
    conns: usize,
    secs: u64,
    size: u64,
    prefill: bool,
}

fn parse() -> Opts {
    let mut o = Opts {
        write: true,
        bs: 4096,
        qd: 32,
        conns: 1,
        secs: 5,
        size: 1 << 30,
        prefill: false,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--op" => o.write = v == "write",
            "--bs" => o.bs = v.parse().unwrap(),
            "--qd" => o.qd = v.parse().unwrap(),
            "--conns" => o.conns = v.parse().unwrap(),
            "--secs" => o.secs = v.parse().unwrap(),
            "--size" => o.size = v.parse().unwrap(),
            "--prefill" => {
                o.prefill = true;
                i += 1;
                continue;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    o
}

/// User + system CPU time of this process.
fn cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(usage.user_time()) + tv(usage.system_time())
}

/// A tiny xorshift for offsets.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn main() {
    let o = parse();
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open_or_create(tmp.path(), Some(o.size)).unwrap());
    if o.prefill || !o.write {
        let chunk = vec![0x5au8; 1 << 20];
        for off in (0..o.size).step_by(1 << 20) {
            store.write(off, &chunk).unwrap();
        }
        store.flush().unwrap();
    }
    let server = DataServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        Arc::clone(&store),
        DataServerConfig {
            max_connections: 64,
            dir: tmp.path().to_owned(),
        },
    )
    .unwrap();
    let addr = server.local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let blocks = o.size / u64::from(o.bs);
    let payload = Bytes::from(vec![0xa5u8; o.bs as usize]);
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    let clients: Vec<_> = (0..o.conns)
        .map(|c| {
            let (stop, done, payload) = (stop.clone(), done.clone(), payload.clone());
            let (write, bs, qd) = (o.write, o.bs, o.qd);
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1);
                let mut wbuf = BytesMut::new();
                let mut rbuf = BytesMut::with_capacity(1 << 20);
                let mut dec = ResponseCodec::new();
                let mut id = 0u64;
                let mut make = |id: u64| {
                    let off = (next(&mut rng) % blocks) * u64::from(bs);
                    if write {
                        Request::write(id, off, payload.clone(), false).unwrap()
                    } else {
                        Request::read(id, off, bs).unwrap()
                    }
                };
                for _ in 0..qd {
                    RequestCodec::new().encode(make(id), &mut wbuf).unwrap();
                    id += 1;
                }
                s.write_all(&wbuf).unwrap();
                wbuf.clear();
                let mut tmp = vec![0u8; 1 << 20];
                while !stop.load(Ordering::Relaxed) {
                    let n = match s.read(&mut tmp) {
                        Ok(0) | Err(_) => break, // the server closed at the end
                        Ok(n) => n,
                    };
                    rbuf.extend_from_slice(&tmp[..n]);
                    let mut answered = 0;
                    while let Some(resp) = dec.decode(&mut rbuf).unwrap() {
                        resp.unwrap().into_result().unwrap();
                        answered += 1;
                    }
                    for _ in 0..answered {
                        RequestCodec::new().encode(make(id), &mut wbuf).unwrap();
                        id += 1;
                    }
                    if !wbuf.is_empty() {
                        if s.write_all(&wbuf).is_err() {
                            break;
                        }
                        wbuf.clear();
                    }
                    done.fetch_add(answered, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(o.secs));
    stop.store(true, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    let cpu = cpu_time() - cpu0;
    let n = done.load(Ordering::Relaxed);
    drop(server); // closes the connections, which ends the clients
    for c in clients {
        let _ = c.join();
    }
    let secs = elapsed.as_secs_f64();
    println!(
        "{} bs={} qd={} conns={}: {:.0} req/s, {:.1} MiB/s, {:.1} µs CPU/req (client included)",
        if o.write { "write" } else { "read" },
        o.bs,
        o.qd,
        o.conns,
        n as f64 / secs,
        n as f64 * f64::from(o.bs) / secs / (1 << 20) as f64,
        cpu.as_secs_f64() * 1e6 / n.max(1) as f64,
    );
}
