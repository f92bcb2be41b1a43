#!/usr/bin/env bash
# The main job: mount a working r3fs on an embedded local cluster.
#
#   tests/scripts/main-job.sh [MOUNTPOINT] [--check]
#
# `r3fs mount` with no cluster file starts a local cluster in the background
# (the embedded KV engine, mgmtd, meta and 3 storage nodes with chains of 3,
# loopback only, data in $R3FS_DATA_DIR, default /var/lib/r3fs/local), mounts
# it on MOUNTPOINT (default /mnt/r3fs) and returns once the mount is usable.
# This script then writes a file of 64 MiB through the mount, reads it back
# and compares checksums, and shows `r3fs status`. The mount stays up for you
# to use; `r3fs umount MOUNTPOINT` stops it (and the local cluster).
#
# --check (what CI runs): a temporary data directory and mountpoint, and an
# unmount, a remount that must still hold the file, and a final unmount, all
# cleaned up even on failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${R3FS_BIN:-target/release/r3fs}
check=false
mnt=""
for arg in "$@"; do
  case "$arg" in
    --check) check=true ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) mnt=$arg ;;
  esac
done
if [ ! -x "$BIN" ]; then
  cargo build --release --locked -p r3fs-cli
fi

src=""
tmp=""
on_exit() {
  if [ -n "$src" ]; then rm -f "$src"; fi
  if [ -n "$tmp" ]; then
    "$BIN" umount "$mnt" >/dev/null 2>&1 || true
    if mountpoint -q "$mnt" 2>/dev/null; then umount -l "$mnt" || true; fi
    "$BIN" local-cluster stop --force >/dev/null 2>&1 || true
    rm -rf "$tmp"
  fi
}
trap on_exit EXIT
if $check; then
  tmp=$(mktemp -d /tmp/r3fs-main-job.XXXXXX)
  export R3FS_DATA_DIR=$tmp/data
  mnt=${mnt:-$tmp/mnt}
fi
mnt=${mnt:-/mnt/r3fs}
mkdir -p "$mnt"

echo "== r3fs mount $mnt"
"$BIN" mount "$mnt"

echo "== write 64 MiB through the mount and read it back"
src=$(mktemp "${TMPDIR:-/tmp}/r3fs-main-job-src.XXXXXX")
head -c $((64 << 20)) /dev/urandom >"$src"
cp "$src" "$mnt/hello.bin"
echo "hello from r3fs" >"$mnt/hello.txt"
sync "$mnt/hello.bin"
want=$(sha256sum <"$src" | cut -d' ' -f1)
got=$(sha256sum <"$mnt/hello.bin" | cut -d' ' -f1)
rm -f "$src"
[ "$want" = "$got" ] || { echo "checksum mismatch: wrote $want, read $got" >&2; exit 1; }
echo "sha256 $got matches"
cat "$mnt/hello.txt"
ls -l "$mnt"

echo "== r3fs status"
"$BIN" status

if $check; then
  echo "== unmount, remount: the data is still there"
  "$BIN" umount "$mnt"
  "$BIN" mount "$mnt"
  again=$(sha256sum <"$mnt/hello.bin" | cut -d' ' -f1)
  [ "$again" = "$want" ] || { echo "after remount: read $again, want $want" >&2; exit 1; }
  echo "sha256 $again still matches after a remount"
  "$BIN" umount "$mnt"
  echo "main job passed"
else
  echo
  echo "r3fs is mounted on $mnt; stop it with: $BIN umount $mnt"
fi
