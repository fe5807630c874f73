#!/bin/sh
# The frontend chosen through the whole control plane: the manager (embedded store), agent
# node-1 (the kernel has ublk), agent node-2 (--no-ublk), the CSI driver (controller and
# node) for node-1 and a CSI node for node-2 (kernel-nbd scheme). The CSI client is this
# repository's test binary tests/vm_guest.rs (function csi_cluster_in_guest), copied in by
# run.sh: default StorageClass frontend (auto) → /dev/ublkbN on node-1, kernel NBD on
# node-2; engine SIGKILL under the mounted filesystem on ublk.
set -u
. /guest/lib.sh

t cluster-start
[ -x /usr/bin/vm-guest-test ] || fail "cluster: no test binary in the guest (run.sh needs IRONHORN_VM_TEST_BIN)"
modprobe ublk_drv 2>/dev/null
modprobe nbd nbds_max=4 2>/dev/null
[ -e /dev/ublk-control ] || fail "cluster: no /dev/ublk-control"
TOKEN=guest-cluster-token
export IRONHORN_TOKEN=$TOKEN
mkdir -p /tmp/cl/manager /tmp/cl/n1/disk /tmp/cl/n2/disk /tmp/csi-a /tmp/csi-b
ironhorn manager --data-dir /tmp/cl/manager --listen 127.0.0.1:9500 \
    --agent-listen 127.0.0.1:9501 --token "$TOKEN" >>"$LOGS/manager.log" 2>&1 &
echo $! >/tmp/cl-manager.pid
wait_until 60 port_open 9500 || fail "cluster: the manager did not listen"
for n in 1 2; do
    extra=""
    [ "$n" = 2 ] && extra="--no-ublk"
    # shellcheck disable=SC2086
    ironhorn agent --node "node-$n" --disk "/tmp/cl/n$n/disk" \
        --manager http://127.0.0.1:9501 --ports "$((10000 + n * 100))-$((10000 + n * 100 + 99))" \
        --state-dir "/tmp/cl/n$n/agent" --stop-instances-on-exit $extra \
        >>"$LOGS/agent-$n.log" 2>&1 &
    echo $! >"/tmp/cl-agent-$n.pid"
done
t cluster-agents-started
PATH=/opt/node-tools:$PATH ironhorn csi --mode all --node-id node-1 \
    --endpoint unix:///tmp/csi-a/csi.sock --manager http://127.0.0.1:9500 \
    --attach-scheme kernel-nbd --state-dir /tmp/csi-a/state >>"$LOGS/csi-a.log" 2>&1 &
echo $! >/tmp/cl-csi-a.pid
PATH=/opt/node-tools:$PATH ironhorn csi --mode node --node-id node-2 \
    --endpoint unix:///tmp/csi-b/csi.sock \
    --attach-scheme kernel-nbd --state-dir /tmp/csi-b/state >>"$LOGS/csi-b.log" 2>&1 &
echo $! >/tmp/cl-csi-b.pid
wait_until 30 test -S /tmp/csi-a/csi.sock || fail "cluster: node-1's CSI socket did not appear"
wait_until 30 test -S /tmp/csi-b/csi.sock || fail "cluster: node-2's CSI socket did not appear"
# Both nodes registered, node-1 with ublk and node-2 without.
nodes_ready() {
    ironhorn node ls --manager http://127.0.0.1:9500 --json >/tmp/cl-nodes.json 2>/dev/null &&
        grep -cE '"ublk": ?true' /tmp/cl-nodes.json | grep -qx 1 &&
        grep -cE '"ublk": ?false' /tmp/cl-nodes.json | grep -qx 1
}
wait_until 60 nodes_ready || { cat /tmp/cl-nodes.json; fail "cluster: nodes did not report (node-1 ublk, node-2 not)"; }
t cluster-up
export IRONHORN_GUEST_CSI_A=/tmp/csi-a/csi.sock IRONHORN_GUEST_CSI_B=/tmp/csi-b/csi.sock
run_client csi_cluster_in_guest cluster
no_io_errors ublkb || fail "cluster: the kernel logged I/O errors on the ublk device"
t cluster-done
stop_pid /tmp/cl-csi-a.pid
stop_pid /tmp/cl-csi-b.pid
stop_pid /tmp/cl-agent-1.pid
stop_pid /tmp/cl-agent-2.pid
stop_pid /tmp/cl-manager.pid
t cluster-end
