//! Arbitrary compressed payloads with arbitrary declared sizes: errors, never panics or unbounded output.
#![no_main]

use akosha_protocol::Codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let Ok(codec) = Codec::from_wire(data[0] % 3, (data[1] % 19 + 1) as i8) else { return };
    let declared = usize::from(data[2]) * 97;
    if let Ok(out) = codec.decompress(&data[3..], declared, 1 << 16) {
        assert_eq!(out.len(), declared);
    }
});
