#!/usr/bin/env bash
# The main job until the FUSE client lands: a local cluster of what exists so
# far, on loopback, with data in a temporary directory:
#   r3fs kv       the embedded KV engine, shared by the servers below
#   r3fs mgmtd    two instances; one takes the primary lease
#   r3fs meta     two stateless meta servers on the same namespace
# then namespace work through `r3fs fs` (spread over both meta servers), the
# cluster as `r3fs admin` sees it, a restart of everything to show the data
# persists, and a clean stop. Cleans up after itself, also on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${R3FS_BIN:-target/release/r3fs}
if [ ! -x "$BIN" ]; then
  cargo build --release --locked -p r3fs-cli
fi
DATA=$(mktemp -d /tmp/r3fs-local.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$DATA"
}
trap cleanup EXIT

# start NAME ARGS...: runs `r3fs ARGS --listen 127.0.0.1:0`, waits for its
# "ready" log line and sets ADDR to the address it listens on.
start() {
  local name=$1; shift
  : >"$DATA/$name.log"
  "$BIN" "$@" --listen 127.0.0.1:0 2>>"$DATA/$name.log" &
  PIDS+=($!)
  for _ in $(seq 200); do
    ADDR=$(grep -o 'listen=127\.0\.0\.1:[0-9]*' "$DATA/$name.log" | head -n1 | cut -d= -f2 || true)
    [ -n "$ADDR" ] && return 0
    kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$DATA/$name.log"; echo "$name died" >&2; exit 1; }
    sleep 0.05
  done
  cat "$DATA/$name.log"; echo "$name did not come up" >&2; exit 1
}

stop_all() {
  for p in "${PIDS[@]}"; do kill -TERM "$p"; done
  for p in "${PIDS[@]}"; do wait "$p"; done
  PIDS=()
}

start_cluster() {
  start kv kv --data-dir "$DATA/kv"; KV=$ADDR
  start mgmtd1 mgmtd --node-id 1 --kv-remote "$KV" --lease-ms 4000 --extend-interval-ms 1000 --check-interval-ms 500; M1=$ADDR
  start mgmtd2 mgmtd --node-id 2 --kv-remote "$KV" --lease-ms 4000 --extend-interval-ms 1000 --check-interval-ms 500; M2=$ADDR
  start meta1 meta --engine remote --kv-remote "$KV" --data-dir "$DATA/meta1"; META1=$ADDR
  start meta2 meta --engine remote --kv-remote "$KV" --data-dir "$DATA/meta2"; META2=$ADDR
  echo "kv $KV, mgmtd $M1 $M2, meta $META1 $META2"
  for _ in $(seq 100); do
    "$BIN" admin --mgmtd "$M1,$M2" show-primary 2>/dev/null | grep -q '^primary' && return 0
    sleep 0.1
  done
  echo "no mgmtd took the primary lease" >&2; exit 1
}

run() {
  echo "\$ r3fs $*"
  "$BIN" "$@"
}

start_cluster
run admin --mgmtd "$M1,$M2" show-primary
run fs --meta "$META1" mkdir -p /projects/r3fs/docs
run fs --meta "$META2" touch /projects/r3fs/README
run fs --meta "$META1" ln -s /projects/r3fs /latest
run fs --meta "$META2" mv /projects/r3fs/README /projects/r3fs/docs/README
run fs --meta "$META1" setfattr /projects/r3fs/docs/README user.owner storage-team
run fs --meta "$META2" getfattr /projects/r3fs/docs/README user.owner
run fs --meta "$META1,$META2" ls -l /latest/docs
run fs --meta "$META2" stat /projects/r3fs/docs/README
echo "restarting every server on the same data"
stop_all
start_cluster
run fs --meta "$META1,$META2" ls -l /projects/r3fs
run fs --meta "$META2" statfs
stop_all
echo "local cluster demo: OK"
