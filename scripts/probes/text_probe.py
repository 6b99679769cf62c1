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

    python scripts/text_probe.py                         # the packaged default model
    python scripts/text_probe.py --model runs/world/model --clips 32
    python scripts/text_probe.py --model BASE --checkpoint runs/world/checkpoints/step_000500 [--ema]
    python scripts/text_probe.py --subject first-frame
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from magdiff.data.world import EVAL_SEED_OFFSET, MOTIONS, WorldConfig, WorldDataset, caption_for
from magdiff.pipelines import MagDiffPipeline
from magdiff.sda import cut_out, empty_slots
from magdiff.training.trainer import UNetWithTextEncoder
from magdiff.world_model import ASSETS


def _other_motion(sample: dict) -> str:
    """The motion after the clip's own in ``MOTIONS`` (the same caption but for that word)."""
    return MOTIONS[(MOTIONS.index(sample["meta"]["motion"]) + 1) % len(MOTIONS)]


def load_training_weights(pipeline: MagDiffPipeline, checkpoint: Path, ema: bool) -> None:
    """Load a checkpoint's weights (``unet.*`` and ``text_encoder.*`` when the text encoder trained) in place."""
    state = load_file(str(checkpoint / "unet.safetensors"))
    if ema:
        state.update(load_file(str(checkpoint / "ema.safetensors")))
    module = UNetWithTextEncoder(pipeline.unet, pipeline.text_encoder) if "unet.conv_in.weight" in state else None
    missing, unexpected = (module or pipeline.unet).load_state_dict(state, strict=False)
    if unexpected or (module is None and missing):
        raise SystemExit(f"{checkpoint} does not match {type(pipeline.unet).__name__}: {unexpected[:3]} {missing[:3]}")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ASSETS / "default_model"))
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 960, 900, 700, 400])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="a training checkpoint folder to load into --model")
    parser.add_argument("--ema", action="store_true", help="with --checkpoint: its EMA weights")
    parser.add_argument("--split", choices=["held-out", "train"], default="held-out", help="which clips")
    parser.add_argument("--subject", choices=["none", "first-frame"], default="none", help="what slot 0 holds")
    args = parser.parse_args()

    pipeline = MagDiffPipeline.from_pretrained(args.model, use_safetensors=True)
    if args.checkpoint is not None:
        load_training_weights(pipeline, Path(args.checkpoint), args.ema)
    scheduler = pipeline.scheduler
    offset = EVAL_SEED_OFFSET if args.split == "held-out" else 0
    dataset = WorldDataset(args.clips, seed_offset=offset, config=WorldConfig(num_frames=args.frames))
    samples = [dataset[i] for i in range(args.clips)]
    clean = torch.stack([pipeline._vae_mean_latents(s["frames"]).permute(1, 0, 2, 3) for s in samples])
    device = pipeline.device
    captions = pipeline.encode_prompt([s["caption"] for s in samples], device)
    prompts = {
        "right caption": captions,
        "empty caption": pipeline.encode_prompt([""], device).expand_as(captions),
        "other clip's caption": captions.roll(1, dims=0),
        "other motion": pipeline.encode_prompt(
            [caption_for(s["meta"], motion=_other_motion(s)) for s in samples], "cpu"
        ),
    }
    size = tuple(clean.shape[-2:])
    masks = torch.stack([F.adaptive_max_pool2d(s["masks"].float(), size)[:, 0] for s in samples])[:, None]
    subject: dict[str, object] = {}
    if args.subject == "first-frame":
        pixels = tuple(samples[0]["frames"].shape[-2:])
        encoded = []
        for s in samples:
            slots = empty_slots(args.frames, *pixels)
            slots[0] = cut_out(s["frames"][0], s["masks"][0])
            filled = torch.zeros(args.frames, dtype=torch.bool)
            filled[0] = True
            encoded.append(pipeline.encode_subject_slots(slots, filled, pixels))
        subject = {
            "subject_embeds": torch.cat([embeds for embeds, _ in encoded]),
            "subject_latents": [torch.cat(level) for level in zip(*(pyramid for _, pyramid in encoded))],
        }
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{args.model}: {args.clips} {args.split} clips, slot 0: {args.subject}, v-prediction MSE (lower is better)")
    print(f"{'t':>5} " + " ".join(f"{name:>20}" for name in prompts) + f" {'colour part':>12} {'subject part':>12}")
    for t in args.timesteps:
        timesteps = torch.full((args.clips,), t)
        noise = torch.randn(clean.shape, generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        target = scheduler.get_velocity(clean, noise, timesteps)
        losses, colour_share, subject_share = [], 0.0, 0.0
        for name, text in prompts.items():
            error = pipeline.unet(noisy, timesteps, encoder_hidden_states=text, **subject).sample - target
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
