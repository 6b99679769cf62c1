"""Does a world model read its prompt? The denoising loss on held-out clips with the right caption, an empty one and
another clip's caption, at a few noise levels.

At the highest noise (zero terminal SNR: x_t is pure noise at t = 999) the clean clip can only come from the
conditions, and the world's background colour alone explains ~83% of the latent variance, so a model that reads the
text has a clearly lower loss with the right caption than with an empty or a wrong one. "other motion" changes only
the motion word (moving left -> right -> up -> down -> staying still -> left): it matters at middle noise levels, where
the subject's path is decided. "colour part" is the share of the right-caption error that is a per-clip, per-channel
constant (a wrong background colour).

``--subject first-frame`` fills slot 0 with the first frame's cut-out subject, as generation does: the subject's start
is then given and the motion word decides where it is in every later frame. "subject part" is the right-caption loss
inside the subject's (latent-resolution) masks, over the whole loss per pixel.

    python scripts/probes/text_probe.py                         # the packaged default model
    python scripts/probes/text_probe.py --model runs/world/model --clips 32
    python scripts/probes/text_probe.py --model BASE --checkpoint runs/world/checkpoints/step_000500 [--ema]
    python scripts/probes/text_probe.py --subject first-frame
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import (
    SPLITS,
    add_model_arguments,
    clean_latents,
    encode_captions,
    first_frame_subject,
    load_probed_pipeline,
    training_target,
    world_clips,
)

from magdiff.data.world import MOTIONS, caption_for


def _other_motion(clip: dict) -> str:
    """The motion after the clip's own in ``MOTIONS`` (the same caption but for that word)."""
    return MOTIONS[(MOTIONS.index(clip["meta"]["motion"]) + 1) % len(MOTIONS)]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 960, 900, 700, 400])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="held-out", help="which clips")
    parser.add_argument("--subject", choices=["none", "first-frame"], default="none", help="what slot 0 holds")
    args = parser.parse_args()

    pipeline = load_probed_pipeline(args.model, args.checkpoint, args.ema)
    scheduler = pipeline.scheduler
    clips = world_clips(pipeline, args.clips, args.frames, args.split)
    clean = clean_latents(pipeline, clips)  # (b, c, F, h, w)
    captions = encode_captions(pipeline, [clip["caption"] for clip in clips])
    prompts = {
        "right caption": captions,
        "empty caption": encode_captions(pipeline, [""]).expand_as(captions),
        "other clip's caption": captions.roll(1, dims=0),
        "other motion": encode_captions(pipeline, [caption_for(c["meta"], motion=_other_motion(c)) for c in clips]),
    }
    size = tuple(clean.shape[-2:])
    masks = torch.stack([F.adaptive_max_pool2d(clip["masks"].float(), size)[:, 0] for clip in clips])[:, None]
    subject = first_frame_subject(pipeline, clips) if args.subject == "first-frame" else None
    generator = torch.Generator().manual_seed(args.seed)
    target_name = scheduler.config.prediction_type
    print(f"{args.model}: {args.clips} {args.split} clips, slot 0: {args.subject}, {target_name} MSE (lower is better)")
    print(f"{'t':>5} " + " ".join(f"{name:>20}" for name in prompts) + f" {'colour part':>12} {'subject part':>12}")
    for t in args.timesteps:
        timesteps = torch.full((args.clips,), t)
        noise = torch.randn(clean.shape, generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        target = training_target(scheduler, clean, noise, timesteps)
        losses, colour_share, subject_share = [], 0.0, 0.0
        for name, text in prompts.items():
            error = pipeline.unet(noisy, timesteps, text, subject=subject).sample - target
            losses.append(error.pow(2).mean().item())
            if name == "right caption":
                colour_share = error.mean(dim=(2, 3, 4)).pow(2).mean().item() / max(losses[-1], 1e-12)
                inside = (error.pow(2) * masks).sum() / (masks.sum() * error.shape[1])
                subject_share = inside.item() / max(losses[-1], 1e-12)
        print(
            f"{t:>5} "
            + " ".join(f"{loss:>20.4f}" for loss in losses)
            + f" {colour_share:>12.2f} {subject_share:>12.2f}"
        )


if __name__ == "__main__":
    main()
