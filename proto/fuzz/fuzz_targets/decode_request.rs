//! Feeds arbitrary bytes, in chunks, to `RequestCodec`: decoding must never panic, and
//! every request it accepts must encode back to a frame that decodes to the same request.
#![no_main]

use bytes::BytesMut;
use ironhorn_proto::frame::{Request, RequestCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    // First byte: chunk size (1..=256) in which the rest arrives, like socket reads.
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let mut codec = RequestCodec::new();
    let mut buf = BytesMut::new();
    for piece in rest.chunks(usize::from(chunk) + 1) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Ok(req))) => check(&req),
                // Corrupt payload: the frame is consumed, decoding goes on.
                Ok(Some(Err(_crc))) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});

fn check(req: &Request) {
    assert_eq!(req.payload().len(), req.header().payload_len());
    let mut wire = BytesMut::new();
    let mut codec = RequestCodec::new();
    codec.encode(req, &mut wire).expect("encode");
    let again = codec.decode(&mut wire).expect("re-decode").expect("complete");
    assert_eq!(again.as_ref(), Ok(req));
    assert!(wire.is_empty());
}
