//! Per-stream state shared between the reactor and the thread that uses the stream.
//!
//! [`StreamCtl`] holds the sending side's flow-control credit and the stream's end state.
//! A user thread waits on it for credit; the reactor adds credit (WINDOW_UPDATE) and ends
//! the stream (CANCEL, ERROR, connection loss). It must never hold the lock across IO.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::conn::{ConnShared, Outbound, envelope};

use crate::proto::wire::{Envelope, FrameKind};
use crate::wire::{STREAM_WINDOW_MESSAGES, Status};

/// What the reactor hands to the thread reading a stream.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// One STREAM_MESSAGE payload.
    Message(Bytes),
    /// The RESPONSE payload (unary and client-streaming calls).
    Response(Bytes),
    /// END_OF_STREAM: the peer sends nothing more.
    End,
    /// ERROR or CANCEL from the peer, or a local protocol failure.
    Failed(Status),
}

/// Capacity of a stream's inbound channel: the whole window plus one terminal frame, so a
/// peer that respects flow control can never find it full.
pub(crate) const INBOUND_CAPACITY: usize = STREAM_WINDOW_MESSAGES as usize + 2;

/// Longest a waiting caller polls for its reply before it sleeps (see
/// `StreamReader::spin_for_reply`).
pub(crate) const REPLY_SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// Callers poll only on a connection whose calls waited on average less than this for
/// their reply (`ReplyWait::is_fast`): the polling window plus what a sleeping
/// caller pays to be woken (50–100 µs on this machine's virtual CPUs), so that a
/// connection whose fast replies are measured asleep keeps polling. Replicated writes
/// (300 µs and more) stop polling and leave the CPU to the threads that produce them.
pub(crate) const REPLY_FAST_AVG_US_MAX: u64 = 150;

/// Callers allowed to spin for a reply at once, in this process.
pub(crate) const SPINNING_CALLERS_MAX: usize = 1;

/// Callers waiting for a reply beyond which nobody spins.
pub(crate) const SPIN_WAITING_CALLERS_MAX: usize = 2;

static SPINNING_CALLERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static WAITING_CALLERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Credit returned to the peer once the application has consumed this many messages:
/// half the window, so the peer rarely stalls and updates stay rare.
pub(crate) const CREDIT_RETURN_BATCH: u32 = STREAM_WINDOW_MESSAGES / 2;

#[derive(Debug)]
struct CtlState {
    send_credit: u32,
    ended: Option<Status>,
}

/// Flow-control credit and end state of one stream.
#[derive(Debug)]
pub(crate) struct StreamCtl {
    state: Mutex<CtlState>,
    changed: Condvar,
}

impl StreamCtl {
    /// A stream with the protocol's initial window.
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(CtlState {
                send_credit: STREAM_WINDOW_MESSAGES,
                ended: None,
            }),
            changed: Condvar::new(),
        }
    }

    /// Takes one message of credit, waiting until the peer grants some, the stream ends,
    /// or `deadline` passes.
    pub(crate) fn acquire_credit(&self, deadline: Option<Instant>) -> Result<(), Status> {
        let mut state = self.state.lock();
        loop {
            if let Some(status) = &state.ended {
                return Err(status.clone());
            }
            if state.send_credit > 0 {
                state.send_credit -= 1;
                return Ok(());
            }
            match deadline {
                Some(deadline) => {
                    if self.changed.wait_until(&mut state, deadline).timed_out() {
                        return Err(Status::deadline_exceeded(
                            "deadline passed while waiting for the peer to accept more stream \
                             messages (it is reading slowly)",
                        ));
                    }
                }
                None => self.changed.wait(&mut state),
            }
        }
    }

    /// Takes one message of credit if the peer granted some, never waiting: `Ok(false)`
    /// when there is none.
    pub(crate) fn try_acquire_credit(&self) -> Result<bool, Status> {
        let mut state = self.state.lock();
        if let Some(status) = &state.ended {
            return Err(status.clone());
        }
        if state.send_credit == 0 {
            return Ok(false);
        }
        state.send_credit -= 1;
        Ok(true)
    }

    /// Adds credit granted by the peer.
    pub(crate) fn add_credit(&self, credit: u32) {
        let mut state = self.state.lock();
        state.send_credit = state.send_credit.saturating_add(credit);
        self.changed.notify_all();
    }

    /// Ends the stream with `status` (the first end wins) and wakes any waiting sender.
    pub(crate) fn end(&self, status: Status) {
        let mut state = self.state.lock();
        if state.ended.is_none() {
            state.ended = Some(status);
        }
        self.changed.notify_all();
    }

    /// How the stream ended, if it has.
    pub(crate) fn ended(&self) -> Option<Status> {
        self.state.lock().ended.clone()
    }
}

/// The sending half of one stream, used by callers and handlers alike.
pub(crate) struct StreamWriter {
    pub(crate) conn: Arc<ConnShared>,
    pub(crate) stream_id: u64,
    pub(crate) ctl: Arc<StreamCtl>,
    pub(crate) deadline: Option<Instant>,
}

impl StreamWriter {
    /// Sends one STREAM_MESSAGE, waiting for credit and send-buffer space until the
    /// stream's deadline.
    pub(crate) fn send_message(&self, payload: Bytes) -> Result<(), Status> {
        self.send_message_until(payload, self.deadline)
    }

    /// Sends one STREAM_MESSAGE, waiting for credit and send-buffer space until `deadline`
    /// (which callers clamp to the stream's own deadline).
    pub(crate) fn send_message_until(
        &self,
        payload: Bytes,
        deadline: Option<Instant>,
    ) -> Result<(), Status> {
        self.ctl.acquire_credit(deadline)?;
        let mut env = envelope(self.stream_id, FrameKind::StreamMessage);
        env.payload = payload;
        let frame = self.conn.encode(&env)?;
        self.conn.push(Outbound::Frame(frame), deadline)
    }

    /// Sends one STREAM_MESSAGE if the peer has credit left and the send buffer has room,
    /// never waiting: `Ok(false)` when it has not (nothing was sent, no credit is taken).
    ///
    /// # Errors
    /// The stream's end reason or the connection's close reason.
    pub(crate) fn try_send_message(&self, payload: Bytes) -> Result<bool, Status> {
        if !self.ctl.try_acquire_credit()? {
            return Ok(false);
        }
        let mut env = envelope(self.stream_id, FrameKind::StreamMessage);
        env.payload = payload;
        let frame = self.conn.encode(&env)?;
        match self.conn.push_nowait(Outbound::Frame(frame)) {
            Ok(()) => Ok(true),
            Err(status) if status.code == crate::wire::Code::ResourceExhausted => {
                self.ctl.add_credit(1);
                Ok(false)
            }
            Err(status) => Err(status),
        }
    }

    /// The earlier of the stream's deadline and `now + timeout`.
    pub(crate) fn deadline_within(&self, timeout: std::time::Duration) -> Instant {
        let local = Instant::now() + timeout;
        self.deadline.map_or(local, |d| d.min(local))
    }

    /// Sends a frame that ends our side of the stream (RESPONSE, END_OF_STREAM, ERROR or
    /// CANCEL). Large frames (a RESPONSE) wait for buffer space; the others never block.
    pub(crate) fn finish(&self, env: Envelope) -> Result<(), Status> {
        debug_assert_eq!(env.stream_id, self.stream_id);
        let frame = self.conn.encode(&env)?;
        let item = Outbound::Finish {
            stream_id: self.stream_id,
            frame,
        };
        if env.kind == FrameKind::Response as i32 {
            self.conn.push(item, self.deadline)
        } else {
            self.conn.push_control(item);
            Ok(())
        }
    }

    /// Sends a RESPONSE without ever waiting for buffer space.
    ///
    /// # Errors
    /// As [`ConnShared::push_nowait`](super::conn::ConnShared::push_nowait).
    pub(crate) fn finish_nowait(&self, env: Envelope) -> Result<(), Status> {
        debug_assert_eq!(env.stream_id, self.stream_id);
        let frame = self.conn.encode(&env)?;
        self.conn.push_nowait(Outbound::Finish {
            stream_id: self.stream_id,
            frame,
        })
    }

    /// Ends our side with an ERROR frame carrying `status`.
    pub(crate) fn fail(&self, status: &Status) {
        let mut env = envelope(self.stream_id, FrameKind::Error);
        env.status = Some(status.to_proto());
        // An ERROR is small and control-class: it cannot fail for lack of space.
        let _ = self.finish(env);
    }

    /// Abandons the stream: CANCEL to the peer, and local senders stop.
    pub(crate) fn cancel(&self, why: &str) {
        self.ctl.end(Status::cancelled(why.to_string()));
        let _ = self.finish(envelope(self.stream_id, FrameKind::Cancel));
    }

    /// The status to report when the inbound side vanished: the stream's own end reason if
    /// it has one, else the connection's.
    pub(crate) fn vanished_status(&self) -> Status {
        self.ctl
            .ended()
            .or_else(|| self.conn.close_reason())
            .unwrap_or_else(|| Status::cancelled("the stream was abandoned"))
    }
}

/// The receiving half of one stream: reads what the reactor delivered and returns credit.
pub(crate) struct StreamReader {
    pub(crate) rx: crossbeam_channel::Receiver<Inbound>,
    /// Messages consumed since credit was last returned.
    pub(crate) consumed_unreturned: u32,
    /// For a call we made, when it was sent, until its first reply (which times the
    /// connection's reply wait); `None` on the callee's side.
    pub(crate) opened_at: Option<Instant>,
}

impl StreamReader {
    /// Waits for the next inbound item until `deadline` (callers clamp it to the stream's
    /// own deadline). Returns credit for consumed messages in batches.
    pub(crate) fn recv_until(
        &mut self,
        writer: &StreamWriter,
        deadline: Option<Instant>,
    ) -> Result<Inbound, Status> {
        // Polling pays only for a reply that is about to arrive: the first reply of a call
        // on a connection whose replies recently came within the polling bound. A slow
        // call (a replicated write) would only take the CPU its own reply needs.
        let first_reply_of = self.opened_at.take();
        let spin = first_reply_of.is_some() && writer.conn.reply_wait.is_fast();
        WAITING_CALLERS.fetch_add(1, Ordering::AcqRel);
        let spun = if spin { self.spin_for_reply() } else { None };
        let received = match spun {
            Some(inbound) => Ok(inbound),
            None => self.recv_blocking(deadline),
        };
        WAITING_CALLERS.fetch_sub(1, Ordering::AcqRel);
        if let (Some(opened_at), Ok(_)) = (first_reply_of, &received) {
            writer.conn.reply_wait.record(opened_at.elapsed());
        }
        match received {
            Ok(Inbound::Message(payload)) => {
                self.return_credit(writer);
                Ok(Inbound::Message(payload))
            }
            Ok(other) => Ok(other),
            Err(None) => Err(Status::deadline_exceeded(format!(
                "no reply from {} before the deadline",
                writer.conn.peer_addr
            ))),
            Err(Some(())) => Err(writer.vanished_status()),
        }
    }

    /// Polls for an item for a few microseconds before sleeping: a reply on loopback
    /// usually arrives within a round trip, and waking a sleeping thread on an idle core
    /// costs more than the round trip itself. Bounded by [`REPLY_SPIN`], so a slow reply
    /// costs a caller at most that much CPU.
    fn spin_for_reply(&self) -> Option<Inbound> {
        // Only when few callers wait, and one spinner per process at most: with many
        // callers, replies arrive often enough that sleeping is cheap, and spinning would
        // take the CPU the reactor needs to deliver them (this host has few cores).
        if WAITING_CALLERS.load(Ordering::Acquire) > SPIN_WAITING_CALLERS_MAX {
            return self.rx.try_recv().ok();
        }
        if SPINNING_CALLERS.fetch_add(1, Ordering::AcqRel) >= SPINNING_CALLERS_MAX {
            SPINNING_CALLERS.fetch_sub(1, Ordering::AcqRel);
            return self.rx.try_recv().ok();
        }
        let started = Instant::now();
        let received = loop {
            if let Ok(inbound) = self.rx.try_recv() {
                break Some(inbound);
            }
            if started.elapsed() >= REPLY_SPIN {
                break None;
            }
            std::hint::spin_loop();
        };
        SPINNING_CALLERS.fetch_sub(1, Ordering::AcqRel);
        received
    }

    /// Sleeps until an item, the deadline, or the end of the stream. `Err(None)`: deadline;
    /// `Err(Some(()))`: the sending side vanished.
    fn recv_blocking(&self, deadline: Option<Instant>) -> Result<Inbound, Option<()>> {
        match deadline {
            Some(deadline) => self.rx.recv_deadline(deadline).map_err(|e| match e {
                crossbeam_channel::RecvTimeoutError::Timeout => None,
                crossbeam_channel::RecvTimeoutError::Disconnected => Some(()),
            }),
            None => self.rx.recv().map_err(|_| Some(())),
        }
    }

    fn return_credit(&mut self, writer: &StreamWriter) {
        self.consumed_unreturned += 1;
        if self.consumed_unreturned >= CREDIT_RETURN_BATCH {
            let mut env = envelope(writer.stream_id, FrameKind::WindowUpdate);
            env.credit = self.consumed_unreturned;
            self.consumed_unreturned = 0;
            if let Ok(frame) = writer.conn.encode(&env) {
                writer.conn.push_control(Outbound::Frame(frame));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::wire::Code;

    #[test]
    fn credit_runs_out_and_is_refilled_by_the_peer() {
        let ctl = Arc::new(StreamCtl::new());
        for _ in 0..STREAM_WINDOW_MESSAGES {
            ctl.acquire_credit(None).unwrap();
        }
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(
            ctl.acquire_credit(Some(soon)).unwrap_err().code,
            Code::DeadlineExceeded
        );
        let granter = {
            let ctl = ctl.clone();
            std::thread::spawn(move || ctl.add_credit(1))
        };
        ctl.acquire_credit(None).unwrap();
        granter.join().unwrap();
    }

    #[test]
    fn end_wakes_a_blocked_sender_with_the_first_reason() {
        let ctl = Arc::new(StreamCtl::new());
        for _ in 0..STREAM_WINDOW_MESSAGES {
            ctl.acquire_credit(None).unwrap();
        }
        let ender = {
            let ctl = ctl.clone();
            std::thread::spawn(move || {
                ctl.end(Status::cancelled("peer cancelled"));
                ctl.end(Status::unavailable("later reason is ignored"));
            })
        };
        assert_eq!(ctl.acquire_credit(None).unwrap_err().code, Code::Cancelled);
        ender.join().unwrap();
        assert_eq!(ctl.ended().unwrap().code, Code::Cancelled);
    }
}
