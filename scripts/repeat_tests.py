"""Run tests again and again, and count: how flaky tests are found before CI finds them (issue 22).

    python scripts/repeat_tests.py --runs 20 [--burn] [TEST ...]

Without TEST it repeats the timing-sensitive ones (priority, determinism, failures). `--burn` runs a CPU-burning
process beside them (one busy loop per core), the load under which a wait that leans on timing gives way. Each run is
a fresh pytest process (fresh servers, nothing carried over); a summary table, and the failures' last lines, are
printed at the end and written to `--out` as JSON. `make test-repeat RUNS=20 BURN=1` runs it.

    python scripts/repeat_tests.py --burn-beside -- COMMAND ...

runs one command beside the burners instead (`make test-repeat-job BURN=1`: the Slurm fault job, which repeats
itself in one pytest session with --job-runs).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMING_SENSITIVE = [
    "tests/integration/test_rollout_priority.py",
    "tests/integration/test_rollout_determinism.py",
    "tests/integration/test_rollout_failures.py",
]


def _burn() -> None:
    while True:
        pass


def burners_started() -> list[multiprocessing.Process]:
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(os.cpu_count() or 1)]
    for b in burners:
        b.start()
    return burners


def burn_beside(command: list[str]) -> int:
    burners = burners_started()
    try:
        return subprocess.run(command, cwd=REPO).returncode
    finally:
        for b in burners:
            b.terminate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tests", nargs="*", default=TIMING_SENSITIVE)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--burn", action="store_true", help="a busy loop per core beside the tests")
    ap.add_argument("--out", default="runs/repeat_tests.json")
    ap.add_argument("--burn-beside", action="store_true", help="run the command after -- once beside the burners")
    argv = sys.argv[1:] if argv is None else argv
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.burn_beside:
        if not command:
            ap.error("--burn-beside needs the command after --")
        return burn_beside(command)

    burners = burners_started() if args.burn else []
    results: dict[str, list[dict]] = {t: [] for t in args.tests}
    try:
        for run in range(args.runs):
            for test in args.tests:
                t0 = time.monotonic()
                proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                                      cwd=REPO, capture_output=True, text=True)
                seconds = time.monotonic() - t0
                results[test].append({"run": run, "passed": proc.returncode == 0, "seconds": round(seconds, 1),
                                      "tail": "" if proc.returncode == 0 else proc.stdout[-3000:]})
                print(f"run {run + 1}/{args.runs} {test}: {'passed' if proc.returncode == 0 else 'FAILED'} "
                      f"in {seconds:.0f} s", flush=True)
    finally:
        for b in burners:
            b.terminate()

    print(f"\n{'test':60s} passed  seconds (min-max)" + ("   [with a CPU burner]" if args.burn else ""))
    for test, rows in results.items():
        secs = [r["seconds"] for r in rows]
        print(f"{test:60s} {sum(r['passed'] for r in rows)}/{len(rows):<4d}  {min(secs):.0f}-{max(secs):.0f}")
        for r in rows:
            if not r["passed"]:
                print(f"--- {test}, run {r['run'] + 1} ---\n{r['tail']}")
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"burn": args.burn, "results": results}, indent=1))
    return 0 if all(r["passed"] for rows in results.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
