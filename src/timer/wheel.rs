//! A sans-IO hierarchical timer wheel: many deadlines, O(1) insert and cancel, millisecond
//! granularity.
//!
//! Owns the pending timers and the wheel's notion of "now" (`now_ms`, moved only by
//! [`TimerWheel::advance`]). Must never read a clock, sleep or spawn a thread: the caller
//! passes time in (the [`Timers`](super::Timers) thread, or a test).
//!
//! Layout (as in the Linux and tokio wheels): [`LEVELS`] levels of 64 slots each; a slot of
//! level `L` spans `64^L` ms, so level 0 holds the next 64 ms one millisecond per slot and
//! the top level spans [`WHEEL_RANGE_MS`] (2^36 ms, about 795 days). A timer sits in the
//! lowest level whose window, aligned on the wheel's time, holds its deadline; when time
//! reaches a slot of a higher level, its timers move down (the cascade). Deadlines beyond the
//! top level's reach wait in an overflow list, re-examined when time comes within reach of
//! the earliest of them. Deadlines at or before the wheel's time wait in a due list and fire
//! at the next [`advance`](TimerWheel::advance).
//!
//! Storage is a slab (`Vec` of entries, a free list, a generation per entry) with an
//! intrusive doubly-linked list per slot, so a cancel unlinks in O(1); one `u64` bitmap per
//! level says which slots hold timers, so [`advance`](TimerWheel::advance) jumps over empty
//! stretches (a jump of hours costs a few steps per level, not one per millisecond).
//!
//! Memory: one entry per pending timer (the value plus 24 bytes), and the slab never shrinks:
//! it stays at the largest number of timers pending at once, which the caller bounds (at
//! most [`TIMERS_MAX`]).

/// Bits of a level's slot index: 64 slots per level.
const SLOT_BITS: u32 = 6;
/// Slots per level.
const SLOTS: usize = 1 << SLOT_BITS;
/// The levels of the wheel; the top one reaches [`WHEEL_RANGE_MS`] ahead.
pub const LEVELS: usize = 6;
/// How far ahead of the wheel's time a deadline can be and still sit in the wheel (2^36 ms,
/// about 795 days); later ones wait in the overflow list.
pub const WHEEL_RANGE_MS: u64 = 1 << (SLOT_BITS * LEVELS as u32);
/// The shift of the top level's slot index (its slots span 2^30 ms, about 12 days).
const TOP_SHIFT: u32 = SLOT_BITS * (LEVELS as u32 - 1);

/// The most timers pending at once (entry indices are `u32`, and one value is the list end).
pub const TIMERS_MAX: usize = NIL as usize;

/// The end of a list.
const NIL: u32 = u32::MAX;
/// Lists `0..SLOT_LISTS` are the slots (`level * 64 + slot`); then the due and overflow lists.
const SLOT_LISTS: usize = LEVELS * SLOTS;
const DUE: u16 = SLOT_LISTS as u16;
const OVERFLOW: u16 = DUE + 1;
const LISTS: usize = OVERFLOW as usize + 1;
/// The list mark of a free entry (it is on the free list, or retired).
const FREE: u16 = u16::MAX;

/// Names one inserted timer. A stale id (its timer fired or was cancelled) never names a
/// later timer: an entry's generation changes each time it is freed, and an entry whose
/// generation would wrap is retired instead of reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId {
    index: u32,
    generation: u32,
}

/// One slab entry: a pending timer, or a free one (`list == FREE`, `value == None`).
#[derive(Debug)]
struct Entry<T> {
    value: Option<T>,
    deadline_ms: u64,
    prev: u32,
    next: u32,
    generation: u32,
    /// Which list holds it: a slot, `DUE`, `OVERFLOW`, or `FREE`.
    list: u16,
}

/// A hierarchical timer wheel holding values of type `T` until their deadlines (see the
/// module documentation).
#[derive(Debug)]
pub struct TimerWheel<T> {
    entries: Vec<Entry<T>>,
    /// The first free entry (linked through `next`), or `NIL`.
    free_head: u32,
    /// The first entry of each list, or `NIL`.
    heads: Vec<u32>,
    /// Per level, bit `s` set when slot `s` holds a timer.
    occupied: [u64; LEVELS],
    /// The wheel's time: every deadline at or before it has fired or is in the due list.
    now_ms: u64,
    len: usize,
    /// Never later than the earliest deadline in the due list (when it is not empty).
    due_earliest_ms: u64,
    /// Never later than the earliest deadline in the overflow list (when it is not empty).
    overflow_earliest_ms: u64,
    /// Reused by `fire_due` to sort the due list.
    scratch: Vec<(u64, u32)>,
}

impl<T> TimerWheel<T> {
    /// An empty wheel whose time is `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self {
            entries: Vec::new(),
            free_head: NIL,
            heads: vec![NIL; LISTS],
            occupied: [0; LEVELS],
            now_ms,
            len: 0,
            due_earliest_ms: u64::MAX,
            overflow_earliest_ms: u64::MAX,
            scratch: Vec::new(),
        }
    }

    /// The wheel's time: the `now_ms` of the last [`advance`](Self::advance) (or of
    /// [`new`](Self::new)).
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// How many timers are pending.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a timer that hands `value` back at the first [`advance`](Self::advance) whose
    /// time is at or after `deadline_ms`; a deadline at or before the wheel's time fires at
    /// the next one. O(1).
    ///
    /// # Panics
    /// When [`TIMERS_MAX`] timers are already pending.
    pub fn insert(&mut self, deadline_ms: u64, value: T) -> TimerId {
        let index = self.allocate(deadline_ms, value);
        self.place(index);
        self.len += 1;
        TimerId {
            index,
            generation: self.entries[index as usize].generation,
        }
    }

    /// Removes a pending timer and returns its value; `None` when it already fired or was
    /// cancelled. O(1).
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let entry = self.entries.get(id.index as usize)?;
        if entry.list == FREE || entry.generation != id.generation {
            return None;
        }
        self.unlink(id.index);
        self.len -= 1;
        Some(self.release(id.index))
    }

    /// Moves the wheel's time to `now_ms` (an earlier `now_ms` counts as the wheel's time)
    /// and appends to `fired` the value of every timer whose deadline is at or before it,
    /// in non-decreasing deadline order. Work: O(levels) per slot reached that holds timers,
    /// plus O(1) per timer fired or moved down a level (at most [`LEVELS`] moves per timer),
    /// plus a sort of the timers inserted with a deadline already past; empty stretches of
    /// time cost nothing.
    pub fn advance(&mut self, now_ms: u64, fired: &mut Vec<T>) {
        let now_ms = now_ms.max(self.now_ms);
        self.fire_due(fired);
        loop {
            let slot = self.next_slot_expiration();
            let overflow = self.overflow_recheck_ms();
            match (slot, overflow) {
                // The slot first on a tie: it is the earlier work (overflow timers are far off).
                (Some((at_ms, level, index)), overflow)
                    if at_ms <= now_ms && overflow.is_none_or(|o| at_ms <= o) =>
                {
                    debug_assert!(at_ms > self.now_ms, "time never goes back");
                    self.now_ms = at_ms;
                    self.expire_slot(level, index, fired);
                }
                (_, Some(at_ms)) if at_ms <= now_ms => {
                    debug_assert!(at_ms >= self.now_ms, "time never goes back");
                    self.now_ms = at_ms;
                    self.recheck_overflow();
                }
                _ => break,
            }
        }
        self.now_ms = now_ms;
    }

    /// When the earliest pending timer is due, as a lower bound: never later than the real
    /// earliest deadline, and exact when that timer is in level 0 (within 64 ms of the
    /// wheel's time) or in the due list; otherwise the start of its slot (a driver that
    /// sleeps until then and advances gets a finer answer after the cascade). A value at or
    /// before the wheel's time means "advance now". `None` when no timer is pending. O(levels).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        let mut earliest = self.next_slot_expiration().map(|(at_ms, _, _)| at_ms);
        if self.heads[usize::from(DUE)] != NIL {
            earliest = Some(earliest.map_or(self.due_earliest_ms, |e| e.min(self.due_earliest_ms)));
        }
        if self.heads[usize::from(OVERFLOW)] != NIL {
            let overflow = self.overflow_earliest_ms;
            earliest = Some(earliest.map_or(overflow, |e| e.min(overflow)));
        }
        earliest
    }

    // ---- slab ----

    fn allocate(&mut self, deadline_ms: u64, value: T) -> u32 {
        if self.free_head != NIL {
            let index = self.free_head;
            let entry = &mut self.entries[index as usize];
            debug_assert!(entry.list == FREE && entry.value.is_none());
            self.free_head = entry.next;
            entry.value = Some(value);
            entry.deadline_ms = deadline_ms;
            return index;
        }
        assert!(
            self.entries.len() < TIMERS_MAX,
            "more than TIMERS_MAX timers pending"
        );
        let index = u32::try_from(self.entries.len()).expect("below TIMERS_MAX, so fits in u32");
        self.entries.push(Entry {
            value: Some(value),
            deadline_ms,
            prev: NIL,
            next: NIL,
            generation: 0,
            list: FREE,
        });
        index
    }

    /// Frees an entry already unlinked from its list and returns its value.
    fn release(&mut self, index: u32) -> T {
        let entry = &mut self.entries[index as usize];
        let value = entry.value.take().expect("a linked entry holds its value");
        entry.list = FREE;
        entry.prev = NIL;
        match entry.generation.checked_add(1) {
            Some(generation) => {
                entry.generation = generation;
                entry.next = self.free_head;
                self.free_head = index;
            }
            // Retired: reusing it would let an id of generation 0 name a new timer.
            None => entry.next = NIL,
        }
        value
    }

    // ---- lists ----

    fn link(&mut self, index: u32, list: u16) {
        let head = self.heads[usize::from(list)];
        {
            let entry = &mut self.entries[index as usize];
            entry.list = list;
            entry.prev = NIL;
            entry.next = head;
        }
        if head != NIL {
            self.entries[head as usize].prev = index;
        }
        self.heads[usize::from(list)] = index;
        if usize::from(list) < SLOT_LISTS {
            let (level, slot) = split(list);
            self.occupied[level] |= 1 << slot;
        }
    }

    fn unlink(&mut self, index: u32) {
        let (list, prev, next) = {
            let entry = &self.entries[index as usize];
            (entry.list, entry.prev, entry.next)
        };
        debug_assert_ne!(list, FREE, "unlinking a free entry");
        if prev == NIL {
            debug_assert_eq!(self.heads[usize::from(list)], index);
            self.heads[usize::from(list)] = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
        if next == NIL && prev == NIL && usize::from(list) < SLOT_LISTS {
            let (level, slot) = split(list);
            self.occupied[level] &= !(1 << slot);
        }
    }

    /// Empties a list and returns its first entry (the rest follow through `next`).
    fn detach(&mut self, list: u16) -> u32 {
        let head = std::mem::replace(&mut self.heads[usize::from(list)], NIL);
        if usize::from(list) < SLOT_LISTS {
            let (level, slot) = split(list);
            self.occupied[level] &= !(1 << slot);
        }
        head
    }

    // ---- placement ----

    /// Links a pending entry into the list its deadline belongs to at the wheel's time.
    fn place(&mut self, index: u32) {
        let deadline_ms = self.entries[index as usize].deadline_ms;
        let list = self.list_for(deadline_ms);
        // A bound left by cancelled timers is dropped once their list is empty.
        let first = self.heads[usize::from(list)] == NIL;
        if list == DUE {
            self.due_earliest_ms = if first {
                deadline_ms
            } else {
                self.due_earliest_ms.min(deadline_ms)
            };
        } else if list == OVERFLOW {
            self.overflow_earliest_ms = if first {
                deadline_ms
            } else {
                self.overflow_earliest_ms.min(deadline_ms)
            };
        }
        self.link(index, list);
    }

    fn list_for(&self, deadline_ms: u64) -> u16 {
        if deadline_ms <= self.now_ms {
            return DUE;
        }
        match level_for(self.now_ms, deadline_ms) {
            Some(level) => {
                let slot = (deadline_ms >> (SLOT_BITS * level as u32)) as usize & (SLOTS - 1);
                u16::try_from(level * SLOTS + slot).expect("below SLOT_LISTS")
            }
            None => OVERFLOW,
        }
    }

    // ---- expiry ----

    /// The earliest slot holding timers: its start time, level and slot index. A slot is
    /// always strictly ahead of the wheel's time's own slot at its level (the top level is a
    /// ring: "ahead" wraps), so the distance is 1..=63 slots.
    fn next_slot_expiration(&self) -> Option<(u64, usize, usize)> {
        let mut earliest: Option<(u64, usize, usize)> = None;
        for (level, &occupied) in self.occupied.iter().enumerate() {
            if occupied == 0 {
                continue;
            }
            let shift = SLOT_BITS * level as u32;
            let now_slot = (self.now_ms >> shift) as u32 & (SLOTS as u32 - 1);
            let rotated = occupied.rotate_right((now_slot + 1) % SLOTS as u32);
            let distance = u64::from(rotated.trailing_zeros()) + 1;
            debug_assert!(
                distance < SLOTS as u64,
                "a slot at the wheel's own position"
            );
            // No overflow: the slot's start is at or before a deadline it holds.
            let at_ms = ((self.now_ms >> shift) + distance) << shift;
            let slot = (now_slot as usize + distance as usize) % SLOTS;
            if earliest.is_none_or(|(e, _, _)| at_ms < e) {
                earliest = Some((at_ms, level, slot));
            }
        }
        earliest
    }

    /// Fires every timer of the due list, earliest deadline first.
    fn fire_due(&mut self, fired: &mut Vec<T>) {
        let mut index = self.detach(DUE);
        self.due_earliest_ms = u64::MAX;
        let mut due = std::mem::take(&mut self.scratch);
        while index != NIL {
            let entry = &self.entries[index as usize];
            due.push((entry.deadline_ms, index));
            index = entry.next;
        }
        due.sort_unstable();
        for &(_, index) in &due {
            self.len -= 1;
            fired.push(self.release(index));
        }
        due.clear();
        self.scratch = due;
    }

    /// At the start of slot `slot` of `level` (the wheel's time): fires its timers that are
    /// due and moves the others down a level.
    fn expire_slot(&mut self, level: usize, slot: usize, fired: &mut Vec<T>) {
        let list = u16::try_from(level * SLOTS + slot).expect("below SLOT_LISTS");
        let mut index = self.detach(list);
        while index != NIL {
            let next = self.entries[index as usize].next;
            if self.entries[index as usize].deadline_ms <= self.now_ms {
                self.len -= 1;
                fired.push(self.release(index));
            } else {
                self.place(index);
                debug_assert!(
                    usize::from(self.entries[index as usize].list) < level * SLOTS,
                    "a cascaded timer moves to a lower level"
                );
            }
            index = next;
        }
    }

    /// When the wheel's time first lets the earliest overflow timer into the top level (never
    /// before the wheel's time: a bound left by a cancelled timer may say so).
    fn overflow_recheck_ms(&self) -> Option<u64> {
        if self.heads[usize::from(OVERFLOW)] == NIL {
            return None;
        }
        let top_slot = (self.overflow_earliest_ms >> TOP_SHIFT).saturating_sub(SLOTS as u64 - 1);
        Some((top_slot << TOP_SHIFT).max(self.now_ms))
    }

    /// Moves every overflow timer now within reach into the wheel. O(overflow timers), done
    /// at most once per distinct top-level slot of their deadlines (plus once after the
    /// earliest of them was cancelled).
    fn recheck_overflow(&mut self) {
        let mut index = self.detach(OVERFLOW);
        self.overflow_earliest_ms = u64::MAX;
        while index != NIL {
            let next = self.entries[index as usize].next;
            self.place(index);
            debug_assert_ne!(
                self.entries[index as usize].list, DUE,
                "an overflow timer is far ahead"
            );
            index = next;
        }
    }

    /// Checks every structural invariant (tests; O(timers)).
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut linked = 0;
        for list in 0..LISTS {
            let list = u16::try_from(list).expect("few lists");
            let mut prev = NIL;
            let mut index = self.heads[usize::from(list)];
            while index != NIL {
                let entry = &self.entries[index as usize];
                assert_eq!(entry.list, list);
                assert_eq!(entry.prev, prev);
                assert!(entry.value.is_some());
                self.check_position(list, entry.deadline_ms);
                linked += 1;
                prev = index;
                index = entry.next;
            }
            if usize::from(list) < SLOT_LISTS {
                let (level, slot) = split(list);
                let bit = self.occupied[level] & (1 << slot) != 0;
                assert_eq!(bit, self.heads[usize::from(list)] != NIL);
            }
        }
        assert_eq!(linked, self.len);
        let free = self.entries.iter().filter(|e| e.list == FREE).count();
        assert_eq!(free + self.len, self.entries.len());
    }

    #[cfg(test)]
    fn check_position(&self, list: u16, deadline_ms: u64) {
        if list == DUE {
            assert!(deadline_ms <= self.now_ms && self.due_earliest_ms <= deadline_ms);
        } else if list == OVERFLOW {
            assert!((deadline_ms >> TOP_SHIFT) - (self.now_ms >> TOP_SHIFT) >= SLOTS as u64);
            assert!(self.overflow_earliest_ms <= deadline_ms);
        } else {
            let (level, slot) = split(list);
            let shift = SLOT_BITS * level as u32;
            assert!(deadline_ms > self.now_ms);
            assert_eq!((deadline_ms >> shift) as usize & (SLOTS - 1), slot);
            if level + 1 < LEVELS {
                let window = shift + SLOT_BITS;
                assert_eq!(deadline_ms >> window, self.now_ms >> window);
                assert!(deadline_ms >> shift > self.now_ms >> shift);
            } else {
                let distance = (deadline_ms >> shift) - (self.now_ms >> shift);
                assert!((1..SLOTS as u64).contains(&distance));
            }
        }
    }
}

/// A slot list's level and slot index.
fn split(list: u16) -> (usize, usize) {
    (usize::from(list) / SLOTS, usize::from(list) % SLOTS)
}

/// The level for a deadline after `now_ms`: the level of the highest bit where they differ,
/// or the top level (a ring) while the deadline is fewer than 64 top slots ahead; `None`
/// when it is farther (the overflow list).
fn level_for(now_ms: u64, deadline_ms: u64) -> Option<usize> {
    debug_assert!(deadline_ms > now_ms);
    let highest_bit = 63 - (now_ms ^ deadline_ms).leading_zeros();
    let level = (highest_bit / SLOT_BITS) as usize;
    if level < LEVELS - 1 {
        return Some(level);
    }
    let top_distance = (deadline_ms >> TOP_SHIFT) - (now_ms >> TOP_SHIFT);
    (top_distance < SLOTS as u64).then_some(LEVELS - 1)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::util::rng::SimRng;

    /// Advances to `now_ms` and returns what fired, checking the invariants.
    fn advance(wheel: &mut TimerWheel<u64>, now_ms: u64) -> Vec<u64> {
        let mut fired = Vec::new();
        wheel.advance(now_ms, &mut fired);
        wheel.check_invariants();
        fired
    }

    #[test]
    fn a_timer_fires_at_its_deadline_not_before() {
        let mut wheel = TimerWheel::new(1_000);
        wheel.insert(1_010, 7);
        assert_eq!(wheel.next_deadline_ms(), Some(1_010));
        assert!(advance(&mut wheel, 1_009).is_empty());
        assert_eq!(wheel.len(), 1);
        assert_eq!(advance(&mut wheel, 1_010), vec![7]);
        assert!(wheel.is_empty());
        assert_eq!(wheel.next_deadline_ms(), None);
        assert!(advance(&mut wheel, 5_000).is_empty());
    }

    #[test]
    fn a_deadline_in_the_past_fires_at_the_next_advance() {
        let mut wheel = TimerWheel::new(500);
        wheel.insert(200, 2);
        wheel.insert(500, 5);
        wheel.insert(100, 1);
        wheel.check_invariants();
        assert_eq!(wheel.next_deadline_ms(), Some(100));
        // Even an advance to an earlier time (it counts as the wheel's time).
        assert_eq!(advance(&mut wheel, 400), vec![1, 2, 5]);
        assert_eq!(wheel.now_ms(), 500);
    }

    #[test]
    fn cancel_before_fire_returns_the_value_and_it_never_fires() {
        let mut wheel = TimerWheel::new(0);
        let near = wheel.insert(10, 10);
        let far = wheel.insert(100_000, 100_000);
        let overflow = wheel.insert(WHEEL_RANGE_MS * 3, 3);
        let due = wheel.insert(0, 0);
        let kept = wheel.insert(50, 50);
        assert_eq!(wheel.cancel(near), Some(10));
        assert_eq!(wheel.cancel(far), Some(100_000));
        assert_eq!(wheel.cancel(overflow), Some(3));
        assert_eq!(wheel.cancel(due), Some(0));
        wheel.check_invariants();
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.cancel(near), None, "cancelled twice");
        assert_eq!(advance(&mut wheel, WHEEL_RANGE_MS * 4), vec![50]);
        assert_eq!(wheel.cancel(kept), None, "cancel after fire");
    }

    #[test]
    fn a_stale_id_never_cancels_the_timer_that_reused_its_entry() {
        let mut wheel = TimerWheel::new(0);
        let old = wheel.insert(10, 1);
        assert_eq!(wheel.cancel(old), Some(1));
        let new = wheel.insert(20, 2);
        assert_eq!(new.index, old.index, "the entry is reused");
        assert_eq!(wheel.cancel(old), None);
        assert_eq!(advance(&mut wheel, 15), Vec::<u64>::new());
        let fired_id = new;
        assert_eq!(advance(&mut wheel, 20), vec![2]);
        let newer = wheel.insert(30, 3);
        assert_eq!(newer.index, fired_id.index);
        assert_eq!(wheel.cancel(fired_id), None);
        assert_eq!(wheel.cancel(old), None);
        assert_eq!(wheel.cancel(newer), Some(3));
    }

    #[test]
    fn an_entry_whose_generation_would_wrap_is_retired() {
        let mut wheel = TimerWheel::new(0);
        let first = wheel.insert(10, 1);
        wheel.entries[first.index as usize].generation = u32::MAX;
        let last = TimerId {
            index: first.index,
            generation: u32::MAX,
        };
        assert_eq!(wheel.cancel(last), Some(1));
        let next = wheel.insert(10, 2);
        assert_ne!(next.index, first.index, "the retired entry is not reused");
        assert_eq!(
            wheel.cancel(TimerId {
                index: first.index,
                generation: 0
            }),
            None
        );
        wheel.check_invariants();
    }

    #[test]
    fn large_jumps_cost_no_walk_over_empty_time_and_fire_everything() {
        let mut wheel = TimerWheel::new(0);
        let hour_ms = 3_600_000;
        for i in 0..10 {
            wheel.insert(i * hour_ms + 1, i);
        }
        wheel.insert(u64::MAX, u64::MAX);
        wheel.insert(u64::MAX - 1, u64::MAX - 1);
        // Ten hours in one step, then the end of time.
        assert_eq!(
            advance(&mut wheel, 10 * hour_ms),
            (0..10).collect::<Vec<_>>()
        );
        assert_eq!(wheel.len(), 2);
        assert!(wheel.next_deadline_ms().is_some_and(|d| d < u64::MAX));
        assert!(advance(&mut wheel, u64::MAX - 2).is_empty());
        assert_eq!(advance(&mut wheel, u64::MAX), vec![u64::MAX - 1, u64::MAX]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn deadlines_beyond_the_wheel_wait_in_the_overflow_and_fire_on_time() {
        let mut wheel = TimerWheel::new(0);
        let deadlines = [
            WHEEL_RANGE_MS - 1,
            WHEEL_RANGE_MS,
            WHEEL_RANGE_MS + 1,
            5 * WHEEL_RANGE_MS + 12_345,
            40 * WHEEL_RANGE_MS,
        ];
        for &d in &deadlines {
            wheel.insert(d, d);
        }
        wheel.check_invariants();
        // Step through in big strides; each fires exactly at the first advance at or after it.
        let mut now = 0;
        let mut fired = Vec::new();
        while !wheel.is_empty() {
            let next = wheel.next_deadline_ms().expect("timers pending");
            assert!(
                next <= *deadlines
                    .iter()
                    .find(|d| !fired.contains(*d))
                    .expect("pending")
            );
            now += WHEEL_RANGE_MS / 7;
            for d in advance(&mut wheel, now) {
                assert!(d <= now && d > now - WHEEL_RANGE_MS / 7);
                fired.push(d);
            }
        }
        assert_eq!(fired, deadlines);
    }

    #[test]
    fn a_cancelled_timer_leaves_no_stale_bound_behind() {
        let mut wheel = TimerWheel::new(0);
        let far = wheel.insert(100 * WHEEL_RANGE_MS, 1);
        let past = wheel.insert(0, 2);
        assert_eq!(wheel.cancel(far), Some(1));
        assert_eq!(wheel.cancel(past), Some(2));
        let now = 200 * WHEEL_RANGE_MS;
        assert!(advance(&mut wheel, now).is_empty());
        // New timers in the emptied lists: the bounds are theirs, not the cancelled ones'
        // (a bound in the past would make a driver spin).
        wheel.insert(now + 2 * WHEEL_RANGE_MS, 3);
        assert_eq!(wheel.next_deadline_ms(), Some(now + 2 * WHEEL_RANGE_MS));
        assert!(wheel.overflow_recheck_ms().is_some_and(|at| at > now));
        wheel.insert(now - 5, 4);
        assert_eq!(wheel.next_deadline_ms(), Some(now - 5));
        assert_eq!(advance(&mut wheel, now + 1), vec![4]);
        assert_eq!(advance(&mut wheel, now + 2 * WHEEL_RANGE_MS), vec![3]);
    }

    #[test]
    fn the_top_level_ring_wraps_without_the_overflow() {
        // Just before a top-level boundary, a deadline just after it and one nearly a wheel
        // range ahead both sit in the wheel.
        let start = WHEEL_RANGE_MS * 3 - 5;
        let mut wheel = TimerWheel::new(start);
        wheel.insert(start + 10, 1);
        wheel.insert(start + WHEEL_RANGE_MS - (1 << TOP_SHIFT), 2);
        assert_eq!(wheel.heads[usize::from(OVERFLOW)], NIL);
        wheel.check_invariants();
        assert_eq!(advance(&mut wheel, start + 10), vec![1]);
        assert!(advance(&mut wheel, start + WHEEL_RANGE_MS - (1 << TOP_SHIFT) - 1).is_empty());
        assert_eq!(advance(&mut wheel, start + WHEEL_RANGE_MS), vec![2]);
    }

    /// 100,000 timers over a wide range of deadlines, time moving in strides of varied size:
    /// each fires exactly once, at the first advance at or after its deadline, in
    /// non-decreasing deadline order within an advance.
    #[test]
    fn many_timers_fire_exactly_once_on_time_and_in_order() {
        let mut rng = SimRng::new(14);
        let mut wheel = TimerWheel::new(0);
        let mut deadlines = HashMap::new();
        for value in 0..100_000u64 {
            let deadline = match rng.below(4) {
                0 => rng.below(100),
                1 => rng.below(100_000),
                2 => rng.below(100_000_000),
                _ => rng.below(WHEEL_RANGE_MS * 4),
            };
            wheel.insert(deadline, value);
            deadlines.insert(value, deadline);
        }
        wheel.check_invariants();
        let mut now = 0u64;
        let mut fired_once = vec![false; 100_000];
        let mut advances = 0;
        while !wheel.is_empty() {
            let before = now;
            let lower_bound = wheel.next_deadline_ms().expect("timers pending");
            let earliest_left = deadlines
                .iter()
                .filter(|(v, _)| !fired_once[**v as usize])
                .map(|(_, d)| *d)
                .min();
            if advances % 64 == 0 {
                assert!(earliest_left.is_some_and(|e| lower_bound <= e));
            }
            now += match rng.below(5) {
                0 => rng.below(3),
                1 => rng.below(1_000),
                2 => rng.below(1_000_000),
                3 => rng.below(1_000_000_000),
                _ => rng.below(WHEEL_RANGE_MS / 2),
            };
            let fired = if advances % 64 == 0 {
                advance(&mut wheel, now)
            } else {
                let mut fired = Vec::new();
                wheel.advance(now, &mut fired);
                fired
            };
            advances += 1;
            let mut last = 0;
            for value in fired {
                let deadline = deadlines[&value];
                assert!(!fired_once[value as usize], "fired twice");
                fired_once[value as usize] = true;
                assert!(deadline <= now, "fired early");
                assert!(deadline > before || before == 0, "fired late");
                assert!(deadline >= last, "out of order");
                last = deadline;
            }
        }
        assert!(fired_once.iter().all(|f| *f));
    }

    /// Random inserts, cancels and advances, against a `BTreeMap` model.
    #[test]
    fn behaves_like_a_sorted_map_under_random_operations() {
        for seed in 0..20 {
            let mut rng = SimRng::new(seed);
            let mut wheel = TimerWheel::new(rng.below(1 << 40));
            // The model: (deadline, value) → id.
            let mut model: BTreeMap<(u64, u64), TimerId> = BTreeMap::new();
            let mut gone: Vec<TimerId> = Vec::new();
            let mut deadline_of: HashMap<u64, u64> = HashMap::new();
            for value in 0..20_000u64 {
                let now = wheel.now_ms();
                match rng.below(10) {
                    0..=4 => {
                        let deadline = match rng.below(5) {
                            0 => now.saturating_sub(rng.below(100)),
                            1 => now + rng.below(64),
                            2 => now + rng.below(100_000),
                            3 => now + rng.below(WHEEL_RANGE_MS),
                            _ => now.saturating_add(rng.below(u64::MAX / 4)),
                        };
                        let id = wheel.insert(deadline, value);
                        model.insert((deadline, value), id);
                        deadline_of.insert(value, deadline);
                    }
                    5 | 6 => {
                        if let Some(&key) =
                            model.keys().nth(rng.below(model.len() as u64 + 1) as usize)
                        {
                            let id = model.remove(&key).expect("present");
                            assert_eq!(wheel.cancel(id), Some(key.1));
                            gone.push(id);
                        } else if let Some(id) = rng.pick(&gone) {
                            assert_eq!(wheel.cancel(id), None);
                        }
                    }
                    7 => {
                        if let Some(id) = rng.pick(&gone) {
                            assert_eq!(wheel.cancel(id), None, "a stale id");
                        }
                    }
                    _ => {
                        let target = match rng.below(3) {
                            0 => now + rng.below(64),
                            1 => now + rng.below(1 << 20),
                            _ => now.saturating_add(rng.below(WHEEL_RANGE_MS * 2)),
                        };
                        let lower_bound = wheel.next_deadline_ms();
                        assert_eq!(lower_bound.is_some(), !model.is_empty());
                        if let (Some(bound), Some(((first, _), _))) =
                            (lower_bound, model.first_key_value())
                        {
                            assert!(bound <= *first, "the bound is later than a deadline");
                        }
                        let fired = advance(&mut wheel, target);
                        let due: Vec<(u64, u64)> = model
                            .range(..(target.max(now) + 1, 0))
                            .map(|(k, _)| *k)
                            .collect();
                        let mut fired_keys: Vec<(u64, u64)> =
                            fired.iter().map(|v| (deadline_of[v], *v)).collect();
                        let deadlines: Vec<u64> = fired_keys.iter().map(|k| k.0).collect();
                        assert!(deadlines.is_sorted(), "fired out of deadline order");
                        fired_keys.sort_unstable();
                        assert_eq!(fired_keys, due);
                        for key in due {
                            gone.push(model.remove(&key).expect("present"));
                        }
                    }
                }
                assert_eq!(wheel.len(), model.len());
            }
            wheel.check_invariants();
        }
    }
}
