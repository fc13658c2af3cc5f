//! How a control call is answered when no thread waits for its outcome: a [`Done`]
//! callback, and [`AnswerOnce`] for answers that several paths race to give (the leader's
//! reply, a failure to send, a deadline).
//!
//! Owns nothing but the hand-off. Must never answer a call twice nor block the thread that
//! answers.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::wire::Status;

/// Where a call's outcome goes. Called once, on a control pool thread or on the thread that
/// started the call; it must not wait for another call.
pub(crate) type Done<T> = Box<dyn FnOnce(Result<T, Status>) + Send>;

/// A [`Done`] shared by the paths that may answer: the first answer is given, later ones
/// are dropped (and say so in the log, at debug).
pub(crate) struct AnswerOnce<T> {
    slot: Arc<Mutex<Option<Done<T>>>>,
}

impl<T> Clone for AnswerOnce<T> {
    fn clone(&self) -> Self {
        Self {
            slot: Arc::clone(&self.slot),
        }
    }
}

impl<T> AnswerOnce<T> {
    /// Shares `done`.
    pub(crate) fn new(done: Done<T>) -> Self {
        Self {
            slot: Arc::new(Mutex::new(Some(done))),
        }
    }

    /// Answers with `result` if no one has yet; returns whether this was the answer.
    pub(crate) fn answer(&self, result: Result<T, Status>) -> bool {
        // Taken out before it runs: `done` may take long enough (building a reply) that
        // holding the lock would stall a racing path.
        let done = self.slot.lock().take();
        match done {
            Some(done) => {
                done(result);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Code;

    #[test]
    fn only_the_first_answer_is_given() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let once = AnswerOnce::new(Box::new(move |result: Result<u32, Status>| {
            tx.send(result).expect("receiver alive");
        }));
        let other = once.clone();
        assert!(once.answer(Ok(7)));
        assert!(!other.answer(Err(Status::new(Code::Unavailable, "late"))));
        assert_eq!(rx.try_recv().expect("one answer"), Ok(7));
        assert!(rx.try_recv().is_err(), "a second answer was given");
    }
}
