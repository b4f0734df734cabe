#!/usr/bin/env bash
# Self-test of scripts/lab/parse.py on canned serial logs. Needs no QEMU.
# Prints one line per case and "N passed, N failed, 0 skipped"; exits 1 when a case fails.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ioasid-lab-parser.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

passed=0
failed=0

# check NAME EXPECTED_STATUS EXPECTED_LAST_LINE [PARSE ARGS...] < LOG
# Optional: MUST_CONTAIN="text" in the environment of the call.
check() {
    local name=$1 want_rc=$2 want_last=$3
    shift 3
    cat >"$tmp/$name.log"
    local out rc=0
    out=$(python3 "$here/parse.py" "$tmp/$name.log" "$@" 2>&1) || rc=$?
    local last
    last=$(printf '%s\n' "$out" | tail -n1)
    local why=""
    [ "$rc" = "$want_rc" ] || why="exit status $rc, expected $want_rc"
    [ -n "$why" ] || [ "$last" = "$want_last" ] || why="last line '$last', expected '$want_last'"
    if [ -z "$why" ] && [ -n "${MUST_CONTAIN:-}" ] && ! grep -qF -- "$MUST_CONTAIN" <<<"$out"; then
        why="output lacks '$MUST_CONTAIN'"
    fi
    if [ -z "$why" ]; then
        echo "parser test $name ... ok"
        passed=$((passed + 1))
    else
        echo "parser test $name ... FAILED: $why"
        printf '%s\n' "$out" | sed 's/^/    | /'
        failed=$((failed + 1))
    fi
}

MUST_CONTAIN="lab test edu_dma ... ok" check all_pass 0 "3 passed, 0 failed, 0 skipped" <<'EOF'
LAB-INIT LAB_EDU_BDF=0000:00:03.0 (bound to vfio-pci)
LAB-TEST ioas_alloc PASS
LAB-TEST ioas_map PASS
LAB-TEST edu_dma PASS
LAB-DONE
EOF

MUST_CONTAIN="lab test edu_dma ... FAILED: readback mismatch at 0x100000" \
    check one_fail 1 "2 passed, 1 failed, 0 skipped" <<'EOF'
LAB-TEST ioas_alloc PASS
LAB-TEST edu_dma FAIL readback mismatch at 0x100000
LAB-TEST ioas_map PASS
LAB-DONE
EOF

MUST_CONTAIN="LAB-DONE missing" check missing_done 1 "2 passed, 0 failed, 0 skipped" <<'EOF'
LAB-TEST ioas_alloc PASS
LAB-TEST ioas_map PASS
[    3.100000] BUG: kernel NULL pointer dereference, address: 0000000000000000
[    3.200000] Kernel panic - not syncing: Fatal exception
EOF

MUST_CONTAIN="no tests ran" check zero_tests 1 "0 passed, 0 failed, 0 skipped" <<'EOF'
LAB-INIT running: /bin/ioasid-lab --filter nothing_matches
LAB-DONE
EOF

# Kernel messages, \r\n line ends, and a result printed after a kernel message on one line.
printf '%s\r\n' \
    "SeaBIOS (version 1.16.3)" \
    "[    1.068494] kvm_intel: VMX not supported by CPU 1" \
    "LAB-TEST ioas_alloc PASS" \
    "[    2.000000] DMAR: DRHD: handling fault status reg 2" \
    "[    2.100000] vfio-pci 0000:00:03.0: resetting" \
    "test chatter: mapping 4096 bytes" \
    "[    2.300000] DMAR: [DMA Read NO_PASID] Request device [00:03.0] fault addr 0x100000 LAB-TEST edu_unmapped_dma PASS" \
    "LAB-TEST pasid_attach SKIP edu has no PASID capability" \
    "LAB-DONE" \
    "[    2.794038] reboot: Power down" >"$tmp/noise.in"
MUST_CONTAIN="lab test pasid_attach ... skipped: edu has no PASID capability" \
    check interleaved_noise 0 "2 passed, 0 failed, 1 skipped (pasid_attach: edu has no PASID capability)" <"$tmp/noise.in"

MUST_CONTAIN="lab test nested_hwpt ... FAILED: malformed result line" \
    check malformed 1 "1 passed, 1 failed, 0 skipped" <<'EOF'
LAB-TEST ioas_alloc PASS
LAB-TEST nested_hwpt PA
LAB-DONE
EOF

MUST_CONTAIN="lab test x ... FAILED: (no reason given)" check fail_no_reason 1 "0 passed, 1 failed, 0 skipped" <<'EOF'
LAB-TEST x FAIL
LAB-DONE
EOF

MUST_CONTAIN="timed out after 900 s" check timed_out 1 "1 passed, 0 failed, 0 skipped" --timed-out 900 <<'EOF'
LAB-TEST ioas_alloc PASS
EOF

# Several skips: each is counted and named with its reason on the closing line, after the
# "N passed, N failed" prefix CI reads. A skip with no reason says so.
MUST_CONTAIN="lab test sva_copy ... skipped: no /dev/iommu in L2" \
    check skips_named 0 "1 passed, 0 failed, 3 skipped (sva_copy: no /dev/iommu in L2; nested_hwpt: the vIOMMU has no nesting (caps 0x0); pri_fault: (no reason given))" <<'EOF'
LAB-TEST ioas_alloc PASS (12 ms)
LAB-TEST sva_copy SKIP no /dev/iommu in L2
LAB-TEST nested_hwpt SKIP the vIOMMU has no nesting (caps 0x0)
LAB-TEST pri_fault SKIP
LAB-DONE
EOF

# Skips and a failure together: the failure still fails the run.
check skip_and_fail 1 "0 passed, 1 failed, 1 skipped (b: no mdev)" <<'EOF'
LAB-TEST a FAIL readback mismatch
LAB-TEST b SKIP no mdev
LAB-DONE
EOF

# Only skips: nothing failed, the run passes, and the skips are named.
check only_skips 0 "0 passed, 0 failed, 1 skipped (edu_dma: no edu device)" <<'EOF'
LAB-TEST edu_dma SKIP no edu device
LAB-DONE
EOF

# A missing log: the closing line keeps its shape.
rc=0
out=$(python3 "$here/parse.py" "$tmp/does-not-exist.log" 2>/dev/null) || rc=$?
if [ "$rc" = 1 ] && [ "$(printf '%s\n' "$out" | tail -n1)" = "0 passed, 0 failed, 0 skipped" ]; then
    echo "parser test missing_log ... ok"
    passed=$((passed + 1))
else
    echo "parser test missing_log ... FAILED: exit $rc, output '$out'"
    failed=$((failed + 1))
fi

check demo_ok 0 "lab demo: ok" --mode demo <<'EOF'
L3 guest says hello
LAB-DONE
EOF

check demo_fail 1 "lab demo: FAILED" --mode demo <<'EOF'
LAB-TEST demo_l3_boot FAIL L3 never printed its banner
LAB-DONE
EOF

check demo_no_done 1 "lab demo: FAILED" --mode demo <<'EOF'
L3 guest says hello
EOF

echo "$passed passed, $failed failed, 0 skipped"
[ "$failed" = 0 ]
