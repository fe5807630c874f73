#!/bin/sh
# The engine's ublk frontend: /dev/ublkbN, discard/write-zeroes, ext4, the engine SIGKILLed
# and restarted (user recovery) under the mounted file system while a writer runs, files
# intact, fsck clean, clean removal; then fio with verify on the device.
set -u
. /guest/lib.sh

ENGINE_ARGS="--frontend ublk --ublk-queues 2 --ublk-depth 32"
t ublk-start
modprobe ublk_drv || fail "ublk: modprobe ublk_drv"
[ -c /dev/ublk-control ] || fail "ublk: no /dev/ublk-control"
start_replica vublk-r1 9702 256MiB
start_replica vublk-r2 9704 256MiB
# shellcheck disable=SC2086
start_engine vublk 256MiB 0 9700 127.0.0.1:9702 127.0.0.1:9704 -- $ENGINE_ARGS --ublk-id 3
DEV=/dev/ublkb3
wait_until 60 test -b $DEV || fail "ublk: $DEV did not appear"
wait_until 30 grep -q "ublk device /dev/ublkb3 live" "$LOGS/engine-vublk.log" || fail "ublk: engine did not report the device live"
[ "$(cat /sys/block/ublkb3/size)" = "524288" ] || fail "ublk: $DEV has $(cat /sys/block/ublkb3/size) sectors"
t ublk-live
queue_info $DEV ublk
discard_and_zeroes $DEV || fail "ublk: discarded or zeroed range does not read back as zeros"
pass ublk-discard-write-zeroes

mkfs.ext4 -q -F $DEV || fail "ublk: mkfs.ext4"
mount -t ext4 $DEV /mnt || fail "ublk: mount"
write_files /mnt/before 4 8 || fail "ublk: write files"
sync
t ublk-written

(dd if=/dev/urandom of=/mnt/during bs=1M count=16 conv=fsync 2>/dev/null && md5sum /mnt/during >/tmp/during.md5) &
WRITER=$!
sleep 0.5
kill -9 "$(cat /tmp/engine-vublk.pid)"
t ublk-engine-killed
sleep 2
[ -b $DEV ] || fail "ublk: $DEV vanished when its engine died"
# shellcheck disable=SC2086
start_engine vublk 256MiB 0 9700 127.0.0.1:9702 127.0.0.1:9704 -- $ENGINE_ARGS --ublk-id 3
wait_until 60 sh -c "grep 'ublk device /dev/ublkb3 live' $LOGS/engine-vublk.log | grep -q 'recovered=true'" ||
    fail "ublk: the restarted engine did not recover the device"
t ublk-recovered
wait "$WRITER" || fail "ublk: the writer across the engine restart failed"
t ublk-writer-done
dmesg | grep -iE "ublk" | grep -v "detected capacity" | tail -n 4 | sed "s/^/@@INFO dmesg /"
write_files /mnt/after 2 4 || fail "ublk: write after restart"
sync
echo 3 >/proc/sys/vm/drop_caches
check_files /mnt/before || fail "ublk: files written before the restart changed"
check_files /mnt/after || fail "ublk: files written after the restart changed"
md5sum -c /tmp/during.md5 >/dev/null || fail "ublk: file written across the restart changed"
no_io_errors ublkb3 || fail "ublk: the kernel logged I/O errors: $(dmesg | grep -i 'error' | tail -3)"
pass ublk-engine-restart-under-mount

umount /mnt || fail "ublk: umount"
e2fsck -fn $DEV >"$LOGS/ublk-fsck.log" 2>&1 || fail "ublk: e2fsck found problems"
pass ublk-fsck-clean

stop_pid /tmp/engine-vublk.pid
wait_until 20 sh -c "! test -e /sys/class/ublk-char/ublkc3" || fail "ublk: device not removed after the engine stopped"
[ -b $DEV ] && fail "ublk: $DEV still there after a clean stop"
grep -q "ublk device removed" "$LOGS/engine-vublk.log" || fail "ublk: engine did not log the removal"
pass ublk-clean-removal
t ublk-removed

# fio with verify on a fresh device (kernel-picked id).
: >"$LOGS/engine-vublk.log"
# shellcheck disable=SC2086
start_engine vublk 256MiB 0 9700 127.0.0.1:9702 127.0.0.1:9704 -- $ENGINE_ARGS
wait_until 60 grep -q "ublk device /dev/ublkb[0-9]* live" "$LOGS/engine-vublk.log" || fail "ublk: engine did not start a device"
DEV=$(grep -o "/dev/ublkb[0-9]*" "$LOGS/engine-vublk.log" | head -1)
wait_until 10 test -b "$DEV" || fail "ublk: $DEV missing"
fio_verify "$DEV" ublk || fail "ublk: fio verify"
pass ublk-fio-verify
t ublk-fio-done

stop_pid /tmp/engine-vublk.pid
wait_until 20 sh -c "! test -b $DEV" || fail "ublk: $DEV not removed at the end"
stop_pid /tmp/vublk-r1.pid
stop_pid /tmp/vublk-r2.pid
t ublk-end
