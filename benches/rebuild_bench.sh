#!/usr/bin/env bash
# Online rebuild throughput (benches/RESULTS.md, "Rebuild").
#
# A volume (default 2 GiB, 3/4 random data, the rest never written) on two replicas and an
# engine on 127.0.0.1, filled through NBD with nbdcopy. Then, while fio keeps writing 4k
# random writes at a fixed rate (a database that does not stop for a rebuild):
#   full:    a third, empty replica is added (`engine ctl replica add`): every written
#            chunk is copied; time until it is RW.
#   partial: that replica is SIGKILLed, 1 % of the volume is rewritten while it is down, it
#            is started again on the same directory and re-added: only chunks whose
#            checksums differ are copied.
# Rates are volume bytes per second of wall time (the full rebuild also reports the written
# bytes it copied). fio's latency percentiles during the full rebuild are printed too.
#
#   benches/rebuild_bench.sh      # needs nbdcopy, fio (nbd engine), python3
#   REBUILD_BENCH_MIB=256 benches/rebuild_bench.sh   # a quick try
set -euo pipefail
cd "$(dirname "$0")/.."

. benches/lib.sh
bench_setup rebuild-bench
MIB=${REBUILD_BENCH_MIB:-2048}
SIZE=$((MIB << 20))
# fio's rate during the rebuilds (a steady load, not a saturating one)
RATE=${REBUILD_BENCH_RATE:-2m}
export RUST_LOG=${RUST_LOG:-warn}

replica() { # replica NAME CONTROL_PORT DATA_PORT: starts (or restarts) a replica; prints its pid
    "$BIN" replica serve --dir "$W/$1" --size "${MIB}MiB" --listen "127.0.0.1:$2" \
        --data-listen "127.0.0.1:$3" >/dev/null 2>>"$W/$1.log" &
    echo $!
}

P1=$(port); P2=$(port); P3=$(port); D1=$(port); D2=$(port); D3=$(port); EC=$(port); NBD=$(port)
PIDS+=("$(replica r1 "$P1" "$D1")" "$(replica r2 "$P2" "$D2")")
wait_port "$P1"; wait_port "$P2"
"$BIN" engine serve --volume bench --size "${MIB}MiB" --replica "127.0.0.1:$P1" \
    --replica "127.0.0.1:$P2" --nbd "tcp://127.0.0.1:$NBD" --listen "127.0.0.1:$EC" \
    2>"$W/engine.log" &
PIDS+=($!)
wait_port "$NBD"
CTL=("$BIN" engine ctl --engine "127.0.0.1:$EC" --json)
URI="nbd://127.0.0.1:$NBD/bench"

WRITTEN=$((SIZE / 4 * 3))
head -c "$WRITTEN" /dev/urandom >"$W/img"
t0=$(now)
nbdcopy -- "$W/img" "$URI"
t1=$(now)
rm -f "$W/img"
echo "fill: $((WRITTEN >> 20)) MiB in $(python3 -c "print(f'{$t1-$t0:.1f}')") s"

load() { # load NAME SECONDS: 4k random writes at $RATE over the written part
    fio --name="$1" --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=4 ${REBUILD_BENCH_FIO_EXTRA:-} \
        --size="$WRITTEN" --rate="$RATE" --time_based --runtime="$2" \
        --output-format=json >"$W/fio-$1.json" 2>"$W/fio-$1.log" &
    echo $!
}
stop_fio() { # stop_fio PID: SIGINT (fio then writes its report), wait until it is gone
    kill -INT "$1" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
}
mode_of() { # mode_of PORT: the engine's mode for the replica at 127.0.0.1:PORT
    "${CTL[@]}" replica ls | python3 -c "
import json, sys
for r in json.load(sys.stdin):
    if r['address'] == '127.0.0.1:$1':
        print(r['mode'])
"
}
wait_rw() { # wait_rw PORT: seconds until the replica is RW
    local t0 t
    t0=$(now)
    for _ in $(seq 36000); do
        [ "$(mode_of "$1")" = RW ] && { t=$(now); python3 -c "print($t-$t0)"; return 0; }
        sleep 0.1
    done
    echo "replica 127.0.0.1:$1 not RW after an hour" >&2
    return 1
}

# Full rebuild onto an empty replica, under load.
R3=$(replica r3 "$P3" "$D3")
PIDS+=("$R3")
wait_port "$P3"
FIO=$(load full 3600)
sleep 2
"${CTL[@]}" replica add "127.0.0.1:$P3" >/dev/null
FULL=$(wait_rw "$P3")
stop_fio "$FIO"
du_r3=$(du -sb --apparent-size "$W/r3" | cut -f1)
alloc_r3=$(du -sB1 "$W/r3" | cut -f1)

# Partial rebuild: the replica dies, 1 % changes, it comes back and is re-added.
kill -9 "$R3"
wait "$R3" 2>/dev/null || true
CHANGED=$((SIZE / 100))
fio --name=change --ioengine=nbd --uri="$URI" --rw=randwrite --bs=64k --iodepth=8 \
    --size="$WRITTEN" --io_size="$CHANGED" --output-format=json >"$W/fio-change.json" 2>&1
R3=$(replica r3 "$P3" "$D3")
PIDS+=("$R3")
wait_port "$P3"
# The engine dropped it at the first write after the kill; add it back.
for _ in $(seq 50); do [ "$(mode_of "$P3")" != RW ] && break; sleep 0.1; done
FIO=$(load partial 3600)
sleep 2
"${CTL[@]}" replica add "127.0.0.1:$P3" >/dev/null
PART=$(wait_rw "$P3")
stop_fio "$FIO"

python3 - "$W" "$SIZE" "$WRITTEN" "$FULL" "$PART" "$CHANGED" "$alloc_r3" "$du_r3" <<'PY'
import json, sys
w, size, written, full, part, changed, alloc, apparent = sys.argv[1:]
size, written, changed, alloc = int(size), int(written), int(changed), int(alloc)
full, part = float(full), float(part)
def lat(name):
    try:
        text = open(f"{w}/fio-{name}.json").read()  # fio's nbd engine prints a line first
        j = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    except Exception as e:  # fio killed mid-run still writes its JSON; say so if not
        return f"(no fio numbers: {e})"
    p = j["clat_ns"]["percentile"]
    return (f"{j['iops']:.0f} IOPS, clat p50 {p['50.000000']/1e3:.0f} µs, "
            f"p99 {p['99.000000']/1e3:.0f} µs, p99.9 {p['99.900000']/1e3:.0f} µs")
print(f"volume {size>>20} MiB, written {written>>20} MiB")
print(f"full rebuild: {full:.1f} s = {size/full/1e6:.0f} MB/s of volume, "
      f"{written/full/1e6:.0f} MB/s of written data; the new replica allocates {alloc>>20} MiB")
print(f"  fio during it: {lat('full')}")
print(f"partial rebuild after {changed>>20} MiB changed: {part:.1f} s = {size/part/1e6:.0f} MB/s of volume")
print(f"  fio during it: {lat('partial')}")
PY
