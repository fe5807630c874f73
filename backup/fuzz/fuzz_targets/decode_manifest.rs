//! Feeds arbitrary bytes to `Manifest::decode` (manifests come from a bucket anyone with
//! write access may have changed): it must never panic, and every manifest it accepts must
//! be valid and encode back to bytes that decode to the same manifest.
#![no_main]

use ironhorn_backup::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        assert!(m.validate().is_ok());
        let again = Manifest::decode(&m.encode()).expect("re-encoded manifest decodes");
        assert_eq!(again, m);
        let _ = m.stored_volume_bytes();
    }
});
