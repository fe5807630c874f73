#!/usr/bin/env bash
# How long a flush takes, and how long it holds up other writes, after a bulk write
# (benches/RESULTS.md, "Flush after a bulk write").
#
# A volume (default 2 GiB) on two replicas + engine on 127.0.0.1. 1.5 GiB is written
# sequentially (fio, 1M, QD8) and 20 MiB more randomly, with no flush, as a bulk load
# does. Then, while fio writes 4 KiB random writes at 2 MB/s, one NBD flush is sent
# (qemu-io): its duration, and the longest write latency fio saw around it, are printed.
#
#   benches/flush_stall.sh          # needs fio (nbd engine), qemu-io, python3
set -euo pipefail
cd "$(dirname "$0")/.."

. benches/lib.sh
bench_setup flush-bench
MIB=${FLUSH_BENCH_MIB:-2048}
FILL=$((MIB * 3 / 4))
export RUST_LOG=warn

C1=$(port); D1=$(port); C2=$(port); D2=$(port); EC=$(port); NBD=$(port)
for r in "r1 $C1 $D1" "r2 $C2 $D2"; do
    set -- $r
    "$BIN" replica serve --dir "$W/$1" --size "${MIB}MiB" --listen "127.0.0.1:$2" \
        --data-listen "127.0.0.1:$3" 2>>"$W/$1.log" &
    PIDS+=($!)
    wait_port "$2"
done
"$BIN" engine serve --volume v --size "${MIB}MiB" --replica "127.0.0.1:$C1" \
    --replica "127.0.0.1:$C2" --nbd "tcp://127.0.0.1:$NBD" --listen "127.0.0.1:$EC" \
    2>"$W/engine.log" &
PIDS+=($!)
wait_port "$NBD"
URI="nbd://127.0.0.1:$NBD/v"

fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1M --iodepth=8 --size="${FILL}M" \
    >/dev/null 2>&1
fio --name=change --ioengine=nbd --uri="$URI" --rw=randwrite --bs=64k --iodepth=8 \
    --size="${FILL}M" --io_size=20M >/dev/null 2>&1
dirty=$(awk '/^Dirty:/ {print $2}' /proc/meminfo)
fio --name=load --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=4 --size="${FILL}M" \
    --rate=2m --time_based --runtime=6 --write_lat_log="$W/lat" --log_avg_msec=0 \
    >/dev/null 2>&1 &
FIO=$!
sleep 2
t0=$(now)
qemu-io -f raw "$URI" -c flush >/dev/null
t1=$(now)
wait "$FIO"
python3 - "$W/lat_clat.1.log" "$t0" "$t1" "$dirty" <<'PY'
import sys
log, t0, t1, dirty = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
worst = max(int(line.split(",")[1]) for line in open(log) if line.strip())
print(f"page cache dirty before the flush: {dirty >> 10} MiB (whole machine)")
print(f"flush: {t1 - t0:.2f} s; longest write during the run: {worst / 1e6:.1f} ms")
PY
