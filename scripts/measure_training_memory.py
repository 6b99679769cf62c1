"""Measure the peak memory of one training step of the SD-1.5-shaped MagDiff U-Net (random weights) on the CPU.

    python scripts/measure_training_memory.py --latent 8 16 --frames 4 --checkpointing both

Each setting runs in its own process (``ru_maxrss`` only grows): build the U-Net, note the peak, run one forward +
backward of batch 1 (the paper's trainable selection, float32), note the peak again. The increase is the step's
gradients plus its activations; the planner (``magdiff.training.planner``) takes its activation coefficient from
these figures. On CUDA, ``torch.cuda.max_memory_allocated`` is the figure to compare instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one_step(latent: int, frames: int, checkpointing: bool) -> dict[str, float]:
    import torch

    from magdiff.models.unet import configure_trainable_parameters
    from magdiff.training.planner import sd15_magdiff_unet

    torch.manual_seed(0)
    unet = sd15_magdiff_unet().train()
    trainable = configure_trainable_parameters(unet, "magdiff")
    if checkpointing:
        unet.enable_gradient_checkpointing()
    sample = torch.randn(1, 4, frames, latent, latent)
    text = torch.randn(1, 77, 768)
    embeds = torch.randn(1, frames, 257, 1280)  # ViT-H/14 hidden states of each slot
    pyramid = [torch.randn(1, 4, frames, size, size) for size in (latent, latent + latent // 4, latent + latent // 2)]
    before = peak_bytes()
    subject = unet.encode_subject(embeds, pyramid, (latent, latent))
    unet(sample, torch.tensor([500]), text, subject=subject).sample.square().mean().backward()
    after = peak_bytes()
    gradient_bytes = 4 * sum(p.numel() for p in trainable)
    return {
        "latent": latent,
        "frames": frames,
        "checkpointing": checkpointing,
        "step_peak_increase_bytes": after - before,
        "gradient_bytes": gradient_bytes,
        "activation_bytes": after - before - gradient_bytes,
        "activation_bytes_per_element": (after - before - gradient_bytes) / (frames * latent * latent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), default="both")
    parser.add_argument("--child", nargs=3, metavar=("LATENT", "FRAMES", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(int(args.child[0]), int(args.child[1]), args.child[2] == "on")))
        return
    modes = ("off", "on") if args.checkpointing == "both" else (args.checkpointing,)
    for latent in args.latent:
        for mode in modes:
            command = [sys.executable, __file__, "--child", str(latent), str(args.frames), mode]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
