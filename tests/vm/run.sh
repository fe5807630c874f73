#!/usr/bin/env bash
# Boots a stock Debian kernel (nbd.ko, ublk_drv.ko) under qemu with software emulation and
# runs guest test scripts inside it against the project's own `ironhorn` binary.
#
#   tests/vm/run.sh [SCRIPT...]     # SCRIPT: names under tests/vm/guest/ (default: nbd ublk;
#                                   # csi needs IRONHORN_VM_TEST_BIN)
#
# The guest is a busybox initramfs holding ironhorn, mkfs.ext4, e2fsck, fio and the kernel
# modules; it has no network card (everything runs on the guest's loopback), runs the
# scripts in order, prints "@@PASS"/"@@FAIL"/"@@T"/"@@FIO" markers on its console and
# powers off. Exit status 0 only if every script passed.
#
# Env: IRONHORN_BIN (default target/debug/ironhorn), IRONHORN_VM_CACHE (where setup.sh put
#      the kernel, default /var/cache/ironhorn-vm), VM_TIMEOUT (seconds for the whole guest
#      run, default 540), VM_MEM (MiB, default 1536), VM_SMP (default 2), VM_LOG (console
#      log path; default a temporary file that is removed), VM_KEEP=1 (keep the work dir),
#      IRONHORN_VM_TEST_BIN (the tests/vm_guest.rs binary, the CSI client of guest/csi.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

BIN=${IRONHORN_BIN:-$repo/target/debug/ironhorn}
CACHE=${IRONHORN_VM_CACHE:-/var/cache/ironhorn-vm}
TIMEOUT=${VM_TIMEOUT:-540}
MEM=${VM_MEM:-1536}
SMP=${VM_SMP:-2}
SCRIPTS=("$@")
[ ${#SCRIPTS[@]} -gt 0 ] || SCRIPTS=(nbd ublk)

die() { echo "vm: $*" >&2; exit 2; }
[ -x "$BIN" ] || die "no ironhorn binary at $BIN (cargo build, or set IRONHORN_BIN)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: run tests/vm/setup.sh (.ci/run does)"
ktree=$CACHE/kernel
kver=$(ls -1 "$ktree/lib/modules" 2>/dev/null | sort -V | tail -1 || true)
[ -n "$kver" ] && [ -f "$ktree/boot/vmlinuz-$kver" ] ||
    die "no kernel under $ktree: run tests/vm/setup.sh (.ci/run does)"
for s in "${SCRIPTS[@]}"; do
    [ -f "$here/guest/$s.sh" ] || die "no guest script tests/vm/guest/$s.sh"
done

work=$(mktemp -d /tmp/ironhorn-vm.XXXXXX)
qemu_pid=
cleanup() {
    if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then
        kill -9 "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    [ -n "${VM_KEEP:-}" ] && { echo "vm: kept $work"; return; }
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$(date +%s.%N)
root=$work/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,run,usr/bin,usr/sbin,guest,lib64}

# busybox for the shell and coreutils
cp /bin/busybox "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
    [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
done
# the kernel runs /sbin/modprobe to load modules on demand (ext4 at mount)
for a in modprobe insmod rmmod poweroff; do ln -sf ../bin/busybox "$root/sbin/$a"; done

copy_bin() { # copy_bin HOSTPATH GUESTPATH: an ELF binary and its shared libraries
    local b=$1 dst=$2
    mkdir -p "$root/$(dirname "$dst")"
    cp -L "$b" "$root/$dst"
    ldd "$b" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}' | while read -r l; do
        [ -f "$l" ] || continue
        mkdir -p "$root/$(dirname "$l")"
        cp -Ln "$l" "$root/$l" 2>/dev/null || true
    done
}
copy_bin "$(command -v mke2fs)" /sbin/mkfs.ext4
copy_bin "$(command -v e2fsck)" /sbin/e2fsck
copy_bin "$(command -v fio)" /usr/bin/fio
copy_bin "$(command -v blkdiscard)" /usr/bin/blkdiscard-z # util-linux's: has -z (write-zeroes)
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
# the project's binary, without debug info (a smaller initramfs)
if command -v objcopy >/dev/null; then
    objcopy --strip-debug "$BIN" "$work/ironhorn"
else
    cp "$BIN" "$work/ironhorn"
fi
copy_bin "$work/ironhorn" /usr/bin/ironhorn
# the CSI client of guest/csi.sh: the tests/vm_guest.rs test binary itself
if [ -n "${IRONHORN_VM_TEST_BIN:-}" ]; then
    if command -v objcopy >/dev/null; then
        objcopy --strip-debug "$IRONHORN_VM_TEST_BIN" "$work/vm-guest-test"
    else
        cp "$IRONHORN_VM_TEST_BIN" "$work/vm-guest-test"
    fi
    copy_bin "$work/vm-guest-test" /usr/bin/vm-guest-test
fi
# the node tools the CSI driver runs (util-linux and e2fsprogs, not busybox's)
for tool in mount umount blkid dumpe2fs resize2fs; do
    copy_bin "$(command -v "$tool")" "/opt/node-tools/$tool"
done
cp "$here"/guest/*.sh "$root/guest/"

# kernel modules and their dependencies, decompressed for busybox modprobe
mods="nbd ublk_drv ext4"
for m in $mods; do
    modprobe -d "$ktree" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | sort -u | while read -r ko; do
    rel=${ko#"$ktree"/lib/modules/"$kver"/}
    mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
    case $ko in
        *.xz) xz -dc "$ko" >"$root/lib/modules/$kver/${rel%.xz}" ;;
        *.zst) zstd -qdc "$ko" >"$root/lib/modules/$kver/${rel%.zst}" ;;
        *) cp "$ko" "$root/lib/modules/$kver/$rel" ;;
    esac
done
cp "$ktree/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$root/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$root" "$kver"

cat >"$root/init" <<INIT
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/tmp
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs -o size=70% tmp /tmp
ip link set lo up
modprobe ext4
echo
echo
echo "@@T \$(cut -d' ' -f1 /proc/uptime) boot"
echo "@@KERNEL \$(uname -r)"
rc=0
for s in ${SCRIPTS[*]}; do
    echo "@@SCRIPT \$s"
    sh /guest/\$s.sh 2>&1 || { echo "@@SCRIPTFAIL \$s"; rc=1; }
done
echo "@@EXIT \$rc"
sync
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/initrd.cpio"
t1=$(date +%s.%N)
echo "vm: kernel $kver, initramfs $(du -h "$work/initrd.cpio" | cut -f1) built in $(printf '%.1f' "$(echo "$t1 - $t0" | bc)") s"

log=${VM_LOG:-$work/console.log}
timeout --signal=KILL "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -machine q35 -smp "$SMP" -m "$MEM" \
    -nographic -no-reboot -nic none \
    -kernel "$ktree/boot/vmlinuz-$kver" -initrd "$work/initrd.cpio" \
    -append "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init" \
    </dev/null >"$log" 2>&1 &
qemu_pid=$!
set +e
wait "$qemu_pid"
qrc=$?
set -e
qemu_pid=
t2=$(date +%s.%N)
tr -d '\r' <"$log" >"$log.txt"
echo "vm: qemu exited $qrc after $(printf '%.1f' "$(echo "$t2 - $t1" | bc)") s (limit ${TIMEOUT} s)"
if grep -q '^@@EXIT 0' "$log.txt"; then
    grep -E '^@@(T|PASS|FIO|INFO|KERNEL|SCRIPT)' "$log.txt"
    echo "vm: all guest scripts passed"
    exit 0
fi
echo "vm: guest run FAILED; console log:" >&2
tail -n 200 "$log.txt" >&2
exit 1
