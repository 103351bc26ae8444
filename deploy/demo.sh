#!/usr/bin/env bash
# Sets everything up, then runs the demo: a local Kafka-protocol broker and Redis, the example
# fraud workload, generated transactions, decisions flowing, and a summary.
# Extra arguments go to `verdict demo` (e.g. --count 50000 --rate 10000).
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/verdict/target}"
exec "$CARGO_TARGET_DIR/release/verdict" demo "$@"
