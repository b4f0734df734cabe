#!/usr/bin/env bash
# Runs the lab suite (or the demo) inside an L2 Linux guest under QEMU TCG, and reports.
#
# Usage: scripts/lab/run.sh [options]
#   --mode suite|demo|bench
#                       suite (default): run all lab tests, report one line per test and
#                       "N passed, N failed, N skipped"; demo: stream the demo's console output;
#                       bench: the lab benchmarks (carries QEMU into L2 as the peer)
#   --filter SUBSTR     run only the tests whose name contains SUBSTR
#   --timeout SECONDS   stop the guest after this long (default 900)
#   --no-edu            boot without the edu device (the suite must then fail)
#   --verbose           stream the guest's serial console while it runs (demo always does)
#   --lab-bin PATH      use PATH as /bin/ioasid-lab instead of building it with cargo
#   --kernel BZIMAGE    use this kernel instead of scripts/lab/kernel.sh's
#   --add SRC:DEST      put SRC into the initramfs at DEST (repeatable)
#   --no-l3             do not build or carry the L3 pieces (the L3 tests then fail)
# Steps: setup.sh (quiet when done), kernel.sh (L2), cargo build --release of ioasid-lab,
# ioasid-guest, ioasid-vmm and ioasid-remote (CARGO_TARGET_DIR is honoured), kernel.sh
# --flavor l3, kernel.sh --flavor l3 --module tests/l3-module (sva_copy.ko) and the L3
# initramfs (l3-init + ioasid-guest + /lib/modules/sva_copy.ko), initramfs.sh for L2 carrying
# /bin/ioasid-vmm, /bin/ioasid-remote, /l3/bzImage and /l3/initramfs.cpio.gz (bench mode also
# QEMU, its firmware, and /l3/vmlinux from kernel.sh --flavor l3 --vmlinux), boot.sh,
# parse.py.
# Work files (initramfs, serial log) go to $IOASID_LAB_WORK, default <cargo target dir>/lab.
# Exit status: 0 when every test passed (demo: LAB-DONE and no FAIL); 1 otherwise.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lab/lib.sh
. "$here/lib.sh"
repo=$(lab_repo)

mode=suite
filter=""
timeout_s=900
edu=1
verbose=0
lab_bin=""
kernel=""
l3=1
adds=()
while [ $# -gt 0 ]; do
    case "$1" in
    --mode | --filter | --timeout | --lab-bin | --kernel | --add)
        [ $# -ge 2 ] || lab_die "run: $1 needs a value"
        case "$1" in
        --mode) mode=$2 ;;
        --filter) filter=$2 ;;
        --timeout) timeout_s=$2 ;;
        --lab-bin) lab_bin=$2 ;;
        --kernel) kernel=$2 ;;
        --add) adds+=(--add "$2") ;;
        esac
        shift
        ;;
    --no-edu) edu=0 ;;
    --no-l3) l3=0 ;;
    --verbose) verbose=1 ;;
    -h | --help)
        sed -n '2,26p' "$0"
        exit 0
        ;;
    *) lab_die "run: unknown argument '$1'" ;;
    esac
    shift
done
case "$mode" in suite | demo | bench) ;; *) lab_die "run: --mode must be suite, demo or bench" ;; esac

# 1. Host packages (quiet when already installed).
"$here/setup.sh"

# 2. The L2 kernel.
if [ -z "$kernel" ]; then
    kernel=$("$here/kernel.sh")
fi
[ -f "$kernel" ] || lab_die "run: kernel '$kernel' not found"

# 3. The lab test binary.
target_dir() {
    if [ -n "${CARGO_TARGET_DIR:-}" ]; then
        printf '%s\n' "$CARGO_TARGET_DIR"
    elif command -v cargo >/dev/null 2>&1; then
        (cd "$repo" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])') ||
            printf '%s\n' "$repo/target"
    else
        printf '%s\n' "$repo/target"
    fi
}
tdir=$(target_dir)
bins=()
[ -z "$lab_bin" ] && bins+=(--bin ioasid-lab)
[ "$l3" = 1 ] && bins+=(--bin ioasid-guest --bin ioasid-vmm --bin ioasid-remote)
if [ ${#bins[@]} != 0 ]; then
    command -v cargo >/dev/null 2>&1 || lab_die "run: cargo not found (needed to build ${bins[*]})"
    lab_say "run: cargo build --release -p ioasid-tests -p vmm -p api ${bins[*]}"
    (cd "$repo" && cargo build --release -p ioasid-tests -p vmm -p api "${bins[@]}") >&2 ||
        lab_die "run: building the lab binaries failed"
fi
[ -n "$lab_bin" ] || lab_bin=$tdir/release/ioasid-lab
[ -f "$lab_bin" ] || lab_die "run: lab binary '$lab_bin' not found"

work=${IOASID_LAB_WORK:-$tdir/lab}
mkdir -p "$work/bin"
# Debug info makes the binaries several times larger, and every byte is unpacked under TCG.
slim() {
    local out=$work/bin/$(basename "$1")
    strip --strip-debug -o "$out" "$1" 2>/dev/null || cp "$1" "$out"
    printf '%s\n' "$out"
}
lab_bin=$(slim "$lab_bin")

# 3b. The L3 guest: its kernel, its initramfs, and the VMM that boots it inside L2.
if [ "$l3" = 1 ]; then
    l3_kernel=$("$here/kernel.sh" --flavor l3)
    [ -f "$l3_kernel" ] || lab_die "run: L3 kernel '$l3_kernel' not found"
    guest_bin=$(slim "$tdir/release/ioasid-guest")
    vmm_bin=$(slim "$tdir/release/ioasid-vmm")
    remote_bin=$(slim "$tdir/release/ioasid-remote")
    # The SVA tests' module, built against the L3 kernel's tree; without it only they fail.
    l3_adds=()
    if l3_module=$("$here/kernel.sh" --flavor l3 --module "$repo/tests/l3-module"); then
        l3_adds+=(--add "$l3_module:/lib/modules/sva_copy.ko")
    else
        lab_warn "run: building tests/l3-module failed; the L3 SVA tests will fail"
    fi
    l3_initrd=$("$here/initramfs.sh" --out "$work/l3-initramfs.cpio.gz" --init "$here/l3-init" \
        --bin-name ioasid-guest "$guest_bin" ${l3_adds[@]+"${l3_adds[@]}"})
    adds+=(--add "$vmm_bin:/bin/ioasid-vmm" --add "$remote_bin:/bin/ioasid-remote" --add "$l3_kernel:/l3/bzImage"
        --add "$l3_initrd:/l3/initramfs.cpio.gz")
fi

# 3c. The peer for the benchmarks: QEMU (its libraries come with it), its firmware and ROMs.
if [ "$mode" = bench ]; then
    qemu=$(command -v qemu-system-x86_64) || lab_die "run: qemu-system-x86_64 not found"
    adds+=(--add "$qemu:/usr/bin/qemu-system-x86_64" --add /usr/share/qemu:/usr/share/qemu
        --add /usr/share/seabios:/usr/share/seabios)
    # The same L3 kernel uncompressed (ELF with a PVH note), for the boot-overhead rows that
    # leave out the decompressor.
    if [ "$l3" = 1 ] && l3_vmlinux=$("$here/kernel.sh" --flavor l3 --vmlinux) && [ -s "$l3_vmlinux" ]; then
        adds+=(--add "$l3_vmlinux:/l3/vmlinux")
    else
        lab_warn "run: no L3 vmlinux; the bench's PVH rows are skipped"
    fi
fi

# 4. The initramfs.
initrd=$("$here/initramfs.sh" --out "$work/initramfs-$mode.cpio.gz" "$lab_bin" "${adds[@]}")

# 5. Boot.
log=$work/serial-$mode.log
boot_args=(--kernel "$kernel" --initrd "$initrd" --mode "$mode" --timeout "$timeout_s" --log "$log")
[ -n "$filter" ] && boot_args+=(--filter "$filter")
[ "$edu" = 0 ] && boot_args+=(--no-edu)
[ "$mode" != suite ] || [ "$verbose" = 1 ] && boot_args+=(--stream)
boot_rc=0
"$here/boot.sh" "${boot_args[@]}" || boot_rc=$?

# 6. Report.
parse_args=("$log" --mode "$mode")
[ "$boot_rc" = 124 ] && parse_args+=(--timed-out "$timeout_s")
parse_rc=0
result=$(python3 "$here/parse.py" "${parse_args[@]}") || parse_rc=$?
if [ "$boot_rc" != 0 ] && [ "$boot_rc" != 124 ]; then
    lab_say "run: QEMU failed with status $boot_rc"
    parse_rc=1
fi
if [ "$parse_rc" != 0 ] && [ "$mode" = suite ] && [ "$verbose" = 0 ]; then
    echo "---- last 40 lines of the serial log ($log) ----"
    tail -n 40 "$log" | sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1bc//g' | tr -d '\r'
    echo "---- end of the serial log ----"
fi
printf '%s\n' "$result"
exit "$parse_rc"
