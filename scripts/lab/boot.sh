#!/usr/bin/env bash
# Boots the lab's L2 guest under QEMU TCG with an emulated VT-d (scalable mode, first-stage
# translation) and the edu device, and saves its serial console to a log file.
#
# Usage: scripts/lab/boot.sh --kernel BZIMAGE --initrd INITRD [options]
#   --mode suite|demo|bench  passed to /init as lab.mode (default suite)
#   --filter SUBSTR     passed to /init as lab.filter (runs matching tests only)
#   --timeout SECONDS   stop QEMU after this long (default 900); exit status 124 then
#   --no-edu            leave out -device edu (the suite must then fail)
#   --log FILE          serial log (default: a new file under $TMPDIR); its path is printed
#   --stream            also copy the serial console to stdout while it runs
# Environment: IOASID_LAB_TSC_KHZ overrides the host TSC frequency given to L2
# (tsc_early_khz=), IOASID_LAB_MEM (default 6G: room for a 3 GiB VM whose RAM is pinned
# for DMA, in vm_memory_mapped_by_region), IOASID_LAB_SMP (default 1: with 2 vCPUs, L2's
# CPU 1 intermittently loses its timer under TCG (RCU stall "timer wakeup didn't happen ...
# cpu=1", L2 frozen); seen again in 1 of 3 full suites on 2026-12-04, at the end of
# api_hotplug_churn_no_leaks. With 1 vCPU the full suite took 2m30s, as fast as with 2),
# IOASID_LAB_APPEND (extra words for L2's kernel command line, e.g. scripts/bench's
# lab.rounds=N; the lab binary reads them from /proc/cmdline).
# Exit status: QEMU's (0 after the guest powers off), 124 on timeout.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lab/lib.sh
. "$here/lib.sh"

kernel=""
initrd=""
mode=suite
filter=""
timeout_s=900
edu=1
log=""
stream=0
while [ $# -gt 0 ]; do
    case "$1" in
    --kernel | --initrd | --mode | --filter | --timeout | --log)
        [ $# -ge 2 ] || lab_die "boot: $1 needs a value"
        case "$1" in
        --kernel) kernel=$2 ;;
        --initrd) initrd=$2 ;;
        --mode) mode=$2 ;;
        --filter) filter=$2 ;;
        --timeout) timeout_s=$2 ;;
        --log) log=$2 ;;
        esac
        shift
        ;;
    --no-edu) edu=0 ;;
    --stream) stream=1 ;;
    -h | --help)
        sed -n '2,15p' "$0"
        exit 0
        ;;
    *) lab_die "boot: unknown argument '$1'" ;;
    esac
    shift
done
[ -f "$kernel" ] || lab_die "boot: --kernel '$kernel' not found"
[ -f "$initrd" ] || lab_die "boot: --initrd '$initrd' not found"
case "$mode" in suite | demo | bench) ;; *) lab_die "boot: --mode must be suite, demo or bench" ;; esac
case "$timeout_s" in '' | *[!0-9]*) lab_die "boot: --timeout wants whole seconds" ;; esac
case "$filter" in *[[:space:]]*) lab_die "boot: --filter cannot contain spaces (kernel command line)" ;; esac

# "2600.002" (MHz) -> "2600002" (kHz).
mhz_to_khz() {
    local int=${1%%.*} frac=""
    [ "$int" != "$1" ] && frac=${1#*.}
    frac=${frac}000
    printf '%d\n' "$((10#$int * 1000 + 10#${frac:0:3}))"
}

# The host's TSC frequency in kHz: dmesg's refined calibration, else its detected value,
# else /proc/cpuinfo's "cpu MHz".
host_tsc_khz() {
    local mhz=""
    local msgs
    msgs=$(dmesg 2>/dev/null || true)
    mhz=$(sed -n 's/.*tsc: Refined TSC clocksource calibration: \([0-9.]*\) MHz.*/\1/p' <<<"$msgs" | tail -n1)
    [ -n "$mhz" ] || mhz=$(sed -n 's/.*tsc: Detected \([0-9.]*\) MHz.*/\1/p' <<<"$msgs" | tail -n1)
    [ -n "$mhz" ] || mhz=$(sed -n 's/^cpu MHz[[:space:]]*:[[:space:]]*\([0-9.]*\).*/\1/p' /proc/cpuinfo | head -n1)
    [ -n "$mhz" ] || return 1
    mhz_to_khz "$mhz"
}

tsc_khz=${IOASID_LAB_TSC_KHZ:-}
if [ -z "$tsc_khz" ]; then
    tsc_khz=$(host_tsc_khz) || tsc_khz=""
fi

# no_timer_check: under TCG on a loaded host, L2's check that the timer interrupt arrives
# through the interrupt-remapped IO-APIC can time out and panic ("timer doesn't work through
# Interrupt-remapped IO-APIC"; seen in 2 of about 9 boots while the machine was busy).
append="console=ttyS0 quiet panic=-1 intel_iommu=on,sm_on no_timer_check"
if [ -n "$tsc_khz" ]; then
    append+=" tsc_early_khz=$tsc_khz"
else
    lab_warn "boot: cannot tell the host TSC frequency; L2 runs without tsc_early_khz"
fi
append+=" lab.mode=$mode"
[ -n "$filter" ] && append+=" lab.filter=$filter"
# Extra words for L2's command line, e.g. the bench's knobs (lab.rounds=10).
[ -n "${IOASID_LAB_APPEND:-}" ] && append+=" $IOASID_LAB_APPEND"

if [ -z "$log" ]; then
    log=$(mktemp "${TMPDIR:-/tmp}/ioasid-lab-serial.XXXXXX.log")
fi
mkdir -p "$(dirname "$log")"
: >"$log"

# Keep QEMU's default NIC: with -nic none, L2 stalled in 3 of 9 runs (RCU stall, a lost timer
# on its second CPU, QEMU idle); with the NIC (and its iPXE ROM at boot) it never did.
qemu=(qemu-system-x86_64 -accel tcg -cpu max -machine "q35,kernel-irqchip=split"
    -m "${IOASID_LAB_MEM:-6G}" -smp "${IOASID_LAB_SMP:-1}" -nographic -no-reboot
    -device "intel-iommu,intremap=on,caching-mode=on,x-scalable-mode=on,x-flts=on")
[ "$edu" = 1 ] && qemu+=(-device edu)
qemu+=(-kernel "$kernel" -initrd "$initrd" -append "$append")

lab_say "boot: serial log: $log"
lab_say "boot: ${qemu[*]:0:${#qemu[@]}-1} \"$append\""
start=$SECONDS
rc=0
# --foreground keeps QEMU in our process group, so ^C reaches it; stdin is not the terminal.
if [ "$stream" = 1 ]; then
    set +e
    timeout --foreground -k 10 "$timeout_s" "${qemu[@]}" </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
else
    timeout --foreground -k 10 "$timeout_s" "${qemu[@]}" </dev/null >"$log" 2>&1 || rc=$?
fi
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    lab_say "boot: TIMEOUT: QEMU stopped after ${timeout_s} s (serial log: $log)"
    exit 124
fi
lab_say "boot: QEMU exited with status $rc after $((SECONDS - start)) s"
exit "$rc"
