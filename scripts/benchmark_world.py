"""Time world sample generation (``make_sample``): prints the mean seconds per 8-frame 64x64 sample.

python scripts/benchmark_world.py [--samples 200]
"""

from __future__ import annotations

import argparse
import time

from magdiff.data.world import make_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    make_sample(0)  # warm the shape caches
    start = time.perf_counter()
    for seed in range(args.samples):
        make_sample(seed)
    per_sample = (time.perf_counter() - start) / args.samples
    print(f"make_sample: {per_sample * 1000:.2f} ms per sample ({args.samples} samples)")


if __name__ == "__main__":
    main()
