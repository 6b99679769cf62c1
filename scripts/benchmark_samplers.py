"""Samplers and step counts on the world benchmark: every oracle figure of each setting against a reference.

    python scripts/benchmark_samplers.py --num-samples 50 --first-sample 0 --out shard0.json    # one shard
    python scripts/benchmark_samplers.py --merge shard0.json shard1.json --out samplers.json    # merge, table
    python scripts/benchmark_samplers.py --speed --settings ddim:25,ddim:25:bfloat16 --out speed.json

A setting is ``SCHEDULER:STEPS`` or ``SCHEDULER:STEPS:DTYPE`` (``--scheduler`` names of ``magdiff generate``;
``default`` is the model's own). Every setting runs the same held-out clips with the same seeds (the clip's index),
so two settings differ only by the sampler. The table lists every figure on the 0-1 scale (accuracies, fidelity,
consistency, IoU, pixel errors) and the subject's colour errors (0-255, compared after dividing by 255; the distances
in pixels, the signed displacements and the counts are kept in the JSON), the largest absolute difference from the
reference (the first setting) on that scale, and the pipeline seconds per clip. The last two lines name
the setting with the fewest steps (then the fastest) that is no worse than the reference by more than
``--tolerance`` on any figure (a figure that improves does not count against it), and the one that is within the
tolerance either way on every figure.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEFAULT_SETTINGS = (
    "ddim:50,ddim:25,dpm-solver++:25,dpm-solver++:15,dpm-solver++:10,unipc:25,unipc:15,unipc:10,ddim:25:bfloat16"
)
# Figures in pixels, signed displacements and counts: in the JSON and the table, not held to the tolerance.
NOT_HELD = ("background_distance", "displacement_x", "displacement_y", "count")
# Figures on the 0-255 scale: held to the tolerance times 255.
ON_255 = ("colour_error",)
# Which way is worse, for the one-sided reading (a figure may only get worse by the tolerance): errors are worse
# higher, the size ratio either way, everything else (accuracies, fidelity, consistency, IoU) lower.
LOWER_IS_BETTER = ("pixel_error", "colour_error")
EITHER_WAY = ("size_ratio",)


def parse_setting(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or int(parts[1]) < 1:
        raise SystemExit(f"setting {text!r}: write SCHEDULER:STEPS or SCHEDULER:STEPS:DTYPE, e.g. unipc:10")
    return {
        "name": text,
        "scheduler": parts[0],
        "steps": int(parts[1]),
        "dtype": parts[2] if len(parts) == 3 else "float32",
    }


def run_shard(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting on the shard's clips; the record is written after each setting, so a run stopped part-way keeps
    the settings it finished."""
    from magdiff.evaluation.world_benchmark import DEFAULT_TASKS, evaluate_world
    from magdiff.loading import SCHEDULERS, load_pipeline
    from magdiff.media import write_text_atomically

    settings = [parse_setting(text) for text in args.settings.split(",")]
    for setting in settings:
        if setting["scheduler"] not in ("default", *SCHEDULERS):
            raise SystemExit(
                f"unknown scheduler {setting['scheduler']!r}; choose from default, {', '.join(SCHEDULERS)}"
            )
    tasks = tuple(args.tasks.split(",")) if args.tasks else DEFAULT_TASKS
    record: dict[str, Any] = {"model": args.model, "tasks": list(tasks), "settings": {}}
    for setting in settings:
        pipeline = load_pipeline(args.model, dtype=setting["dtype"], scheduler=setting["scheduler"])
        pipeline.set_progress_bar_config(disable=True)
        per_sample: list[dict[str, Any]] = []
        start = time.perf_counter()
        results = evaluate_world(
            pipeline,
            num_samples=args.num_samples,
            first_sample=args.first_sample,
            num_inference_steps=setting["steps"],
            tasks=tasks,
            trajectory=args.trajectory,
            per_sample=per_sample,
            progress=False,
            truncate_prompt=args.truncate_prompt,
            captions=args.captions,
        )
        seconds = time.perf_counter() - start
        print(f"{setting['name']}: {seconds:.0f} s, {json.dumps({k: round(v, 4) for k, v in results.items()})}")
        record["settings"][setting["name"]] = {
            **setting,
            "num_samples": args.num_samples,
            "first_sample": args.first_sample,
            "guidance_scale": 7.5,
            "seed": 0,
            "trajectory": args.trajectory,
            "truncate_prompt": args.truncate_prompt,
            "captions": args.captions,
            "seconds": seconds,
            "results": results,
            "per_sample": per_sample,
        }
        write_text_atomically(args.out, json.dumps(record, indent=1))
    return record


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """One generation (the first held-out clip, its cut-out subject) per setting, timed in turn (A B C A B C ...)
    after one untimed call each; the median seconds and each round's ratio to the first setting."""
    import statistics

    import torch

    from magdiff.data.world import EVAL_SEED_OFFSET, WorldConfig, make_sample, subject_cutout
    from magdiff.evaluation.world_benchmark import CAPTIONS
    from magdiff.loading import load_pipeline

    settings = [parse_setting(text) for text in args.settings.split(",")]
    sample = make_sample(EVAL_SEED_OFFSET + args.first_sample, WorldConfig(**CAPTIONS[args.captions]))
    image, mask = subject_cutout(sample["frames"], sample["masks"])
    pipelines = {}
    for setting in settings:
        pipelines[setting["name"]] = load_pipeline(args.model, dtype=setting["dtype"], scheduler=setting["scheduler"])
        pipelines[setting["name"]].set_progress_bar_config(disable=True)

    def generate(setting: dict[str, Any]) -> float:
        start = time.perf_counter()
        pipelines[setting["name"]](
            sample["caption"],
            subject_image=image,
            subject_mask=mask,
            num_inference_steps=setting["steps"],
            generator=torch.Generator().manual_seed(0),
            truncate_prompt=args.truncate_prompt,
            output_type="pt",
        )
        return time.perf_counter() - start

    for setting in settings:
        generate(setting)
    times: dict[str, list[float]] = {setting["name"]: [] for setting in settings}
    for _ in range(args.rounds):
        for setting in settings:
            times[setting["name"]].append(generate(setting))
    first = settings[0]["name"]
    print(f"{args.rounds} rounds in turn, {torch.get_num_threads()} threads; seconds per generation (8 frames)")
    for name, values in times.items():
        ratios = [value / base for value, base in zip(values, times[first], strict=True)]
        print(
            f"{name}: median {statistics.median(values):.3f} s (min-max {min(values):.3f}-{max(values):.3f}); "
            f"over {first}: median {statistics.median(ratios):.3f} (min-max {min(ratios):.3f}-{max(ratios):.3f})"
        )
    return {"model": args.model, "rounds": args.rounds, "seconds": times}


def merge(records: list[dict[str, Any]]) -> dict[str, Any]:
    from magdiff.evaluation.world_benchmark import merge_shards

    names = list(records[0]["settings"])
    for other in records[1:]:
        if list(other["settings"]) != names:
            raise SystemExit("the shards ran different settings")
    merged: dict[str, Any] = {"model": records[0]["model"], "tasks": records[0]["tasks"], "settings": {}}
    for name in names:
        shards = [record["settings"][name] for record in records]
        one = merge_shards(shards)
        clips = one["num_samples"]
        one.update({key: shards[0][key] for key in ("name", "scheduler", "dtype")})
        one["seconds_per_clip"] = sum(shard["seconds"] for shard in shards) / clips
        merged["settings"][name] = one
    return merged


def held_figures(results: dict[str, float]) -> list[str]:
    return [key for key in results if not any(part in key for part in NOT_HELD)]


def loss_of(figure: str, value: float, reference: float) -> float:
    """How much worse ``value`` is than ``reference`` on ``figure``'s scale (negative: better)."""
    difference = (value - reference) / scale_of(figure)
    if any(part in figure for part in EITHER_WAY):
        return abs(difference)
    return difference if any(part in figure for part in LOWER_IS_BETTER) else -difference


def scale_of(figure: str) -> float:
    """What a difference in ``figure`` is divided by before it is compared with the tolerance."""
    return 255.0 if any(part in figure for part in ON_255) else 1.0


def table(merged: dict[str, Any], tolerance: float) -> list[str]:
    settings = merged["settings"]
    names = list(settings)
    reference = settings[names[0]]["results"]
    figures = held_figures(reference)
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for figure in figures:
        values = [settings[name]["results"].get(figure, float("nan")) for name in names]
        lines.append(f"| {figure} | " + " | ".join(f"{value:.3f}" for value in values) + " |")
    worst = {}
    for name in names:
        diffs = [
            abs(settings[name]["results"].get(figure, float("inf")) - reference[figure]) / scale_of(figure)
            for figure in figures
        ]
        worst[name] = max(diffs)
        figure = figures[diffs.index(worst[name])]
        worst[name + "/figure"] = figure
    lines.append("| largest difference from " + names[0] + " | " + " | ".join(f"{worst[n]:.3f}" for n in names) + " |")
    lines.append("| ... on | " + " | ".join(worst[n + "/figure"] for n in names) + " |")
    lines.append(
        "| pipeline seconds per clip | " + " | ".join(f"{settings[n]['seconds_per_clip']:.2f}" for n in names) + " |"
    )
    losses: dict[str, Any] = {}
    for name in names:
        values = [loss_of(f, settings[name]["results"].get(f, float("inf")), reference[f]) for f in figures]
        losses[name] = max(values)
        losses[name + "/figure"] = figures[values.index(losses[name])]
    lines.append("| largest loss against " + names[0] + " | " + " | ".join(f"{losses[n]:.3f}" for n in names) + " |")
    lines.append("| ... on | " + " | ".join(losses[n + "/figure"] for n in names) + " |")
    clips = settings[names[0]]["num_samples"]
    lines.append("")
    lines.append(f"{clips} clips, tolerance {tolerance}")
    for label, table_of in (("no worse than", losses), ("within", worst)):
        candidates = [n for n in names[1:] if table_of[n] <= tolerance and settings[n]["dtype"] == "float32"]
        best = min(candidates, key=lambda n: (settings[n]["steps"], settings[n]["seconds_per_clip"]), default=None)
        lines.append(f"fastest {label} {tolerance} of {names[0]} on every figure: {best or 'none'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="MagDiff pipeline folder (default: the packaged default model)")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="comma-separated SCHEDULER:STEPS[:DTYPE]")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--first-sample", type=int, default=0)
    parser.add_argument("--tasks", default=None, help="world benchmark tasks (default: the benchmark's four)")
    parser.add_argument("--trajectory", choices=("auto", "off"), default="auto")
    truncate_help = "cut captions longer than the model's text context (a warning each) instead of stopping"
    parser.add_argument("--truncate-prompt", action="store_true", help=truncate_help)
    captions_help = "world (default) or canonical: the template with a generic noun (for 16-token models)"
    parser.add_argument("--captions", choices=("world", "canonical"), default="world", help=captions_help)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument(
        "--merge", nargs="+", default=None, metavar="SHARD", help="merge shard records, print the table"
    )
    speed_help = "time one generation per setting in turn (A B A B) instead of scoring the benchmark"
    parser.add_argument("--speed", action="store_true", help=speed_help)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of --speed")
    parser.add_argument("--out", required=True, help="JSON record (a shard's, or the merged one with --merge)")
    args = parser.parse_args()

    from magdiff.media import write_text_atomically

    if args.speed:
        record = run_speed(args)
    elif args.merge:
        record = merge([json.loads(Path(path).read_text()) for path in args.merge])
        print("\n".join(table(record, args.tolerance)))
    else:
        record = run_shard(args)
    write_text_atomically(args.out, json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
