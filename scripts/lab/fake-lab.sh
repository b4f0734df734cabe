#!/bin/sh
# A stand-in for the ioasid-lab binary, to check the lab runner itself without Rust:
#   scripts/lab/run.sh --lab-bin scripts/lab/fake-lab.sh [--no-edu] [--mode demo]
# It speaks the lab protocol (LAB-TEST <name> PASS|FAIL <reason>|SKIP <reason>, LAB-DONE)
# and checks only what /init prepared. Arguments: [demo] [--filter SUBSTR].
mode=suite
filter=""
while [ $# -gt 0 ]; do
    case "$1" in
    demo) mode=demo ;;
    --filter) filter=$2; shift ;;
    esac
    shift
done

selected() { case "$1" in *"$filter"*) return 0 ;; *) return 1 ;; esac; }

# Conditions are eval'd here, in the guest.
check() { # NAME CONDITION-COMMAND REASON-IF-FALSE
    selected "$1" || return 0
    echo "fake-lab: running $1"
    if eval "$2"; then echo "LAB-TEST $1 PASS"; else echo "LAB-TEST $1 FAIL $3"; fi
}

if [ "$mode" = demo ]; then
    echo "fake-lab demo: edu=${LAB_EDU_BDF:-none} mtty=${LAB_MTTY_UUID:-none}"
    [ -n "$LAB_EDU_BDF" ] || echo "LAB-TEST fake_demo FAIL LAB_EDU_BDF is not set"
    echo "LAB-DONE"
    exit 0
fi
# shellcheck disable=SC2016
check fake_edu_present '[ -n "$LAB_EDU_BDF" ] && [ -e /dev/vfio/devices/vfio0 ]' \
    "LAB_EDU_BDF='$LAB_EDU_BDF', /dev/vfio/devices/vfio0 present: $([ -e /dev/vfio/devices/vfio0 ] && echo yes || echo no)"
# shellcheck disable=SC2016
check fake_mtty_present '[ -n "$LAB_MTTY_UUID" ] && [ -e "/sys/bus/mdev/devices/$LAB_MTTY_UUID" ]' \
    "LAB_MTTY_UUID='$LAB_MTTY_UUID' not usable"
check fake_iommufd_present '[ -e /dev/iommu ]' "no /dev/iommu"
if selected fake_kvm_present; then
    if [ -e /dev/kvm ]; then
        echo "LAB-TEST fake_kvm_present PASS"
    else
        echo "LAB-TEST fake_kvm_present SKIP no /dev/kvm in L2"
    fi
fi
echo "LAB-DONE"
