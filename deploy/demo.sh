#!/usr/bin/env bash
# Sets everything up, then runs the demo: a local Kafka-protocol broker and Redis, the example
# fraud workload, generated transactions, decisions flowing, and a summary.
# Extra arguments go to `verdict demo` (e.g. --count 50000 --rate 10000).
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo, rustup and the build cache live under $HOME; a bare CI environment may not set it.
export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
# rustup installs cargo under ~/.cargo/bin; make sure it is found even with a minimal PATH.
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
deploy/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/verdict/target}"
exec "$CARGO_TARGET_DIR/release/verdict" demo "$@"
