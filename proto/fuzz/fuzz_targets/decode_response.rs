//! Feeds arbitrary bytes, in chunks, to `ResponseCodec`: decoding must never panic, and
//! every response it accepts must encode back to a frame that decodes to the same response.
#![no_main]

use bytes::BytesMut;
use ironhorn_proto::frame::{Response, ResponseCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    // First byte: chunk size (1..=256) in which the rest arrives, like socket reads.
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let mut codec = ResponseCodec::new();
    let mut buf = BytesMut::new();
    for piece in rest.chunks(usize::from(chunk) + 1) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(Ok(resp))) => check(&resp),
                // Corrupt payload: the frame is consumed, decoding goes on.
                Ok(Some(Err(_crc))) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = codec.decode_eof(&mut buf);
});

fn check(resp: &Response) {
    assert_eq!(resp.payload().len(), resp.header().payload_len());
    let mut wire = BytesMut::new();
    let mut codec = ResponseCodec::new();
    codec.encode(resp, &mut wire).expect("encode");
    let again = codec.decode(&mut wire).expect("re-decode").expect("complete");
    assert_eq!(again.as_ref(), Ok(resp));
    assert!(wire.is_empty());
}
