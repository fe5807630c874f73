#!/usr/bin/env bash
# Installs what the guest-kernel rig needs on a Debian bookworm machine and unpacks a stock
# Debian 6.12 kernel (it has nbd.ko and ublk_drv.ko) into a cache directory, without
# installing it as the machine's own kernel (no initramfs, no bootloader, no systemd upgrade).
#
#   tests/vm/setup.sh            # idempotent; prints the kernel tree it prepared
#
# Env: IRONHORN_VM_CACHE (default /var/cache/ironhorn-vm), IRONHORN_VM_KPKG (kernel package,
# default: what linux-image-6.12-amd64 points at).
set -euo pipefail

CACHE=${IRONHORN_VM_CACHE:-/var/cache/ironhorn-vm}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# qemu-system-x86 of bookworm would replace the newer qemu-utils (qemu-io) from
# bookworm-backports that the other tests use: take qemu from backports too. The suite is
# added with the same mirror as the machine's main Debian source.
if ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
    uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    if [ -z "$uri" ]; then
        uri=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    [ -n "$uri" ] || { echo "setup: cannot find the machine's Debian mirror" >&2; exit 2; }
    echo "deb $uri bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/ironhorn-backports.list >/dev/null
    $SUDO apt-get update -qq
fi

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx modprobe || need+=(busybox-static)
command -v depmod >/dev/null || need+=(kmod)
command -v cpio >/dev/null || need+=(cpio)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v fio >/dev/null || need+=(fio)
if [ ${#need[@]} -gt 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports "${need[@]}" >/dev/null
fi

# The kernel: download the package and unpack it under $CACHE/kernel.
kpkg=${IRONHORN_VM_KPKG:-$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6/ {print $2; exit}')}
[ -n "$kpkg" ] || { echo "setup: no linux-image-6.12-amd64 in the package lists" >&2; exit 2; }
kver=${kpkg#linux-image-}
ktree=$CACHE/kernel
if [ ! -f "$ktree/boot/vmlinuz-$kver" ] || [ ! -f "$ktree/lib/modules/$kver/modules.dep" ]; then
    $SUDO mkdir -p "$CACHE"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    chmod 755 "$tmp"
    (cd "$tmp" && apt-get download -qq "$kpkg")
    $SUDO rm -rf "$ktree.new"
    $SUDO mkdir -p "$ktree.new"
    $SUDO dpkg-deb -x "$tmp"/*.deb "$ktree.new"
    $SUDO depmod -b "$ktree.new" "$kver"
    $SUDO rm -rf "$ktree"
    $SUDO mv "$ktree.new" "$ktree"
fi
echo "$ktree $kver"
