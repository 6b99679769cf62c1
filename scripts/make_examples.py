"""Write the README's example GIFs with a MagDiff model (default: the packaged default model).

    python scripts/make_examples.py --out docs/examples [--model DIR] [--steps 25]

For held-out world subjects: generation with prompts that ask for another motion and background than the clip the
subject came from, and editing (keep the subject, change the background by text). Frames are upscaled 3x (nearest)
for display; a markdown table for the README is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from magdiff.data.world import EVAL_SEED_OFFSET, caption_for, make_sample, subject_cutout
from magdiff.evaluation.world_benchmark import edit_background
from magdiff.loading import SCHEDULERS, load_pipeline
from magdiff.media import save_video

GENERATION = [(3, "left", "purple"), (11, "up", "yellow"), (17, "right", "green")]
EDITING = [5, 23]


def _upscale(video: torch.Tensor, factor: int = 3) -> torch.Tensor:
    return F.interpolate(video, scale_factor=factor, mode="nearest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/examples")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=25)
    scheduler_help = "sampler (default ddim, what the examples in the README were made with; 'default': the model's)"
    parser.add_argument("--scheduler", choices=("default", *SCHEDULERS), default="ddim", help=scheduler_help)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = load_pipeline(args.model, scheduler=args.scheduler)
    pipeline.set_progress_bar_config(disable=True)
    rows = ["| subject | prompt | result |", "|---|---|---|"]
    for index, motion, background in GENERATION:
        # The clip drawn with the asked motion: its first frame leaves the subject room to move that way.
        sample = make_sample(EVAL_SEED_OFFSET + index, motion=motion)
        image, mask = subject_cutout(sample["frames"], sample["masks"])
        prompt = caption_for(sample["meta"], background=background, canonical=True)  # the phrasing it was trained on
        video = (
            pipeline(
                prompt,
                subject_image=image,
                subject_mask=mask,
                num_inference_steps=args.steps,
                output_type="pt",
                generator=torch.Generator().manual_seed(index),
            ).frames[0]
            * 2
            - 1
        )
        subject_png = out / f"subject_{index}.png"
        rgba = np.dstack(
            [
                ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8),
                (mask[0].numpy() * 255).astype(np.uint8),
            ]
        )
        PIL.Image.fromarray(rgba, "RGBA").resize((192, 192), PIL.Image.NEAREST).save(subject_png)
        gif = save_video(_upscale(video), out / f"generate_{index}.gif", fps=4)
        rows.append(f"| ![]({subject_png.as_posix()}) | `{prompt}` | ![]({gif.as_posix()}) |")
    for index in EDITING:
        sample = make_sample(EVAL_SEED_OFFSET + index)
        target = edit_background(sample["meta"], index)
        prompt = caption_for(sample["meta"], background=target, canonical=True)
        video = (
            pipeline(
                prompt,
                video=sample["frames"],
                video_masks=sample["masks"],
                keep="subject",
                num_inference_steps=args.steps,
                output_type="pt",
                generator=torch.Generator().manual_seed(index),
            ).frames[0]
            * 2
            - 1
        )
        source = save_video(_upscale(sample["frames"]), out / f"edit_source_{index}.gif", fps=4)
        gif = save_video(_upscale(video), out / f"edit_{index}.gif", fps=4)
        rows.append(
            f"| ![]({source.as_posix()}) (source video) | `{prompt}` (keep the subject) | ![]({gif.as_posix()}) |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
