#!/usr/bin/env bash
# Runs the lab suite (or the demo) inside an L2 Linux guest under QEMU TCG, and reports.
#
# Usage: scripts/lab/run.sh [options]
#   --mode suite|demo   suite (default): run all lab tests, report one line per test and
#                       "N passed, N failed"; demo: stream the demo's console output
#   --filter SUBSTR     run only the tests whose name contains SUBSTR
#   --timeout SECONDS   stop the guest after this long (default 900)
#   --no-edu            boot without the edu device (the suite must then fail)
#   --verbose           stream the guest's serial console while it runs (demo always does)
#   --lab-bin PATH      use PATH as /bin/ioasid-lab instead of building it with cargo
#   --kernel BZIMAGE    use this kernel instead of scripts/lab/kernel.sh's
#   --add SRC:DEST      put SRC into the initramfs at DEST (repeatable)
# Steps: setup.sh (quiet when done), kernel.sh, cargo build --release -p ioasid-tests
# --bin ioasid-lab (CARGO_TARGET_DIR is honoured), initramfs.sh, boot.sh, parse.py.
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
    --verbose) verbose=1 ;;
    -h | --help)
        sed -n '2,18p' "$0"
        exit 0
        ;;
    *) lab_die "run: unknown argument '$1'" ;;
    esac
    shift
done
case "$mode" in suite | demo) ;; *) lab_die "run: --mode must be suite or demo" ;; esac

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
if [ -z "$lab_bin" ]; then
    command -v cargo >/dev/null 2>&1 || lab_die "run: cargo not found (needed to build ioasid-lab)"
    lab_say "run: cargo build --release -p ioasid-tests --bin ioasid-lab"
    (cd "$repo" && cargo build --release -p ioasid-tests --bin ioasid-lab) >&2 ||
        lab_die "run: building ioasid-lab failed"
    lab_bin=$tdir/release/ioasid-lab
fi
[ -f "$lab_bin" ] || lab_die "run: lab binary '$lab_bin' not found"

# 4. The initramfs.
work=${IOASID_LAB_WORK:-$tdir/lab}
mkdir -p "$work"
initrd=$("$here/initramfs.sh" --out "$work/initramfs-$mode.cpio.gz" "$lab_bin" "${adds[@]}")

# 5. Boot.
log=$work/serial-$mode.log
boot_args=(--kernel "$kernel" --initrd "$initrd" --mode "$mode" --timeout "$timeout_s" --log "$log")
[ -n "$filter" ] && boot_args+=(--filter "$filter")
[ "$edu" = 0 ] && boot_args+=(--no-edu)
[ "$mode" = demo ] || [ "$verbose" = 1 ] && boot_args+=(--stream)
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
