//! Arbitrary batch payloads: decoding records must never panic or allocate beyond the input.
#![no_main]

use akosha_protocol::{decode_records, encode_records};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&count, payload)) = data.split_first() else { return };
    if let Ok(records) = decode_records(payload, usize::from(count)) {
        assert_eq!(decode_records(&encode_records(&records), records.len()).ok(), Some(records));
    }
});
