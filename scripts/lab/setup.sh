#!/usr/bin/env bash
# Installs what the nested-virt lab needs on the host (Debian 12 bookworm, run as root):
#   - an apt source for bookworm-backports (deb822, same URIs and Signed-By as the
#     machine's bookworm source) when none is configured;
#   - qemu-system-x86 >= 10.0 from bookworm-backports, busybox-static, cpio, and
#     acpica-tools (iasl: a vmm test disassembles our DSDT with it).
# Idempotent: when everything is in place it prints nothing and touches nothing.
# Kernel build dependencies are not installed here; scripts/lab/kernel.sh installs them
# only when it actually has to build a kernel.
#
# Usage: scripts/lab/setup.sh [--dry-run]
#   --dry-run   say what would be done, change nothing.
# Environment: IOASID_LAB_APT_ETC (default /etc/apt) lets tests point at a scratch apt dir.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lab/lib.sh
. "$here/lib.sh"

dry_run=0
for arg in "$@"; do
    case "$arg" in
    --dry-run) dry_run=1 ;;
    -h | --help)
        sed -n '2,14p' "$0"
        exit 0
        ;;
    *) lab_die "setup: unknown argument '$arg'" ;;
    esac
done

apt_etc=${IOASID_LAB_APT_ETC:-/etc/apt}
qemu_min=10.0

# Returns the QEMU version of qemu-system-x86_64 ("10.0.2"), or nothing.
qemu_version() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 0
    qemu-system-x86_64 --version 2>/dev/null |
        sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n1
}

qemu_ok() {
    local v
    v=$(qemu_version)
    [ -n "$v" ] && dpkg --compare-versions "$v" ge "$qemu_min"
}

pkg_installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

missing_pkgs=()
for p in busybox-static cpio acpica-tools; do
    pkg_installed "$p" || missing_pkgs+=("$p")
done
need_qemu=0
qemu_ok || need_qemu=1
need_source=0
lab_apt_has_suite "$apt_etc" bookworm-backports || need_source=1

if [ "$need_source" = 0 ] && [ "$need_qemu" = 0 ] && [ ${#missing_pkgs[@]} = 0 ]; then
    exit 0
fi

if [ "$dry_run" = 0 ] && [ "$(id -u)" != 0 ]; then
    lab_die "setup: must run as root (CI does) to install: ${missing_pkgs[*]:-}" \
        "$([ $need_qemu = 1 ] && echo "qemu-system-x86>=$qemu_min") " \
        "$([ $need_source = 1 ] && echo "and the bookworm-backports apt source")"
fi

need_update=0
if [ "$need_source" = 1 ]; then
    lab_apt_add_suite "$apt_etc" bookworm-backports "$dry_run"
    need_update=1
fi
if [ "$need_qemu" = 1 ] || [ ${#missing_pkgs[@]} != 0 ]; then
    if ! lab_apt_lists_present bookworm-backports; then
        need_update=1
    fi
fi

if [ "$dry_run" = 1 ]; then
    [ "$need_update" = 1 ] && lab_say "setup: would run: apt-get update"
    [ ${#missing_pkgs[@]} != 0 ] && lab_say "setup: would run: apt-get install ${missing_pkgs[*]}"
    [ "$need_qemu" = 1 ] &&
        lab_say "setup: would run: apt-get install -t bookworm-backports qemu-system-x86 (have: '$(qemu_version)', need >= $qemu_min)"
    exit 0
fi

if [ "$need_update" = 1 ]; then
    lab_apt_update
fi
if [ ${#missing_pkgs[@]} != 0 ]; then
    lab_apt_install "${missing_pkgs[@]}"
fi
if [ "$need_qemu" = 1 ]; then
    lab_apt_install -t bookworm-backports qemu-system-x86
    if ! qemu_ok; then
        lab_die "setup: qemu-system-x86_64 is version '$(qemu_version)' after installing from" \
            "bookworm-backports; the lab needs >= $qemu_min (x-scalable-mode, x-flts)." \
            "Check 'apt-cache policy qemu-system-x86'."
    fi
    lab_say "setup: $(qemu-system-x86_64 --version | head -n1)"
fi
