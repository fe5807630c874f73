# Helpers for the guest test scripts (busybox sh). Sourced; every step prints a marker the
# host reads: "@@T <uptime> <label>" (timing), "@@PASS <name>", "@@FAIL <name>: <why>".

export RUST_LOG=${RUST_LOG:-info}
LOGS=/tmp/logs
mkdir -p "$LOGS"

t() { echo "@@T $(cut -d' ' -f1 /proc/uptime) $*"; }
pass() { echo "@@PASS $*"; }
fail() {
    echo "@@FAIL $*"
    for f in "$LOGS"/*.log; do
        [ -f "$f" ] || continue
        echo "----- $f (last 30 lines)"
        tail -n 30 "$f"
    done
    echo "----- dmesg (last 30 lines)"
    dmesg | tail -n 30
    exit 1
}

# wait_until SECONDS COMMAND...: polls every 0.1 s.
wait_until() {
    limit=$1; shift
    i=0
    while ! "$@" >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -ge $((limit * 10)) ] && return 1
        sleep 0.1
    done
    return 0
}

# run_client TEST LABEL: runs test TEST of the tests/vm_guest.rs binary (copied into the
# guest by run.sh) with the node tools on PATH, prints its markers, and fails with the end
# of its output when it fails.
run_client() {
    PATH=/opt/node-tools:$PATH vm-guest-test --exact "$1" --ignored --nocapture \
        --test-threads 1 >"/tmp/$1.out" 2>&1
    rc=$?
    grep -E '^@@(PASS|INFO)' "/tmp/$1.out"
    if [ $rc -ne 0 ]; then
        tail -n 40 "/tmp/$1.out"
        fail "$2: the CSI client test $1 failed"
    fi
}

port_open() { netstat -ltn 2>/dev/null | grep -q ":$1 "; }

# start_replica NAME PORT SIZE: control on PORT, data on PORT+1.
start_replica() {
    ironhorn replica serve --dir "/tmp/$1" --size "$3" --listen "127.0.0.1:$2" \
        >>"$LOGS/$1.log" 2>&1 &
    echo $! >"/tmp/$1.pid"
    wait_until 30 port_open "$2" || fail "replica $1 did not listen on $2"
}

# start_engine NAME SIZE NBD_PORT CONTROL_PORT REPLICA... [-- EXTRA ARGS] (NBD_PORT 0: none)
start_engine() {
    name=$1 size=$2 nbd=$3 ctl=$4
    shift 4
    args=""
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        args="$args --replica $1"
        shift
    done
    [ "${1:-}" = "--" ] && shift
    # NBD_PORT 0: no NBD endpoint (a ublk-only engine)
    [ "$nbd" != 0 ] && args="$args --nbd tcp://127.0.0.1:$nbd"
    # shellcheck disable=SC2086
    ironhorn engine serve --volume "$name" --size "$size" $args \
        --listen "127.0.0.1:$ctl" "$@" \
        >>"$LOGS/engine-$name.log" 2>&1 &
    echo $! >"/tmp/engine-$name.pid"
}

stop_pid() { # stop_pid PIDFILE: SIGTERM, then SIGKILL after 10 s
    p=$(cat "$1" 2>/dev/null) || return 0
    kill "$p" 2>/dev/null || return 0
    i=0
    while kill -0 "$p" 2>/dev/null; do
        i=$((i + 1))
        [ $i -ge 100 ] && kill -9 "$p" 2>/dev/null
        sleep 0.1
    done
}

# write_files DIR N MIB: N files of MIB random MiB each, their md5s in DIR.md5
write_files() {
    mkdir -p "$1"
    i=0
    while [ $i -lt "$2" ]; do
        dd if=/dev/urandom of="$1/f$i" bs=1M count="$3" 2>/dev/null || return 1
        i=$((i + 1))
    done
    (cd "$1" && md5sum f*) >"/tmp/$(basename "$1").md5"
}

check_files() { # check_files DIR
    (cd "$1" && md5sum -c "/tmp/$(basename "$1").md5" >/dev/null)
}

no_io_errors() { # no_io_errors DEVNAME: the kernel logged no I/O error for it
    ! dmesg | grep -E "(I/O error|Buffer I/O error|EXT4-fs error).*$1" >/dev/null
}

# fio_verify DEV LABEL: random 4k writes with crc32c verify, then report the numbers.
fio_verify() {
    fio --name="$2" --filename="$1" --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
        --iodepth=16 --size=16M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --output-format=terse --terse-version=3 >"/tmp/fio-$2.terse" 2>"$LOGS/fio-$2.log" ||
        return 1
    # terse v3: field 8 write... use read/write iops fields (8 = read iops, 49 = write iops)
    awk -F';' -v l="$2" '{ printf "@@FIO %s write_iops=%s write_bw_kib=%s verify_read_iops=%s\n", l, $49, $48, $8 }' \
        "/tmp/fio-$2.terse"
    fio --name="$2-rr" --filename="$1" --direct=1 --ioengine=libaio --rw=randread --bs=4k \
        --iodepth=16 --runtime=5 --time_based --output-format=terse --terse-version=3 \
        >"/tmp/fio-$2-rr.terse" 2>>"$LOGS/fio-$2.log" || return 1
    awk -F';' -v l="$2" '{ printf "@@FIO %s randread_iops=%s randread_bw_kib=%s\n", l, $8, $7 }' \
        "/tmp/fio-$2-rr.terse"
}

# queue_info DEV LABEL: what the kernel's block layer makes of the device (cache, FUA,
# discard, write-zeroes), for the report.
queue_info() {
    q=/sys/block/$(basename "$1")/queue
    echo "@@INFO $2 write_cache=$(sed 's/ /_/g' $q/write_cache) fua=$(cat $q/fua)" \
        "discard_max_bytes=$(cat $q/discard_max_bytes)" \
        "write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes)" \
        "max_sectors_kb=$(cat $q/max_sectors_kb) nr_requests=$(cat $q/nr_requests)"
}

# discard_and_zeroes DEV: random data over 2 MiB, discard the first MiB, write-zeroes the
# second (util-linux blkdiscard -z), flush; both must read back as zeros.
discard_and_zeroes() {
    dd if=/dev/urandom of=/tmp/rnd bs=1M count=2 2>/dev/null || return 1
    dd if=/tmp/rnd of="$1" bs=1M count=2 oflag=direct 2>/dev/null || return 1
    dd if="$1" of=/tmp/back bs=1M count=2 iflag=direct 2>/dev/null || return 1
    cmp /tmp/rnd /tmp/back || return 1
    blkdiscard -o 0 -l 1048576 "$1" || return 1
    blkdiscard-z -z -o 1048576 -l 1048576 "$1" || return 1
    blockdev --flushbufs "$1" || return 1
    dd if="$1" of=/tmp/back bs=1M count=2 iflag=direct 2>/dev/null || return 1
    cmp -n 2097152 /tmp/back /dev/zero
}
