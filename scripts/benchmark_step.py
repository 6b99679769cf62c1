"""Time one denoising step of MagDiff's U-Net against its peer, in turn (A B A B), and their peak memory.

One denoising step is one U-Net call on the classifier-free-guidance batch of 2 (what both pipelines call once per
step; the scheduler update is the same on both sides and left out).

- The peer: diffusers' ``UNetMotionModel`` (SD 1.5 U-Net + AnimateDiff motion modules) with an IP-Adapter-Plus image
  branch, built the way diffusers' ``load_ip_adapter`` builds it (``IPAdapterPlusImageProjection`` as
  ``encoder_hid_proj``, ``IPAdapterAttnProcessor2_0`` with 16 tokens in every spatial cross-attention), called as
  ``AnimateDiffPipeline`` calls it with one image: ``added_cond_kwargs={"image_embeds": [(2, 1, 257, d)]}``; it
  runs its Resampler inside every step.
- MagDiff: ``MagDiffUNetModel.from_unet_motion(peer)``, the same U-Net with MagDiff's additions (8-channel
  ``conv_in``, APA with ``16 x F`` image tokens), in generation mode (slot 0 filled, slots 1..F-1 empty); its subject
  conditioning is encoded once per video, outside the step, as the pipeline does.

Both are warmed, then timed in turn, N pairs; the ratio is taken pair by pair.

    python scripts/benchmark_step.py --scale tiny
    python scripts/benchmark_step.py --scale sd15                          # 16 frames, 256x256 px
    python scripts/benchmark_step.py --scale sd15 --frames 8 --resolution 128 --pairs 5
    python scripts/benchmark_step.py --scale sd15 --memory                 # peak RSS, 8 and 16 frames

The last line printed is ``<scale> step ratio: R`` (MagDiff over the peer, median over pairs).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import UNetMotionModel
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
from diffusers.utils import logging as diffusers_logging

from magdiff.models.unet import MagDiffUNetModel, is_spatial_cross_attention


@dataclass(frozen=True)
class Scale:
    """U-Net shape, token counts and default video size of one benchmark scale."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_heads: int
    motion_heads: int
    norm_groups: int
    cross_attention_dim: int
    text_tokens: int
    image_hidden: int  # image encoder hidden size (ViT-H/14: 1280)
    image_positions: int  # image encoder tokens (ViT-H/14 at 224 px: 257)
    resampler_hidden: int
    resampler_heads: int
    frames: int
    resolution: int


SCALES = {
    # the tiny parts of the tests (magdiff.tiny): two levels of 32 and 64 channels
    "tiny": Scale((32, 64), 1, 4, 4, 8, 32, 16, 32, 17, 64, 1, 8, 64),
    # SD 1.5 + AnimateDiff motion modules + IP-Adapter-Plus, random weights
    "sd15": Scale((320, 640, 1280, 1280), 2, 8, 8, 32, 768, 77, 1280, 257, 768, 12, 16, 256),
}
IMAGE_TOKENS = 16  # IP-Adapter-Plus tokens per image = MagDiff tokens per subject slot


def build_peer(scale: Scale, seed: int = 0) -> UNetMotionModel:
    """The AnimateDiff U-Net with an IP-Adapter-Plus image branch, as ``load_ip_adapter`` leaves it."""
    torch.manual_seed(seed)
    levels = len(scale.block_out_channels)
    unet = UNetMotionModel(
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockMotion",) * (levels - 1) + ("DownBlockMotion",),
        up_block_types=("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * (levels - 1),
        block_out_channels=scale.block_out_channels,
        layers_per_block=scale.layers_per_block,
        norm_num_groups=scale.norm_groups,
        cross_attention_dim=scale.cross_attention_dim,
        num_attention_heads=scale.attention_heads,
        motion_num_attention_heads=scale.motion_heads,
        motion_max_seq_length=32,
    )
    with torch.no_grad():  # motion modules start as identity; give them weights so temporal mixing costs what it costs
        for name, parameter in unet.named_parameters():
            if "motion_modules" in name and "proj_out" in name:
                parameter.normal_(0.0, 0.02)
    projection = IPAdapterPlusImageProjection(
        embed_dims=scale.image_hidden,
        output_dims=scale.cross_attention_dim,
        hidden_dims=scale.resampler_hidden,
        depth=4,
        dim_head=64,
        heads=scale.resampler_heads,
        num_queries=IMAGE_TOKENS,
    )
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([projection])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    processors = {}
    for name, processor in unet.attn_processors.items():
        module_name = name.removesuffix(".processor")
        module = unet.get_submodule(module_name)
        if is_spatial_cross_attention(module_name, module):
            ip = IPAdapterAttnProcessor2_0(
                module.to_k.out_features, module.to_k.in_features, num_tokens=(IMAGE_TOKENS,), scale=1.0
            )
            torch.nn.init.normal_(ip.to_k_ip[0].weight, std=0.02)
            torch.nn.init.normal_(ip.to_v_ip[0].weight, std=0.02)
            processors[name] = ip
        else:
            processors[name] = AttnProcessor2_0() if not isinstance(processor, torch.nn.Module) else processor
    unet.set_attn_processor(processors)
    return unet.eval()


def build_magdiff(peer: UNetMotionModel) -> MagDiffUNetModel:
    return MagDiffUNetModel.from_unet_motion(peer).eval()


def step_functions(
    scale: Scale, frames: int, resolution: int, which: tuple[str, ...], seed: int = 0
) -> dict[str, Callable[[], None]]:
    """``{"magdiff": step, "peer": step}`` (those named in ``which``) on the same noisy latent, text and timestep."""
    generator = torch.Generator().manual_seed(seed)
    size = resolution // 8
    sample = torch.randn(2, 4, frames, size, size, generator=generator)  # CFG batch
    text = torch.randn(2, scale.text_tokens, scale.cross_attention_dim, generator=generator)
    timestep = torch.tensor(500)
    image = torch.randn(1, scale.image_positions, scale.image_hidden, generator=generator)
    empty = torch.randn(1, scale.image_positions, scale.image_hidden, generator=generator)
    peer = build_peer(scale, seed)
    steps: dict[str, Callable[[], None]] = {}
    if "magdiff" in which:
        magdiff = build_magdiff(peer)
        # generation mode: slot 0 holds the subject, slots 1..F-1 the empty image; encoded once per video
        slots = torch.cat([image, empty.expand(frames - 1, -1, -1)])[None]  # (1, F, n, d)
        pyramid = [torch.randn(1, 4, frames, s, s, generator=generator) for s in (size, size * 5 // 4, size * 3 // 2)]
        with torch.inference_mode():
            subject = magdiff.encode_subject(slots, pyramid, (size, size)).repeat(2)
        steps["magdiff"] = lambda: magdiff(sample, timestep, text, subject=subject)
    if "peer" in which:
        image_embeds = [torch.cat([torch.zeros_like(image), image])[:, None]]  # [negative, positive], 1 image
        text_per_frame = text.repeat_interleave(frames, dim=0)  # AnimateDiffPipeline repeats it once per run
        steps["peer"] = lambda: peer(sample, timestep, text_per_frame, added_cond_kwargs={"image_embeds": image_embeds})
    else:
        del peer
    return steps


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        step()
    return time.perf_counter() - start


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, third


def run_timing(args: argparse.Namespace, scale: Scale) -> list[float]:
    """Warm both sides, then time them in turn; returns the pairs' ratios (MagDiff over the peer)."""
    steps = step_functions(scale, args.frames, args.resolution, ("magdiff", "peer"))
    for _ in range(args.warmup):
        timed(steps["magdiff"])
        timed(steps["peer"])
    ours, theirs, ratios = [], [], []
    for pair in range(args.pairs):
        ours.append(timed(steps["magdiff"]))
        theirs.append(timed(steps["peer"]))
        ratios.append(ours[-1] / theirs[-1])
        print(f"pair {pair + 1}: MagDiff {ours[-1]:.3f} s, peer {theirs[-1]:.3f} s, ratio {ratios[-1]:.3f}", flush=True)
    low, high = quartiles(ratios)
    print(
        f"{args.pairs} pairs: MagDiff median {statistics.median(ours):.3f} s, peer median "
        f"{statistics.median(theirs):.3f} s; ratio median {statistics.median(ratios):.3f}, "
        f"min-max {min(ratios):.3f}-{max(ratios):.3f}, IQR {low:.3f}-{high:.3f}"
    )
    return ratios


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def memory_child(args: argparse.Namespace, scale: Scale) -> None:
    """One side, one step, in this fresh process: RSS before the step and the peak RSS of the step alone (JSON on
    stdout). Building MagDiff from the peer holds both U-Nets for a moment, so the process's lifetime peak
    (``ru_maxrss``) would count that construction; the kernel's high-water mark is reset after building
    (``/proc/self/clear_refs``) and read after the step."""
    steps = step_functions(scale, args.frames, args.resolution, (args.memory_side,))
    gc.collect()
    rss_before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    if _status_mib("VmHWM") > rss_before * 1.01 + 16:
        raise SystemExit("this kernel does not reset the peak RSS (/proc/self/clear_refs); cannot measure the step")
    timed(steps[args.memory_side])
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"rss_before_mib": rss_before, "peak_mib": _status_mib("VmHWM"), "lifetime_peak_mib": lifetime}))


def run_memory(args: argparse.Namespace) -> None:
    size = f"{args.resolution}x{args.resolution} px"
    print(f"peak RSS of one step, one fresh process per side and length ({args.scale}, {size})")
    for frames in (8, 16):
        row = {}
        for side in ("magdiff", "peer"):
            command = [sys.executable, __file__, "--scale", args.scale, "--resolution", str(args.resolution)]
            command += ["--frames", str(frames), "--threads", str(args.threads), "--memory-side", side]
            result = subprocess.run(command, check=True, capture_output=True, text=True)
            row[side] = json.loads(result.stdout.strip().splitlines()[-1])
        ours, theirs = row["magdiff"], row["peer"]
        ours_growth = ours["peak_mib"] - ours["rss_before_mib"]
        theirs_growth = theirs["peak_mib"] - theirs["rss_before_mib"]
        print(
            f"{frames} frames: MagDiff step peak {ours['peak_mib']:.0f} MiB (model loaded "
            f"{ours['rss_before_mib']:.0f}, +{ours_growth:.0f}), peer step peak {theirs['peak_mib']:.0f} MiB (model "
            f"loaded {theirs['rss_before_mib']:.0f}, +{theirs_growth:.0f}); ratio "
            f"{ours['peak_mib'] / theirs['peak_mib']:.3f}, of the growth {ours_growth / max(1.0, theirs_growth):.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument("--frames", type=int, default=None, help="frames (default: tiny 8, sd15 16)")
    parser.add_argument("--resolution", type=int, default=None, help="pixels per side (default: tiny 64, sd15 256)")
    parser.add_argument("--pairs", type=int, default=10, help="timed MagDiff/peer pairs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls of each side first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="peak RSS at 8 and 16 frames instead of timing")
    parser.add_argument("--memory-side", choices=("magdiff", "peer"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    scale = SCALES[args.scale]
    args.frames = args.frames or scale.frames
    args.resolution = args.resolution or scale.resolution
    if args.resolution % 8 or args.frames < 1 or args.pairs < 1:
        parser.error("--resolution must be a multiple of 8, --frames and --pairs at least 1")
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()
    if args.memory_side is not None:
        memory_child(args, scale)
        return
    if args.memory:
        run_memory(args)
        return
    print(
        f"size: {args.scale} U-Net {scale.block_out_channels}, {args.frames} frames, {args.resolution}x"
        f"{args.resolution} px ({args.resolution // 8}x{args.resolution // 8} latents), CFG batch 2, "
        f"{scale.text_tokens} text tokens, {IMAGE_TOKENS} image tokens per image (peer: 1 image; MagDiff: "
        f"{args.frames} slots, generation mode), {args.threads} threads",
        flush=True,
    )
    ratios = run_timing(args, scale)
    print(f"{args.scale} step ratio: {statistics.median(ratios):.3f}")  # the last line: MagDiff over the peer


if __name__ == "__main__":
    main()
