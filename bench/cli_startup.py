"""Start-up time of the `modformer` command: `modformer --help` and `modformer SUB --help`.

Target (issue 10): under 1.5 s on the 2-core CPU machine. Run it on an idle machine:

    .venv/bin/python bench/cli_startup.py            # every subcommand, 5 runs each
    .venv/bin/python bench/cli_startup.py --repeats 3 --commands train,cost

Each figure is the median wall time of a fresh process (the console script next to this
interpreter, else `python -m modformer`). For comparison it also times `import torch`
alone, what every call cost before the CLI imported torch lazily.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 1.5


def command_prefix() -> list[str]:
    script = Path(sys.executable).with_name("modformer")
    if script.is_file():
        return [str(script)]
    found = shutil.which("modformer")
    return [found] if found else [sys.executable, "-m", "modformer"]


def median_wall(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command (default: 5)")
    parser.add_argument(
        "--commands", help="comma-separated subcommands to time (default: all of them)"
    )
    args = parser.parse_args()

    from modformer.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    names = args.commands.split(",") if args.commands else list(subparsers.choices)
    prefix = command_prefix()
    rows = [("--help", median_wall([*prefix, "--help"], args.repeats))]
    rows += [(f"{n} --help", median_wall([*prefix, n, "--help"], args.repeats)) for n in names]
    torch_s = median_wall([sys.executable, "-c", "import torch"], args.repeats)
    print(f"{' '.join(prefix)}: median of {args.repeats} fresh processes")
    for name, seconds in rows:
        status = "ok" if seconds < TARGET_S else f"over {TARGET_S} s"
        print(f"  modformer {name:<28} {seconds:6.2f} s  {status}")
    print(f"  (python -c 'import torch'         {torch_s:6.2f} s)")
    slowest = max(s for _, s in rows)
    print(f"slowest {slowest:.2f} s: {'meets' if slowest < TARGET_S else 'misses'} the target")


if __name__ == "__main__":
    main()
