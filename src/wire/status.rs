//! Call outcomes: status codes numbered like gRPC's, and the [`Status`] error every call
//! returns on failure.
//!
//! Must never carry transport state: a status is a value that crosses the wire.

use std::fmt;
use std::time::Duration;

use crate::proto;

/// Why a call failed. Numbered like gRPC's codes so operators can read them the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Code {
    /// Not an error.
    Ok = 0,
    /// The caller cancelled the call.
    Cancelled = 1,
    /// An error with no better code (also used for codes this build does not know).
    Unknown = 2,
    /// The request is malformed or names something impossible; retrying will not help.
    InvalidArgument = 3,
    /// The call's deadline passed before it completed.
    DeadlineExceeded = 4,
    /// The named object does not exist.
    NotFound = 5,
    /// The object to create already exists.
    AlreadyExists = 6,
    /// The caller's identity is known but not allowed to do this.
    PermissionDenied = 7,
    /// A limit was hit (queue full, rate limit, flow-control window exceeded).
    ResourceExhausted = 8,
    /// The system is not in a state that allows this call (for example a version conflict).
    FailedPrecondition = 9,
    /// The call was aborted, typically by a concurrency conflict; retry the whole operation.
    Aborted = 10,
    /// A position or value lies outside the valid range.
    OutOfRange = 11,
    /// The method is not served here.
    Unimplemented = 12,
    /// An invariant broke inside the callee.
    Internal = 13,
    /// The callee cannot be reached or is shutting down; retrying may help.
    Unavailable = 14,
    /// Data was lost or corrupted.
    DataLoss = 15,
    /// The method needs a client certificate and the caller presented none.
    Unauthenticated = 16,
}

impl Code {
    /// The code carried on the wire as `value`; codes from a newer peer read as `Unknown`.
    pub fn from_u32(value: u32) -> Self {
        match value {
            0 => Self::Ok,
            1 => Self::Cancelled,
            3 => Self::InvalidArgument,
            4 => Self::DeadlineExceeded,
            5 => Self::NotFound,
            6 => Self::AlreadyExists,
            7 => Self::PermissionDenied,
            8 => Self::ResourceExhausted,
            9 => Self::FailedPrecondition,
            10 => Self::Aborted,
            11 => Self::OutOfRange,
            12 => Self::Unimplemented,
            13 => Self::Internal,
            14 => Self::Unavailable,
            15 => Self::DataLoss,
            16 => Self::Unauthenticated,
            _ => Self::Unknown,
        }
    }

    /// The name operators see, like gRPC's (`NotFound`, `Unavailable`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "Ok",
            Self::Cancelled => "Cancelled",
            Self::Unknown => "Unknown",
            Self::InvalidArgument => "InvalidArgument",
            Self::DeadlineExceeded => "DeadlineExceeded",
            Self::NotFound => "NotFound",
            Self::AlreadyExists => "AlreadyExists",
            Self::PermissionDenied => "PermissionDenied",
            Self::ResourceExhausted => "ResourceExhausted",
            Self::FailedPrecondition => "FailedPrecondition",
            Self::Aborted => "Aborted",
            Self::OutOfRange => "OutOfRange",
            Self::Unimplemented => "Unimplemented",
            Self::Internal => "Internal",
            Self::Unavailable => "Unavailable",
            Self::DataLoss => "DataLoss",
            Self::Unauthenticated => "Unauthenticated",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

pub use crate::proto::wire::Reason;

/// The [`Status::reason`] of a refusal that a short wait is expected to fix, with nothing
/// for the caller to change: no leader right now (an election), a leadership transfer or
/// membership change in progress, a leader that cannot be reached, the cluster object or CA
/// key not yet replicated to this manager. A caller retries such a refusal for a bounded
/// time (the CLI: `cli::control::RETRY_SOON_ATTEMPTS_MAX` attempts) instead of failing: a
/// message that says "retry in a moment" is a promise. Nothing was done, so repeating the
/// call is safe.
pub const RETRY_SOON: Reason = Reason::RetrySoon;

/// The longest [`Status::retry_after`] a status carries (a larger one on the wire is cut to
/// this): a hint, never a reason to wait long.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(10);

/// What a failed write's [`Status`] says about whether the write took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFate {
    /// Refused before anything was done ([`Reason::RetrySoon`], [`Reason::NotLeader`],
    /// [`Reason::NotSent`]): repeating it is safe.
    NotDone,
    /// It may or may not have taken effect: the reply was lost after the request was sent
    /// ([`Reason::OutcomeUnknown`], or a transport failure: `Unavailable`,
    /// `DeadlineExceeded`, `Cancelled`, `Unknown`, `Internal`, `DataLoss`). Only a write
    /// carrying a request id may be repeated (the repeat gets the first attempt's answer).
    Unknown,
    /// The callee's definitive answer (an invalid request, a version conflict, not found,
    /// not allowed, …).
    Refused,
}

/// A failed call: a code and a message for a human that says what went wrong and, where
/// possible, what to do next; and, for the failures a caller acts on, a reason and its
/// details. Callers branch on the code and the reason, never on the message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Status {
    /// The failure class.
    pub code: Code,
    /// What happened, for a human.
    pub message: String,
    /// The machine-readable cause ([`Reason::Unspecified`] if none), e.g.
    /// [`crate::ca::CERTIFICATE_REVOKED`].
    pub reason: Reason,
    /// With [`Reason::NotLeader`]: the leader's Raft id, if known.
    pub leader_id: Option<u64>,
    /// With [`Reason::NotLeader`]: the leader's address, if known.
    pub leader_addr: Option<String>,
    /// With [`Reason::RetrySoon`] or [`Reason::NotLeader`]: how long to wait before
    /// retrying, if the callee knows (at most [`RETRY_AFTER_MAX`]). Milliseconds, so that a
    /// status stays small (it travels in every `Err`).
    pub retry_after_ms: Option<u32>,
}

impl Status {
    /// A status with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason: Reason::Unspecified,
            leader_id: None,
            leader_addr: None,
            retry_after_ms: None,
        }
    }

    /// This status with the machine-readable `reason`.
    #[must_use]
    pub fn with_reason(mut self, reason: Reason) -> Self {
        self.reason = reason;
        self
    }

    /// This status with a hint of how long to wait before retrying.
    #[must_use]
    pub fn with_retry_after(mut self, wait: Duration) -> Self {
        let wait_ms = wait.min(RETRY_AFTER_MAX).as_millis();
        self.retry_after_ms = Some(u32::try_from(wait_ms).expect("RETRY_AFTER_MAX fits"));
        self
    }

    /// How long to wait before retrying, if the callee said.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after_ms
            .map(|wait_ms| Duration::from_millis(u64::from(wait_ms)))
    }

    /// A refusal the same call may pass after a short wait ([`RETRY_SOON`]).
    pub fn retry_soon(code: Code, message: impl Into<String>) -> Self {
        Self::new(code, message).with_reason(RETRY_SOON)
    }

    /// A refusal by a manager that does not lead ([`Reason::NotLeader`]), naming the leader
    /// when it is known.
    pub fn not_leader(
        code: Code,
        message: impl Into<String>,
        leader_id: Option<u64>,
        leader_addr: Option<String>,
    ) -> Self {
        let mut status = Self::new(code, message).with_reason(Reason::NotLeader);
        status.leader_id = leader_id;
        status.leader_addr = leader_addr;
        status
    }

    /// A call handed on whose answer was lost ([`Reason::OutcomeUnknown`]).
    pub fn outcome_unknown(code: Code, message: impl Into<String>) -> Self {
        Self::new(code, message).with_reason(Reason::OutcomeUnknown)
    }

    /// True for a refusal that a short wait may fix and that did nothing:
    /// [`Reason::RetrySoon`], or [`Reason::NotLeader`] (a caller that cannot go to the
    /// leader itself waits for it to be known here).
    pub fn is_retry_soon(&self) -> bool {
        matches!(self.reason, Reason::RetrySoon | Reason::NotLeader)
    }

    /// The leader's address when this is a [`Reason::NotLeader`] refusal that names one.
    pub fn leader_hint(&self) -> Option<&str> {
        (self.reason == Reason::NotLeader)
            .then_some(self.leader_addr.as_deref())
            .flatten()
    }

    /// What this failure says about whether a write took effect (see [`WriteFate`]).
    pub fn write_fate(&self) -> WriteFate {
        match self.reason {
            Reason::RetrySoon | Reason::NotLeader | Reason::NotSent => WriteFate::NotDone,
            Reason::OutcomeUnknown => WriteFate::Unknown,
            Reason::Unspecified | Reason::CertificateRevoked => match self.code {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
                | Code::DataLoss => WriteFate::Unknown,
                _ => WriteFate::Refused,
            },
        }
    }

    /// Shorthand for [`Code::InvalidArgument`].
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// Shorthand for [`Code::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }

    /// Shorthand for [`Code::PermissionDenied`].
    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, message)
    }

    /// Shorthand for [`Code::Unavailable`].
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    /// Shorthand for [`Code::Internal`].
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// Shorthand for [`Code::ResourceExhausted`].
    pub fn resource_exhausted(message: impl Into<String>) -> Self {
        Self::new(Code::ResourceExhausted, message)
    }

    /// Shorthand for [`Code::DeadlineExceeded`].
    pub fn deadline_exceeded(message: impl Into<String>) -> Self {
        Self::new(Code::DeadlineExceeded, message)
    }

    /// Shorthand for [`Code::Cancelled`].
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(Code::Cancelled, message)
    }

    /// The wire form.
    pub fn to_proto(&self) -> proto::wire::Status {
        proto::wire::Status {
            code: self.code as u32,
            message: self.message.clone(),
            reason: self.reason as i32,
            leader_id: self.leader_id.unwrap_or(0),
            leader_addr: self.leader_addr.clone().unwrap_or_default(),
            retry_after_ms: self.retry_after_ms.unwrap_or(0),
        }
    }

    /// Reads the wire form; a missing status on an ERROR frame is itself an error. A reason
    /// this build does not know reads as [`Reason::Unspecified`].
    pub fn from_proto(status: Option<&proto::wire::Status>) -> Self {
        let Some(s) = status else {
            return Self::new(Code::Unknown, "peer sent an ERROR frame without a status");
        };
        let mut out = Self::new(Code::from_u32(s.code), s.message.clone())
            .with_reason(Reason::try_from(s.reason).unwrap_or(Reason::Unspecified));
        out.leader_id = (s.leader_id != 0).then_some(s.leader_id);
        out.leader_addr = (!s.leader_addr.is_empty()).then(|| s.leader_addr.clone());
        if s.retry_after_ms != 0 {
            out = out.with_retry_after(Duration::from_millis(u64::from(s.retry_after_ms)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_number() {
        for n in 0..=16 {
            let code = Code::from_u32(n);
            assert_eq!(code as u32, n, "{code}");
        }
        assert_eq!(Code::from_u32(99), Code::Unknown);
    }

    #[test]
    fn status_round_trips_through_proto() {
        let status = Status::not_found("service web not found");
        assert_eq!(Status::from_proto(Some(&status.to_proto())), status);
        assert_eq!(Status::from_proto(None).code, Code::Unknown);
        let with_reason =
            Status::permission_denied("refused").with_reason(Reason::CertificateRevoked);
        let back = Status::from_proto(Some(&with_reason.to_proto()));
        assert_eq!(
            back.reason,
            Reason::CertificateRevoked,
            "callers act on the reason, not the message"
        );
        assert_eq!(back, with_reason);
    }

    #[test]
    fn leader_and_retry_details_round_trip_through_proto() {
        let redirect = Status::not_leader(
            Code::FailedPrecondition,
            "not the leader",
            Some(0x2a),
            Some("10.0.0.7:4242".into()),
        )
        .with_retry_after(Duration::from_millis(300));
        let back = Status::from_proto(Some(&redirect.to_proto()));
        assert_eq!(back, redirect);
        assert_eq!(back.leader_hint(), Some("10.0.0.7:4242"));
        assert_eq!(back.leader_id, Some(0x2a));
        assert_eq!(back.retry_after(), Some(Duration::from_millis(300)));
        assert!(back.is_retry_soon(), "a NotLeader refusal did nothing");
        let unknown_leader =
            Status::not_leader(Code::FailedPrecondition, "not the leader", None, None);
        let back = Status::from_proto(Some(&unknown_leader.to_proto()));
        assert_eq!((back.leader_id, back.leader_hint()), (None, None));
        let long = Status::retry_soon(Code::Unavailable, "busy")
            .with_retry_after(Duration::from_secs(3600));
        assert_eq!(long.retry_after(), Some(RETRY_AFTER_MAX));
        // The hint is read from the reason's details only, never from the message.
        let text_only = Status::unavailable("not the leader; leader_addr=10.0.0.7:4242");
        assert_eq!(text_only.leader_hint(), None);
    }

    #[test]
    fn a_write_is_unknown_after_a_lost_reply_and_not_done_after_a_refusal_before_acting() {
        let fate = |status: Status| status.write_fate();
        assert_eq!(
            fate(Status::retry_soon(Code::Unavailable, "election")),
            WriteFate::NotDone
        );
        assert_eq!(
            fate(Status::not_leader(
                Code::FailedPrecondition,
                "no",
                None,
                None
            )),
            WriteFate::NotDone
        );
        assert_eq!(
            fate(Status::unavailable("refused").with_reason(Reason::NotSent)),
            WriteFate::NotDone
        );
        assert_eq!(
            fate(Status::unavailable("connection lost")),
            WriteFate::Unknown
        );
        assert_eq!(
            fate(Status::deadline_exceeded("no reply")),
            WriteFate::Unknown
        );
        assert_eq!(
            fate(Status::outcome_unknown(Code::Aborted, "leader died")),
            WriteFate::Unknown
        );
        assert_eq!(
            fate(Status::new(Code::Aborted, "version conflict")),
            WriteFate::Refused
        );
        assert_eq!(fate(Status::invalid_argument("bad")), WriteFate::Refused);
    }
}
