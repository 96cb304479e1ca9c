#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ for a bounded time each, on the stable toolchain without a
# sanitizer (`cargo fuzz run -s none`), and fails on the first crash, leak of time or memory, or
# failed invariant. New inputs go to a scratch directory; the committed seed corpus (fuzz/corpus/)
# is only read.
#
#   scripts/fuzz.sh                 every target, FUZZ_SECONDS (default 15) seconds each
#   scripts/fuzz.sh 600 svid socks5 these targets, 600 seconds each
#
# A crashing input is kept in fuzz/artifacts/<target>/; replay it with
# `cd fuzz && cargo fuzz run -s none <target> artifacts/<target>/<file>`. Longer runs and runs
# with sanitizers: see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-15}"
if [ "$#" -gt 0 ]; then
  seconds="$1"
  shift
fi
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 1; }
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

work="$(mktemp -d -t meshwire-fuzz.XXXXXX)"
trap 'rm -rf "$work"' EXIT

cargo fuzz build -s none
status=0
for target in "${targets[@]}"; do
  mkdir -p "$work/corpus/$target"
  log="$work/$target.log"
  echo "== fuzz $target: ${seconds} s"
  # -timeout: one input taking more than 10 s is a hang; -rss_limit_mb: a leak or blow-up.
  if cargo fuzz run -s none "$target" "$work/corpus/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    echo "   ok: ${execs:-?} executions, ${rate:-?}/s"
  else
    status=1
    echo "   FAILED: $target (last lines of its log below; the input is in fuzz/artifacts/$target/)" >&2
    tail -n 60 "$log" >&2
  fi
done
exit "$status"
