"""Time the world: sample generation (``make_sample``) and the oracle's scoring of a video, per 8-frame 64x64 clip.

python scripts/benchmark_world.py [--samples 200]
"""

from __future__ import annotations

import argparse
import time

from magdiff.data.world import make_sample, subject_cutout
from magdiff.evaluation.oracle import score_generation


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
    samples = [make_sample(seed) for seed in range(args.samples)]
    start = time.perf_counter()
    for sample in samples:
        image, mask = subject_cutout(sample["frames"], sample["masks"])
        score_generation(sample["frames"], sample["meta"], image, mask)
    per_video = (time.perf_counter() - start) / args.samples
    print(f"oracle score: {per_video * 1000:.2f} ms per video ({args.samples} videos)")


if __name__ == "__main__":
    main()
