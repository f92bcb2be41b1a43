#!/usr/bin/env bash
# The main job until the FUSE client lands: start a meta server on the embedded
# KV engine (loopback only, data in a temporary directory), work with the
# namespace through `r3fs fs`, restart the server to show the data persists,
# and stop it. Cleans up after itself, also on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${R3FS_BIN:-target/release/r3fs}
if [ ! -x "$BIN" ]; then
  cargo build --release --locked -p r3fs-cli
fi
DATA=$(mktemp -d /tmp/r3fs-local.XXXXXX)
PID=
cleanup() {
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  rm -rf "$DATA"
}
trap cleanup EXIT

start_meta() {
  : >"$DATA/meta.log"
  "$BIN" meta --data-dir "$DATA/meta" --listen 127.0.0.1:0 2>>"$DATA/meta.log" &
  PID=$!
  for _ in $(seq 200); do
    ADDR=$(grep -o 'listen=127\.0\.0\.1:[0-9]*' "$DATA/meta.log" | head -n1 | cut -d= -f2 || true)
    [ -n "$ADDR" ] && return 0
    kill -0 "$PID" 2>/dev/null || { cat "$DATA/meta.log"; echo "meta server died" >&2; exit 1; }
    sleep 0.05
  done
  cat "$DATA/meta.log"; echo "meta server did not come up" >&2; exit 1
}

stop_meta() {
  kill -TERM "$PID"; wait "$PID"; PID=
}

fs() {
  echo "\$ r3fs fs $*"
  "$BIN" fs --meta "$ADDR" "$@"
}

start_meta
echo "meta server on $ADDR, data in $DATA/meta"
fs mkdir -p /projects/r3fs/docs
fs touch /projects/r3fs/README
fs ln -s /projects/r3fs /latest
fs mv /projects/r3fs/README /projects/r3fs/docs/README
fs setfattr /projects/r3fs/docs/README user.owner storage-team
fs getfattr /projects/r3fs/docs/README user.owner
fs ls -l /latest/docs
fs stat /projects/r3fs/docs/README
echo "restarting the meta server on the same data directory"
stop_meta
start_meta
fs ls -l /projects/r3fs
fs statfs
stop_meta
echo "local meta demo: OK"
