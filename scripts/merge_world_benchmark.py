"""Merge shards of `magdiff evaluate world --out` (disjoint --first-sample ranges) into one record.

python scripts/merge_world_benchmark.py shard0.json shard1.json --out merged.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from magdiff.evaluation.world_benchmark import merge_shards
from magdiff.media import write_text_atomically


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    shards = [json.loads(Path(path).read_text()) for path in args.shards]
    merged = merge_shards(shards)
    write_text_atomically(args.out, json.dumps(merged, indent=1))
    width = max(len(key) for key in merged["results"])
    for key, value in merged["results"].items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"merged {len(shards)} shards ({merged['num_samples']} clips) into {args.out}")


if __name__ == "__main__":
    main()
