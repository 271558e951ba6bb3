#!/usr/bin/env bash
# Builds the test guest: Debian's amd64 kernel and an initramfs holding
# busybox-static, the virtio/ext4 modules and tests/guest/init. Nothing but
# Debian packages is downloaded (apt-get download, then dpkg-deb -x).
#
#   build.sh CACHE_DIR   prints the directory holding vmlinuz and initrd.gz
#
# The result is cached in CACHE_DIR/<kernel version>-<hash of init>/, so a CI
# run builds it once. Needs: apt-get, dpkg-deb, cpio, gzip.
set -euo pipefail

cache_root=${1:?usage: build.sh CACHE_DIR}
here=$(cd "$(dirname "$0")" && pwd)

# Modules in load order: dependencies first (reference/linux-guest.md).
modules=(
    drivers/virtio/virtio_ring
    drivers/virtio/virtio
    drivers/virtio/virtio_pci_legacy_dev
    drivers/virtio/virtio_pci_modern_dev
    drivers/virtio/virtio_pci
    drivers/block/virtio_blk
    lib/crc16
    crypto/crc32c_generic
    fs/mbcache
    fs/jbd2/jbd2
    fs/ext4/ext4
)

kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

pkg=$(kernel_pkg || true)
if [ -z "$pkg" ]; then
    apt-get update -qq >&2
    pkg=$(kernel_pkg)
fi
[ -n "$pkg" ] || { echo "cannot find the kernel package linux-image-amd64 depends on" >&2; exit 1; }
kver=${pkg#linux-image-}
init_hash=$( (cat "$here/init"; printf '%s\n' "${modules[@]}") | md5sum | cut -c1-12)
out="$cache_root/$kver-$init_hash"
if [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.gz" ]; then
    echo "$out"
    exit 0
fi

mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
(
    cd "$work"
    if ! apt-get download "$pkg" busybox-static >/dev/null 2>&1; then
        apt-get update -qq
        apt-get download "$pkg" busybox-static >/dev/null
    fi
    mkdir kernel busybox
    dpkg-deb -x linux-image-*.deb kernel
    dpkg-deb -x busybox-static_*.deb busybox
) >&2

root="$work/root"
mkdir -p "$root"/{bin,proc,sys,dev,mnt,tmp}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
moddir="$work/kernel/lib/modules/$kver/kernel"
: >"$root/modules.order"
for m in "${modules[@]}"; do
    src=""
    for ext in ko ko.xz ko.zst; do
        [ -f "$moddir/$m.$ext" ] && src="$moddir/$m.$ext" && break
    done
    [ -n "$src" ] || { echo "module $m missing from $pkg" >&2; exit 1; }
    mkdir -p "$root/lib/modules/$(dirname "$m")"
    case "$src" in
        *.xz) xz -dc "$src" >"$root/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$src" >"$root/lib/modules/$m.ko" ;;
        *) cp "$src" "$root/lib/modules/$m.ko" ;;
    esac
    echo "$m" >>"$root/modules.order"
done
install -m 0755 "$here/init" "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"

mkdir -p "$out.tmp.$$"
mv "$work/vmlinuz" "$work/initrd.gz" "$out.tmp.$$/"
rm -rf "$out"
mv "$out.tmp.$$" "$out"
echo "$out"
