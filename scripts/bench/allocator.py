"""What the console scripts' allocator setting (bagel.cli.common.tune_allocator) buys: the
official-geometry rows (scripts/bench/official_geometry.py) with glibc's default malloc and with
the tuned thresholds, in alternating child processes so both see the same machine.

    python scripts/bench/allocator.py [--rounds 2] [--repeats 5]

Prints each row's median over rounds for both settings and the ratio default / tuned (> 1: the
tuned setting is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).with_name("official_geometry.py")


def run_once(setting: str, repeats: int) -> dict[str, float]:
    env = {**os.environ, "BAGEL_MALLOC": "default" if setting == "default" else "tuned"}
    out = subprocess.run([sys.executable, str(BENCH), "--skip", "text", "--repeats", str(repeats)], env=env,
                         capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith("_s"):
            rows[parts[0]] = float(parts[1])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="default/tuned pairs, alternating")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per row in each child")
    args = p.parse_args()
    runs: dict[str, list[dict]] = {"default": [], "tuned": []}
    for _ in range(args.rounds):
        for setting in ("default", "tuned"):
            runs[setting].append(run_once(setting, args.repeats))
    print(f"{'row (s)':<28} {'glibc default':>14} {'tuned':>10} {'ratio':>7}")
    for key in runs["default"][0]:
        a = statistics.median(r[key] for r in runs["default"])
        b = statistics.median(r[key] for r in runs["tuned"])
        print(f"{key:<28} {a:14.4f} {b:10.4f} {a / b:6.2f}x")


if __name__ == "__main__":
    main()
