"""Crash safety, more seeds: runs ``tests/test_crash_safety.py`` with
``DLWSI_CRASH_SEEDS`` seeds (local jpeg, one local dlwsi, S3 jpeg on moto's server) and
summarizes every kill: where it landed, what the killed store claimed, and whether
``--resume`` + ``verify`` succeeded::

    nice -n 5 python benchmarks/crash_safety.py --seeds 6 --json crash.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dlwsi-crash-") as tmp:
        report = Path(tmp) / "kills.jsonl"
        env = {**os.environ, "DLWSI_CRASH_SEEDS": str(args.seeds),
               "DLWSI_CRASH_REPORT": str(report)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(REPO / "tests" / "test_crash_safety.py")], cwd=REPO,
                              env=env, capture_output=True, text=True)
        records = [json.loads(line) for line in report.read_text().splitlines()] \
            if report.exists() else []
    summary = {
        "pytest_returncode": proc.returncode,
        "pytest_tail": proc.stdout.strip().splitlines()[-1:],
        "runs": len(records),
        "killed": sum(r["killed"] for r in records),
        "killed_and_resumed_and_verified": sum(r["killed"] and r.get("resumed_and_verified",
                                                                     False) for r in records),
        "by_store": dict(collections.Counter(f"{r['store']}/{r['codec']}/shard{r['shard']}"
                                             for r in records)),
        "killed_store_state": dict(collections.Counter(r["state"] for r in records)),
        "records": records,
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
