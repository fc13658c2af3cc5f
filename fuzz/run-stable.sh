#!/usr/bin/env bash
# Builds and runs one fuzz target with libFuzzer on the stable toolchain (cargo-fuzz is not
# installed and there is no nightly): the coverage instrumentation cargo-fuzz would add, as
# plain codegen flags, for the target triple only (so build scripts stay uninstrumented).
# No sanitizer: Rust's bounds and overflow checks (debug assertions on) catch what matters.
#   fuzz/run-stable.sh TARGET SECONDS [WORKDIR]   (default WORKDIR: /tmp/flotilla-fuzz)
# Corpus in WORKDIR/corpus-TARGET, crashes in WORKDIR/art-TARGET, log in WORKDIR/fuzz-TARGET.log.
set -euo pipefail
target=$1
seconds=$2
work=${3:-/tmp/flotilla-fuzz}
triple=$(rustc -vV | sed -n 's/^host: //p')
cd "$(dirname "$0")"
# As it was run (2026-12-08); the flags below may not need it.
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$work/target"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
cargo build --release --target "$triple" --bin "$target"
mkdir -p "$work/corpus-$target" "$work/art-$target"
exec nice -n 19 "$work/target/$triple/release/$target" -max_total_time="$seconds" \
  -print_final_stats=1 -rss_limit_mb=2048 -timeout=20 -artifact_prefix="$work/art-$target/" \
  "$work/corpus-$target" >"$work/fuzz-$target.log" 2>&1
