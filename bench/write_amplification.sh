#!/bin/bash
# Disk bytes written per byte a client writes, for 1 MiB sequential writes through jsnap.
#
#   bench/write_amplification.sh [JSNAP_CMD] [DISK]     (defaults: jsnap, the disk of /tmp)
#
# Makes a pool with one 1 GiB thin volume under $TMPDIR, prefills it, then runs 5 s of
# fio --rw=write --bs=1M --iodepth=8 and counts the sectors the disk wrote meanwhile
# (/sys/block/DISK/stat, field 7) until a sync after the run. Other writers on the disk
# inflate the figure; run it on an idle machine.
set -euo pipefail
J="${1:-jsnap}"
DISK="${2:-$(lsblk -no pkname "$(df --output=source "${TMPDIR:-/tmp}" | tail -1)" 2>/dev/null || true)}"
DISK="${DISK:-$(basename "$(df --output=source "${TMPDIR:-/tmp}" | tail -1)")}"
D=$(mktemp -d "${TMPDIR:-/tmp}/jsnap-wa.XXXX")
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; rm -rf "$D"; }
trap cleanup EXIT
$J init "$D/pool" >/dev/null
$J -p "$D/pool" volume create v --size 1G >/dev/null
$J -p "$D/pool" serve --socket "$D/s.sock" >"$D/log" 2>&1 &
PID=$!
for _ in $(seq 100); do [ -S "$D/s.sock" ] && break; sleep 0.1; done
U="nbd+unix:///v?socket=$D/s.sock"
fio --name=prefill --ioengine=nbd --uri="$U" --rw=write --bs=1M --iodepth=8 --size=1G \
    --output-format=terse >/dev/null 2>&1
sleep 1; sync
S0=$(awk '{print $7}' "/sys/block/$DISK/stat")
fio --name=seq --ioengine=nbd --uri="$U" --rw=write --bs=1M --iodepth=8 --size=1G \
    --time_based --runtime=5 --output-format=json 2>/dev/null | sed -n '/^{/,$p' >"$D/out.json"
sleep 2; sync
S1=$(awk '{print $7}' "/sys/block/$DISK/stat")
python3 - "$D/out.json" "$S0" "$S1" <<'PY'
import json, sys
w = json.load(open(sys.argv[1]))["jobs"][0]["write"]
disk = (int(sys.argv[3]) - int(sys.argv[2])) * 512
print(f"seq write {w['bw_bytes'] / 1e6:.0f} MB/s, disk bytes per client byte "
      f"{disk / w['io_bytes']:.2f}")
PY
