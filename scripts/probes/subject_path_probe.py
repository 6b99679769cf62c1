"""Which path carries the subject: the APA image tokens (SDA) or the HFA latents? The denoising loss on held-out
clips with the first frame's cut-out subject in slot 0 (as generation has it), then with each path switched off.

"tokens off" sets every layer's ``a_img`` to 0 (the image branch of APA adds nothing); "HFA off" gives ``conv_in``
zeros where the fused subject latents go; "no subject" leaves every slot empty. The change columns are the mean
squared difference of the prediction from the one with everything on: what that path contributes.

    python scripts/probes/subject_path_probe.py                            # the packaged default model
    python scripts/probes/subject_path_probe.py --model runs/ablation/sda/model runs/ablation/full/model --t 999 700
    python scripts/probes/subject_path_probe.py --model BASE --checkpoint runs/x/checkpoints/step_000500 --ema

The clips are the first held-out ones whose captions the first model reads whole.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from common import (
    add_model_arguments,
    clean_latents,
    encode_captions,
    first_frame_subject,
    load_probed_pipeline,
    training_target,
    world_clips,
)

from magdiff.models.unet import MagDiffUNetModel, SubjectConditioning


def predict(
    unet: MagDiffUNetModel,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    subject: SubjectConditioning | None,
    tokens: bool = True,
    hfa: bool = True,
) -> torch.Tensor:
    """The U-Net's prediction with the subject (none: every slot empty), with its image tokens (``tokens``) or its
    HFA latents (``hfa``) switched off."""
    if subject is not None and not hfa and subject.hfa_latents is not None:
        subject = dataclasses.replace(subject, hfa_latents=torch.zeros_like(subject.hfa_latents))
    saved = {name: processor.a_img.detach().clone() for name, processor in unet.apa_processors().items()}
    if not tokens:
        unet.set_apa_weights(a_img=0.0)
    try:
        return unet(noisy, timesteps, text, subject=subject).sample
    finally:
        for name, processor in unet.apa_processors().items():
            processor.a_img.data.copy_(saved[name])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, several=True)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--t", type=int, nargs="+", default=[999, 700])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.checkpoint is not None and len(args.model) > 1:
        parser.error("--checkpoint goes with one --model")

    clips = None
    print(f"{args.clips} held-out clips, slot 0 = the first frame's cut-out; denoising MSE and change from 'all on'")
    print(f"{'model':<40} {'t':>4} {'all on':>8} {'tokens off':>16} {'HFA off':>16} {'no subject':>16}")
    for model in args.model:
        pipeline = load_probed_pipeline(model, args.checkpoint, args.ema)
        clips = clips or world_clips(pipeline, args.clips)
        unet = pipeline.unet
        clean = clean_latents(pipeline, clips)  # (b, c, F, h, w)
        text = encode_captions(pipeline, [clip["caption"] for clip in clips])
        subject = first_frame_subject(pipeline, clips)
        generator = torch.Generator().manual_seed(args.seed)
        for t in args.t:
            timesteps = torch.full((args.clips,), t)
            noise = torch.randn(clean.shape, generator=generator)
            noisy = pipeline.scheduler.add_noise(clean, noise, timesteps)
            target = training_target(pipeline.scheduler, clean, noise, timesteps)

            reference = predict(unet, noisy, timesteps, text, subject)
            cells = []
            switched_off = ({"tokens": False}, {"hfa": False}, {"subject": None})
            for off in switched_off:
                prediction = predict(unet, noisy, timesteps, text, **{"subject": subject, **off})
                loss = (prediction - target).pow(2).mean().item()
                change = (prediction - reference).pow(2).mean().item()
                cells.append(f"{loss:>7.4f} ({change:.4f})")
            all_on = (reference - target).pow(2).mean().item()
            print(f"{model[-40:]:<40} {t:>4} {all_on:>8.4f} " + " ".join(f"{cell:>16}" for cell in cells))


if __name__ == "__main__":
    main()
