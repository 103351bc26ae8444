#!/usr/bin/env bash
# Interleaved A/B runs of `verdict bench` open loop, for comparing two builds (or two settings)
# on a noisy machine: the variants alternate within each round, so a slow minute of the box
# hits both rather than one. One line per run: CPU µs per decision, p50/p99 ms, peak RSS MiB,
# peak anonymous RSS MiB (heap and buffers, without the executable's mapped pages: compare
# builds on this one), whether the rate was sustained, and verdict's per-stage timers.
#
#   pipeline/bench/ab.sh ROUNDS OUT "label|binary|extra bench args" ...
#   pipeline/bench/ab.sh 5 ab.txt "before|/tmp/verdict-before|" "after|target/release/verdict|"
#
# Environment: RATE (tx/s, default 10000), COUNT (transactions per run, default 100000).
set -euo pipefail
rounds=$1 out=$2
shift 2
rate=${RATE:-10000} count=${COUNT:-100000}
logs=$(mktemp -d)
for round in $(seq 1 "$rounds"); do
  for spec in "$@"; do
    IFS='|' read -r label binary extra <<< "$spec"
    log=$logs/$label-$round.log
    # shellcheck disable=SC2086 # extra holds several arguments
    "$binary" bench --rates "$rate" --count "$count" $extra > "$log" 2>&1 || true
    line=$(grep -E "^  verdict +$rate tx/s" "$log" || true)
    field() { grep -oE "$1" <<< "$line" | head -1 | awk "{print \$$2}"; }
    if [ -z "$line" ]; then
      verdict="FAILED (log: $log)"
    elif grep -q "NOT sustained" <<< "$line"; then
      verdict="not sustained"
    else
      verdict="sustained"
    fi
    timers=$(grep "verdict's timers" "$log" | sed 's/.*mean ms per batch: //' || true)
    echo "round $round $label cpu_us $(field 'CPU [0-9.]+' 2) p50_ms $(field 'p50 [0-9.]+' 2)" \
      "p99_ms $(field 'p99 [0-9.]+' 2) rss_mib $(field 'RSS peak [0-9]+' 3) anon_mib $(field 'anonymous peak [0-9.]+' 3) $verdict | $timers" |
      tee -a "$out"
  done
done
