"""Which path carries the subject: the APA image tokens (SDA) or the HFA latents? The v-prediction loss on held-out
clips with the first frame's cut-out subject in slot 0 (as generation has it), then with each path switched off.

"tokens off" sets every layer's ``a_img`` to 0 (the image branch of APA adds nothing); "HFA off" gives ``conv_in``
zeros where the fused subject latents go; "no subject" leaves every slot empty. The change columns are the mean
squared difference of the prediction from the one with everything on: what that path contributes.

    python scripts/subject_path_probe.py                                  # the packaged default model
    python scripts/subject_path_probe.py runs/ablation/sda/model runs/ablation/full/model --t 999 700
"""

from __future__ import annotations

import argparse

import torch

from magdiff.data.world import EVAL_SEED_OFFSET, WorldConfig, WorldDataset
from magdiff.pipelines import MagDiffPipeline
from magdiff.sda import cut_out, empty_slots
from magdiff.world_model import ASSETS


def predict(
    unet,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    text: torch.Tensor,
    embeds: torch.Tensor,
    pyramid: list[torch.Tensor],
    subject: bool = True,
    tokens: bool = True,
    hfa: bool = True,
) -> torch.Tensor:
    """The U-Net's prediction with the subject, with its image tokens (``tokens``) or HFA latents (``hfa``) off."""
    if not subject:
        return unet(noisy, timesteps, encoder_hidden_states=text).sample
    conditioning = unet.encode_subject(embeds, pyramid, tuple(noisy.shape[-2:]))
    if not hfa and conditioning.hfa_latents is not None:
        conditioning.hfa_latents = torch.zeros_like(conditioning.hfa_latents)
    saved = {name: processor.a_img.detach().clone() for name, processor in unet.apa_processors().items()}
    if not tokens:
        unet.set_apa_weights(a_img=0.0)
    try:
        return unet(noisy, timesteps, encoder_hidden_states=text, subject=conditioning).sample
    finally:
        for name, processor in unet.apa_processors().items():
            processor.a_img.data.copy_(saved[name])


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[str(ASSETS / "default_model")])
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--t", type=int, nargs="+", default=[999, 700])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset = WorldDataset(args.clips, seed_offset=EVAL_SEED_OFFSET, config=WorldConfig())
    samples = [dataset[i] for i in range(args.clips)]
    print(f"{args.clips} held-out clips, slot 0 = the first frame's cut-out; v-prediction MSE and change from 'all on'")
    print(f"{'model':<40} {'t':>4} {'all on':>8} {'tokens off':>16} {'HFA off':>16} {'no subject':>16}")
    for model in args.models:
        pipeline = MagDiffPipeline.from_pretrained(model, use_safetensors=True)
        unet = pipeline.unet
        clean = torch.stack([pipeline._vae_mean_latents(s["frames"]).permute(1, 0, 2, 3) for s in samples])
        text = pipeline.encode_prompt([s["caption"] for s in samples], pipeline.device)
        num_frames, pixels = clean.shape[2], tuple(samples[0]["frames"].shape[-2:])
        encoded = []
        for sample in samples:
            slots = empty_slots(num_frames, *pixels)
            slots[0] = cut_out(sample["frames"][0], sample["masks"][0])
            filled = torch.zeros(num_frames, dtype=torch.bool)
            filled[0] = True
            encoded.append(pipeline.encode_subject_slots(slots, filled, pixels))
        embeds = torch.cat([e for e, _ in encoded])
        pyramid = [torch.cat(level) for level in zip(*(p for _, p in encoded))]
        generator = torch.Generator().manual_seed(args.seed)
        for t in args.t:
            timesteps = torch.full((args.clips,), t)
            noise = torch.randn(clean.shape, generator=generator)
            noisy = pipeline.scheduler.add_noise(clean, noise, timesteps)
            target = pipeline.scheduler.get_velocity(clean, noise, timesteps)

            inputs = (unet, noisy, timesteps, text, embeds, pyramid)
            reference = predict(*inputs)
            cells = []
            switched_off = ({"tokens": False}, {"hfa": False}, {"subject": False})
            for prediction in (predict(*inputs, **off) for off in switched_off):
                loss = (prediction - target).pow(2).mean().item()
                change = (prediction - reference).pow(2).mean().item()
                cells.append(f"{loss:>7.4f} ({change:.4f})")
            all_on = (reference - target).pow(2).mean().item()
            print(f"{model[-40:]:<40} {t:>4} {all_on:>8.4f} " + " ".join(f"{cell:>16}" for cell in cells))


if __name__ == "__main__":
    main()
