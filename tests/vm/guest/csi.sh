#!/bin/sh
# The CSI node service through the kernel's nbd driver: `ironhorn csi --mode node
# --attach-scheme kernel-nbd` against an engine; the gRPC client is this repository's test
# binary tests/vm_guest.rs (function csi_node_in_guest), copied in by run.sh.
set -u
. /guest/lib.sh

t csi-start
[ -x /usr/bin/vm-guest-test ] || fail "csi: no test binary in the guest (run.sh needs IRONHORN_VM_TEST_BIN)"
modprobe nbd nbds_max=4 2>/dev/null
start_replica vcsi-r1 9802 128MiB
start_replica vcsi-r2 9804 128MiB
start_engine vcsi 128MiB 10811 9800 127.0.0.1:9802 127.0.0.1:9804
wait_until 30 port_open 10811 || fail "csi: engine did not listen"
mkdir -p /tmp/csi /tmp/csi-state
# util-linux mount/blkid and e2fsprogs tools, as a node has them
PATH=/opt/node-tools:$PATH ironhorn csi --mode node --node-id guest \
    --endpoint unix:///tmp/csi/csi.sock --attach-scheme kernel-nbd \
    --state-dir /tmp/csi-state >>"$LOGS/csi.log" 2>&1 &
echo $! >/tmp/csi.pid
wait_until 30 test -S /tmp/csi/csi.sock || fail "csi: driver socket did not appear"
t csi-driver-up
export IRONHORN_GUEST_CSI_SOCKET=/tmp/csi/csi.sock
export IRONHORN_GUEST_NBD_URI=nbd://127.0.0.1:10811/vcsi
export IRONHORN_GUEST_ENGINE_CTL=127.0.0.1:9800
run_client csi_node_in_guest csi
t csi-done
stop_pid /tmp/csi.pid
stop_pid /tmp/engine-vcsi.pid
stop_pid /tmp/vcsi-r1.pid
stop_pid /tmp/vcsi-r2.pid
t csi-end
