"""What does a world model predict from pure noise? The clean clip it predicts at t = 999 (zero terminal SNR: the
input is pure noise) with the first frame's subject in slot 0, for each of the four motion words.

Per held-out clip, five rows of eight frames: the clip itself, then the prediction with "moving left", "right", "up"
and "down" in its caption. A model that reads the motion word draws the subject's path in that direction; one that
does not draws the same picture for all four.

    python scripts/motion_probe.py --out motion_probe.png [--model DIR] [--checkpoint DIR --ema]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from text_probe import load_training_weights

from magdiff.data.world import EVAL_SEED_OFFSET, WorldConfig, WorldDataset, caption_for
from magdiff.pipelines import MagDiffPipeline
from magdiff.sda import cut_out, empty_slots
from magdiff.world_model import ASSETS


def _strip(video: torch.Tensor) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] -> one (H, F*W, 3) uint8 row."""
    pixels = ((video + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return np.concatenate(list(pixels), axis=1)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ASSETS / "default_model"))
    parser.add_argument("--checkpoint", default=None, help="a training checkpoint folder to load into --model")
    parser.add_argument("--ema", action="store_true", help="with --checkpoint: its EMA weights")
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--scale", type=int, default=2, help="upscale factor of the picture")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    pipeline = MagDiffPipeline.from_pretrained(args.model, use_safetensors=True)
    if args.checkpoint is not None:
        load_training_weights(pipeline, Path(args.checkpoint), args.ema)
    dataset = WorldDataset(args.clips, seed_offset=EVAL_SEED_OFFSET, config=WorldConfig(num_frames=8))
    scheduler, t = pipeline.scheduler, torch.tensor([999])
    alpha = scheduler.alphas_cumprod[999]
    rows = []
    for index in range(args.clips):
        sample = dataset[index]
        frames = sample["frames"]
        num_frames, size = frames.shape[0], tuple(frames.shape[-2:])
        clean = pipeline._vae_mean_latents(frames).permute(1, 0, 2, 3)[None]
        slots = empty_slots(num_frames, *size)
        slots[0] = cut_out(frames[0], sample["masks"][0])
        filled = torch.zeros(num_frames, dtype=torch.bool)
        filled[0] = True
        embeds, pyramid = pipeline.encode_subject_slots(slots, filled, size)
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(index))
        noisy = scheduler.add_noise(clean, noise, t)
        rows.append(_strip(frames))
        for motion in ("left", "right", "up", "down"):
            text = pipeline.encode_prompt([caption_for(sample["meta"], motion=motion)], pipeline.device)
            v = pipeline.unet(noisy, t, encoder_hidden_states=text, subject_embeds=embeds, subject_latents=pyramid)
            x0 = alpha.sqrt() * noisy - (1 - alpha).sqrt() * v.sample  # v-prediction -> clean latents
            decoded = pipeline.vae.decode(x0[0].permute(1, 0, 2, 3) / pipeline.vae.config.scaling_factor).sample
            rows.append(_strip(decoded))
        print(f"clip {index}: {sample['caption']}")
    picture = Image.fromarray(np.concatenate(rows, axis=0))
    picture.resize((picture.width * args.scale, picture.height * args.scale), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
