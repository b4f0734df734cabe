#!/usr/bin/env python3
"""Reads an L2 serial log and reports the lab's test results.

Protocol (written by the lab test binary, one per line, anywhere in the log):
    LAB-TEST <name> PASS
    LAB-TEST <name> FAIL <reason text>
    LAB-TEST <name> SKIP <reason text>
    LAB-DONE
Kernel messages and test chatter may interleave; lines may end in \\r.

Suite mode prints one line per test, any problems, and then exactly one closing line
"N passed, N failed, N skipped", followed on that line by each skipped test and its reason,
"(name: reason; name: reason)", when any were skipped. A skip is not a pass: it is
counted and named so that it shows in the CI log. It exits 1 on any
FAIL (or malformed LAB-TEST line), when LAB-DONE is missing (crash, hang, timeout), when no
test ran, or when the run timed out; else 0.

Demo mode succeeds when LAB-DONE appears and no LAB-TEST line says FAIL. Bench mode does
too, and repeats the benchmarks' `LAB-BENCH <name> <values>` lines.

Usage: parse.py LOG [--mode suite|demo|bench] [--timed-out SECONDS]
"""

import argparse
import re
import sys
from dataclasses import dataclass

TEST_RE = re.compile(r"LAB-TEST\s+(\S+)(?:\s+(\S+))?(?:\s+(.*?))?\s*$")
DONE_RE = re.compile(r"(?:^|[^\w-])LAB-DONE(?:$|[^\w-])")
BENCH_RE = re.compile(r"LAB-BENCH\s+(.*?)\s*$")
WARN_RE = re.compile(r"LAB-INIT warning: (.*?)\s*$")
PANIC_RE = re.compile(r"(Kernel panic - not syncing.*?|BUG: .*?|Oops: .*?)\s*$")


@dataclass
class Result:
    name: str
    status: str  # "PASS", "FAIL" or "SKIP"
    reason: str


@dataclass
class Report:
    results: list
    done: bool
    warnings: list
    crashes: list
    benches: list


def parse_lines(lines):
    results, warnings, crashes, benches = [], [], [], []
    done = False
    for raw in lines:
        line = raw.replace("\r", "")
        if DONE_RE.search(line):
            done = True
        m = WARN_RE.search(line)
        if m:
            warnings.append(m.group(1))
        m = BENCH_RE.search(line)
        if m:
            benches.append(m.group(1))
        m = PANIC_RE.search(line)
        if m:
            crashes.append(m.group(1))
        m = TEST_RE.search(line)
        if not m:
            continue
        name, status, reason = m.group(1), m.group(2) or "", (m.group(3) or "").strip()
        if status == "PASS":
            results.append(Result(name, "PASS", ""))
        elif status in ("FAIL", "SKIP"):
            results.append(Result(name, status, reason or "(no reason given)"))
        else:
            # A result line we cannot read must not pass silently.
            results.append(Result(name, "FAIL", f"malformed result line: {line.strip()!r}"))
    return Report(results, done, warnings, crashes, benches)


def summary_line(results):
    """`N passed, N failed, N skipped`, then each skipped test with its reason in
    parentheses. The `N passed, N failed` prefix is what CI reads: keep it first."""
    passed = sum(r.status == "PASS" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    skips = [r for r in results if r.status == "SKIP"]
    line = f"{passed} passed, {failed} failed, {len(skips)} skipped"
    if skips:
        line += " (" + "; ".join(f"{r.name}: {r.reason}" for r in skips) + ")"
    return line


def report(rep, mode, timed_out, out):
    """Prints the report to `out`; returns the exit status."""
    problems = []
    if timed_out is not None:
        problems.append(f"the guest timed out after {timed_out} s")
    if not rep.done:
        problems.append("LAB-DONE missing: the guest crashed, hung or stopped early")
    failed = any(r.status == "FAIL" for r in rep.results)

    for w in rep.warnings:
        print(f"lab: guest init warning: {w}", file=out)
    for c in rep.crashes:
        print(f"lab: guest kernel: {c}", file=out)
    for r in rep.results:
        if r.status == "PASS":
            print(f"lab test {r.name} ... ok", file=out)
        elif r.status == "FAIL":
            print(f"lab test {r.name} ... FAILED: {r.reason}", file=out)
        else:
            print(f"lab test {r.name} ... skipped: {r.reason}", file=out)

    if mode in ("demo", "bench"):
        for b in rep.benches:
            print(f"bench {b}", file=out)
        ok = rep.done and not failed and timed_out is None
        for p in problems:
            print(f"lab: {mode}: {p}", file=out)
        if failed:
            print(f"lab: {mode}: a step FAILED", file=out)
        print(f"lab {mode}: ok" if ok else f"lab {mode}: FAILED", file=out)
        return 0 if ok else 1

    if not rep.results:
        problems.append("no tests ran")
    for p in problems:
        print(f"lab: {p}", file=out)
    print(summary_line(rep.results), file=out)
    return 1 if (problems or failed) else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--mode", choices=("suite", "demo", "bench"), default="suite")
    ap.add_argument("--timed-out", metavar="SECONDS", default=None)
    args = ap.parse_args(argv)
    try:
        with open(args.log, encoding="utf-8", errors="replace") as f:
            rep = parse_lines(f)
    except OSError as e:
        print(f"lab: cannot read the serial log: {e}", file=sys.stderr)
        print("0 passed, 0 failed, 0 skipped")
        return 1
    sys.stdout.flush()
    return report(rep, args.mode, args.timed_out, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
