"""Long videos with the packaged default model (8-frame clips): memory per length, and the world oracle's scores.

    python scripts/benchmark_long_video.py memory [--frames 8,16,32,64,128] [--steps 2]
    python scripts/benchmark_long_video.py world --frames 8,32,64 --num-samples 6 [--steps 25] [--out r.json]

``memory`` runs every length in a fresh process and prints its peak resident memory (``ru_maxrss``) after loading
the model and at the end, and the seconds the pipeline took. ``world`` generates held-out world clips' captions with
their first frame's cut-out subject at every length and scores them with the oracle (:mod:`magdiff.evaluation`):

- motion direction over the whole clip (first to last frame, the oracle's rule);
- motion direction within every 8-frame window (frames 0-7, 8-15, ...): the same rule, its "still" threshold scaled
  to the window's share of the clip (a subject slowed to stay in the frame moves less per window), and the share of
  windows that move against the asked direction by more than a pixel (a snap-back or reversal);
- temporal consistency over the whole clip (against the 8-frame figure of the same clips), and background accuracy.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from magdiff.evaluation.world_benchmark import CANONICAL_CAPTIONS as CANONICAL  # captions the model reads uncut

WINDOW = 8


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(num_frames: int, steps: int) -> None:
    """One length in this process: prints a JSON line with peak RSS after loading and after the run."""
    from magdiff.data.world import EVAL_SEED_OFFSET, WorldConfig, make_sample, subject_cutout
    from magdiff.loading import load_pipeline

    torch.set_num_threads(1)
    pipeline = load_pipeline(None, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    sample = make_sample(EVAL_SEED_OFFSET, WorldConfig(**CANONICAL))
    image, mask = subject_cutout(sample["frames"], sample["masks"])
    loaded = _rss_mib()
    start = time.perf_counter()
    out = pipeline(
        sample["caption"],
        subject_image=image,
        subject_mask=mask,
        num_frames=num_frames,
        num_inference_steps=steps,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.frames.shape[1] == num_frames
    record = {"frames": num_frames, "rss_loaded_mib": loaded, "rss_peak_mib": _rss_mib()}
    print(json.dumps({**record, "seconds": time.perf_counter() - start}))


def memory(frames: list[int], steps: int) -> None:
    print(f"peak RSS per length (default model, 64x64, {steps} DDIM steps, CFG, 1 thread, a fresh process each)")
    print("| frames | windows | peak RSS, model loaded | peak RSS, end | growth over loading | pipeline seconds |")
    print("|---|---|---|---|---|---|")
    from magdiff.pipelines.context import context_windows

    for num_frames in frames:
        command = [sys.executable, __file__, "_one", str(num_frames), "--steps", str(steps)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        record = json.loads(result.stdout.strip().splitlines()[-1])
        growth = record["rss_peak_mib"] - record["rss_loaded_mib"]
        windows = len(context_windows(num_frames, WINDOW, WINDOW // 2))
        print(
            f"| {num_frames} | {windows} | {record['rss_loaded_mib']:.0f} MiB | {record['rss_peak_mib']:.0f} MiB | "
            f"{growth:.0f} MiB | {record['seconds']:.1f} |",
            flush=True,
        )


def _window_scores(video: torch.Tensor, asked: str) -> dict[str, float]:
    """Direction and reversals within every 8-frame window, and per-window background, of one scored clip."""
    from magdiff.data.world import MOTION_DIRECTIONS
    from magdiff.evaluation.oracle import (
        DETECTION_THRESHOLD,
        STILL_FRACTION,
        SubjectTrack,
        as_rgb_video,
        detect_subject,
        estimate_background,
        motion_from_track,
    )

    num_frames, height, width, _ = as_rgb_video(video).shape
    background = estimate_background(video)
    track = detect_subject(video, background.per_frame_rgb, DETECTION_THRESHOLD)
    direction = np.array(MOTION_DIRECTIONS[asked], dtype=np.float64)
    correct, against, backgrounds = [], [], []
    for start in range(0, num_frames - WINDOW + 1, WINDOW):
        part = slice(start, start + WINDOW)
        window = SubjectTrack(track.masks[part], track.found[part], track.centroids[part], track.areas[part])
        threshold = STILL_FRACTION * min(height, width) * (WINDOW - 1) / max(num_frames - 1, 1)
        motion, dx, dy = motion_from_track(window, still_threshold=threshold)
        correct.append(motion == asked)
        if direction.any():
            against.append(motion is not None and float(np.dot([dx, dy], direction)) < -1.0)
        backgrounds.append(estimate_background(video[part]).name)
    return {
        "window_motion_correct": float(np.mean(correct)),
        "window_against_motion": float(np.mean(against)) if against else float("nan"),
        "window_background_names": backgrounds,
    }


def world(frames: list[int], num_samples: int, steps: int, trajectory: str, out: str | None) -> None:
    from magdiff.data.world import EVAL_SEED_OFFSET, WorldConfig, make_sample, subject_cutout
    from magdiff.evaluation.oracle import score_generation
    from magdiff.loading import load_pipeline

    torch.set_num_threads(1)
    pipeline = load_pipeline(None, device="cpu")
    pipeline.set_progress_bar_config(disable=True)
    records: list[dict] = []
    for index in range(num_samples):
        sample = make_sample(EVAL_SEED_OFFSET + index, WorldConfig(**CANONICAL))
        image, mask = subject_cutout(sample["frames"], sample["masks"])
        for num_frames in frames:
            start = time.perf_counter()
            output = pipeline(
                sample["caption"],
                subject_image=image,
                subject_mask=mask,
                num_frames=num_frames,
                num_inference_steps=steps,
                output_type="pt",
                trajectory=trajectory,
                generator=torch.Generator().manual_seed(index),
            )
            video = output.frames[0].float() * 2.0 - 1.0  # (F, 3, H, W) in [-1, 1]
            scores = score_generation(video, sample["meta"], image, mask)
            windows = _window_scores(video, sample["meta"]["motion"])
            record = {
                "index": index,
                "frames": num_frames,
                "caption": sample["caption"],
                "seconds": time.perf_counter() - start,
                "motion_correct": scores.motion_correct,
                "predicted_motion": scores.predicted_motion,
                "background_correct": scores.background_correct,
                "temporal_consistency": scores.temporal_consistency,
                **windows,
                "window_background_correct": float(
                    np.mean([name == sample["meta"]["background"] for name in windows["window_background_names"]])
                ),
            }
            records.append(record)
            print(json.dumps(record), flush=True)
    print(f"\nworld oracle, {num_samples} held-out clips, {steps} DDIM steps, CFG 7.5, trajectory={trajectory}")
    header = (
        "| frames | motion (whole clip) | motion (every 8-frame window) | windows moving backwards "
        "| temporal consistency | background (whole clip) | background (every window) | seconds per clip |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for num_frames in frames:
        rows = [r for r in records if r["frames"] == num_frames]

        def mean(key: str, rows: list[dict] = rows) -> float:
            values = [float(r[key]) for r in rows if not (isinstance(r[key], float) and np.isnan(r[key]))]
            return float(np.mean(values)) if values else float("nan")

        print(
            f"| {num_frames} | {mean('motion_correct'):.3f} | {mean('window_motion_correct'):.3f} | "
            f"{mean('window_against_motion'):.3f} | {mean('temporal_consistency'):.3f} | "
            f"{mean('background_correct'):.3f} | {mean('window_background_correct'):.3f} | {mean('seconds'):.0f} |"
        )
    if out:
        with open(out, "w") as handle:
            json.dump({"steps": steps, "trajectory": trajectory, "records": records}, handle, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("_one")
    one.add_argument("frames", type=int)
    one.add_argument("--steps", type=int, default=2)
    mem = commands.add_parser("memory")
    mem.add_argument("--frames", default="8,16,32,64,128")
    mem.add_argument("--steps", type=int, default=2)
    scores = commands.add_parser("world")
    scores.add_argument("--frames", default="8,32,64")
    scores.add_argument("--num-samples", type=int, default=6)
    scores.add_argument("--steps", type=int, default=25)
    scores.add_argument("--trajectory", choices=("auto", "off"), default="auto")
    scores.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.command == "_one":
        run_one(args.frames, args.steps)
    elif args.command == "memory":
        memory([int(f) for f in args.frames.split(",")], args.steps)
    else:
        world([int(f) for f in args.frames.split(",")], args.num_samples, args.steps, args.trajectory, args.out)


if __name__ == "__main__":
    main()
