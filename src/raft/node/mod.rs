//! The threads that drive the Raft core over the transport (work in progress: the wire
//! codec and the member directory).

pub mod codec;
pub mod directory;
