"""Time the start-up of the ``magdiff`` command against the import of the libraries it is built on.

Four commands run as subprocesses, in turn (a b c d a b c d ...), so that a change in the machine's load falls on
all of them alike:

    (a) python -c "import torch, diffusers, transformers"   the floor: the libraries alone
    (b) magdiff --help
    (c) magdiff generate ... --steps 1                       start-up, loading, encoding, 1 step, decoding, writing
    (d) magdiff generate ... --steps 25                      the whole default command

For each command the script prints the median wall time, its spread (min-max) and the median CPU time (user + sys of
the subprocess, which a loaded machine inflates less than the wall time); then the ratio (c)/(a) of each round, and
the machine's load average before and after. Every round writes the same (d) video; its SHA-256 is printed so that a
change can be checked to keep the output bytes.

    python scripts/benchmark_startup.py                    # 5 rounds
    python scripts/benchmark_startup.py --rounds 3 --skip-full --json startup.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBJECT = ROOT / "examples" / "subject.png"
PROMPT = "a toy moving left on a red background"


def _magdiff() -> list[str]:
    """The installed console script beside this Python, else ``python -m magdiff.cli``."""
    script = Path(sys.executable).with_name("magdiff")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "magdiff.cli"]


def commands(out_dir: Path, skip_full: bool) -> dict[str, list[str]]:
    generate = [*_magdiff(), "generate", "--subject", str(SUBJECT), "--prompt", PROMPT, "--seed", "0"]
    table = {
        "a": [sys.executable, "-c", "import torch, diffusers, transformers"],
        "b": [*_magdiff(), "--help"],
        "c": [*generate, "--steps", "1", "--out", str(out_dir / "steps1.gif")],
        "d": [*generate, "--steps", "25", "--out", str(out_dir / "steps25.gif")],
    }
    if skip_full:
        del table["d"]
    return table


def run_timed(command: list[str]) -> tuple[float, float]:
    """Run ``command``; return its wall time and its CPU time (user + sys), in seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of a b c d (default 5)")
    parser.add_argument("--skip-full", action="store_true", help="leave out (d), the 25-step generate")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every timing here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    out_dir = Path(tempfile.mkdtemp(prefix="magdiff-startup-"))
    try:
        table = commands(out_dir, args.skip_full)
        load_before = _load()
        print(f"{os.cpu_count()} CPUs, load average {load_before} (1, 5, 15 min); {args.rounds} rounds")
        walls: dict[str, list[float]] = {name: [] for name in table}
        cpus: dict[str, list[float]] = {name: [] for name in table}
        digests: set[str] = set()
        for round_index in range(args.rounds):
            for name, command in table.items():
                wall, cpu = run_timed(command)
                walls[name].append(wall)
                cpus[name].append(cpu)
                print(f"round {round_index + 1} ({name}) {wall:7.2f} s wall {cpu:7.2f} s CPU", flush=True)
            if "d" in table:
                digests.add(hashlib.sha256((out_dir / "steps25.gif").read_bytes()).hexdigest())
        load_after = _load()

        print("\ncommand                                        median wall   spread (min-max)   median CPU")
        labels = {
            "a": "(a) import torch, diffusers, transformers",
            "b": "(b) magdiff --help",
            "c": "(c) magdiff generate --steps 1",
            "d": "(d) magdiff generate --steps 25",
        }
        for name in table:
            median = statistics.median(walls[name])
            spread = f"{min(walls[name]):.2f}-{max(walls[name]):.2f} s"
            print(f"{labels[name]:<46} {median:8.2f} s   {spread:>16}   {statistics.median(cpus[name]):8.2f} s")
        ratios = [c / a for c, a in zip(walls["c"], walls["a"])]
        cpu_ratios = [c / a for c, a in zip(cpus["c"], cpus["a"])]
        print("(c)/(a) per round, wall: " + ", ".join(f"{ratio:.2f}" for ratio in ratios))
        print("(c)/(a) per round, CPU:  " + ", ".join(f"{ratio:.2f}" for ratio in cpu_ratios))
        print(f"(c)/(a) median: wall {statistics.median(ratios):.2f}x, CPU {statistics.median(cpu_ratios):.2f}x")
        if digests:
            print(f"(d) output SHA-256: {', '.join(sorted(digests))}")
        print(f"load average before {load_before}, after {load_after}")
        if args.json:
            record = {
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "load_before": load_before,
                "load_after": load_after,
                "commands": {name: " ".join(command) for name, command in table.items()},
                "wall_s": walls,
                "cpu_s": cpus,
                "output_sha256": sorted(digests),
            }
            Path(args.json).write_text(json.dumps(record, indent=1))
            print(f"wrote {args.json}")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
