//! Small helpers shared by several components.
//!
//! Owns nothing stateful. Must never grow component logic: a helper lands here only when
//! two or more modules need exactly the same thing.

pub mod clock;
pub mod fsutil;
pub mod id;
pub mod memory;
#[cfg(test)]
pub(crate) mod user_text;
