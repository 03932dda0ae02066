//! Arbitrary bytes as a stream of frames, fed in arbitrary pieces: decoding must never panic.
#![no_main]

use akosha_protocol::{BATCH_HEAD_LEN, FrameDecoder, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let cut = usize::from(split).min(rest.len());
    let mut decoder = FrameDecoder::new(1 << 20);
    for piece in [&rest[..cut], &rest[cut..]] {
        decoder.push(piece);
        while let Ok(Some(message)) = decoder.next_message() {
            // Whatever decodes must re-encode to a frame that decodes to the same message.
            let mut again = FrameDecoder::new(1 << 20);
            again.push(&message.encode());
            assert_eq!(again.next_message().ok().flatten(), Some(message.clone()));
            let _: Message = message;
        }
    }
    let _ = decoder.finish();
    // The receiver's split read of a batch frame: head and payload decoded apart.
    if let Some((head, payload)) = rest.split_first_chunk::<BATCH_HEAD_LEN>()
        && let Ok(message) = Message::decode_batch_parts(head, payload.to_vec())
    {
        let mut again = FrameDecoder::new(1 << 20);
        again.push(&message.encode());
        assert_eq!(again.next_message().ok().flatten(), Some(message));
    }
});
