//! The wire protocol: how calls travel between flotilla nodes.
//!
//! A connection carries frames: a u32 big-endian length and one protobuf
//! [`Envelope`](crate::proto::wire::Envelope) (see `proto/flotilla/wire.proto`). Frames belong
//! to streams, multiplexed by id; the side that opens a stream (the caller) uses odd ids if it
//! dialed the connection and even ids if it accepted it, so ids never collide.
//!
//! A stream's life, by call shape:
//! - unary: caller `REQUEST` → callee `RESPONSE` or `ERROR`;
//! - server-streaming: caller `REQUEST` → callee `STREAM_MESSAGE`* then `END_OF_STREAM` or
//!   `ERROR`;
//! - client-streaming: caller `REQUEST` (no payload), `STREAM_MESSAGE`*, `END_OF_STREAM` →
//!   callee `RESPONSE` or `ERROR` (possibly early, which ends the upload).
//!
//! Either side may send `CANCEL` to abandon a stream. A `REQUEST` may carry `timeout_us`, the
//! caller's deadline, so the callee can stop work nobody waits for.
//!
//! Flow control: each direction of a stream starts with a window of
//! [`STREAM_WINDOW_MESSAGES`] stream messages; the receiver returns credit with
//! `WINDOW_UPDATE` as its application consumes them. A sender with no credit blocks (until
//! its deadline); a peer that overruns the window has its stream failed with
//! `ResourceExhausted`. With every frame bounded, a stream's buffered memory is bounded by
//! window × frame limit.
//!
//! This module is sans-IO: it must never touch a socket, a thread or a clock.

pub mod codec;
pub mod status;

pub use codec::{
    DecodeError, FRAME_BYTES_MAX_DEFAULT, FRAME_HEADER_BYTES, FrameDecoder, FrameTooLarge,
    decode_envelope, encode_frame,
};
pub use status::{Code, RETRY_AFTER_MAX, RETRY_SOON, Reason, Status, WriteFate};

/// Stream messages a receiver accepts before it has returned any credit. Both sides assume
/// this value; it is part of the protocol.
pub const STREAM_WINDOW_MESSAGES: u32 = 16;
