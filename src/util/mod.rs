//! Small helpers shared by several components.
//!
//! Owns nothing stateful. Must never grow component logic: a helper lands here only when
//! two or more modules need exactly the same thing.

pub mod clock;
pub mod fdlimit;
pub mod fsutil;
pub mod id;
pub mod memory;
#[cfg(any(test, feature = "sim"))]
pub mod rng;
#[cfg(test)]
pub(crate) mod user_text;

/// This host's name (empty if the kernel will not say): a manager records it in its Node, an
/// agent in its session request.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
