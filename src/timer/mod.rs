//! Timers for many deadlines: heartbeat deadlines, grace periods, rate-limit windows,
//! batching delays, backoff.
//!
//! [`wheel`] is the sans-IO hierarchical timer wheel (no clock, no thread: time is passed in);
//! [`service`] is the `flotilla-<name>` thread that runs callbacks at their deadlines on one.
//! Owns nothing of the product and must never import a module above `util`: it sits in the
//! bottom layer so that every component can use it.

pub mod service;
pub mod wheel;

pub use service::{Callback, TIMER_COMMANDS_QUEUE_LEN_MAX, TimerHandle, Timers, TimersError};
pub use wheel::{TimerId, TimerWheel};
