#!/usr/bin/env bash
# Backup and restore throughput (benches/RESULTS.md, "Backups").
#
# A 2 GiB volume (first half random data, second half zeros) served by one replica and an
# engine on 127.0.0.1; snapshot s1 is backed up through the engine (`engine ctl backup
# create`: the replica reads its layers and uploads), 1 % of the volume is rewritten with
# random data (10 × 2 MiB), snapshot s2 is backed up incrementally, and both are restored
# with `ironhorn backup restore`. Targets: moto's S3 server (started here) and file://.
# Rates are volume bytes (2 GiB) per second of wall time.
#
#   benches/backup_bench.sh            # needs moto_server (pip install 'moto[server]'),
#                                      # nbdcopy, qemu-io, python3
set -euo pipefail
cd "$(dirname "$0")/.."

. benches/lib.sh
bench_setup backup-bench
# BACKUP_BENCH_MIB: volume size in MiB (default 2048; smaller to try the script out).
MIB=${BACKUP_BENCH_MIB:-2048}
SIZE=$((MIB << 20))
rate() { python3 -c "print(f'{$1/($3-$2)/1e6:.0f}')"; }

export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1
export RUST_LOG=warn

MOTO=$(port)
python3 -m moto.server -H 127.0.0.1 -p "$MOTO" >"$W/moto.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$MOTO/" && break; sleep 0.1; done
curl -s -X PUT -o /dev/null "http://127.0.0.1:$MOTO/bench"
S3="s3://bench/ih?endpoint=http://127.0.0.1:$MOTO"
FILE="file://$W/target"

RC=$(port); RD=$(port); EC=$(port); NBD=$(port)
"$BIN" replica serve --dir "$W/r" --size "${MIB}MiB" --listen "127.0.0.1:$RC" --data-listen "127.0.0.1:$RD" 2>"$W/replica.log" &
PIDS+=($!)
sleep 1
"$BIN" engine serve --volume bench --size "${MIB}MiB" --replica "127.0.0.1:$RC" --nbd "tcp://127.0.0.1:$NBD" --listen "127.0.0.1:$EC" 2>"$W/engine.log" &
PIDS+=($!)
for _ in $(seq 100); do "$BIN" engine ctl --engine "127.0.0.1:$EC" info >/dev/null 2>&1 && break; sleep 0.2; done
CTL=("$BIN" engine ctl --engine "127.0.0.1:$EC" --json)

head -c $((SIZE / 2)) /dev/urandom >"$W/img"
truncate -s "$SIZE" "$W/img"
nbdcopy -- "$W/img" "nbd://127.0.0.1:$NBD/bench"
"${CTL[@]}" snapshot create s1 >/dev/null

declare -A R
for name in S3 FILE; do
    url=${!name}
    t0=$(now)
    out=$("${CTL[@]}" backup create --snapshot s1 --target "$url" --volume "bench-$name")
    t1=$(now)
    R[$name.backup]=$(rate $SIZE "$t0" "$t1")
    R[$name.backup_up]=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["uploaded_bytes"])')
    R[$name.id1]=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["backup_id"])')
done

# 1 % change: random 2 MiB pieces (10 for 2 GiB) at random 2 MiB-aligned offsets.
for i in $(seq $((MIB / 200 > 0 ? MIB / 200 : 1))); do
    head -c $((2 << 20)) /dev/urandom >"$W/piece"
    off=$(( (RANDOM % (MIB / 2)) * (2 << 20) ))
    qemu-io -f raw "nbd://127.0.0.1:$NBD/bench" -c "write -s $W/piece $off 2M" >/dev/null
done
"${CTL[@]}" snapshot create s2 >/dev/null

for name in S3 FILE; do
    url=${!name}
    t0=$(now)
    out=$("${CTL[@]}" backup create --snapshot s2 --target "$url" --volume "bench-$name")
    t1=$(now)
    R[$name.incr_s]=$(python3 -c "print(f'{$t1-$t0:.2f}')")
    R[$name.incr_up]=$(echo "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["uploaded_bytes"], d["uploaded_blocks"])')
    t0=$(now)
    "$BIN" backup --target "$url" --json restore "${R[$name.id1]}" --to "$W/restored-$name" >/dev/null
    t1=$(now)
    R[$name.restore]=$(rate $SIZE "$t0" "$t1")
done

echo "| target | backup MB/s | stored bytes uploaded (full) | incremental after 1 % change: bytes, blocks, seconds | restore MB/s |"
echo "| --- | --- | --- | --- | --- |"
for name in S3 FILE; do
    echo "| $name | ${R[$name.backup]} | ${R[$name.backup_up]} | ${R[$name.incr_up]}, ${R[$name.incr_s]} s | ${R[$name.restore]} |"
done
