//! Hand-made histories with known verdicts, and a cross-check of the search against brute
//! force on small random histories.

use super::*;
use crate::util::rng::SimRng;

const KEY: Key = 7;

fn returned(client: ClientId, input: Input, call_at: u64, at: u64, output: Output) -> Operation {
    Operation {
        client,
        key: KEY,
        input,
        call_at,
        end: End::Returned { at, output },
    }
}

fn unknown(client: ClientId, input: Input, call_at: u64) -> Operation {
    Operation {
        client,
        key: KEY,
        input,
        call_at,
        end: End::Unknown,
    }
}

fn put(client: ClientId, value: Value, call_at: u64, at: u64) -> Operation {
    returned(client, Input::Put { value }, call_at, at, Output::PutDone)
}

fn get(client: ClientId, seen: Option<Value>, call_at: u64, at: u64) -> Operation {
    returned(client, Input::Get, call_at, at, Output::Got(seen))
}

fn cas(
    client: ClientId,
    from: Value,
    to: Value,
    swapped: bool,
    call_at: u64,
    at: u64,
) -> Operation {
    let output = if swapped {
        Output::CasSwapped
    } else {
        Output::CasFailed
    };
    let input = Input::Cas {
        from: Some(from),
        to,
    };
    returned(client, input, call_at, at, output)
}

fn verdict_of(operations: Vec<Operation>) -> Verdict {
    let history = History::new(operations).expect("test histories are well formed");
    check(&history, CheckLimits::default()).verdict
}

fn assert_linearizable(operations: Vec<Operation>) {
    assert_eq!(verdict_of(operations), Verdict::Linearizable);
}

fn violation_of(operations: Vec<Operation>) -> Violation {
    match verdict_of(operations) {
        Verdict::NotLinearizable(violation) => violation,
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[test]
fn empty_history_is_linearizable() {
    assert_linearizable(vec![]);
}

#[test]
fn sequential_put_then_get_is_linearizable() {
    assert_linearizable(vec![put(1, 5, 1, 2), get(2, Some(5), 3, 4)]);
}

#[test]
fn read_of_an_absent_key_sees_nil() {
    assert_linearizable(vec![get(1, None, 1, 2)]);
    let violation = violation_of(vec![get(1, Some(3), 1, 2)]);
    assert_eq!(violation.stuck, OpId(0));
    assert!(violation.longest_prefix.is_empty());
}

#[test]
fn stale_read_is_not_linearizable() {
    // put 1, then put 2, then (after both returned) a read that still sees 1.
    let violation = violation_of(vec![
        put(1, 1, 1, 2),
        put(1, 2, 3, 4),
        get(2, Some(1), 5, 6),
    ]);
    assert_eq!(violation.key, KEY);
    assert_eq!(
        violation.stuck,
        OpId(2),
        "the stale get is the one that cannot fit"
    );
    assert_eq!(violation.longest_prefix, vec![OpId(0), OpId(1)]);
}

#[test]
fn read_concurrent_with_a_write_may_see_either_value() {
    let before = vec![put(1, 1, 1, 2), put(1, 2, 3, 8), get(2, Some(1), 4, 5)];
    let after = vec![put(1, 1, 1, 2), put(1, 2, 3, 8), get(2, Some(2), 4, 5)];
    assert_linearizable(before);
    assert_linearizable(after);
}

#[test]
fn reads_may_not_flip_back_to_an_older_value() {
    // Both reads overlap the write, but once one has seen the new value a later read
    // cannot see the old one.
    let operations = vec![
        put(1, 1, 1, 2),
        put(1, 2, 3, 20),
        get(2, Some(2), 4, 5),
        get(3, Some(1), 6, 7),
    ];
    assert_eq!(violation_of(operations).stuck, OpId(3));
}

#[test]
fn lost_write_is_not_linearizable() {
    // An acknowledged write vanishes: a later read sees the key absent.
    let violation = violation_of(vec![put(1, 1, 1, 2), get(2, None, 3, 4)]);
    assert_eq!(violation.stuck, OpId(1));
}

#[test]
fn lost_update_two_swaps_from_one_value_is_not_linearizable() {
    // Both compare-and-sets claim to have replaced 0; only one can have.
    let operations = vec![
        put(1, 0, 1, 2),
        cas(2, 0, 1, true, 3, 6),
        cas(3, 0, 2, true, 4, 5),
    ];
    violation_of(operations);
}

#[test]
fn failed_cas_must_have_seen_another_value() {
    assert_linearizable(vec![put(1, 0, 1, 2), cas(2, 1, 2, false, 3, 4)]);
    violation_of(vec![put(1, 0, 1, 2), cas(2, 0, 2, false, 3, 4)]);
}

#[test]
fn cas_with_unknown_outcome_may_take_effect_later_or_never() {
    let cas_0_to_1 = Input::Cas {
        from: Some(0),
        to: 1,
    };
    // It took effect: a later read sees 1.
    assert_linearizable(vec![
        put(1, 0, 1, 2),
        unknown(2, cas_0_to_1, 3),
        get(3, Some(1), 5, 6),
    ]);
    // It never did: a later read sees 0.
    assert_linearizable(vec![
        put(1, 0, 1, 2),
        unknown(2, cas_0_to_1, 3),
        get(3, Some(0), 5, 6),
    ]);
    // It took effect long after its caller gave up, between two reads.
    assert_linearizable(vec![
        put(1, 0, 1, 2),
        unknown(2, cas_0_to_1, 3),
        get(3, Some(0), 10, 11),
        get(3, Some(1), 12, 13),
    ]);
    // Once seen, it cannot be undone.
    let undone = vec![
        put(1, 0, 1, 2),
        unknown(2, cas_0_to_1, 3),
        get(3, Some(1), 5, 6),
        get(3, Some(0), 7, 8),
    ];
    assert_eq!(violation_of(undone).stuck, OpId(3));
    // It cannot take effect before it was called.
    let from_the_future = vec![
        put(1, 0, 1, 2),
        get(3, Some(1), 3, 4),
        unknown(2, cas_0_to_1, 5),
    ];
    assert_eq!(violation_of(from_the_future).stuck, OpId(1));
}

#[test]
fn put_with_unknown_outcome_may_be_seen_but_not_unseen() {
    let put_1 = Input::Put { value: 1 };
    assert_linearizable(vec![unknown(1, put_1, 1), get(2, Some(1), 5, 6)]);
    assert_linearizable(vec![unknown(1, put_1, 1), get(2, None, 5, 6)]);
    violation_of(vec![
        unknown(1, put_1, 1),
        get(2, Some(1), 5, 6),
        get(2, None, 7, 8),
    ]);
}

#[test]
fn unobserved_unknown_writes_do_not_multiply_the_search() {
    // 40 writes nobody saw the outcome of, all concurrent with a long run of failed
    // compare-and-sets and reads; then a read that contradicts everything. Without dominance
    // between configurations, each subset of the 40 writes would be explored (2^40).
    let mut operations = vec![put(1, 0, 1, 2)];
    for client in 0..40 {
        operations.push(unknown(
            100 + client,
            Input::Put {
                value: 1000 + client,
            },
            3,
        ));
    }
    for step in 0..30 {
        let at = 10 + 4 * step;
        operations.push(cas(2, 7, 8, false, at, at + 1));
        operations.push(get(3, Some(0), at + 2, at + 3));
    }
    operations.push(get(3, Some(5), 500, 501));
    let history = History::new(operations).expect("well formed");
    let report = check(&history, CheckLimits::default());
    assert!(
        matches!(report.verdict, Verdict::NotLinearizable(_)),
        "{:?}",
        report.verdict
    );
    assert!(
        report.states_explored < 100_000,
        "explored {}",
        report.states_explored
    );
}

#[test]
fn unknown_operations_that_change_nothing_do_not_multiply_the_search() {
    // 40 compare-and-sets with unknown outcome whose `from` never holds: spending any subset
    // of them changes nothing, so the search must not enumerate the subsets.
    let mut operations = vec![put(1, 0, 1, 2)];
    for client in 0..40 {
        let input = Input::Cas {
            from: Some(5),
            to: 1000 + client,
        };
        operations.push(unknown(100 + client, input, 3));
    }
    for step in 0..30 {
        let at = 10 + 4 * step;
        operations.push(cas(2, 7, 8, false, at, at + 1));
        operations.push(get(3, Some(0), at + 2, at + 3));
    }
    operations.push(get(3, Some(9), 500, 501));
    let history = History::new(operations).expect("well formed");
    let report = check(&history, CheckLimits::default());
    assert!(
        matches!(report.verdict, Verdict::NotLinearizable(_)),
        "{:?}",
        report.verdict
    );
    assert!(
        report.states_explored < 100_000,
        "explored {}",
        report.states_explored
    );
}

#[test]
fn reads_with_unknown_outcome_are_dropped() {
    let history =
        History::new(vec![put(1, 1, 1, 2), unknown(2, Input::Get, 3)]).expect("well formed");
    assert_eq!(history.len(), 1);
}

#[test]
fn events_at_equal_times_overlap() {
    // The get is called at the instant the put returns: they are concurrent.
    assert_linearizable(vec![put(1, 1, 1, 2), get(2, None, 2, 3)]);
}

#[test]
fn keys_are_checked_independently() {
    let mut other_key = put(1, 9, 1, 2);
    other_key.key = KEY + 1;
    let mut other_key_read = get(2, Some(9), 3, 4);
    other_key_read.key = KEY + 1;
    // On KEY, a read of 9 would be illegal; 9 lives on the other key.
    assert_linearizable(vec![other_key, other_key_read, get(3, None, 5, 6)]);
    let stale = get(3, Some(9), 5, 6);
    let violation = violation_of(vec![other_key, other_key_read, stale]);
    assert_eq!(violation.key, KEY);
    assert_eq!(violation.stuck, OpId(2));
}

#[test]
fn bounded_search_reports_unknown() {
    let history = History::new(vec![put(1, 1, 1, 2), get(2, Some(1), 3, 4)]).expect("well formed");
    let limits = CheckLimits {
        states_explored_max_per_key: 1,
    };
    let report = check(&history, limits);
    assert_eq!(report.verdict, Verdict::Unknown { keys: vec![KEY] });
    assert!(check(&history, CheckLimits::default()).is_linearizable());
}

#[test]
fn history_rejects_a_return_before_its_call() {
    let error = History::new(vec![put(1, 1, 5, 4)]).expect_err("returns before call");
    assert!(matches!(
        error,
        HistoryError::ReturnBeforeCall { op: OpId(0), .. }
    ));
}

#[test]
fn history_rejects_an_output_that_does_not_answer_the_input() {
    let wrong = returned(1, Input::Get, 1, 2, Output::CasSwapped);
    let error = History::new(vec![wrong]).expect_err("a get cannot swap");
    assert!(matches!(error, HistoryError::OutputMismatch { .. }));
}

#[test]
fn recorder_orders_events_and_leaves_abandoned_operations_unknown() {
    let mut recorder = Recorder::new();
    let first = recorder.call(1, KEY, Input::Put { value: 1 });
    let second = recorder.call(2, KEY, Input::Get);
    recorder.complete(second, Output::Got(None));
    recorder.abandon(first);
    let _ignored = recorder.call(3, KEY, Input::Get);
    let history = recorder.history();
    assert_eq!(history.len(), 2, "the unobserved get is dropped");
    assert_eq!(history.operations()[0].end, End::Unknown);
    assert_eq!(history.operations()[0].call_at, 1);
    assert_eq!(history.operations()[1].call_at, 2);
    assert_eq!(
        history.operations()[1].end,
        End::Returned {
            at: 3,
            output: Output::Got(None)
        }
    );
    assert!(check(&history, CheckLimits::default()).is_linearizable());
}

#[test]
fn explain_quotes_the_stuck_operation() {
    let history = History::new(vec![put(1, 1, 1, 2), get(2, None, 3, 4)]).expect("well formed");
    let report = check(&history, CheckLimits::default());
    let text = report.explain(&history);
    assert!(text.contains("op#1"), "{text}");
    assert!(
        text.contains("client 2 key 7 get called at 3, returned at 4: nil"),
        "{text}"
    );
}

fn random_operation(rng: &mut SimRng, client: ClientId, unknown_in_4: u64) -> Operation {
    let small_value = |rng: &mut SimRng| rng.below(3);
    let input = match rng.below(3) {
        0 => Input::Get,
        1 => Input::Put {
            value: small_value(rng),
        },
        _ => Input::Cas {
            from: (rng.below(4) != 0).then(|| small_value(rng)),
            to: small_value(rng),
        },
    };
    let call_at = rng.below(12);
    let output = match input {
        Input::Get => Output::Got((rng.below(4) != 0).then(|| small_value(rng))),
        Input::Put { .. } => Output::PutDone,
        Input::Cas { .. } if rng.below(2) == 0 => Output::CasSwapped,
        Input::Cas { .. } => Output::CasFailed,
    };
    let end = if rng.below(4) < unknown_in_4 {
        End::Unknown
    } else {
        End::Returned {
            at: call_at + rng.below(6),
            output,
        }
    };
    Operation {
        client,
        key: KEY,
        input,
        call_at,
        end,
    }
}

/// The definition, by brute force: some subset of the unknown operations plus every returned
/// one, in some order that respects real time, is legal for a register.
fn brute_force_linearizable(operations: &[Operation]) -> bool {
    fn extend(operations: &[Operation], used: &mut Vec<bool>, state: Option<Value>) -> bool {
        let all_returned_used = operations
            .iter()
            .zip(used.iter())
            .all(|(operation, used)| *used || operation.end == End::Unknown);
        if all_returned_used {
            return true;
        }
        for candidate in 0..operations.len() {
            if used[candidate] {
                continue;
            }
            // Legal to place next only if no unused operation returned before it was called.
            let call_at = operations[candidate].call_at;
            let blocked = operations.iter().zip(used.iter()).any(|(other, used)| {
                !used && matches!(other.end, End::Returned { at, .. } if at < call_at)
            });
            if blocked {
                continue;
            }
            let Some(next) = search_step_for_test(state, &operations[candidate]) else {
                continue;
            };
            used[candidate] = true;
            let found = extend(operations, used, next);
            used[candidate] = false;
            if found {
                return true;
            }
        }
        false
    }
    let mut used = vec![false; operations.len()];
    extend(operations, &mut used, None)
}

/// The register semantics, restated independently of the search's own step function.
fn search_step_for_test(state: Option<Value>, operation: &Operation) -> Option<Option<Value>> {
    let output = match operation.end {
        End::Returned { output, .. } => Some(output),
        End::Unknown => None,
    };
    match operation.input {
        Input::Get => match output {
            Some(Output::Got(seen)) if seen == state => Some(state),
            _ => None,
        },
        Input::Put { value } => Some(Some(value)),
        Input::Cas { from, to } => match output {
            Some(Output::CasSwapped) if state == from => Some(Some(to)),
            Some(Output::CasFailed) if state != from => Some(state),
            None if state == from => Some(Some(to)),
            None => Some(state),
            _ => None,
        },
    }
}

/// Compares the search with brute force on `histories` random histories where an operation's
/// outcome is unknown with probability `unknown_in_4` / 4.
fn cross_check_with_brute_force(seed: u64, histories: usize, unknown_in_4: u64) {
    let mut rng = SimRng::new(seed);
    let (mut linearizable, mut not_linearizable) = (0, 0);
    for _ in 0..histories {
        let count = 1 + rng.below(7);
        let operations: Vec<Operation> = (0..count)
            .map(|c| random_operation(&mut rng, c, unknown_in_4))
            .collect();
        let history = History::new(operations).expect("generated histories are well formed");
        let expected = brute_force_linearizable(history.operations());
        let report = check(&history, CheckLimits::default());
        assert!(!matches!(report.verdict, Verdict::Unknown { .. }));
        assert_eq!(
            report.is_linearizable(),
            expected,
            "verdicts differ on {:#?}",
            history.operations()
        );
        if expected {
            linearizable += 1;
        } else {
            not_linearizable += 1;
        }
    }
    // The generator must exercise both verdicts, or the comparison proves little.
    assert!(
        linearizable > histories / 10,
        "only {linearizable} linearizable histories"
    );
    assert!(
        not_linearizable > histories / 10,
        "only {not_linearizable} violations"
    );
}

#[test]
fn search_agrees_with_brute_force_on_small_random_histories() {
    cross_check_with_brute_force(0x5eed, 20_000, 1);
}

#[test]
fn search_agrees_with_brute_force_when_most_outcomes_are_unknown() {
    cross_check_with_brute_force(0xface, 20_000, 3);
}

/// Plain Wing & Gong search with exact memoization and none of the search's reductions: the
/// reference the reductions must agree with on histories too long for brute force.
fn reference_linearizable(operations: &[Operation]) -> bool {
    fn search(
        operations: &[Operation],
        done: u64,
        state: Option<Value>,
        seen: &mut std::collections::HashSet<(u64, Option<Value>)>,
    ) -> bool {
        let pending_return = |index: usize| {
            done & (1 << index) == 0 && matches!(operations[index].end, End::Returned { .. })
        };
        let Some(first_return) = (0..operations.len())
            .filter(|&index| pending_return(index))
            .filter_map(|index| match operations[index].end {
                End::Returned { at, .. } => Some(at),
                End::Unknown => None,
            })
            .min()
        else {
            return true; // every operation that returned is linearized
        };
        if !seen.insert((done, state)) {
            return false;
        }
        (0..operations.len()).any(|index| {
            done & (1 << index) == 0
                && operations[index].call_at <= first_return
                && search_step_for_test(state, &operations[index])
                    .is_some_and(|next| search(operations, done | (1 << index), next, seen))
        })
    }
    assert!(operations.len() <= 64, "the reference keeps a u64 bitset");
    search(operations, 0, None, &mut std::collections::HashSet::new())
}

/// A history of one key from a true register: every operation takes effect at a random
/// instant inside its interval (or, for some with unknown outcome, never); then, half the
/// time, one read is corrupted. Values are drawn from 0..4, or are all distinct (as the
/// simulator's workload writes them) when `unique_values`.
fn register_history(
    rng: &mut SimRng,
    count: u64,
    clients: u64,
    unique_values: bool,
) -> Vec<Operation> {
    let mut free_at = vec![0; clients as usize];
    let mut planned: Vec<(Operation, Option<u64>)> = Vec::new();
    for index in 0..count {
        let client = index % clients;
        let call_at = free_at[client as usize] + rng.below(3);
        let duration = 1 + rng.below(12);
        free_at[client as usize] = call_at + duration + 1;
        let (value, from) = if unique_values {
            (100 + index, 100 + index.saturating_sub(1 + rng.below(4)))
        } else {
            (rng.below(4), rng.below(4))
        };
        let input = match rng.below(3) {
            0 => Input::Get,
            1 => Input::Put { value },
            _ => Input::Cas {
                from: Some(from),
                to: value,
            },
        };
        let lost = input != Input::Get && rng.below(4) == 0;
        let effect_at = (!lost || rng.below(2) == 0).then(|| call_at + rng.below(duration));
        let end = if lost {
            End::Unknown
        } else {
            End::Returned {
                at: call_at + duration,
                output: Output::PutDone,
            }
        };
        let operation = Operation {
            client,
            key: KEY,
            input,
            call_at,
            end,
        };
        planned.push((operation, effect_at));
    }
    let mut order: Vec<usize> = (0..planned.len())
        .filter(|&i| planned[i].1.is_some())
        .collect();
    order.sort_by_key(|&i| (planned[i].1, i));
    let mut state = None;
    for index in order {
        let operation = &mut planned[index].0;
        let output = match operation.input {
            Input::Get => Output::Got(state),
            Input::Put { value } => {
                state = Some(value);
                Output::PutDone
            }
            Input::Cas { from, to } if from == state => {
                state = Some(to);
                Output::CasSwapped
            }
            Input::Cas { .. } => Output::CasFailed,
        };
        if let End::Returned {
            output: recorded, ..
        } = &mut operation.end
        {
            *recorded = output;
        }
    }
    let mut operations: Vec<Operation> = planned.into_iter().map(|(op, _)| op).collect();
    if rng.below(2) == 0 {
        let reads: Vec<usize> = (0..operations.len())
            .filter(|&i| {
                matches!(
                    operations[i].end,
                    End::Returned {
                        output: Output::Got(_),
                        ..
                    }
                )
            })
            .collect();
        if !reads.is_empty() {
            let read = reads[rng.below(reads.len() as u64) as usize];
            // A value some operation of this history writes: the read becomes stale, early
            // or simply wrong, which is what a broken store would show.
            let written = operations[rng.below(operations.len() as u64) as usize].input;
            let seen = match written {
                Input::Put { value } | Input::Cas { to: value, .. } => value,
                Input::Get => rng.below(4),
            };
            if let End::Returned { output, .. } = &mut operations[read].end {
                *output = Output::Got(Some(seen));
            }
        }
    }
    operations
}

/// Compares the search with the plain reference on `histories` generated histories.
fn cross_check_with_plain_wing_gong(seed: u64, histories: usize, unique_values: bool) {
    let mut rng = SimRng::new(seed);
    let (mut linearizable, mut not_linearizable, mut undecided) = (0, 0, 0);
    for _ in 0..histories {
        let count = 10 + rng.below(30);
        let clients = 2 + rng.below(5);
        let operations = register_history(&mut rng, count, clients, unique_values);
        let history = History::new(operations).expect("well formed");
        let expected = reference_linearizable(history.operations());
        let report = check(&history, CheckLimits::default());
        if matches!(report.verdict, Verdict::Unknown { .. }) {
            // A bounded search may give up (the problem is NP-complete); it must never be
            // wrong, and giving up must stay rare.
            undecided += 1;
            continue;
        }
        assert_eq!(
            report.is_linearizable(),
            expected,
            "verdicts differ ({:?}) on {:#?}",
            report.verdict,
            history.operations()
        );
        if expected {
            linearizable += 1;
        } else {
            not_linearizable += 1;
        }
    }
    eprintln!("linearizable {linearizable}, not {not_linearizable}, undecided {undecided}");
    assert!(
        linearizable > histories / 10,
        "only {linearizable} linearizable"
    );
    assert!(
        not_linearizable > histories / 10,
        "only {not_linearizable} violations"
    );
    assert!(
        undecided <= histories / 1000,
        "{undecided} undecided histories"
    );
}

#[test]
fn search_agrees_with_plain_wing_gong_on_longer_histories() {
    cross_check_with_plain_wing_gong(0xbeef, 3_000, false);
}

#[test]
fn search_agrees_with_plain_wing_gong_when_values_are_unique() {
    cross_check_with_plain_wing_gong(0xcafe, 3_000, true);
}
