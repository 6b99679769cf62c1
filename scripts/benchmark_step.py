"""Time one denoising step of MagDiffPipeline against diffusers' AnimateDiffPipeline + IP-Adapter-Plus.

Both pipelines are built from the same tiny public-format parts (SD-style pipeline, motion adapter, IP-Adapter-Plus
checkpoint, CLIP vision encoder), run with the same prompt, frames, size, guidance and scheduler, and timed in one
process. The per-step time is the slope between a short and a long run (so prompt/subject encoding and decoding,
which happen once, cancel out); the median over repeats is reported.

    python scripts/benchmark_step.py                  # 8 frames, 64x64 px, 2 threads
    python scripts/benchmark_step.py --height 128 --width 128 --frames 16

The peer is timed twice: with one image (how it is usually run) and with one image per frame (the same number of
image tokens as MagDiff's F subject slots). Target: MagDiff <= 1.15x the peer step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from diffusers import AnimateDiffPipeline, MotionAdapter
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from magdiff.pipelines.assembly import assemble_magdiff
from magdiff.tiny import TINY_IMAGE_HIDDEN, save_tiny_public_parts

PROMPT = "a cat moving left on a red background"


def _timed(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_step_seconds(run, short: int, long: int, repeats: int) -> float:
    run(short)  # warm-up
    return (_timed(lambda: run(long), repeats) - _timed(lambda: run(short), repeats)) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--short", type=int, default=2, help="steps of the short run")
    parser.add_argument("--long", type=int, default=10, help="steps of the long run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as folder:
        parts = save_tiny_public_parts(folder)
        magdiff = assemble_magdiff(
            parts["sd"], parts["motion_adapter"], parts["image_encoder"], ip_adapter=parts["ip_adapter"]
        )
        peer = AnimateDiffPipeline.from_pretrained(
            parts["sd"], motion_adapter=MotionAdapter.from_pretrained(parts["motion_adapter"])
        )
        peer.load_ip_adapter(
            str(parts["ip_adapter"].parent),
            subfolder="",
            weight_name=parts["ip_adapter"].name,
            image_encoder_folder=None,
        )
    for pipeline in (magdiff, peer):
        pipeline.set_progress_bar_config(disable=True)

    frames, size = args.frames, (args.height, args.width)
    subject = torch.rand(3, *size) * 2 - 1
    mask = torch.zeros(1, *size)
    mask[:, size[0] // 4 : 3 * size[0] // 4, size[1] // 4 : 3 * size[1] // 4] = 1
    common = {"num_frames": frames, "height": size[0], "width": size[1], "guidance_scale": 7.5, "output_type": "latent"}

    def run_magdiff(steps: int) -> None:
        magdiff(
            PROMPT,
            subject_image=subject,
            subject_mask=mask,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            **common,
        )

    def run_peer(num_images: int):
        features = torch.randn(1, num_images, 17, TINY_IMAGE_HIDDEN)
        embeds = [torch.cat([torch.zeros_like(features), features])]  # [negative, positive] for CFG

        def run(steps: int) -> None:
            peer(
                PROMPT,
                ip_adapter_image_embeds=embeds,
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0),
                **common,
            )

        return run

    with torch.inference_mode():
        ours = per_step_seconds(run_magdiff, args.short, args.long, args.repeats)
        peer_one = per_step_seconds(run_peer(1), args.short, args.long, args.repeats)
        peer_all = per_step_seconds(run_peer(frames), args.short, args.long, args.repeats)

    print(
        f"setting: {frames} frames, {size[1]}x{size[0]} px, CFG 7.5, DDIM, {args.threads} threads, "
        f"tiny components (U-Net {sum(p.numel() for p in magdiff.unet.parameters()) / 1e6:.2f}M params)"
    )
    print(f"MagDiffPipeline step (F={frames} subject slots, HFA pyramid, APA): {ours * 1000:8.2f} ms")
    print(
        f"AnimateDiff + IP-Adapter-Plus step, 1 image:                {peer_one * 1000:8.2f} ms  "
        f"ratio {ours / peer_one:.3f}x"
    )
    print(
        f"AnimateDiff + IP-Adapter-Plus step, {frames} images:               {peer_all * 1000:8.2f} ms  "
        f"ratio {ours / peer_all:.3f}x"
    )
    print(
        f"target: <= 1.15x -> {'met' if ours / peer_one <= 1.15 else 'missed'} (1 image), "
        f"{'met' if ours / peer_all <= 1.15 else 'missed'} ({frames} images)"
    )


if __name__ == "__main__":
    main()
