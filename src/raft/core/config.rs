//! Tunables of one Raft member. Every limit is named and documented here.
//!
//! Plain values: this module must never read the environment, a file or a clock.

use crate::raft::types::NodeId;

/// Heartbeat interval (swarmkit: 1 tick).
pub const HEARTBEAT_TICKS_DEFAULT: u32 = 1;
/// Base election timeout; the randomized timeout is drawn from `[base, 2 * base)` (swarmkit: 10).
pub const ELECTION_TIMEOUT_TICKS_DEFAULT: u32 = 10;
/// Ticks subtracted from the election timeout to form the read lease, covering clock drift
/// between the leader and its followers.
pub const LEASE_MARGIN_TICKS_DEFAULT: u32 = 2;
/// Most append messages in flight to one peer (swarmkit: 256).
pub const INFLIGHT_MSGS_MAX_DEFAULT: usize = 256;
/// Most payload bytes in flight to one peer (256 messages of 64 KiB).
pub const INFLIGHT_BYTES_MAX_DEFAULT: u64 = 16 * 1024 * 1024;
/// Payload bytes per append message (swarmkit: 64 KiB); one larger entry still goes alone.
pub const APPEND_BYTES_MAX_DEFAULT: u64 = 64 * 1024;
/// Largest proposal accepted (swarmkit's transaction limit: 1.5 MiB).
pub const PROPOSAL_BYTES_MAX_DEFAULT: u64 = 1536 * 1024;
/// Entries kept behind a snapshot for slow followers (swarmkit: 500).
pub const SNAPSHOT_KEEP_ENTRIES_DEFAULT: u64 = 500;
/// Payload bytes kept in memory behind a snapshot, whatever the entry count: 500 entries of
/// 1.5 MiB transactions would otherwise hold 750 MiB after a load (a follower further behind
/// gets the entries from storage, or the snapshot).
pub const SNAPSHOT_KEEP_BYTES_MAX_DEFAULT: u64 = 8 << 20;
/// Payload bytes a leader may hold uncommitted before refusing proposals (backpressure).
pub const UNCOMMITTED_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// Ticks a replicating follower may go without acknowledging anything before the leader
/// assumes messages were lost and probes again.
pub const REPLICATE_STALL_TICKS_DEFAULT: u32 = 3;

/// Configuration of one member.
#[derive(Clone, Debug)]
pub struct Config {
    /// This member's id (never [`crate::raft::types::NO_NODE`]).
    pub id: NodeId,
    /// Seed of the random election timeouts: the core has no other source of randomness.
    pub seed: u64,
    /// Ticks between leader heartbeats.
    pub heartbeat_ticks: u32,
    /// Base election timeout in ticks.
    pub election_timeout_ticks: u32,
    /// Ticks of clock drift tolerated by lease reads.
    pub lease_margin_ticks: u32,
    /// Run a pre-vote round (no term change) before a real election.
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum within an election timeout steps down, and
    /// followers that heard from a leader recently ignore vote requests.
    pub check_quorum: bool,
    /// Serve reads from the leader lease (no heartbeat round) while the lease is valid.
    /// Requires `check_quorum` and clocks whose rates differ by less than the lease margin.
    pub lease_reads: bool,
    /// Most append messages in flight to one peer.
    pub inflight_msgs_max: usize,
    /// Most payload bytes in flight to one peer.
    pub inflight_bytes_max: u64,
    /// Payload bytes per append message.
    pub append_bytes_max: u64,
    /// Largest single proposal.
    pub proposal_bytes_max: u64,
    /// Entries kept behind a snapshot for slow followers.
    pub snapshot_keep_entries: u64,
    /// Payload bytes of those entries kept in memory at most (the newest are kept).
    pub snapshot_keep_bytes_max: u64,
    /// Payload bytes a leader may hold uncommitted before refusing proposals.
    pub uncommitted_bytes_max: u64,
    /// Ticks without progress after which a replicating peer is probed again.
    pub replicate_stall_ticks: u32,
}

impl Config {
    /// The swarmkit-like defaults for member `id`, with election randomness from `seed`.
    pub fn new(id: NodeId, seed: u64) -> Self {
        Self {
            id,
            seed,
            heartbeat_ticks: HEARTBEAT_TICKS_DEFAULT,
            election_timeout_ticks: ELECTION_TIMEOUT_TICKS_DEFAULT,
            lease_margin_ticks: LEASE_MARGIN_TICKS_DEFAULT,
            pre_vote: true,
            check_quorum: true,
            lease_reads: false,
            inflight_msgs_max: INFLIGHT_MSGS_MAX_DEFAULT,
            inflight_bytes_max: INFLIGHT_BYTES_MAX_DEFAULT,
            append_bytes_max: APPEND_BYTES_MAX_DEFAULT,
            proposal_bytes_max: PROPOSAL_BYTES_MAX_DEFAULT,
            snapshot_keep_entries: SNAPSHOT_KEEP_ENTRIES_DEFAULT,
            snapshot_keep_bytes_max: SNAPSHOT_KEEP_BYTES_MAX_DEFAULT,
            uncommitted_bytes_max: UNCOMMITTED_BYTES_MAX_DEFAULT,
            replicate_stall_ticks: REPLICATE_STALL_TICKS_DEFAULT,
        }
    }

    /// Checks the relations the core relies on.
    ///
    /// # Panics
    /// If a limit is zero or the heartbeat is not shorter than the election timeout: these are
    /// programming errors, not runtime conditions.
    pub fn validate(&self) {
        assert_ne!(
            self.id,
            crate::raft::types::NO_NODE,
            "node id must not be zero"
        );
        assert!(self.heartbeat_ticks > 0, "heartbeat_ticks must be positive");
        assert!(
            self.election_timeout_ticks > self.heartbeat_ticks,
            "election timeout must exceed the heartbeat"
        );
        assert!(
            self.lease_margin_ticks < self.election_timeout_ticks,
            "lease margin must be shorter than the election timeout"
        );
        assert!(
            self.inflight_msgs_max > 0,
            "inflight_msgs_max must be positive"
        );
        assert!(
            self.inflight_bytes_max > 0,
            "inflight_bytes_max must be positive"
        );
        assert!(
            self.append_bytes_max > 0,
            "append_bytes_max must be positive"
        );
        assert!(
            self.replicate_stall_ticks > 0,
            "replicate_stall_ticks must be positive"
        );
    }
}
