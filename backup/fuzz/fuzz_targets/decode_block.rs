//! Feeds arbitrary bytes to `decode_block` as a stored block object: it must never panic,
//! and whatever it accepts must hash to the name it was checked against.
#![no_main]

use ironhorn_backup::codec::{BlockHash, decode_block};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First two bytes: the expected content length (a block size of at most 64 KiB here).
    let Some((len, obj)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = usize::from(u16::from_le_bytes(*len));
    // The name: the hash of the object's own tail, so that accepting is possible.
    let name = BlockHash::of(obj.get(16..).unwrap_or_default());
    if let Ok(content) = decode_block(obj, &name, len) {
        assert_eq!(content.len(), len);
        assert_eq!(BlockHash::of(&content), name);
    }
});
