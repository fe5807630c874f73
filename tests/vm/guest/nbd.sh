#!/bin/sh
# Kernel NBD through `ironhorn nbd attach --supervise`: ext4 on /dev/nbdN, the engine
# SIGKILLed and restarted under the mounted file system while a writer runs, files intact,
# fsck clean, detach; then fio with verify on the device.
set -u
. /guest/lib.sh

URI=nbd://127.0.0.1:10809/vnbd
t nbd-start
modprobe nbd nbds_max=4 || fail "nbd: modprobe nbd"
start_replica vnbd-r1 9602 256MiB
start_replica vnbd-r2 9604 256MiB
start_engine vnbd 256MiB 10809 9600 127.0.0.1:9602 127.0.0.1:9604
wait_until 30 port_open 10809 || fail "nbd: engine did not listen"
t nbd-engine-up

ironhorn nbd attach "$URI" --supervise --io-timeout 5s --dead-conn-timeout 60s \
    >/tmp/attach.out 2>>"$LOGS/nbd-attach.log" &
SUP=$!
wait_until 30 grep -q /dev/nbd /tmp/attach.out || fail "nbd: attach printed no device"
DEV=$(cat /tmp/attach.out)
NAME=${DEV#/dev/}
[ "$(cat /sys/block/$NAME/size)" = "524288" ] || fail "nbd: $DEV has $(cat /sys/block/$NAME/size) sectors, not 524288"
grep -q "ironhorn:$URI" /sys/block/$NAME/backend || fail "nbd: backend identifier $(cat /sys/block/$NAME/backend)"
t nbd-attached
# A second attach finds the first instead of taking another device.
AGAIN=$(ironhorn nbd attach "$URI" 2>>"$LOGS/nbd-attach.log") || fail "nbd: second attach failed"
[ "$AGAIN" = "$DEV" ] || fail "nbd: second attach gave $AGAIN, not $DEV"
[ "$(ironhorn nbd ls | wc -l)" = "1" ] || fail "nbd: ls shows $(ironhorn nbd ls)"
pass nbd-attach-idempotent

queue_info "$DEV" nbd
discard_and_zeroes "$DEV" || fail "nbd: discarded or zeroed range does not read back as zeros"
pass nbd-discard-write-zeroes

mkfs.ext4 -q -F "$DEV" || fail "nbd: mkfs.ext4"
mount -t ext4 "$DEV" /mnt || fail "nbd: mount"
write_files /mnt/before 4 8 || fail "nbd: write files"
sync
t nbd-written

# Kill the engine under the mounted file system, with a writer running across the outage.
(dd if=/dev/urandom of=/mnt/during bs=1M count=16 conv=fsync 2>/dev/null && md5sum /mnt/during >/tmp/during.md5) &
WRITER=$!
sleep 0.5
kill -9 "$(cat /tmp/engine-vnbd.pid)"
t nbd-engine-killed
sleep 2
start_engine vnbd 256MiB 10809 9600 127.0.0.1:9602 127.0.0.1:9604
wait_until 60 grep -q reconnected "$LOGS/nbd-attach.log" || fail "nbd: no reconnection after the engine restart"
t nbd-reconnected
wait "$WRITER" || fail "nbd: the writer across the engine restart failed"
t nbd-writer-done
dmesg | grep -iE "nbd" | grep -v "detected capacity" | tail -n 4 | sed "s/^/@@INFO dmesg /"
write_files /mnt/after 2 4 || fail "nbd: write after restart"
sync
echo 3 >/proc/sys/vm/drop_caches
check_files /mnt/before || fail "nbd: files written before the restart changed"
check_files /mnt/after || fail "nbd: files written after the restart changed"
md5sum -c /tmp/during.md5 >/dev/null || fail "nbd: file written across the restart changed"
no_io_errors "$NAME" || fail "nbd: the kernel logged I/O errors: $(dmesg | grep -i 'error' | tail -3)"
pass nbd-engine-restart-under-mount

# A supervisor stopped while the device stays attached: a new one adopts the attachment
# (it does not hold the kernel's sockets, so it probes) and still reconnects after another
# engine restart.
kill "$SUP"
wait "$SUP" || fail "nbd: supervisor exited non-zero on SIGTERM"
grep -q "device stays attached" "$LOGS/nbd-attach.log" || fail "nbd: supervisor did not stop cleanly"
[ -e /sys/block/$NAME/pid ] || fail "nbd: stopping the supervisor detached the device"
ironhorn nbd attach "$URI" --supervise --io-timeout 5s --dead-conn-timeout 60s \
    >/tmp/attach2.out 2>>"$LOGS/nbd-attach2.log" &
SUP=$!
wait_until 30 grep -q "$DEV" /tmp/attach2.out || fail "nbd: second supervisor printed no device"
grep -q "already attached" "$LOGS/nbd-attach2.log" || fail "nbd: second supervisor attached anew"
sleep 3
(dd if=/dev/urandom of=/mnt/during2 bs=1M count=8 conv=fsync 2>/dev/null && md5sum /mnt/during2 >/tmp/during2.md5) &
WRITER=$!
sleep 0.5
kill -9 "$(cat /tmp/engine-vnbd.pid)"
sleep 2
start_engine vnbd 256MiB 10809 9600 127.0.0.1:9602 127.0.0.1:9604
wait_until 60 grep -q "reconnected (adopted attachment)" "$LOGS/nbd-attach2.log" ||
    fail "nbd: the adopting supervisor did not reconnect"
wait "$WRITER" || fail "nbd: the writer across the second engine restart failed"
echo 3 >/proc/sys/vm/drop_caches
md5sum -c /tmp/during2.md5 >/dev/null || fail "nbd: file written across the second restart changed"
check_files /mnt/before || fail "nbd: files changed after the second restart"
no_io_errors "$NAME" || fail "nbd: I/O errors after the second restart"
pass nbd-supervisor-restart-adopts
t nbd-adopted-reconnected

umount /mnt || fail "nbd: umount"
e2fsck -fn "$DEV" >"$LOGS/nbd-fsck.log" 2>&1 || fail "nbd: e2fsck found problems"
pass nbd-fsck-clean

ironhorn nbd detach "$DEV" >>"$LOGS/nbd-attach.log" 2>&1 || fail "nbd: detach"
[ -e /sys/block/$NAME/pid ] && fail "nbd: $DEV still connected after detach"
wait_until 10 sh -c "! kill -0 $SUP" || fail "nbd: supervisor did not end after detach"
wait "$SUP" || fail "nbd: supervisor exited non-zero"
pass nbd-detach
t nbd-detached

# fio with verify on a fresh attachment (kernel-picked device, no supervisor).
DEV=$(ironhorn nbd attach "$URI" 2>>"$LOGS/nbd-attach.log") || fail "nbd: re-attach"
fio_verify "$DEV" nbd || fail "nbd: fio verify"
pass nbd-fio-verify
t nbd-fio-done
# Online growth: the engine grows the volume, `nbd grow` hands the new size to the kernel.
ironhorn engine ctl --engine 127.0.0.1:9600 expand 320MiB >>"$LOGS/nbd-attach.log" 2>&1 ||
    fail "nbd: engine expand"
ironhorn nbd grow "$URI" >>"$LOGS/nbd-attach.log" 2>&1 || fail "nbd: grow"
[ "$(cat /sys/block/${DEV#/dev/}/size)" = "655360" ] ||
    fail "nbd: $DEV has $(cat /sys/block/${DEV#/dev/}/size) sectors after grow, not 655360"
dd if="$DEV" of=/dev/null bs=1M skip=319 count=1 iflag=direct 2>/dev/null || fail "nbd: read the grown end"
pass nbd-grow-online
ironhorn nbd detach "$URI" >>"$LOGS/nbd-attach.log" 2>&1 || fail "nbd: detach by URI"

stop_pid /tmp/engine-vnbd.pid
stop_pid /tmp/vnbd-r1.pid
stop_pid /tmp/vnbd-r2.pid
t nbd-end
