"""Install a trained MagDiff folder as the packaged default model, with the default model's sampler.

    python scripts/install_default_model.py runs/world/magdiff/model [--dest src/magdiff/assets/default_model]

The folder is copied whole, then its scheduler is replaced by UniPC built from its own DDIM config (``from_config``:
the same betas, prediction type, zero terminal SNR and trailing steps) and ``model_index.json`` gets
``default_num_inference_steps: 15``, the setting the sampler study chose (docs/benchmarks.md). The copy is made
beside the destination, loaded once as a pipeline, and only then renamed over it: a failed install leaves the old
model in place. The training-only files (logs) are left out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

DEFAULT_STEPS = 15
TRAINING_ONLY = ("training_log.jsonl",)


def install(model: Path, dest: Path, steps: int = DEFAULT_STEPS) -> Path:
    from diffusers import UniPCMultistepScheduler

    from magdiff import MagDiffPipeline
    from magdiff.errors import MagDiffInputError

    if not (model / "model_index.json").is_file():
        raise MagDiffInputError(f"{model} is not a MagDiff pipeline folder (no model_index.json).")
    staging = dest.with_name(dest.name + ".installing")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(model, staging, ignore=shutil.ignore_patterns(*TRAINING_ONLY))
    try:
        scheduler_dir = staging / "scheduler"
        config = json.loads((scheduler_dir / "scheduler_config.json").read_text())
        (scheduler_dir / "scheduler_config.json").unlink()
        UniPCMultistepScheduler.from_config(config).save_config(scheduler_dir)
        index = json.loads((staging / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "UniPCMultistepScheduler"]
        index["default_num_inference_steps"] = steps
        (staging / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        pipe = MagDiffPipeline.from_pretrained(staging)  # it loads, with the sampler above
        assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
        assert pipe.config.default_num_inference_steps == steps
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--dest", type=Path, default=Path("src/magdiff/assets/default_model"))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    args = parser.parse_args()
    from magdiff.errors import MagDiffInputError

    try:
        dest = install(args.model, args.dest, args.steps)
    except MagDiffInputError as error:
        sys.exit(f"error: {error}")
    size = sum(path.stat().st_size for path in dest.rglob("*") if path.is_file())
    print(f"installed {args.model} as {dest} ({size / 2**20:.1f} MB, UniPC, {args.steps} steps)")


if __name__ == "__main__":
    main()
