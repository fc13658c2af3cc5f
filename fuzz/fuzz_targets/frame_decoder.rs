//! Feeds arbitrary bytes, split at arbitrary points, to the frame decoder.
//!
//! Properties checked on every input: the decoder never panics; it never accepts a frame
//! above its limit; every envelope it accepts re-encodes and decodes to itself.
#![no_main]

use bytes::Bytes;
use flotilla::wire::{DecodeError, FrameDecoder, decode_envelope, encode_frame};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const FRAME_BYTES_MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    // Chunk sizes 1..=256 exercise headers and bodies split at every position.
    let chunk = usize::from(split) + 1;
    let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX);
    for piece in rest.chunks(chunk) {
        decoder.extend(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(envelope)) => {
                    assert!(envelope.encoded_len() <= FRAME_BYTES_MAX);
                    let frame = encode_frame(&envelope, FRAME_BYTES_MAX)
                        .expect("an accepted envelope fits the limit when re-encoded");
                    let again = decode_envelope(frame.slice(4..)).expect("re-encoded frame decodes");
                    assert_eq!(again, envelope);
                }
                Ok(None) => break,
                Err(DecodeError::FrameTooLarge { len_bytes, max_bytes }) => {
                    assert!(len_bytes > max_bytes);
                    return;
                }
                Err(DecodeError::Malformed(_)) => return,
            }
        }
    }
    // The envelope parser on its own, without framing.
    let _ = decode_envelope(Bytes::copy_from_slice(rest));
});
