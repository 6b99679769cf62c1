"""The paper's ablation ladder, reproduced on the world: one recipe (the ``world`` preset), the same budget and seeds,
and one change per variant.

Ladder: text only (no subject) -> + SDA (segmented subject, fixed prompt weights, no HFA) -> + APA (learned weights)
-> + HFA (pyramid, the full model). Side studies: whole-image vs segmented subject (the SDA argument), fixed vs
learned APA weights with HFA, single-scale vs pyramid HFA.

    python -m magdiff.training.ablation run sda --steps 3000      # train + benchmark one variant
    python -m magdiff.training.ablation run sda --print-commands  # the equivalent magdiff commands
    python -m magdiff.training.ablation report --out docs/ablation_results.md

Every variant writes ``<root>/<variant>/model`` and ``<root>/<variant>/benchmark.json``; ``report`` tabulates the
oracle scores of all variants found and the learned ``a_img``/``a_txt`` per layer of the full model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MagDiffInputError
from .config import TrainConfig, config_from_dict, get_preset


@dataclass(frozen=True)
class Variant:
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    subject_input: str = "segmented"
    """What the benchmark gives generation as the subject (``"whole"``: the whole first frame)."""

    @property
    def learns_apa(self) -> bool:
        return self.overrides.get("apa", "learned") == "learned"


VARIANTS: dict[str, Variant] = {
    "text-only": Variant(
        "text only: every subject slot empty",
        {"subject_image": "none", "apa": "fixed", "hfa": "off", "slot_fill_background_probability": 0.0},
    ),
    "sda": Variant(
        "+ SDA: segmented subject, fixed weights (a_img = a_txt = 1), no HFA", {"apa": "fixed", "hfa": "off"}
    ),
    "sda-apa": Variant("+ APA: learned a_img / a_txt per layer, no HFA", {"apa": "learned", "hfa": "off"}),
    "full": Variant("+ HFA: 1x/1.25x/1.5x pyramid (the full MagDiff)", {"apa": "learned", "hfa": "pyramid"}),
    "whole-image": Variant(
        "full, but the subject is the whole frame, not the cut-out",
        # (keep-background edits need the cut-out's complement: not trained with whole frames)
        {"apa": "learned", "hfa": "pyramid", "subject_image": "whole", "slot_fill_background_probability": 0.0},
        subject_input="whole",
    ),
    "fixed-apa": Variant("full, but fixed APA weights", {"apa": "fixed", "hfa": "pyramid"}),
    "single-hfa": Variant("full, but single-scale HFA (1x latent only)", {"apa": "learned", "hfa": "single"}),
}
LADDER = ("text-only", "sda", "sda-apa", "full")
DEFAULT_STEPS = 3000
REPORTED = (
    ("generation/motion_correct", "motion"),
    ("generation/background_correct", "background"),
    ("generation/subject_fidelity", "fidelity"),
    ("empty_subject/subject_fidelity", "fidelity, empty slots"),
    ("generation/temporal_consistency", "temporal"),
    ("editing/mask_iou", "edit IoU"),
    ("editing/kept_pixel_error", "kept-pixel error"),
    ("editing/background_correct", "new background"),
)


def base_overrides(base: str | Path | None) -> dict[str, Any]:
    """Start from ``base`` (a MagDiff pipeline folder) with the MagDiff parts built anew for the variant; ``None``:
    from scratch."""
    return {} if base is None else {"model": str(base), "new_subject_parts": True}


def variant_config(
    name: str, root: str | Path = "runs/ablation", base: str | Path | None = None, **overrides: Any
) -> TrainConfig:
    """The ``world`` recipe with the variant's changes; every variant shares one cache folder under ``root``.
    With ``base`` every variant starts from the same base weights (see :func:`base_overrides`)."""
    if name not in VARIANTS:
        raise MagDiffInputError(f"Unknown ablation variant {name!r}; choose from {sorted(VARIANTS)}.")
    root = Path(root)
    values = {
        "output_dir": str(root / name),
        "cache_dir": str(root / "cache"),
        "max_steps": DEFAULT_STEPS,
        **VARIANTS[name].overrides,
        **base_overrides(base),
        **overrides,
    }
    return config_from_dict(values, get_preset("world"))


def commands(
    name: str,
    root: str | Path = "runs/ablation",
    steps: int = DEFAULT_STEPS,
    eval_samples: int = 200,
    base: str | Path | None = None,
) -> list[str]:
    """The ``magdiff`` commands that reproduce one row (two training processes, then the benchmark)."""
    config = variant_config(name, root, base, max_steps=steps)
    values = {**VARIANTS[name].overrides, **base_overrides(base), "cache_dir": config.cache_dir, "batch_size": 4}
    sets = " ".join(
        f"--set {key}={shlex.quote(str(value).lower() if isinstance(value, bool) else str(value))}"
        for key, value in values.items()
    )
    evaluate = (
        f"magdiff evaluate world --model {config.output_dir}/model --num-samples {eval_samples} "
        f"--out {config.output_dir}/benchmark.json"
    )
    if VARIANTS[name].subject_input == "whole":
        evaluate += " --subject-input whole"
    return [
        f"torchrun --nproc_per_node 2 -m magdiff.cli train --preset world --output-dir {config.output_dir} "
        f"--max-steps {steps} {sets}",
        evaluate,
    ]


def run(
    name: str,
    root: str | Path,
    steps: int,
    eval_samples: int,
    eval_steps: int = 25,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    base: str | Path | None = None,
    eval_processes: int = 1,
) -> dict:
    """Train one variant (resuming its latest checkpoint) and run the world benchmark on its EMA export.

    ``overrides`` change the shared recipe (the same for every variant of one study, e.g. a smaller model);
    ``eval_processes`` > 1 splits the benchmark's clips between that many ``magdiff evaluate world`` processes."""
    from ..evaluation.world_benchmark import evaluate_world
    from ..media import write_text_atomically
    from ..pipelines.pipeline_magdiff import MagDiffPipeline
    from .trainer import train

    config = variant_config(name, root, base, **{**(overrides or {}), "max_steps": steps})
    checkpoints = Path(config.output_dir) / "checkpoints"
    resume = "latest" if checkpoints.is_dir() and any(checkpoints.glob("step_*")) else None
    export = train(config, resume=resume, progress=progress)
    pipeline = MagDiffPipeline.from_pretrained(export, use_safetensors=True)
    pipeline.set_progress_bar_config(disable=True)
    per_sample: list[dict] = []
    if eval_processes > 1:
        subject_input = VARIANTS[name].subject_input
        merged = _evaluate_in_processes(export, eval_samples, eval_steps, subject_input, eval_processes, config)
        results, per_sample = merged["results"], merged["per_sample"]
    else:
        results = evaluate_world(
            pipeline,
            num_samples=eval_samples,
            num_inference_steps=eval_steps,
            num_frames=config.num_frames,
            resolution=config.resolution,
            progress=progress,
            per_sample=per_sample,
            subject_input=VARIANTS[name].subject_input,
        )
    record = {
        "variant": name,
        "description": VARIANTS[name].description,
        "overrides": VARIANTS[name].overrides,
        "max_steps": steps,
        "base": None if base is None else str(base),
        "num_samples": eval_samples,
        "first_sample": 0,
        "steps": eval_steps,
        "guidance_scale": 7.5,
        "seed": 0,
        "results": results,
        "apa_weights": {k: list(v) for k, v in pipeline.unet.apa_weights().items()},
        "per_sample": per_sample,
    }
    write_text_atomically(Path(config.output_dir) / "benchmark.json", json.dumps(record, indent=1))
    return record


def _evaluate_in_processes(
    model: Path, num_samples: int, steps: int, subject_input: str, processes: int, config: TrainConfig
) -> dict[str, Any]:
    """The world benchmark over clips ``0 .. num_samples - 1`` split between ``processes`` processes, merged."""
    from ..evaluation.world_benchmark import merge_shards

    bounds = [round(i * num_samples / processes) for i in range(processes + 1)]
    shards = [(first, end - first) for first, end in itertools.pairwise(bounds) if end > first]
    with tempfile.TemporaryDirectory() as folder:
        jobs = []
        for first, count in shards:
            out = Path(folder) / f"shard_{first}.json"
            command = [sys.executable, "-m", "magdiff.cli", "evaluate", "world", "--model", str(model)]
            command += ["--num-samples", str(count), "--first-sample", str(first), "--steps", str(steps)]
            command += ["--num-frames", str(config.num_frames), "--resolution", str(config.resolution)]
            command += ["--subject-input", subject_input, "--out", str(out)]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            jobs.append((out, subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
        records = []
        for out, job in jobs:
            _, error = job.communicate()
            if job.returncode != 0:
                raise RuntimeError(f"Benchmark shard {out.name} failed:\n{error.decode()[-2000:]}")
            records.append(json.loads(out.read_text()))
    return merge_shards(records)


# Per-clip scores compared clip by clip with the full model: (task, per-clip key, label).
PAIRED = (
    ("generation", "subject_fidelity", "fidelity"),
    ("editing", "mask_iou", "edit IoU"),
    ("editing", "kept_pixel_error", "kept-pixel error"),
)


def paired_differences(records: dict[str, dict]) -> list[str]:
    """Markdown lines: each variant's per-clip scores minus the full model's on the same clips, mean +- standard
    error (every variant scores the same clips with the same seeds, so the pairing removes the clips' spread)."""

    def per_clip(record: dict, task: str, key: str) -> dict[int, float]:
        rows = record.get("per_sample", [])
        return {row["index"]: float(row[key]) for row in rows if row["task"] == task and row.get(key) is not None}

    lines = [
        "Difference from the full model on the same clips (mean +- standard error of the per-clip difference):",
        "",
        "| variant | " + " | ".join(label for _, _, label in PAIRED) + " |",
        "|---" * (len(PAIRED) + 1) + "|",
    ]
    reference = {(task, key): per_clip(records["full"], task, key) for task, key, _ in PAIRED}
    for name, record in records.items():
        if name == "full":
            continue
        cells = []
        for task, key, _ in PAIRED:
            full, other = reference[task, key], per_clip(record, task, key)
            differences = [other[index] - full[index] for index in full if index in other]
            if len(differences) < 2:
                cells.append("-")
                continue
            mean = sum(differences) / len(differences)
            variance = sum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
            cells.append(f"{mean:+.3f} +- {(variance / len(differences)) ** 0.5:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(root: str | Path) -> str:
    """A Markdown table of every variant's benchmark under ``root``, then the full model's APA weights per layer."""
    root = Path(root)
    records = {}
    for name in VARIANTS:
        path = root / name / "benchmark.json"
        if path.is_file():
            records[name] = json.loads(path.read_text())
    if not records:
        raise MagDiffInputError(f"No ablation results under {root} (expected {root}/<variant>/benchmark.json).")
    lines = [
        "| variant | what changes | " + " | ".join(label for _, label in REPORTED) + " | clips | steps |",
        "|---" * (len(REPORTED) + 4) + "|",
    ]
    for name, record in records.items():
        scores = record["results"]
        cells = [f"{scores[key]:.3f}" if key in scores else "-" for key, _ in REPORTED]
        count = int(scores.get("generation/count", record.get("num_samples", 0)))
        lines.append(
            f"| {name} | {VARIANTS[name].description} | "
            + " | ".join(cells)
            + f" | {count} | {record.get('max_steps', '?')} |"
        )
    if "full" in records and len(records) > 1:
        lines += ["", *paired_differences(records)]
    # The learned APA weights per layer: the full model first, then every other variant that learns them.
    learned = [name for name, record in records.items() if VARIANTS[name].learns_apa and record.get("apa_weights")]
    learned.sort(key=lambda name: name != "full")  # stable: the full model first, the rest in report order
    if learned:
        lines += [
            "",
            "Learned APA weights, `a_img` / `a_txt` per layer:",
            "",
            "| layer | " + " | ".join(learned) + " |",
            "|---" * (len(learned) + 1) + "|",
        ]
        for layer in records[learned[0]]["apa_weights"]:
            cells = []
            for name in learned:
                weights = records[name]["apa_weights"].get(layer)
                cells.append("-" if weights is None else f"{weights[0]:.3f} / {weights[1]:.3f}")
            lines.append(f"| `{layer}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m magdiff.training.ablation", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="train and benchmark one variant")
    run_parser.add_argument("variant", choices=sorted(VARIANTS))
    run_parser.add_argument("--root", default="runs/ablation")
    run_parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps (same for every variant)")
    run_parser.add_argument("--eval-samples", type=int, default=200)
    run_parser.add_argument("--eval-steps", type=int, default=25)
    run_parser.add_argument("--eval-processes", type=int, default=1, help="benchmark processes (clips split)")
    run_parser.add_argument(
        "--base", default=None, help="a MagDiff pipeline every variant starts from (MagDiff parts built anew)"
    )
    run_parser.add_argument("--print-commands", action="store_true", help="print the magdiff commands and stop")
    report_parser = sub.add_parser("report", help="tabulate the variants' benchmark results")
    report_parser.add_argument("--root", default="runs/ablation")
    report_parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.print_commands:
            print("\n".join(commands(args.variant, args.root, args.steps, args.eval_samples, args.base)))
            return
        record = run(
            args.variant,
            args.root,
            args.steps,
            args.eval_samples,
            args.eval_steps,
            base=args.base,
            eval_processes=args.eval_processes,
        )
        for key, label in REPORTED:
            if key in record["results"]:
                print(f"{label:<24} {record['results'][key]:.4f}")
        return
    table = report(args.root)
    if args.out:
        from ..media import write_text_atomically

        write_text_atomically(args.out, table)
    print(table, end="")


if __name__ == "__main__":
    main()
