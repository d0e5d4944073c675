"""Start-up time of ``langseg --help`` and ``import langseg``, optionally against another source tree.

    python benchmarks/cli_startup.py [--runs 15] [--compare /path/to/other/checkout/src]

Each figure is the median wall time of fresh interpreter processes (``python -m langseg --help``,
``python -c "import langseg"``), the trees interleaved run by run so that load changes hit both alike;
the load average is printed before and after. Whether torch was imported is printed per tree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
COMMANDS = {
    "langseg --help": ["-m", "langseg", "--help"],
    "import langseg": ["-c", "import langseg"],
}


def run(src: Path, args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def imports_torch(src: Path) -> bool:
    code = "import sys, langseg.cli; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return out.stdout.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--compare", type=Path, help="another checkout's src/ folder (e.g. the previous one)")
    args = parser.parse_args()
    trees = {"this tree": SRC, **({"compared": args.compare} if args.compare else {})}
    print(f"load average before: {os.getloadavg()}")
    times: dict[tuple[str, str], list[float]] = {(t, c): [] for t in trees for c in COMMANDS}
    for src in trees.values():  # warm the file cache once
        run(src, COMMANDS["langseg --help"])
    for _ in range(args.runs):
        for command, argv in COMMANDS.items():
            for tree, src in trees.items():
                times[tree, command].append(run(src, argv))
    print(f"load average after: {os.getloadavg()}")
    print(f"{'command':<16} {'tree':<10} {'median s':>9} {'torch':>6}")
    for (tree, command), values in times.items():
        torch = imports_torch(trees[tree])
        print(f"{command:<16} {tree:<10} {statistics.median(values):>9.3f} {torch!s:>6}")
    if "compared" in trees:
        for command in COMMANDS:
            ratio = statistics.median(times["compared", command]) / statistics.median(
                times["this tree", command]
            )
            print(f"{command}: this tree is {ratio:.1f}x faster than the compared one")


if __name__ == "__main__":
    main()
