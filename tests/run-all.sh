#!/usr/bin/env bash
# Sets up this machine and runs the whole r3fs test suite: formatting, lints
# (with and without the FoundationDB backend), every unit, integration,
# process and FUSE mount test, short benchmark runs, and the main job.
# Needs root for apt-get; a Rust toolchain with rustfmt and clippy.
set -euo pipefail
cd "$(dirname "$0")/.."

# bindfs: the libfuse peer the FUSE benchmarks compare against;
# fonts-dejavu-core: text in the channels benchmark chart.
packages=(build-essential pkg-config libclang-dev bindfs fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }

step() { echo; echo "== $*"; }
start=$(date +%s)

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (workspace)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo clippy (FoundationDB backend, type-checked only: no libfdb_c here)"
cargo clippy -p r3fs-kv -p r3fs-cli --features r3fs-kv/fdb,r3fs-cli/fdb --all-targets --locked -- -D warnings

step "cargo test (workspace)"
cargo test --workspace --locked

if [ -n "${FDB_CLUSTER_FILE:-}" ]; then
  step "KV conformance suite against FoundationDB ($FDB_CLUSTER_FILE)"
  cargo test -p r3fs-kv --features fdb --locked --test fdb_conformance
else
  echo "FDB_CLUSTER_FILE not set: skipping the FoundationDB conformance run"
fi

step "release build"
cargo build --release --locked -p r3fs-cli -p r3fs-bench

step "r3fs-bench meta and storage (short runs: check the benchmarks work; figures are not judged)"
target/release/r3fs-bench meta --ops 2000 --listings 40
target/release/r3fs-bench storage --size-mib 16 --random-reads 400 --repeats 1

step "r3fs-bench fuse and channels (short runs; root and /dev/fuse)"
target/release/r3fs-bench fuse --files 1000 --size-mib 64 --random-reads 2000
mkdir -p target/bench && target/release/r3fs-bench channels --quick --chart target/bench/channels.png

step "cluster of separate processes (kv, 2 mgmtd, 2 meta) through r3fs fs"
R3FS_BIN=target/release/r3fs bash tests/scripts/local-cluster.sh

step "main job: r3fs mount on a local cluster, write, read back, status, remount"
R3FS_BIN=target/release/r3fs bash tests/scripts/main-job.sh --check

echo
echo "all r3fs tests passed in $(( $(date +%s) - start )) s"
