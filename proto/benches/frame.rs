//! Micro-benchmarks of the data-protocol frame codec.
//!
//! Run: `cargo bench -p ironhorn-proto --bench frame`. "encode" builds the message (crc
//! included, as a sender would) and writes header + payload into a reused buffer; "decode"
//! copies the wire bytes into the read buffer (as a socket read would) and decodes them
//! (crc check included). "header" rows touch the fixed header only.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ironhorn_proto::frame::{
    Request, RequestCodec, RequestHeader, Response, ResponseCodec, ResponseHeader,
};
use tokio_util::codec::{Decoder, Encoder};

fn write_request(c: &mut Criterion, name: &str, size: usize) {
    let payload = Bytes::from(vec![0x5a; size]);
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(size as u64));

    let mut codec = RequestCodec::new();
    let mut out = BytesMut::with_capacity(size + 64);
    group.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            let req = Request::write(7, 4096, black_box(payload.clone()), false).unwrap();
            codec.encode(&req, &mut out).unwrap();
            black_box(&out);
        })
    });

    let req = Request::write(7, 4096, payload.clone(), false).unwrap();
    let mut wire = BytesMut::new();
    codec.encode(&req, &mut wire).unwrap();
    let mut buf = BytesMut::with_capacity(wire.len());
    group.bench_function("decode", |b| {
        b.iter(|| {
            buf.extend_from_slice(black_box(&wire));
            let got = codec.decode(&mut buf).unwrap().unwrap().unwrap();
            black_box(got);
        })
    });
    group.finish();
}

fn read_response(c: &mut Criterion, name: &str, size: usize) {
    let payload = Bytes::from(vec![0xa5; size]);
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(size as u64));

    let mut codec = ResponseCodec::new();
    let mut out = BytesMut::with_capacity(size + 64);
    group.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            let resp = Response::ok_data(9, black_box(payload.clone())).unwrap();
            codec.encode(&resp, &mut out).unwrap();
            black_box(&out);
        })
    });

    let resp = Response::ok_data(9, payload.clone()).unwrap();
    let mut wire = BytesMut::new();
    codec.encode(&resp, &mut wire).unwrap();
    let mut buf = BytesMut::with_capacity(wire.len());
    group.bench_function("decode", |b| {
        b.iter(|| {
            buf.extend_from_slice(black_box(&wire));
            let got = codec.decode(&mut buf).unwrap().unwrap().unwrap();
            black_box(got);
        })
    });
    group.finish();
}

fn headers(c: &mut Criterion) {
    let mut group = c.benchmark_group("header");
    let req = Request::write(7, 4096, Bytes::from(vec![1; 4096]), true).unwrap();
    let req_header = *req.header();
    let req_raw = req.encode_header();
    group.bench_function("request_encode", |b| {
        b.iter(|| black_box(black_box(&req_header).encode()))
    });
    group.bench_function("request_decode", |b| {
        b.iter(|| black_box(RequestHeader::decode(black_box(&req_raw)).unwrap()))
    });
    let resp = Response::ok_data(9, Bytes::from(vec![1; 4096])).unwrap();
    let resp_header = *resp.header();
    let resp_raw = resp.encode_header();
    group.bench_function("response_encode", |b| {
        b.iter(|| black_box(black_box(&resp_header).encode()))
    });
    group.bench_function("response_decode", |b| {
        b.iter(|| black_box(ResponseHeader::decode(black_box(&resp_raw)).unwrap()))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    write_request(c, "write_request_4k", 4096);
    read_response(c, "read_response_4k", 4096);
    write_request(c, "write_request_1m", 1 << 20);
    headers(c);
}

criterion_group!(frame, benches);
criterion_main!(frame);
