//! Histories of key-value operations: what clients called, when, and what they saw.
//!
//! This module owns the plain data a checker consumes ([`Operation`], [`History`]) and the
//! [`Recorder`] a workload fills while it runs. It validates shape (a return never precedes its
//! call, an output matches its input) and must never judge linearizability itself.

use std::fmt;

/// A client (a Jepsen process, a simulated client). Informational: the checker does not
/// require a client's operations to be sequential, because a client that gives up on an
/// operation with an unknown outcome and moves on leaves that operation pending forever.
pub type ClientId = u64;
/// A key of the key-value map. A Jepsen register is a map with a single key.
pub type Key = u64;
/// A value stored under a key.
pub type Value = u64;
/// A logical time: only the order matters. Events at equal times are treated as concurrent.
pub type LogicalTime = u64;

/// The position of an operation in its [`History`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub usize);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op#{}", self.0)
    }
}

/// What a client asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Read the key's value.
    Get,
    /// Set the key to `value`.
    Put {
        /// The value written.
        value: Value,
    },
    /// Set the key to `to` if (and only if) it currently holds `from` (`None`: absent).
    Cas {
        /// The value the key must hold for the swap to happen.
        from: Option<Value>,
        /// The value written when it does.
        to: Value,
    },
}

/// What a completed operation returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// A get saw this value (`None`: the key was absent).
    Got(Option<Value>),
    /// A put took effect.
    PutDone,
    /// A compare-and-set found `from` and wrote `to`.
    CasSwapped,
    /// A compare-and-set found another value and changed nothing.
    CasFailed,
}

impl Output {
    /// Whether this output can answer `input` at all.
    pub fn answers(self, input: Input) -> bool {
        matches!(
            (input, self),
            (Input::Get, Output::Got(_))
                | (Input::Put { .. }, Output::PutDone)
                | (Input::Cas { .. }, Output::CasSwapped | Output::CasFailed)
        )
    }
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum End {
    /// The client saw a result at `at`.
    Returned {
        /// When the result reached the client.
        at: LogicalTime,
        /// The result.
        output: Output,
    },
    /// The client never learned the outcome (timeout, crash): the operation may have taken
    /// effect at any point after its call, or never.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Operation {
    /// Who called it.
    pub client: ClientId,
    /// The key it touches.
    pub key: Key,
    /// What was asked.
    pub input: Input,
    /// When it was called.
    pub call_at: LogicalTime,
    /// How it ended.
    pub end: End,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {} key {} ", self.client, self.key)?;
        match self.input {
            Input::Get => write!(f, "get")?,
            Input::Put { value } => write!(f, "put {value}")?,
            Input::Cas { from, to } => write!(f, "cas {} -> {to}", show_value(from))?,
        }
        write!(f, " called at {}", self.call_at)?;
        match self.end {
            End::Unknown => write!(f, ", outcome unknown"),
            End::Returned { at, output } => {
                write!(f, ", returned at {at}: ")?;
                match output {
                    Output::Got(value) => write!(f, "{}", show_value(value)),
                    Output::PutDone => write!(f, "ok"),
                    Output::CasSwapped => write!(f, "swapped"),
                    Output::CasFailed => write!(f, "compare failed"),
                }
            }
        }
    }
}

/// Renders an optional value the way Jepsen does (`nil` for absent).
fn show_value(value: Option<Value>) -> String {
    value.map_or_else(|| "nil".to_owned(), |v| v.to_string())
}

/// Why a list of operations is not a well-formed history.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// The operation returned before it was called; the recorder's clock is broken.
    #[error("{op} returns at {returned_at}, before its call at {called_at}")]
    ReturnBeforeCall {
        /// The operation.
        op: OpId,
        /// Its call time.
        called_at: LogicalTime,
        /// Its return time.
        returned_at: LogicalTime,
    },
    /// The output is of the wrong kind for the input (a get that returned "swapped").
    #[error("{op}: output {output:?} cannot answer input {input:?}")]
    OutputMismatch {
        /// The operation.
        op: OpId,
        /// What was asked.
        input: Input,
        /// What came back.
        output: Output,
    },
}

/// A validated list of operations, in any order. Reads with an unknown outcome are dropped on
/// construction: a read changes nothing, so a read nobody saw constrains nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    operations: Vec<Operation>,
}

impl History {
    /// Validates `operations` into a history.
    ///
    /// # Errors
    /// [`HistoryError`] if an operation returns before its call or its output does not answer
    /// its input: fix the recorder (or the parser) that produced it.
    pub fn new(operations: Vec<Operation>) -> Result<Self, HistoryError> {
        let mut kept = Vec::with_capacity(operations.len());
        for (index, operation) in operations.into_iter().enumerate() {
            validate(OpId(index), &operation)?;
            let unobserved_read = operation.input == Input::Get && operation.end == End::Unknown;
            if !unobserved_read {
                kept.push(operation);
            }
        }
        Ok(Self { operations: kept })
    }

    /// The operations kept, indexed by [`OpId`].
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }

    /// The operation at `id`, if any.
    pub fn get(&self, id: OpId) -> Option<&Operation> {
        self.operations.get(id.0)
    }

    /// How many operations are kept.
    pub fn len(&self) -> usize {
        self.operations.len()
    }

    /// Whether no operation is kept.
    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }
}

fn validate(op: OpId, operation: &Operation) -> Result<(), HistoryError> {
    let End::Returned { at, output } = operation.end else {
        return Ok(());
    };
    if at < operation.call_at {
        return Err(HistoryError::ReturnBeforeCall {
            op,
            called_at: operation.call_at,
            returned_at: at,
        });
    }
    if !output.answers(operation.input) {
        return Err(HistoryError::OutputMismatch {
            op,
            input: operation.input,
            output,
        });
    }
    Ok(())
}

/// A handle on an operation a [`Recorder`] saw called and has not seen end.
#[derive(Debug, PartialEq, Eq, Hash)]
#[must_use = "an operation that is never completed is recorded with an unknown outcome"]
pub struct Pending(usize);

/// Records a history while a workload runs. Its clock is its own event counter, so every
/// call and return gets a distinct time in the order the workload reported them: report a
/// call before sending the request and a return after receiving the answer.
///
/// An operation never completed is recorded with an unknown outcome.
#[derive(Debug, Default)]
pub struct Recorder {
    operations: Vec<Operation>,
    clock: LogicalTime,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `client` called `input` on `key` now.
    pub fn call(&mut self, client: ClientId, key: Key, input: Input) -> Pending {
        let call_at = self.tick();
        self.operations.push(Operation {
            client,
            key,
            input,
            call_at,
            end: End::Unknown,
        });
        Pending(self.operations.len() - 1)
    }

    /// Records that the operation behind `pending` returned `output` now.
    ///
    /// # Panics
    /// If `output` cannot answer the operation's input: that is a bug in the workload.
    pub fn complete(&mut self, pending: Pending, output: Output) {
        let at = self.tick();
        let operation = &mut self.operations[pending.0];
        assert!(
            output.answers(operation.input),
            "output {output:?} cannot answer {:?}",
            operation.input
        );
        operation.end = End::Returned { at, output };
    }

    /// Records that the operation behind `pending` will never be seen to end (the client
    /// gave up). Same as dropping the handle; this spells the intent out.
    pub fn abandon(&mut self, pending: Pending) {
        debug_assert_eq!(self.operations[pending.0].end, End::Unknown);
    }

    /// How many operations were called so far.
    pub fn len(&self) -> usize {
        self.operations.len()
    }

    /// Whether nothing was called yet.
    pub fn is_empty(&self) -> bool {
        self.operations.is_empty()
    }

    /// The history recorded so far.
    pub fn history(&self) -> History {
        History::new(self.operations.clone())
            .expect("the recorder assigns increasing times and asserts outputs match inputs")
    }

    fn tick(&mut self) -> LogicalTime {
        self.clock += 1;
        self.clock
    }
}
