//! The `flotilla-<name>` timer thread: runs callbacks at their deadlines for components that
//! must not block waiting for one.
//!
//! Owns one [`TimerWheel`] of callbacks, its clock origin, and the map from handle ids to
//! wheel ids. A [`Timers`] handle (cheap to clone) sends it commands over a bounded queue of
//! [`TIMER_COMMANDS_QUEUE_LEN_MAX`]; the thread sleeps until the next deadline or command.
//! Must never block: callbacks run on the thread, one after another, so a callback must only
//! hand work to another thread (`try_send`, a flag, a waker) and return; one that blocks
//! delays every other timer. A callback that panics is logged and the thread goes on.
//!
//! Cancellation is exact without waiting for the thread: each timer has a claim flag that
//! either [`Timers::cancel`] or the thread takes first, so a callback runs at most once and
//! never after a cancel that returned `true`. The cancel also asks the thread (best effort)
//! to drop the callback at once; if the queue is full, the callback is dropped at its deadline.
//!
//! Stopping: [`Timers::stop`] (any clone, idempotent), or the drop of the last clone, sets the
//! thread's stop flag (it runs no callback after seeing it) and drops the command queue's only
//! sender (new timers are refused with [`TimersError::Stopped`]; the thread, asleep, wakes),
//! then joins the thread. Pending callbacks are dropped, not run: those in the wheel and those
//! still queued, on the timer thread; dropping one may drop a `Timers` clone it captured,
//! which is safe. A callback running when `stop` is called finishes first. Memory: one wheel entry, one map entry and
//! one claim flag per pending timer, bounded by the callers' count of timers.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use parking_lot::{Mutex, RwLock};

use super::wheel::{TimerId, TimerWheel};

/// A callback run by the timer thread at its deadline. It must not block.
pub type Callback = Box<dyn FnOnce() + Send + 'static>;

/// The bound of the command queue from the handles to the timer thread (inserts and
/// cancels). When it is full, [`Timers::after`] fails with [`TimersError::QueueFull`] (the
/// thread is far behind: a callback blocks) and a cancel only sets its claim flag.
pub const TIMER_COMMANDS_QUEUE_LEN_MAX: usize = 4096;

/// The most commands the thread takes in one turn before it fires due timers again.
const COMMANDS_PER_TURN_MAX: usize = 1024;

/// The longest sleep with nothing due (a deadline found later is still met: the wheel's
/// answer is a lower bound, so the thread wakes, advances and sleeps again).
const IDLE_SLEEP_MAX: Duration = Duration::from_secs(3600);

/// Why [`Timers::after`] refused a timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimersError {
    /// The timers were stopped: the component is shutting down; do not retry.
    #[error("the timer thread has stopped (shutting down); do not retry")]
    Stopped,
    /// The command queue is full: the timer thread is far behind (a callback blocks).
    #[error(
        "the timer command queue is full ({TIMER_COMMANDS_QUEUE_LEN_MAX} commands): the timer \
         thread is behind; fail the operation or retry later"
    )]
    QueueFull,
}

/// One timer given by [`Timers::after`], to [`cancel`](Timers::cancel) it. Dropping it does not
/// cancel the timer.
#[derive(Debug)]
pub struct TimerHandle {
    id: u64,
    claimed: Arc<AtomicBool>,
}

/// A handle on a running timer thread. Clones share the thread; see the module
/// documentation for how it stops.
#[derive(Clone)]
pub struct Timers {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Timers")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

struct Shared {
    name: String,
    /// The time of the thread's wheel 0.
    origin: Instant,
    /// The only sender of the command queue; taken (dropped) by `stop`, which tells the
    /// thread to stop, and once the thread has dropped its receiver the queue is freed with
    /// the commands still in it. Read-locked around each send, so no send slips in after.
    commands: RwLock<Option<Sender<Command>>>,
    next_id: AtomicU64,
    /// Set by `stop` before it drops the sender: the thread runs no callback after seeing it.
    stopping: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    thread_id: ThreadId,
}

enum Command {
    Insert { deadline_ms: u64, timer: Pending },
    Cancel { id: u64 },
}

/// A timer as the thread keeps it.
struct Pending {
    id: u64,
    /// Taken by whichever comes first: the thread (to run the callback) or a cancel.
    claimed: Arc<AtomicBool>,
    callback: Callback,
}

impl Timers {
    /// Starts the thread `flotilla-<name>` (for example `flotilla-timers`).
    ///
    /// # Errors
    /// The OS error if the thread cannot start.
    pub fn start(name: &str) -> std::io::Result<Timers> {
        let origin = Instant::now();
        let (commands, received) = bounded(TIMER_COMMANDS_QUEUE_LEN_MAX);
        let thread_name = name.to_string();
        let stopping = Arc::new(AtomicBool::new(false));
        let thread_stopping = Arc::clone(&stopping);
        let thread = std::thread::Builder::new()
            .name(format!("flotilla-{name}"))
            .spawn(move || run(&thread_name, origin, &received, &thread_stopping))?;
        let shared = Shared {
            name: name.to_string(),
            origin,
            commands: RwLock::new(Some(commands)),
            next_id: AtomicU64::new(0),
            stopping,
            thread_id: thread.thread().id(),
            thread: Mutex::new(Some(thread)),
        };
        Ok(Timers {
            shared: Arc::new(shared),
        })
    }

    /// Runs `callback` on the timer thread once `delay` has passed (not before; as soon after
    /// as the thread gets to it). Never waits for the thread.
    ///
    /// # Errors
    /// [`TimersError::Stopped`] after [`stop`](Self::stop); [`TimersError::QueueFull`] when
    /// [`TIMER_COMMANDS_QUEUE_LEN_MAX`] commands wait for the thread. Either way the callback
    /// is dropped without running.
    pub fn after(&self, delay: Duration, callback: Callback) -> Result<TimerHandle, TimersError> {
        let commands = self.shared.commands.read();
        let Some(commands) = commands.as_ref() else {
            return Err(TimersError::Stopped);
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let claimed = Arc::new(AtomicBool::new(false));
        let timer = Pending {
            id,
            claimed: Arc::clone(&claimed),
            callback,
        };
        let deadline_ms = deadline_ms(self.shared.origin, delay);
        match commands.try_send(Command::Insert { deadline_ms, timer }) {
            Ok(()) => Ok(TimerHandle { id, claimed }),
            Err(TrySendError::Full(_)) => Err(TimersError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(TimersError::Stopped),
        }
    }

    /// Cancels a timer. Returns `true` when its callback will never run (it had not started;
    /// after a stop, it was dropped), `false` when it has already run or is running. Never
    /// blocks.
    pub fn cancel(&self, handle: TimerHandle) -> bool {
        if handle.claimed.swap(true, Ordering::AcqRel) {
            return false;
        }
        // Best effort: frees the callback now instead of at its deadline.
        if let Some(commands) = self.shared.commands.read().as_ref() {
            let _ = commands.try_send(Command::Cancel { id: handle.id });
        }
        true
    }

    /// Stops the thread and joins it; pending callbacks are dropped, not run. Idempotent, from
    /// any clone. Called from a callback (on the timer thread itself) it only signals: the
    /// thread exits once the callback returns.
    pub fn stop(&self) {
        self.shared.stop();
    }
}

impl Shared {
    fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        drop(self.commands.write().take());
        if std::thread::current().id() == self.thread_id {
            return;
        }
        // Held while joining, so that every `stop` returns only once the thread is gone.
        let mut thread = self.thread.lock();
        if let Some(thread) = thread.take()
            && thread.join().is_err()
        {
            log::error!("the timer thread flotilla-{} panicked", self.name);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Milliseconds from `origin` to `delay` from now, rounded up so that a timer never fires
/// early (the thread fires a deadline once the whole milliseconds elapsed reach it).
fn deadline_ms(origin: Instant, delay: Duration) -> u64 {
    let at = origin.elapsed().saturating_add(delay);
    u64::try_from(at.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// Whole milliseconds elapsed since `origin`.
fn elapsed_ms(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The thread's state.
struct Thread<'a> {
    name: &'a str,
    stopping: &'a AtomicBool,
    origin: Instant,
    wheel: TimerWheel<Pending>,
    /// Handle ids of the timers in the wheel.
    ids: HashMap<u64, TimerId>,
    fired: Vec<Pending>,
}

fn run(name: &str, origin: Instant, commands: &Receiver<Command>, stopping: &AtomicBool) {
    let mut thread = Thread {
        name,
        stopping,
        origin,
        wheel: TimerWheel::new(elapsed_ms(origin)),
        ids: HashMap::new(),
        fired: Vec::new(),
    };
    // Stopped: the pending callbacks drop with the wheel, the queued ones with the queue.
    while !thread.stopped() {
        thread.fire_due();
        match commands.recv_timeout(thread.sleep()) {
            Ok(command) => thread.take_commands(command, commands),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Thread<'_> {
    fn stopped(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn fire_due(&mut self) {
        self.wheel.advance(elapsed_ms(self.origin), &mut self.fired);
        for timer in std::mem::take(&mut self.fired) {
            if self.stopped() {
                return; // the rest are dropped
            }
            self.ids.remove(&timer.id);
            if timer.claimed.swap(true, Ordering::AcqRel) {
                continue; // cancelled, and the cancel command did not reach us first
            }
            if catch_unwind(AssertUnwindSafe(timer.callback)).is_err() {
                log::error!("a timer callback panicked on flotilla-{}", self.name);
            }
        }
    }

    /// How long to sleep before the next deadline.
    fn sleep(&self) -> Duration {
        let Some(deadline_ms) = self.wheel.next_deadline_ms() else {
            return IDLE_SLEEP_MAX;
        };
        self.origin
            .checked_add(Duration::from_millis(deadline_ms))
            .map_or(IDLE_SLEEP_MAX, |at| {
                at.saturating_duration_since(Instant::now())
                    .min(IDLE_SLEEP_MAX)
            })
    }

    fn take_commands(&mut self, first: Command, commands: &Receiver<Command>) {
        self.apply(first);
        for _ in 1..COMMANDS_PER_TURN_MAX {
            match commands.try_recv() {
                Ok(command) => self.apply(command),
                Err(_) => return,
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Insert { deadline_ms, timer } => {
                if timer.claimed.load(Ordering::Acquire) {
                    return; // cancelled before it reached the wheel
                }
                let id = timer.id;
                let wheel_id = self.wheel.insert(deadline_ms, timer);
                self.ids.insert(id, wheel_id);
            }
            Command::Cancel { id } => {
                if let Some(wheel_id) = self.ids.remove(&id) {
                    drop(self.wheel.cancel(wheel_id));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use crossbeam_channel::{TryRecvError, unbounded};

    use super::*;
    use crate::util::rng::SimRng;

    /// A bound on waits so a broken thread fails the test instead of hanging it (not a
    /// timing assertion).
    const WAIT: Duration = Duration::from_secs(30);

    #[test]
    fn callbacks_run_on_the_named_thread_not_before_their_deadline() {
        let timers = Timers::start("timers").expect("start");
        let (sent, received) = unbounded();
        let asked = Instant::now();
        for delay_ms in [0u64, 5, 30, 1] {
            let sent = sent.clone();
            let delay = Duration::from_millis(delay_ms);
            timers
                .after(
                    delay,
                    Box::new(move || {
                        let thread = std::thread::current().name().map(str::to_string);
                        sent.send((delay, asked.elapsed(), thread)).expect("send");
                    }),
                )
                .expect("after");
        }
        let mut delays = Vec::new();
        for _ in 0..4 {
            let (delay, ran_after, thread) = received.recv_timeout(WAIT).expect("fired");
            assert!(ran_after >= delay, "ran before its deadline");
            assert_eq!(thread.as_deref(), Some("flotilla-timers"));
            delays.push(delay.as_millis());
        }
        delays.sort_unstable();
        assert_eq!(delays, [0, 1, 5, 30]);
        timers.stop();
    }

    /// Holds the timer thread inside a callback until the returned sender is dropped or sent to.
    fn block_thread(timers: &Timers) -> Sender<()> {
        let (release, released) = bounded::<()>(0);
        let (entered, inside) = bounded::<()>(1);
        timers
            .after(
                Duration::ZERO,
                Box::new(move || {
                    entered.send(()).expect("test waits");
                    let _ = released.recv();
                }),
            )
            .expect("after");
        inside.recv_timeout(WAIT).expect("the blocker runs");
        release
    }

    #[test]
    fn a_cancel_before_the_deadline_prevents_the_callback() {
        let timers = Timers::start("timers").expect("start");
        let release = block_thread(&timers);
        // Due already, but the thread is busy: the cancel wins.
        let (sent, cancelled_calls) = unbounded::<()>();
        let handle = timers
            .after(
                Duration::ZERO,
                Box::new(move || sent.send(()).expect("send")),
            )
            .expect("after");
        assert!(timers.cancel(handle));
        // And a cancel reaching the thread before its deadline.
        let (sent_late, late_calls) = unbounded::<()>();
        let late = timers
            .after(
                Duration::from_millis(20),
                Box::new(move || sent_late.send(()).expect("send")),
            )
            .expect("after");
        let (sent_sentinel, sentinel) = unbounded::<()>();
        timers
            .after(
                Duration::from_millis(40),
                Box::new(move || sent_sentinel.send(()).expect("send")),
            )
            .expect("after");
        assert!(timers.cancel(late));
        drop(release);
        sentinel.recv_timeout(WAIT).expect("the sentinel fires");
        timers.stop();
        // Dropped without running: the senders are gone and nothing was sent.
        assert_eq!(cancelled_calls.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(late_calls.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn a_cancel_after_the_callback_ran_returns_false() {
        let timers = Timers::start("timers").expect("start");
        let (sent, received) = unbounded::<()>();
        let handle = timers
            .after(
                Duration::ZERO,
                Box::new(move || sent.send(()).expect("send")),
            )
            .expect("after");
        received.recv_timeout(WAIT).expect("fired");
        assert!(!timers.cancel(handle));
    }

    #[test]
    fn many_timers_each_run_once_and_cancelled_ones_never() {
        let timers = Timers::start("timers").expect("start");
        let mut rng = SimRng::new(7);
        let (sent, received) = unbounded::<(usize, Instant, Instant)>();
        let mut cancelled = HashSet::new();
        let count = 3_000;
        for i in 0..count {
            let delay = Duration::from_millis(rng.below(200));
            let sent = sent.clone();
            let asked = Instant::now();
            let callback =
                Box::new(move || sent.send((i, asked + delay, Instant::now())).expect("send"));
            let handle = timers.after(delay, callback).expect("after");
            if rng.below(4) == 0 && timers.cancel(handle) {
                cancelled.insert(i);
            }
        }
        drop(sent);
        let mut ran = HashSet::new();
        while ran.len() + cancelled.len() < count {
            let (i, deadline, at) = received.recv_timeout(WAIT).expect("every timer fires");
            assert!(at >= deadline, "ran before its deadline");
            assert!(ran.insert(i), "ran twice");
            assert!(!cancelled.contains(&i), "a cancelled callback ran");
        }
        timers.stop();
        // Every callback is gone now (run or dropped): the channel is closed and empty.
        assert_eq!(
            received.recv_timeout(WAIT),
            Err(RecvTimeoutError::Disconnected)
        );
    }

    #[test]
    fn stop_drops_pending_callbacks_and_joins_and_refuses_new_ones() {
        let timers = Timers::start("timers").expect("start");
        let (sent, received) = unbounded::<()>();
        for _ in 0..100 {
            let sent = sent.clone();
            timers
                .after(
                    Duration::from_secs(3600),
                    Box::new(move || sent.send(()).expect("send")),
                )
                .expect("after");
        }
        // A pending callback holding a handle: dropping it on the thread must be safe.
        let clone = timers.clone();
        timers
            .after(Duration::from_secs(3600), Box::new(move || clone.stop()))
            .expect("after");
        drop(sent);
        let other = timers.clone();
        timers.stop();
        assert_eq!(received.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(
            other.after(Duration::ZERO, Box::new(|| {})).err(),
            Some(TimersError::Stopped)
        );
        other.stop();
    }

    #[test]
    fn dropping_the_last_handle_stops_the_thread() {
        let timers = Timers::start("timers").expect("start");
        let (sent, received) = unbounded::<()>();
        timers
            .after(
                Duration::from_secs(3600),
                Box::new(move || sent.send(()).expect("send")),
            )
            .expect("after");
        drop(timers);
        assert_eq!(received.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn a_callback_may_schedule_and_stop_and_a_panic_does_not_kill_the_thread() {
        let timers = Timers::start("timers").expect("start");
        timers
            .after(
                Duration::ZERO,
                Box::new(|| panic!("a callback panics (expected)")),
            )
            .expect("after");
        let (sent, received) = unbounded::<&str>();
        let inner = timers.clone();
        timers
            .after(
                Duration::from_millis(1),
                Box::new(move || {
                    let again = sent.clone();
                    inner
                        .after(
                            Duration::from_millis(1),
                            Box::new(move || again.send("second").expect("send")),
                        )
                        .expect("after from a callback");
                    sent.send("first").expect("send");
                }),
            )
            .expect("after");
        assert_eq!(received.recv_timeout(WAIT), Ok("first"));
        assert_eq!(received.recv_timeout(WAIT), Ok("second"));
        let stopper = timers.clone();
        let (stopped, stop_returned) = unbounded::<()>();
        timers
            .after(
                Duration::ZERO,
                Box::new(move || {
                    stopper.stop();
                    stopped.send(()).expect("send");
                }),
            )
            .expect("after");
        stop_returned
            .recv_timeout(WAIT)
            .expect("stop from a callback returns");
        timers.stop();
    }
}
