"""Print the chaos suite's table from the JSON lines its tests wrote (CHAOS_REPORT):
scenario, outcome, recovery seconds; then the median recovery time per role."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(path: str) -> int:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] if Path(path).exists() else []
    if not rows:
        print("no chaos results (did the tests run?)")
        return 1
    print(f"{'SCENARIO':<32} {'OUTCOME':<10} RECOVERY_S")
    for r in rows:
        print(f"{r['role'] + ' ' + r['fault'] + ' during ' + r['moment']:<32} {r['outcome']:<10} {r['recovery_s']:.2f}")
    print()
    for role in sorted({r["role"] for r in rows}):
        times = [r["recovery_s"] for r in rows if r["role"] == role]
        print(f"median recovery, {role}: {statistics.median(times):.2f} s over {len(times)} scenario(s)")
    return 0 if all(r["outcome"] == "finished" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
