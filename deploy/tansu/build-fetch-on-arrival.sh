#!/usr/bin/env bash
# Builds Tansu 0.6.0 with one fix (fetch-on-arrival.patch beside this script) for latency
# measurements: 0.6.0 holds every Fetch for the consumer's whole `fetch.wait.max.ms`, even
# when it found records at once, so each broker hop costs that wait; Apache Kafka answers a
# Fetch as soon as it holds `fetch.min.bytes`. The patched broker answers then too, and while
# it has too little it looks again every millisecond until the wait is over.
#
# Not part of the setup: the test suite and the demo use the wheel's unpatched Tansu. The
# build took 6.5 minutes on two cores here (cold build folder). Use the result with
#   VERDICT_TANSU=~/.cache/tansu-fetch-on-arrival/bin/tansu $T bench ...
#
# Usage: deploy/tansu/build-fetch-on-arrival.sh [INSTALL_ROOT]   (default ~/.cache/tansu-fetch-on-arrival)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=${1:-$HOME/.cache/tansu-fetch-on-arrival}
work="$root/src"
rm -rf "$work"
mkdir -p "$work/fetch" "$root/bin"

# Both crates' sources through cargo itself: a stub manifest that names them, `cargo fetch`,
# then the registry's .crate files, which are tarballs. tansu (binary only) brings the
# Cargo.lock its release was built with; tansu-storage is the crate the patch changes.
cat > "$work/fetch/Cargo.toml" <<'EOF'
[package]
name = "fetch-tansu-sources"
version = "0.0.0"
edition = "2021"
publish = false

[lib]
path = "lib.rs"

[dependencies]
tansu = { version = "=0.6.0", default-features = false }
tansu-storage = { version = "=0.6.0", default-features = false }
EOF
touch "$work/fetch/lib.rs"
cargo fetch --manifest-path "$work/fetch/Cargo.toml"
cache="${CARGO_HOME:-$HOME/.cargo}/registry/cache"
for crate in tansu-0.6.0 tansu-storage-0.6.0; do
    file=$(ls "$cache"/*/"$crate.crate" | head -n 1)
    tar -xzf "$file" -C "$work"
done

patch -d "$work/tansu-storage-0.6.0" -p1 < "$here/fetch-on-arrival.patch"
cat >> "$work/tansu-0.6.0/Cargo.toml" <<'EOF'

[patch.crates-io]
tansu-storage = { path = "../tansu-storage-0.6.0" }
EOF

# The release's own Cargo.lock, so every other dependency is the version 0.6.0 shipped with;
# `dynostore` carries the `memory://` storage engine the benchmark uses.
CARGO_TARGET_DIR="$root/target" cargo build --release --bin tansu --features dynostore \
    --manifest-path "$work/tansu-0.6.0/Cargo.toml"
cp "$root/target/release/tansu" "$root/bin/tansu"
echo "built $root/bin/tansu"
