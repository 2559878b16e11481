#!/usr/bin/env bash
# Runs the AFL++ targets for a bounded time each: fuzz/run.sh [SECONDS] [TARGET...]
# (default 600 s each; targets: proto manifest store). Needs cargo-afl
# (`cargo install cargo-afl --locked`; `cargo afl config --build` once).
# Findings land in fuzz/out/<target>/default/crashes; every crash becomes a
# regression test in the crate that decoded it.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-600}"
shift || true
targets=("${@:-proto manifest store}")
# shellcheck disable=SC2206
targets=(${targets[@]})
cargo afl build --release
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1
pids=()
for t in "${targets[@]}"; do
  mkdir -p "out/$t"
  timeout --preserve-status "$secs" cargo afl fuzz -i "seeds/$t" -o "out/$t" "target/release/$t" \
    > "out/$t.log" 2>&1 &
  pids+=("$!")
done
status=0
for p in "${pids[@]}"; do wait "$p" || true; done
for t in "${targets[@]}"; do
  stats="out/$t/default/fuzzer_stats"
  crashes=$(find "out/$t/default/crashes" -type f ! -name README.txt 2>/dev/null | wc -l)
  execs=$(awk -F: '/^execs_done/ {gsub(/ /,"",$2); print $2}' "$stats" 2>/dev/null || echo 0)
  echo "$t: ${execs:-0} executions, $crashes crashes"
  if [ "$crashes" -gt 0 ]; then status=1; fi
done
exit "$status"
