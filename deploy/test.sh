#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: unit tests, property tests, and the
# end-to-end tests, which start their own Tansu broker and redis-server on free ports.
# One release build serves the binary, the tests and the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/verdict/target}"
# End-to-end tests each start servers and a pipeline; two at a time fit on two cores.
cargo test --release --workspace -- --test-threads=2 "$@"
