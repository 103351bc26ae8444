#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: unit tests, property tests, and the
# end-to-end tests, which start their own Tansu broker and redis-server on free ports.
# One release build serves the binary, the tests and the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo, rustup and the build cache live under $HOME; a bare CI environment may not set it.
export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
# rustup installs cargo under ~/.cargo/bin; make sure it is found even with a minimal PATH.
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
deploy/setup.sh

# Tools the tests use to validate what verdict exports and the deployment files (no Docker
# engine or cluster needed): promtool (Debian's prometheus package), node for the CRD and
# Compose schemas, kubernetes-validate for the Kubernetes API schemas.
tools=()
command -v promtool >/dev/null 2>&1 || tools+=(prometheus)
command -v node >/dev/null 2>&1 || tools+=(nodejs npm)
if [ ${#tools[@]} -gt 0 ]; then
  echo "test: installing ${tools[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  # The prometheus package only provides promtool here; its service is not started.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${tools[@]}" >/dev/null
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r deploy/validate/requirements.txt
(cd deploy/validate && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/verdict/target}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# End-to-end tests each start servers and a pipeline; two at a time fit on two cores.
# (No doc tests: the crates' docs hold no runnable examples.)
set +e
cargo test --release --workspace --lib --bins --tests -- --test-threads=2 "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "verdict: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
