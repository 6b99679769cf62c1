"""The ``magdiff`` command: a thin shell over the pipelines (parse, load, call, export).

    magdiff generate --subject cat.png --prompt "a cat moving left on a blue background" --out cat.gif
    magdiff edit --video dog.mp4 --masks dog_masks/ --prompt "a dog walking in the snow" --out snow.mp4
    magdiff assemble --base-model DIR_OR_ID --motion-adapter DIR_OR_ID --image-encoder DIR_OR_ID --out MODEL_DIR

Bad input ends with one ``error: ...`` line on stderr and exit status 2; no output file is written then.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import MagDiffInputError

DTYPES = ("float32", "float16", "bfloat16")


def default_cache_dir() -> Path:
    return Path(os.environ.get("MAGDIFF_HOME", Path.home() / ".cache" / "magdiff"))


def packaged_default_model() -> Path:
    """Where the trained default model ships inside the package."""
    return Path(__file__).resolve().parent / "assets" / "default_model"


def resolve_model(model: str | None) -> str:
    """The model folder to load: ``--model``, else the packaged default model, else a tiny untrained model built
    and saved once under the cache folder (``$MAGDIFF_HOME``, default ``~/.cache/magdiff``)."""
    if model is not None:
        if not Path(model).is_dir() or not (Path(model) / "model_index.json").is_file():
            raise MagDiffInputError(
                f"--model {model} is not a MagDiff pipeline folder (no model_index.json); "
                f"give a folder written by `magdiff assemble`, `magdiff train` or "
                f"MagDiffPipeline.save_pretrained."
            )
        return model
    packaged = packaged_default_model()
    if (packaged / "model_index.json").is_file():
        return str(packaged)
    fallback = default_cache_dir() / "untrained-tiny"
    if not (fallback / "model_index.json").is_file():
        from .pipelines.assembly import save_pipeline_atomically
        from .tiny import tiny_magdiff_pipeline

        print(
            f"note: no trained default model is installed; building an untrained tiny model at {fallback} "
            f"(its videos are noise; pass --model for a real one)",
            file=sys.stderr,
        )
        save_pipeline_atomically(tiny_magdiff_pipeline(), fallback)
    return str(fallback)


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_pipeline(args: argparse.Namespace):  # -> MagDiffPipeline
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .pipelines.pipeline_magdiff import MagDiffPipeline

    # Quiet loading: one progress bar (the denoising loop) and one summary line is what the user reads.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    model = resolve_model(args.model)
    dtype = getattr(torch, args.dtype)
    pipeline = MagDiffPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True)
    pipeline.to(_device(args.device))
    pipeline.set_progress_bar_config(disable=False, desc="denoising", leave=True)
    if args.scheduler != "default":
        pipeline.scheduler = _scheduler(args.scheduler, pipeline.scheduler.config)
    return pipeline


SCHEDULERS = ("default", "ddim", "dpm-solver++", "euler", "euler-ancestral", "pndm")


def _scheduler(name: str, config: dict):
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    classes = {
        "ddim": DDIMScheduler,
        "dpm-solver++": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
        "euler-ancestral": EulerAncestralDiscreteScheduler,
        "pndm": PNDMScheduler,
    }
    return classes[name].from_config(config)


def _generator(seed: int | None):
    import torch

    return None if seed is None else torch.Generator().manual_seed(seed)


def _run_and_save(pipeline, args: argparse.Namespace, fmt: str, **inputs: object) -> None:
    from .media import save_video

    start = time.perf_counter()
    output = pipeline(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        generator=_generator(args.seed),
        output_type="pt",
        **inputs,
    )
    video = output.frames[0] * 2.0 - 1.0  # (F, 3, H, W) in [-1, 1]
    path = save_video(video, args.out, fps=args.fps)
    elapsed = time.perf_counter() - start
    frames, _, height, width = video.shape
    print(f"wrote {path} ({fmt}, {frames} frames, {width}x{height}, {args.fps} fps) in {elapsed:.1f} s")


def cmd_generate(args: argparse.Namespace) -> None:
    from .media import check_output_path, load_subject

    fmt = check_output_path(args.out)
    segmenter = _segmenter(args.segmenter)
    pipeline = load_pipeline(args)
    height, width = _size(args, pipeline)
    subject = load_subject(args.subject, mask_path=args.subject_mask, segmenter=segmenter, size=(height, width))
    args.height, args.width = height, width
    _run_and_save(pipeline, args, fmt, subject_image=subject.image, subject_mask=subject.mask)


def cmd_edit(args: argparse.Namespace) -> None:
    from .media import check_output_path, load_masks, load_video, probe_video

    fmt = check_output_path(args.out)
    segmenter = _segmenter(args.segmenter)
    pipeline = load_pipeline(args)
    height, width = _size(args, pipeline)
    info = probe_video(args.video)
    num_frames = args.num_frames or min(info.num_frames or 8, pipeline.max_num_frames)
    if num_frames > pipeline.max_num_frames:
        raise MagDiffInputError(
            f"--num-frames {num_frames} is more than this model supports "
            f"({pipeline.max_num_frames}); ask for fewer frames."
        )
    frames = load_video(args.video, num_frames=num_frames, size=(height, width))
    masks = None
    if args.masks is not None:
        masks = load_masks(
            args.masks, num_frames=num_frames, size=(height, width), expected_size=(info.height, info.width)
        )
    args.height, args.width, args.num_frames = height, width, num_frames
    if args.invert:
        from .inversion import check_invertible

        check_invertible(pipeline.scheduler)  # before any work: --invert needs DDIM
    _run_and_save(
        pipeline,
        args,
        fmt,
        video=frames,
        video_masks=masks,
        keep=args.keep,
        segmenter=segmenter,
        invert=args.invert,
        source_prompt=args.source_prompt,
    )


def cmd_assemble(args: argparse.Namespace) -> None:
    import torch

    from .pipelines.assembly import assemble_magdiff

    start = time.perf_counter()
    assemble_magdiff(
        args.base_model,
        args.motion_adapter,
        args.image_encoder,
        args.out,
        ip_adapter=args.ip_adapter,
        ip_adapter_subfolder=args.ip_adapter_subfolder,
        ip_adapter_weight_name=args.ip_adapter_weight_name,
        image_encoder_subfolder=args.image_encoder_subfolder,
        torch_dtype=getattr(torch, args.dtype),
        overwrite=args.overwrite,
        apa=args.apa,
        hfa=args.hfa,
    )
    print(f"wrote an untrained MagDiff pipeline to {args.out} in {time.perf_counter() - start:.1f} s")


def cmd_train(args: argparse.Namespace) -> None:
    import yaml

    from .training.config import config_from_dict, get_preset, load_config
    from .training.trainer import train

    config = load_config(args.config) if args.config else get_preset(args.preset)
    overrides = {}
    for item in args.set or []:
        key, separator, value = item.partition("=")
        if not separator:
            raise MagDiffInputError(f"--set {item!r}: use key=value (e.g. --set max_steps=2000).")
        overrides[key.strip()] = yaml.safe_load(value)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    if args.max_steps:
        overrides["max_steps"] = args.max_steps
    config = config_from_dict(overrides, config)
    if args.prepare_only:
        cache = train(config, progress=not args.no_progress, prepare_only=True)
        print(f"cached the encoded training clips in {cache}")
        return
    export = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"trained {config.max_steps} steps; model written to {export}")


def cmd_evaluate_world(args: argparse.Namespace) -> None:
    import json

    from .evaluation.world_benchmark import DEFAULT_TASKS, evaluate_world

    pipeline = load_pipeline(args)
    pipeline.set_progress_bar_config(disable=True)
    tasks = tuple(args.tasks.split(",")) if args.tasks else DEFAULT_TASKS
    per_sample: list[dict] = []
    results = evaluate_world(
        pipeline,
        num_samples=args.num_samples,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        tasks=tasks,
        preview_path=args.preview,
        first_sample=args.first_sample,
        per_sample=per_sample,
    )
    width = max(len(key) for key in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.4f}")
    if args.out:
        from .media import write_text_atomically

        record = {
            "num_samples": args.num_samples,
            "first_sample": args.first_sample,
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "seed": args.seed,
            "results": results,
            "per_sample": per_sample,
        }
        write_text_atomically(args.out, json.dumps(record, indent=1))
        print(f"wrote {args.out}")


def cmd_world_preview(args: argparse.Namespace) -> None:
    from .data.world import render_preview

    path = render_preview(args.out, num_samples=args.num_samples, seed=args.seed)
    print(f"wrote {path}")


def _size(args: argparse.Namespace, pipeline) -> tuple[int, int]:
    default_height, default_width = pipeline.default_size
    return args.height or default_height, args.width or default_width


def _segmenter(name: str | None):
    if name is None:
        return None
    from .segmentation import get_segmenter

    return get_segmenter(name)


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="MagDiff pipeline folder (default: the packaged default model)")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (default: empty)")
    parser.add_argument("--num-frames", type=int, default=None, help="frames to generate (default 8)")
    parser.add_argument("--height", type=int, default=None, help="video height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="video width in pixels (default: the model's)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance scale (default 7.5)")
    parser.add_argument(
        "--image-guidance-scale", type=float, default=None, help="optional subject guidance scale (default: off)"
    )
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="default", help="sampler (default: the model's)")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--segmenter", default=None, help="segmenter where no mask is given (default: grabcut)")
    parser.add_argument("--fps", type=int, default=8, help="frames per second of the written video")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--out", required=True, help="output video, .mp4 (H.264) or .gif")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magdiff", description="MagDiff video generation and editing.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="text + subject image -> video")
    generate.add_argument(
        "--subject",
        required=True,
        help="subject image: PNG with alpha, or RGB with --subject-mask, or RGB alone (segmented)",
    )
    generate.add_argument("--subject-mask", default=None, help="mask image of the subject (white = subject)")
    _add_sampling_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    edit = commands.add_parser("edit", help="source video + text -> edited video keeping the masked region")
    edit.add_argument("--video", required=True, help="source video (mp4, gif, ... or a folder of frames)")
    edit.add_argument(
        "--masks", default=None, help="folder of per-frame mask PNGs, or a mask video (default: segment every frame)"
    )
    edit.add_argument(
        "--keep",
        choices=("subject", "background"),
        default="subject",
        help="keep the masked subject (change the scene) or the scene (change the subject)",
    )
    edit.add_argument(
        "--invert",
        action="store_true",
        help="start from the DDIM inversion of the source video instead of noise (motion and layout follow it more "
        "closely; needs the DDIM scheduler)",
    )
    edit.add_argument("--source-prompt", default="", help="what the source video shows, for --invert (default: empty)")
    _add_sampling_arguments(edit)
    edit.set_defaults(func=cmd_edit)

    assemble = commands.add_parser("assemble", help="build an untrained MagDiff from public parts")
    assemble.add_argument("--base-model", required=True, help="SD-1.5-style pipeline: hub id or folder")
    assemble.add_argument("--motion-adapter", required=True, help="AnimateDiff motion adapter: hub id or folder")
    assemble.add_argument("--image-encoder", required=True, help="CLIP vision encoder: hub id or folder")
    assemble.add_argument("--image-encoder-subfolder", default=None)
    assemble.add_argument("--ip-adapter", default=None, help="IP-Adapter-Plus weights: file, folder or hub id")
    assemble.add_argument("--ip-adapter-subfolder", default=None)
    assemble.add_argument("--ip-adapter-weight-name", default=None)
    assemble.add_argument("--apa", choices=("learned", "fixed"), default="learned")
    assemble.add_argument("--hfa", choices=("pyramid", "single", "off"), default="pyramid")
    assemble.add_argument("--dtype", choices=DTYPES, default="float32")
    assemble.add_argument("--overwrite", action="store_true")
    assemble.add_argument("--out", required=True, help="output pipeline folder")
    assemble.set_defaults(func=cmd_assemble)

    train_parser = commands.add_parser("train", help="train MagDiff (accelerate; works under torchrun)")
    source = train_parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="world", help="config preset: world (default), world-tiny, paper")
    source.add_argument("--config", default=None, help="YAML/JSON training config (unknown keys are errors)")
    train_parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    train_parser.add_argument("--output-dir", default=None)
    train_parser.add_argument("--max-steps", type=int, default=None)
    train_parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    train_parser.add_argument("--no-progress", action="store_true")
    train_parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="only build the cache of encoded clips (before a multi-process launch)",
    )
    train_parser.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score a model")
    targets = evaluate.add_subparsers(dest="target", required=True)
    world = targets.add_parser("world", help="the world benchmark, scored exactly by the oracle")
    world.add_argument("--model", default=None, help="MagDiff pipeline folder (default: the packaged model)")
    world.add_argument("--num-samples", type=int, default=200)
    world.add_argument("--first-sample", type=int, default=0, help="first held-out clip (to split a run in shards)")
    world.add_argument("--steps", type=int, default=25)
    world.add_argument("--guidance-scale", type=float, default=7.5)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument(
        "--tasks",
        default=None,
        help="comma-separated, from generation,empty_subject,editing,editing_inverted (default: the first three)",
    )
    world.add_argument("--preview", default=None, help="write a GIF of the first samples here")
    world.add_argument("--out", default=None, help="write the results as JSON here")
    world.add_argument("--device", default="auto")
    world.add_argument("--dtype", choices=DTYPES, default="float32")
    world.add_argument("--scheduler", choices=SCHEDULERS, default="default")
    world.set_defaults(func=cmd_evaluate_world)

    from .data.manifest import add_segment_dataset_parser

    add_segment_dataset_parser(commands)

    preview = commands.add_parser("world-preview", help="render a few world samples to a PNG")
    preview.add_argument("--out", required=True)
    preview.add_argument("--num-samples", type=int, default=6)
    preview.add_argument("--seed", type=int, default=0)
    preview.set_defaults(func=cmd_world_preview)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except MagDiffInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
