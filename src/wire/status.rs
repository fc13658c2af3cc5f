//! Call outcomes: status codes numbered like gRPC's, and the [`Status`] error every call
//! returns on failure.
//!
//! Must never carry transport state: a status is a value that crosses the wire.

use std::fmt;

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

/// The [`Status::reason`] of a refusal that a short wait is expected to fix, with nothing
/// for the caller to change: no leader right now (an election), a leadership transfer or
/// membership change in progress, a leader that cannot be reached, the cluster object or CA
/// key not yet replicated to this manager. A caller retries such a refusal for a bounded
/// time (the CLI: `cli::control::RETRY_SOON_ATTEMPTS_MAX` attempts) instead of failing: a
/// message that says "retry in a moment" is a promise. Repeating a write refused this way
/// is safe: creates carry their object id, updates the version they read.
pub const RETRY_SOON: &str = "RETRY_SOON";

/// A failed call: a code and a message for a human that says what went wrong and, where
/// possible, what to do next; and, for the few failures a caller acts on, a reason code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Status {
    /// The failure class.
    pub code: Code,
    /// What happened, for a human.
    pub message: String,
    /// A machine-readable cause (empty if none), e.g. [`crate::ca::CERTIFICATE_REVOKED`]:
    /// callers test this, never the message, which is worded for humans.
    pub reason: String,
}

impl Status {
    /// A status with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reason: String::new(),
        }
    }

    /// This status with the machine-readable `reason`.
    #[must_use]
    pub fn with_reason(mut self, reason: &str) -> Self {
        self.reason = reason.to_string();
        self
    }

    /// A refusal the same call may pass after a short wait ([`RETRY_SOON`]).
    pub fn retry_soon(code: Code, message: impl Into<String>) -> Self {
        Self::new(code, message).with_reason(RETRY_SOON)
    }

    /// True for a refusal marked [`RETRY_SOON`].
    pub fn is_retry_soon(&self) -> bool {
        self.reason == RETRY_SOON
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
            reason: self.reason.clone(),
        }
    }

    /// Reads the wire form; a missing status on an ERROR frame is itself an error.
    pub fn from_proto(status: Option<&proto::wire::Status>) -> Self {
        match status {
            Some(s) => Self::new(Code::from_u32(s.code), s.message.clone()).with_reason(&s.reason),
            None => Self::new(Code::Unknown, "peer sent an ERROR frame without a status"),
        }
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
        let with_reason = Status::permission_denied("refused").with_reason("SOME_REASON");
        let back = Status::from_proto(Some(&with_reason.to_proto()));
        assert_eq!(
            back.reason, "SOME_REASON",
            "callers act on the reason, not the message"
        );
        assert_eq!(back, with_reason);
    }
}
