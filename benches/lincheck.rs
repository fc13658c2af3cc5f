//! Linearizability checker throughput on synthetic key-value histories.
//!
//! `cargo bench --bench lincheck -- [OPS] [CLIENTS] [KEYS] [UNKNOWN_PERCENT]` (defaults
//! 100000 8 16 2): clients run get / put / cas against a true atomic map, each operation
//! taking effect at a random instant between its call and its return; some lose their answer
//! (unknown outcome; half of those never take effect). The history is linearizable by
//! construction, so the checker must say so. Prints
//! `BENCH lincheck_ops_per_s <v> ops/s` and `BENCH lincheck_states_per_s <v> states/s`.

use std::collections::HashMap;
use std::time::Instant;

use flotilla::lincheck::{self, CheckLimits, End, History, Input, Operation, Output, Value};
use flotilla::raft::sim::rng::SimRng;

struct Planned {
    operation: Operation,
    effect_at: Option<u64>,
}

fn generate(ops: usize, clients: u64, keys: u64, unknown_percent: u64) -> History {
    let mut rng = SimRng::new(42);
    let mut free_at = vec![0_u64; clients as usize];
    let mut planned = Vec::with_capacity(ops);
    let mut next_value: Value = 1;
    for index in 0..ops {
        let client = index as u64 % clients;
        let call_at = free_at[client as usize] + 1 + rng.below(3);
        let duration = 2 + rng.below(20);
        let key = rng.below(keys);
        let input = match rng.below(10) {
            0..=4 => Input::Get,
            5..=7 => {
                next_value += 1;
                Input::Put { value: next_value }
            }
            _ => {
                next_value += 1;
                Input::Cas {
                    from: Some(next_value - 1 - rng.below(3)),
                    to: next_value,
                }
            }
        };
        let lost = rng.below(100) < unknown_percent;
        let effect_at = (!lost || rng.below(2) == 0).then(|| call_at + rng.below(duration));
        let end = if lost {
            End::Unknown
        } else {
            End::Returned {
                at: call_at + duration,
                output: Output::PutDone, // replaced once the effect is known
            }
        };
        free_at[client as usize] = call_at + duration;
        planned.push(Planned {
            operation: Operation {
                client,
                key,
                input,
                call_at,
                end,
            },
            effect_at,
        });
    }
    apply_in_effect_order(&mut planned);
    History::new(planned.into_iter().map(|plan| plan.operation).collect())
        .expect("generated histories are well formed")
}

/// Runs the operations against a true map in the order they take effect, filling outputs.
fn apply_in_effect_order(planned: &mut [Planned]) {
    let mut order: Vec<usize> = (0..planned.len())
        .filter(|&index| planned[index].effect_at.is_some())
        .collect();
    order.sort_by_key(|&index| planned[index].effect_at);
    let mut map: HashMap<u64, Value> = HashMap::new();
    for index in order {
        let operation = &mut planned[index].operation;
        let current = map.get(&operation.key).copied();
        let output = match operation.input {
            Input::Get => Output::Got(current),
            Input::Put { value } => {
                map.insert(operation.key, value);
                Output::PutDone
            }
            Input::Cas { from, to } if current == from => {
                map.insert(operation.key, to);
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
}

fn arg(index: usize, default: u64) -> u64 {
    std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .nth(index)
        .map_or(default, |text| text.parse().expect("numeric argument"))
}

fn main() {
    let ops = arg(0, 100_000) as usize;
    let clients = arg(1, 8);
    let keys = arg(2, 16);
    let unknown_percent = arg(3, 2);
    let history = generate(ops, clients, keys, unknown_percent);
    let started = Instant::now();
    let report = lincheck::check(&history, CheckLimits::default());
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        report.is_linearizable(),
        "a history generated from a true map must be linearizable: {:?}",
        report.verdict
    );
    println!(
        "BENCH lincheck_ops_per_s {:.0} ops/s",
        history.len() as f64 / seconds
    );
    println!(
        "BENCH lincheck_states_per_s {:.0} states/s",
        report.states_explored as f64 / seconds
    );
}
