//! Frame codec: a u32 big-endian length, then one protobuf [`Envelope`].
//!
//! The decoder is sans-IO: the connection feeds it plaintext and pulls whole envelopes out.
//! It refuses a frame whose announced length exceeds the limit as soon as the 4-byte header
//! is readable, before reserving any memory for the body, so a peer cannot make us allocate
//! by lying about a length. Must never read from or write to a socket itself.

use std::io::{self, Read};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::proto::wire::{Envelope, FrameKind};

/// Bytes of the length prefix before every envelope.
pub const FRAME_HEADER_BYTES: usize = 4;

/// Default limit on one encoded envelope (4 MiB). Anything larger is streamed in chunks.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 4 * 1024 * 1024;

/// Plaintext bytes the decoder asks for per read: big enough for throughput, small enough
/// that a connection's idle buffer stays small.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Why the byte stream could not be turned into envelopes. Every variant is fatal for the
/// connection: after a framing error the stream position is unknowable.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The peer announced a frame larger than the limit.
    #[error("frame of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    FrameTooLarge {
        /// The announced length.
        len_bytes: usize,
        /// The configured limit.
        max_bytes: usize,
    },
    /// The frame body is not a valid envelope.
    #[error("malformed envelope: {0}")]
    Malformed(String),
}

/// An envelope that cannot be sent because it is larger than the frame limit.
#[derive(Debug, thiserror::Error)]
#[error(
    "message of {len_bytes} bytes exceeds the frame limit of {max_bytes} bytes; stream it in chunks"
)]
pub struct FrameTooLarge {
    /// The encoded length.
    pub len_bytes: usize,
    /// The configured limit.
    pub max_bytes: usize,
}

/// Turns a byte stream into envelopes, one frame at a time.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    frame_bytes_max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames above `frame_bytes_max` bytes.
    pub fn new(frame_bytes_max: usize) -> Self {
        assert!(
            frame_bytes_max > 0,
            "a zero frame limit would refuse every frame"
        );
        Self {
            buf: BytesMut::new(),
            frame_bytes_max,
        }
    }

    /// Appends bytes received from the peer.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Reads once from `source` into the decoder's buffer; returns the bytes read (0 at end
    /// of stream).
    ///
    /// # Errors
    /// The IO error from `source`, including `WouldBlock`.
    pub fn read_from(&mut self, source: &mut impl Read) -> io::Result<usize> {
        let start = self.buf.len();
        self.buf.resize(start + READ_CHUNK_BYTES, 0);
        let result = source.read(&mut self.buf[start..]);
        let read = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(start + read);
        result
    }

    /// Lets go of the buffer's memory when it holds nothing (every frame read was taken):
    /// an idle connection then costs no read buffer. A buffer keeps the capacity of the
    /// largest batch it held; when each read reserved [`READ_CHUNK_BYTES`], that was 10 of
    /// the leader's 18 KB per agent session (heaptrack, 2,000 agents). The next read
    /// allocates again: one allocation per read, beside a TLS record's decryption. Frames
    /// already taken keep their bytes alive on their own (shared, reference-counted).
    pub fn release_idle_buffer(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// True while a frame has started but not fully arrived. The transport closes
    /// connections that stay mid-frame too long (slowloris defence).
    pub fn is_mid_frame(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next complete envelope, `None` if more bytes are needed.
    ///
    /// # Errors
    /// [`DecodeError`] if the announced length exceeds the limit or the body is not a valid
    /// envelope; the connection must then be closed.
    pub fn next_frame(&mut self) -> Result<Option<Envelope>, DecodeError> {
        if self.buf.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let header: [u8; FRAME_HEADER_BYTES] = self.buf[..FRAME_HEADER_BYTES]
            .try_into()
            .expect("slice has exactly FRAME_HEADER_BYTES bytes");
        let len_bytes = u32::from_be_bytes(header) as usize;
        if len_bytes > self.frame_bytes_max {
            return Err(DecodeError::FrameTooLarge {
                len_bytes,
                max_bytes: self.frame_bytes_max,
            });
        }
        let frame_bytes = FRAME_HEADER_BYTES + len_bytes;
        if self.buf.len() < frame_bytes {
            // The length is within the limit, so reserving the rest of the frame is bounded.
            self.buf.reserve(frame_bytes - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(FRAME_HEADER_BYTES);
        let body = self.buf.split_to(len_bytes).freeze();
        decode_envelope(body).map(Some)
    }
}

/// Decodes and validates one envelope body (without its length prefix).
///
/// # Errors
/// [`DecodeError::Malformed`] if the protobuf is invalid, the kind is unknown or
/// unspecified, or the stream id does not fit the kind (0 only for PING and PONG).
pub fn decode_envelope(body: Bytes) -> Result<Envelope, DecodeError> {
    let envelope = Envelope::decode(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    match FrameKind::try_from(envelope.kind) {
        Ok(FrameKind::Unspecified) | Err(_) => {
            return Err(DecodeError::Malformed(format!(
                "unknown frame kind {}",
                envelope.kind
            )));
        }
        Ok(_) => {}
    }
    let connection_level = matches!(
        FrameKind::try_from(envelope.kind),
        Ok(FrameKind::Ping | FrameKind::Pong)
    );
    if connection_level != (envelope.stream_id == 0) {
        return Err(DecodeError::Malformed(format!(
            "stream id {} does not fit frame kind {}: stream 0 is for PING and PONG only",
            envelope.stream_id, envelope.kind
        )));
    }
    Ok(envelope)
}

/// Encodes `envelope` with its length prefix.
///
/// # Errors
/// [`FrameTooLarge`] if the encoded envelope exceeds `frame_bytes_max`.
pub fn encode_frame(envelope: &Envelope, frame_bytes_max: usize) -> Result<Bytes, FrameTooLarge> {
    let len_bytes = envelope.encoded_len();
    if len_bytes > frame_bytes_max {
        return Err(FrameTooLarge {
            len_bytes,
            max_bytes: frame_bytes_max,
        });
    }
    let mut out = BytesMut::with_capacity(FRAME_HEADER_BYTES + len_bytes);
    out.put_u32(u32::try_from(len_bytes).expect("frame limit fits in u32"));
    envelope
        .encode(&mut out)
        .expect("buffer was sized by encoded_len");
    Ok(out.freeze())
}

/// The envelope overhead for a payload of `payload_bytes` with a short method name: what a
/// sender must leave free under the frame limit when it chunks a large value.
pub const ENVELOPE_OVERHEAD_BYTES_MAX: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(stream_id: u64, payload: &[u8]) -> Envelope {
        Envelope {
            stream_id,
            kind: FrameKind::Request as i32,
            method: "test.Echo".into(),
            payload: Bytes::copy_from_slice(payload),
            ..Default::default()
        }
    }

    #[test]
    fn decodes_frames_split_at_every_byte() {
        let a = encode_frame(&envelope(1, b"hello"), 1024).unwrap();
        let b = encode_frame(&envelope(3, b"world"), 1024).unwrap();
        let stream: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let mut decoder = FrameDecoder::new(1024);
        let mut got = Vec::new();
        for byte in &stream {
            decoder.extend(&[*byte]);
            while let Some(env) = decoder.next_frame().unwrap() {
                got.push((env.stream_id, env.payload));
            }
        }
        assert_eq!(
            got,
            vec![
                (1, Bytes::from_static(b"hello")),
                (3, Bytes::from_static(b"world"))
            ]
        );
        assert!(!decoder.is_mid_frame());
    }

    #[test]
    fn an_idle_decoder_lets_its_read_buffer_go_but_never_a_partial_frame() {
        let frame = encode_frame(&envelope(1, b"hello"), 1024).unwrap();
        let mut decoder = FrameDecoder::new(1024);
        decoder.read_from(&mut &frame[..3]).unwrap();
        decoder.release_idle_buffer();
        assert!(decoder.is_mid_frame(), "the partial frame was dropped");
        decoder.read_from(&mut &frame[3..]).unwrap();
        assert!(decoder.buf.capacity() >= READ_CHUNK_BYTES);
        let env = decoder.next_frame().unwrap().unwrap();
        decoder.release_idle_buffer();
        assert_eq!(
            decoder.buf.capacity(),
            0,
            "an idle connection kept its buffer"
        );
        assert_eq!(
            env.payload,
            Bytes::from_static(b"hello"),
            "a taken frame changed"
        );
        decoder.read_from(&mut &frame[..]).unwrap();
        assert_eq!(decoder.next_frame().unwrap().unwrap().stream_id, 1);
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut decoder = FrameDecoder::new(1024);
        decoder.extend(&(1025u32).to_be_bytes());
        match decoder.next_frame() {
            Err(DecodeError::FrameTooLarge {
                len_bytes: 1025,
                max_bytes: 1024,
            }) => {}
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        // Nothing was reserved for the refused body.
        assert!(decoder.buf.capacity() < 1024);
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would_refuse() {
        let big = envelope(1, &[0u8; 2000]);
        assert!(encode_frame(&big, 1024).is_err());
    }

    #[test]
    fn garbage_body_unknown_kind_and_stream_zero_are_malformed() {
        assert!(matches!(
            decode_envelope(Bytes::from_static(&[0xff, 0xff, 0xff])),
            Err(DecodeError::Malformed(_))
        ));
        let mut env = envelope(1, b"");
        env.kind = 42;
        let body = Bytes::from(env.encode_to_vec());
        assert!(matches!(
            decode_envelope(body),
            Err(DecodeError::Malformed(_))
        ));
        let body = Bytes::from(envelope(0, b"").encode_to_vec());
        assert!(matches!(
            decode_envelope(body),
            Err(DecodeError::Malformed(_))
        ));
    }
}
