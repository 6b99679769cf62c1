"""What does a world model predict from pure noise? The clean clip it predicts at t = 999 (zero terminal SNR: the
input is pure noise) with the first frame's subject in slot 0, for each of the four motion words.

Per held-out clip, five rows of eight frames: the clip itself, then the prediction with "moving left", "right", "up"
and "down" in its caption. A model that reads the motion word draws the subject's path in that direction; one that
does not draws the same picture for all four.

    python scripts/probes/motion_probe.py --out motion_probe.png [--model DIR] [--checkpoint DIR --ema]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import (
    add_model_arguments,
    clean_latents,
    encode_captions,
    first_frame_subject,
    load_probed_pipeline,
    predicted_clean,
    world_clips,
)
from PIL import Image

from magdiff.data.world import caption_for

T = 999


def _strip(video: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> one (H, F*W, 3) uint8 row."""
    pixels = ((video + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return np.concatenate(list(pixels), axis=1)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--scale", type=int, default=2, help="upscale factor of the picture")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    pipeline = load_probed_pipeline(args.model, args.checkpoint, args.ema)
    scheduler, timestep = pipeline.scheduler, torch.tensor([T])
    rows = []
    for index, clip in enumerate(world_clips(pipeline, args.clips)):
        clean = clean_latents(pipeline, [clip])  # (1, c, F, h, w)
        subject = first_frame_subject(pipeline, [clip])
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(index))
        noisy = scheduler.add_noise(clean, noise, timestep)
        rows.append(_strip(clip["frames"]))
        for motion in ("left", "right", "up", "down"):
            text = encode_captions(pipeline, [caption_for(clip["meta"], motion=motion)])
            prediction = pipeline.unet(noisy, timestep, text, subject=subject).sample
            decoded = pipeline.decode_latents(predicted_clean(scheduler, noisy, prediction, T))  # (1, 3, F, H, W)
            rows.append(_strip(decoded[0].permute(1, 0, 2, 3)))
        print(f"clip {index}: {clip['caption']}")
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    picture.resize((picture.width * args.scale, picture.height * args.scale), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
