#!/usr/bin/env bash
# The one command that passes all tests, on a fresh Debian 12 machine too.
# It installs what the tests need when it is missing, then runs lints and the
# whole test suite (unit, simulator seeds, codec properties, real processes
# with real NBD clients, a Linux guest under QEMU).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
have() { command -v "$1" >/dev/null 2>&1; }
have nbdinfo || need_pkgs+=(libnbd-bin)
# The disk-error failover tests show a failing nbdkit disk as a file.
have nbdfuse || need_pkgs+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need_pkgs+=(python3-libnbd)
have nbdkit || need_pkgs+=(nbdkit)
have fio || need_pkgs+=(fio)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx mke2fs || need_pkgs+=(busybox-static)
have cpio || need_pkgs+=(cpio)
have ip || need_pkgs+=(iproute2)
# The disk-error failover test mounts a small tmpfs; the benchmark script's
# test pins CPUs.
{ have mount && have umount; } || need_pkgs+=(mount)
have taskset || need_pkgs+=(util-linux)
# The guest test builds its kernel + initramfs from Debian packages.
have dpkg-deb || need_pkgs+=(dpkg)
have gzip || need_pkgs+=(gzip)
if ! have qemu-system-x86_64 || ! have qemu-img || ! have qemu-io || ! have qemu-nbd; then
  # Debian's qemu-system-x86 needs qemu-utils of its own version; a newer
  # qemu-utils (from backports) must come down to it in the same command.
  apt_qemu=1
fi
if [ ${#need_pkgs[@]} -gt 0 ] || [ -n "${apt_qemu:-}" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if [ ${#need_pkgs[@]} -gt 0 ]; then
    apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  fi
  if [ -n "${apt_qemu:-}" ]; then
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    apt-get install -y -qq --allow-downgrades qemu-system-x86 "qemu-utils=$v" >/dev/null
  fi
fi
have cargo-nextest || cargo install --locked cargo-nextest

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Debian's python has the nbd module; a python3 first on PATH may not.
export PATH=/usr/bin:$PATH:$HOME/.cargo/bin
cargo nextest run --workspace --no-fail-fast "$@"
