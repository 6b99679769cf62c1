"""The ``magdiff`` command: a thin shell over the pipelines (parse, load, call, export).

    magdiff generate --subject cat.png --prompt "a cat moving left on a blue background" --out cat.gif
    magdiff edit --video dog.mp4 --masks dog_masks/ --prompt "a dog walking in the snow" --out snow.mp4
    magdiff assemble --base-model DIR_OR_ID --motion-adapter DIR_OR_ID --image-encoder DIR_OR_ID --out MODEL_DIR
    magdiff evaluate folder --videos DIR --clip CLIP_DIR --i3d i3d_torchscript.pt --reference REAL_DIR --out r.json

Bad input ends with one ``error: ...`` line on stderr and exit status 2; no output file is written then.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli_checks import check_against_model, check_arguments, check_input_file, segmenter_from_arguments
from .errors import MagDiffInputError
from .evaluation.layouts import DAVIS_LAYOUT, DREAMBOOTH_LAYOUT, EXTRACTOR_HELP, FOLDER_LAYOUT
from .loading import SCHEDULERS, load_pipeline, resolve_device, resolve_model

if TYPE_CHECKING:
    from .pipelines.pipeline_magdiff import MagDiffPipeline

DTYPES = ("float32", "float16", "bfloat16")


# ---------------------------------------------------------------------------------------------------- helpers


def _load_sampling_pipeline(args: argparse.Namespace) -> MagDiffPipeline:
    return load_pipeline(args.model, device=args.device, dtype=args.dtype, scheduler=args.scheduler)


def _size(args: argparse.Namespace, pipeline: MagDiffPipeline) -> tuple[int, int]:
    default_height, default_width = pipeline.default_size
    return args.height or default_height, args.width or default_width


def _write_json(path: str | os.PathLike[str], record: dict[str, Any], indent: int | None = 1) -> None:
    from .media import write_text_atomically

    write_text_atomically(path, json.dumps(record, indent=indent))


# ---------------------------------------------------------------------------------------------------- generate, edit


def _run_and_save(
    pipeline: MagDiffPipeline, args: argparse.Namespace, fmt: str, size: tuple[int, int], **inputs: Any
) -> None:
    import torch

    from .media import save_video

    start = time.perf_counter()
    replaced = Path(args.out).expanduser().exists()
    generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
    output = pipeline(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=size[0],
        width=size[1],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        generator=generator,
        truncate_prompt=args.truncate_prompt,
        output_type="pt",
        context_length=args.context_length,
        context_stride=args.context_stride,
        **inputs,
    )
    video = output.frames[0] * 2.0 - 1.0  # (F, 3, H, W) in [-1, 1]
    path = save_video(video, args.out, fps=args.fps)
    elapsed = time.perf_counter() - start
    frames, _, height, width = video.shape
    replacing = ", replaced the existing file" if replaced else ""
    print(f"wrote {path} ({fmt}, {frames} frames, {width}x{height}, {args.fps} fps{replacing}) in {elapsed:.1f} s")


def cmd_generate(args: argparse.Namespace) -> None:
    from .media import check_output_path, load_image, load_subject, load_trajectory

    fmt = check_output_path(args.out)
    check_input_file(args.subject, "--subject")  # every input is checked before the model loads
    if args.subject_mask is not None:
        check_input_file(args.subject_mask, "--subject-mask")
        load_subject(
            args.subject, mask_path=args.subject_mask, size=load_image(args.subject).size[::-1]
        )  # sizes, empty
    trajectory = load_trajectory(args.trajectory)
    segmenter = segmenter_from_arguments(args)
    pipeline = _load_sampling_pipeline(args)
    check_against_model(args, pipeline, args.num_frames)
    size = _size(args, pipeline)
    subject = load_subject(args.subject, mask_path=args.subject_mask, segmenter=segmenter, size=size)
    _run_and_save(
        pipeline,
        args,
        fmt,
        size,
        num_frames=args.num_frames,
        subject_image=subject.image,
        subject_mask=subject.mask,
        trajectory=trajectory,
    )


def cmd_edit(args: argparse.Namespace) -> None:
    from .media import check_output_path, load_masks, load_video, probe_video

    fmt = check_output_path(args.out)
    info = probe_video(args.video)  # every input is checked before the model loads
    if args.masks is not None and not Path(args.masks).expanduser().exists():
        raise MagDiffInputError(f"--masks {args.masks!r} does not exist; give a folder of mask PNGs or a mask video.")
    if args.masks is not None and args.num_frames is not None:  # their count, sizes and emptiness
        load_masks(args.masks, num_frames=args.num_frames, size=None, expected_size=(info.height, info.width))
    segmenter = segmenter_from_arguments(args)
    if args.invert and args.scheduler == "default":
        args.scheduler = "ddim"  # inversion is DDIM's: built from the model's own scheduler config
    pipeline = _load_sampling_pipeline(args)
    num_frames = args.num_frames  # None: the source's length (0 is refused above); long ones in windows
    if num_frames is None:
        num_frames = info.num_frames or 8
    check_against_model(args, pipeline, num_frames)  # --num-frames, --height/--width, --invert's sampler
    size = _size(args, pipeline)
    frames = load_video(args.video, num_frames=num_frames, size=size)
    masks = None
    if args.masks is not None:
        masks = load_masks(args.masks, num_frames=num_frames, size=size, expected_size=(info.height, info.width))
    _run_and_save(
        pipeline,
        args,
        fmt,
        size,
        num_frames=num_frames,
        video=frames,
        video_masks=masks,
        keep=args.keep,
        segmenter=segmenter,
        invert=args.invert,
        source_prompt=args.source_prompt,
    )


# ---------------------------------------------------------------------------------------------------- assemble, train


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
    if args.max_minutes is not None:
        overrides["max_minutes"] = args.max_minutes
    if args.config:
        config = load_config(args.config, overrides=overrides)
    else:
        config = config_from_dict(overrides, get_preset(args.preset))
    if args.plan:  # the memory planner: build the model, count, estimate; no training
        from .training.planner import plan_for_config

        print(plan_for_config(config, args.gpu_memory, args.num_gpus, args.zero_stage))
        return
    from .training.trainer import last_logged_step, train  # after the config is checked: a bad value fails first

    if args.prepare_only:
        cache = train(config, progress=not args.no_progress, prepare_only=True)
        print(f"cached the encoded training clips in {cache}")
        return
    export = train(config, resume=args.resume, progress=not args.no_progress)
    step = last_logged_step(config.output_dir)  # None: a run resumed from checkpoints copied without their log
    print(f"{'' if step is None else f'trained {step} steps; '}model written to {export}")


def cmd_train_trajectory(args: argparse.Namespace) -> None:
    from .pipelines.assembly import save_pipeline_atomically
    from .training.trajectory import evaluate_trajectory_head, train_trajectory_head, trajectory_training_data

    out = Path(args.out)
    if out.exists() and not args.overwrite and out.resolve() != Path(resolve_model(args.model)).resolve():
        raise MagDiffInputError(f"{out} exists; pass --overwrite to replace it.")
    # float32 and the saved scheduler: the pipeline is written back whole. A head already there is replaced.
    pipeline = load_pipeline(args.model, device=args.device, trajectory=None)
    pipeline.set_progress_bar_config(disable=True)
    data = trajectory_training_data(
        args.data,
        num_samples=args.num_samples,
        held_out=args.held_out,
        num_frames=args.num_frames,
        made_up_fraction=args.made_up_subjects,
        size=pipeline.default_size,
    )
    print(f"trajectory head: {len(data.train)} clips from {args.data}, {args.steps} steps")
    result = train_trajectory_head(
        pipeline,
        data.train.captions,
        data.train.paths,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        on_log=lambda record: print(f"step {record['step']:>6}  loss {record['loss']:.6f}  {record['seconds']:.0f} s"),
    )
    scores: dict[str, dict[str, float]] = {}
    for name, part in data.held_out.items():
        if len(part):
            scores[name] = evaluate_trajectory_head(pipeline, result.head, part.captions, part.paths)
            print(f"held out ({name}): " + ", ".join(f"{key} {value:.4f}" for key, value in scores[name].items()))
    pipeline.register_modules(trajectory=result.head)
    save_pipeline_atomically(pipeline, out)
    log = {"data": args.data, "num_samples": len(data.train), "log": result.log, "held_out": scores}
    _write_json(out / "trajectory" / "training_log.json", log, indent=None)
    print(f"wrote {out} (with its trajectory head)")


# ---------------------------------------------------------------------------------------------------- evaluate


def cmd_evaluate_world(args: argparse.Namespace) -> None:
    from .evaluation.standard import format_results
    from .evaluation.world_benchmark import DEFAULT_TASKS, evaluate_world

    pipeline = _load_sampling_pipeline(args)
    pipeline.set_progress_bar_config(disable=True)
    per_sample: list[dict] = []
    results = evaluate_world(
        pipeline,
        num_samples=args.num_samples,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_frames=args.num_frames,
        resolution=args.resolution,
        seed=args.seed,
        tasks=tuple(args.tasks.split(",")) if args.tasks else DEFAULT_TASKS,
        preview_path=args.preview,
        first_sample=args.first_sample,
        per_sample=per_sample,
        subject_input=args.subject_input,
        trajectory=args.trajectory,
        truncate_prompt=args.truncate_prompt,
        user_style=args.user_style,
        captions=args.captions,
    )
    print("\n".join(format_results(results, {})))
    if args.out:
        settings = (
            "num_samples",
            "first_sample",
            "steps",
            "guidance_scale",
            "seed",
            "trajectory",
            "user_style",
            "captions",
            "scheduler",
        )
        record = {key: getattr(args, key) for key in settings}
        _write_json(args.out, {**record, "results": results, "per_sample": per_sample})
        print(f"wrote {args.out}")


def _score_videos(args: argparse.Namespace, benchmark: str, inputs: dict, kinds: Sequence[str], **options: Any) -> None:
    """Load the extractors of ``kinds``, score the videos with :func:`evaluate_videos`, print the table and write
    the ``--out`` record."""
    from .evaluation.standard import evaluate_videos, format_results, load_extractors

    paths = {kind: getattr(args, kind) for kind in kinds}
    outputs = "logits" if getattr(args, "c3d_logits", False) else "probabilities"
    extractors = load_extractors(paths, device=resolve_device(args.device), c3d_outputs=outputs)
    skipped: dict[str, str] = {}
    per_video: list[dict] = []
    results = evaluate_videos(
        extractors=extractors, progress=not args.no_progress, per_video=per_video, skipped=skipped, **options
    )
    print("\n".join(format_results(results, skipped)))
    if args.out:
        record = {"benchmark": benchmark, **inputs, "extractors": extractors.paths, "results": results}
        _write_json(args.out, {**record, "skipped": skipped, "per_video": per_video})
        print(f"wrote {args.out}")


def _check_json_output(path: str | None) -> None:
    if path is not None:
        from .media import check_text_output_path

        check_text_output_path(path)


def cmd_evaluate_folder(args: argparse.Namespace) -> None:
    from .evaluation.standard import FOLDER_METRICS, list_videos, read_folder

    _check_json_output(args.out)
    items = read_folder(args.videos)
    references: list[Path] = []
    if args.reference is not None:
        references = list_videos(args.reference, recursive=True)
        if not references:
            raise MagDiffInputError(f"--reference {args.reference!r} contains no video files.")
    inputs = {"videos": args.videos, "reference": args.reference, "num_frames": args.num_frames}
    _score_videos(
        args,
        "folder",
        inputs,
        ("clip", "dino", "i3d", "c3d"),
        items=items,
        metrics=FOLDER_METRICS,
        reference_videos=references,
        num_frames=args.num_frames,
        is_splits=args.is_splits,
        frame_pairs=args.frame_pairs,
        batch_size=args.batch_size,
    )


def cmd_evaluate_davis(args: argparse.Namespace) -> None:
    from .evaluation.standard import DAVIS_METRICS, read_davis

    _check_json_output(args.out)
    items = read_davis(args.davis, args.videos, resolution=args.resolution)
    inputs = {"videos": args.videos, "davis": args.davis, "resolution": args.resolution}
    _score_videos(args, "davis", inputs, ("clip",), items=items, metrics=DAVIS_METRICS, frame_pairs=args.frame_pairs)


def cmd_evaluate_dreambooth(args: argparse.Namespace) -> None:
    from .evaluation.standard import DREAMBOOTH_METRICS, read_dreambooth

    _check_json_output(args.out)
    items = read_dreambooth(args.dataset, args.videos)
    inputs = {"videos": args.videos, "dataset": args.dataset}
    _score_videos(args, "dreambooth", inputs, ("clip", "dino"), items=items, metrics=DREAMBOOTH_METRICS)


def cmd_app(args: argparse.Namespace) -> None:
    from .app import launch

    launch(args.model, host=args.host, port=args.port, device=args.device)


def cmd_world_preview(args: argparse.Namespace) -> None:
    from .data.world import render_preview

    path = render_preview(args.out, num_samples=args.num_samples, seed=args.seed)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------- the parser


def _add_model_arguments(parser: argparse.ArgumentParser, *, sampling: bool = True, scheduler: str = "default") -> None:
    """``--model`` and ``--device``; with ``sampling``, ``--dtype`` and ``--scheduler`` (default ``scheduler``)."""
    parser.add_argument("--model", default=None, help="MagDiff pipeline folder (default: the packaged default model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    if sampling:
        parser.add_argument("--dtype", choices=DTYPES, default="float32")
        schedulers = ("default", *SCHEDULERS)
        what = "the model's" if scheduler == "default" else f"{scheduler}; 'default' is the model's"
        parser.add_argument("--scheduler", choices=schedulers, default=scheduler, help=f"sampler (default: {what})")


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default=None, help="negative prompt (default: empty)")
    truncate_help = "cut a prompt longer than the text encoder's context (with a warning) instead of an error"
    parser.add_argument("--truncate-prompt", action="store_true", help=truncate_help)
    parser.add_argument("--num-frames", type=int, default=None, help="frames to generate (default 8)")
    context_help = (
        "frames denoised at once; longer videos go in overlapping windows of this length (default: the clip length "
        "the model was trained on)"
    )
    parser.add_argument("--context-length", type=int, default=None, help=context_help)
    stride_help = "frames between the starts of two windows (default: half the window)"
    parser.add_argument("--context-stride", type=int, default=None, help=stride_help)
    parser.add_argument("--height", type=int, default=None, help="video height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="video width in pixels (default: the model's)")
    steps_help = "denoising steps (default: the model's, which the default model's folder names; else 50)"
    parser.add_argument("--steps", type=int, default=None, help=steps_help)
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance scale (default 7.5)")
    guidance_help = "optional subject guidance scale (default: off)"
    parser.add_argument("--image-guidance-scale", type=float, default=None, help=guidance_help)
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    segmenter_help = "segmenter where no mask is given: grabcut (default), background-difference or transformers"
    parser.add_argument("--segmenter", default=None, help=segmenter_help)
    model_help = "local transformers image-segmentation model folder, for --segmenter transformers"
    parser.add_argument("--segmenter-model", default=None, metavar="DIR", help=model_help)
    parser.add_argument("--fps", type=int, default=8, help="frames per second of the written video")
    parser.add_argument("--out", required=True, help="output video, .mp4 (H.264) or .gif")


def _add_standard_parser(
    targets: argparse._SubParsersAction, name: str, summary: str, layout: str, kinds: Sequence[str]
) -> argparse.ArgumentParser:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = targets.add_parser(name, help=summary, description=layout, formatter_class=formatter)
    parser.add_argument("--videos", required=True, metavar="DIR", help="folder of the videos to score (see above)")
    for kind in kinds:
        metavar = "DIR" if kind in ("clip", "dino") else "FILE"
        parser.add_argument(f"--{kind}", default=None, metavar=metavar, help=EXTRACTOR_HELP[kind])
    parser.add_argument("--out", default=None, metavar="JSON", help="write results, skipped metrics, per-video scores")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _add_evaluate_parsers(targets: argparse._SubParsersAction) -> None:
    world = targets.add_parser("world", help="the world benchmark, scored exactly by the oracle")
    _add_model_arguments(world, scheduler="ddim")  # the benchmark's protocol: 25 DDIM steps, whatever the model's
    world.add_argument("--num-samples", type=int, default=200)
    world.add_argument("--first-sample", type=int, default=0, help="first held-out clip (to split a run in shards)")
    world.add_argument("--steps", type=int, default=25)
    world.add_argument("--num-frames", type=int, default=8, help="frames of the world clips (the model's own)")
    world.add_argument("--resolution", type=int, default=64, help="size of the world clips in pixels")
    world.add_argument("--guidance-scale", type=float, default=7.5)
    world.add_argument("--seed", type=int, default=0)
    tasks_help = (
        "comma-separated, from generation,empty_subject,editing,editing_background,editing_inverted,editing_blend,"
        "editing_background_blend (default: the first four)"
    )
    world.add_argument("--tasks", default=None, help=tasks_help)
    user_style_help = "also generate from this many held-out user-style subjects (looks the world never makes)"
    world.add_argument("--user-style", type=int, default=0, metavar="N", help=user_style_help)
    truncate_help = "cut captions longer than the model's text context (a warning each) instead of stopping"
    world.add_argument("--truncate-prompt", action="store_true", help=truncate_help)
    subject_help = (
        "generation's subject: the cut-out (default) or the whole first frame (models trained on uncut subjects)"
    )
    world.add_argument("--subject-input", choices=("segmented", "whole"), default="segmented", help=subject_help)
    trajectory_help = "generation along the model's trajectory head (auto, default) or the paper's slot 0 only (off)"
    world.add_argument("--trajectory", choices=("auto", "off"), default="auto", help=trajectory_help)
    captions_help = (
        "the world's own captions (default: paraphrases, subject words) or the canonical template with a generic "
        "subject noun (short enough for models with a 16-token context)"
    )
    world.add_argument("--captions", choices=("world", "canonical"), default="world", help=captions_help)
    world.add_argument("--preview", default=None, help="write a GIF of the first samples here")
    world.add_argument("--out", default=None, help="write the results as JSON here")
    world.set_defaults(func=cmd_evaluate_world)

    pairs_help = "frame pairs of frame consistency: consecutive (default) or all pairs"
    folder_kinds = ("clip", "dino", "i3d", "c3d")
    folder = _add_standard_parser(
        targets, "folder", "standard metrics of a folder of videos", FOLDER_LAYOUT, folder_kinds
    )
    folder.add_argument("--reference", default=None, metavar="DIR", help="folder of real videos for FVD")
    frames_help = "frames per clip for FVD and IS (default 16, the published protocol; other values are not comparable)"
    folder.add_argument("--num-frames", type=int, default=16, help=frames_help)
    folder.add_argument("--is-splits", type=int, default=10, help="splits of the Inception Score (default 10)")
    folder.add_argument("--c3d-logits", action="store_true", help="the --c3d network returns logits, not softmax")
    folder.add_argument("--frame-pairs", choices=("consecutive", "all"), default="consecutive", help=pairs_help)
    folder.add_argument("--batch-size", type=int, default=8, help="clips per I3D/C3D batch (default 8)")
    folder.set_defaults(func=cmd_evaluate_folder)

    summary = "textual alignment and frame consistency of DAVIS edits"
    davis = _add_standard_parser(targets, "davis", summary, DAVIS_LAYOUT, ("clip",))
    davis.add_argument("--davis", required=True, metavar="DIR", help="the DAVIS folder (JPEGImages/, Annotations/)")
    davis.add_argument("--resolution", default="480p", help="DAVIS resolution folder (default 480p)")
    davis.add_argument("--frame-pairs", choices=("consecutive", "all"), default="consecutive", help=pairs_help)
    davis.set_defaults(func=cmd_evaluate_davis)

    summary = "DINO, CLIP-I and CLIP-T of DreamBooth subject videos"
    dreambooth = _add_standard_parser(targets, "dreambooth", summary, DREAMBOOTH_LAYOUT, ("clip", "dino"))
    dreambooth.add_argument("--dataset", required=True, metavar="DIR", help="the DreamBooth dataset folder")
    dreambooth.set_defaults(func=cmd_evaluate_dreambooth)


#: Subcommands whose parsers are written beside their code, in modules that import torch and the video libraries:
#: name -> (module, the function that adds the parser, the summary ``magdiff --help`` lists for it).
DATA_COMMANDS = {
    "segment-dataset": (
        "magdiff.data.manifest",
        "add_segment_dataset_parser",
        "compute per-frame subject masks for every video of a manifest",
    ),
    "make-shards": (
        "magdiff.data.shards",
        "add_make_shards_parser",
        "pack the videos, captions and masks of a manifest into WebDataset tar shards",
    ),
}


def _add_data_parsers(commands: argparse._SubParsersAction, command: str | None) -> None:
    """The :data:`DATA_COMMANDS`: whole for ``command`` (all of them for ``None``), only listed for the others, so
    that ``magdiff --help`` and the other commands do not import their modules."""
    for name, (module, function, summary) in DATA_COMMANDS.items():
        if command is None or command == name:
            getattr(importlib.import_module(module), function)(commands)
        else:
            commands.add_parser(name, help=summary)


def command_of(argv: Sequence[str]) -> str:
    """The subcommand named in ``argv`` (the first word that is not an option; ``""`` for none)."""
    return next((word for word in argv if not word.startswith("-")), "")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``magdiff`` parser. With ``command`` (the subcommand about to be parsed, see :func:`command_of`), the
    :data:`DATA_COMMANDS` other than it are only listed, not built, and their modules are not imported."""
    parser = argparse.ArgumentParser(prog="magdiff", description="MagDiff video generation and editing.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="text + subject image -> video")
    subject_help = "subject image: PNG with alpha, or RGB with --subject-mask, or RGB alone (segmented)"
    generate.add_argument("--subject", required=True, help=subject_help)
    generate.add_argument("--subject-mask", default=None, help="mask image of the subject (white = subject)")
    trajectory_help = (
        "where the subject goes: auto (the model's trajectory head reads the prompt; default), off (the paper's "
        "slot-0-only generation), or [[dx, dy], ...] pixels per frame, inline or in a JSON file"
    )
    generate.add_argument("--trajectory", default="auto", help=trajectory_help)
    _add_sampling_arguments(generate)
    generate.set_defaults(func=cmd_generate)

    edit = commands.add_parser("edit", help="source video + text -> edited video keeping the masked region")
    edit.add_argument("--video", required=True, help="source video (mp4, gif, ... or a folder of frames)")
    masks_help = "folder of per-frame mask PNGs, or a mask video (default: segment every frame)"
    edit.add_argument("--masks", default=None, help=masks_help)
    keep_help = "keep the masked subject (change the scene) or the scene (change the subject)"
    edit.add_argument("--keep", choices=("subject", "background"), default="subject", help=keep_help)
    invert_help = (
        "start from the DDIM inversion of the source video instead of noise (motion and layout follow it more "
        "closely; samples with DDIM, built from the model's scheduler config when --scheduler is default)"
    )
    edit.add_argument("--invert", action="store_true", help=invert_help)
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
    minutes_help = "stop after this many minutes of training, checkpointed and exported (max_minutes)"
    train_parser.add_argument("--max-minutes", type=float, default=None, help=minutes_help)
    train_parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    train_parser.add_argument("--no-progress", action="store_true")
    prepare_help = "only build the cache of encoded clips (before a multi-process launch)"
    train_parser.add_argument("--prepare-only", action="store_true", help=prepare_help)
    plan_help = "print the parameters and the estimated peak memory per GPU of the config, then stop"
    train_parser.add_argument("--plan", action="store_true", help=plan_help)
    train_parser.add_argument("--gpu-memory", default=None, help="with --plan: GPU size, e.g. 24GB (largest batch)")
    train_parser.add_argument("--num-gpus", type=int, default=1, help="with --plan: GPUs the run shards over")
    train_parser.add_argument("--zero-stage", type=int, default=0, help="with --plan: ZeRO stage 0-3 (3 = FSDP)")
    train_parser.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("evaluate", help="score a model or a folder of videos")
    _add_evaluate_parsers(evaluate.add_subparsers(dest="target", required=True))

    _add_data_parsers(commands, command)

    trajectory = commands.add_parser(
        "train-trajectory", help="train a pipeline's trajectory head (prompt -> the subject's path) from clip masks"
    )
    _add_model_arguments(trajectory, sampling=False)
    trajectory.add_argument("--data", default="world", help="'world' or a manifest (JSONL/CSV) with per-frame masks")
    trajectory.add_argument("--num-samples", type=int, default=8000, help="training clips (default 8000)")
    trajectory.add_argument("--held-out", type=int, default=200, help="clips scored at the end (default 200)")
    trajectory.add_argument("--num-frames", type=int, default=8, help="frames per clip (default 8)")
    made_up_help = "world only: add this fraction of the clips again with made-up subject words (default 1.0)"
    trajectory.add_argument("--made-up-subjects", type=float, default=1.0, help=made_up_help)
    trajectory.add_argument("--steps", type=int, default=5000)
    trajectory.add_argument("--batch-size", type=int, default=64)
    trajectory.add_argument("--learning-rate", type=float, default=1e-3)
    trajectory.add_argument("--seed", type=int, default=0)
    trajectory.add_argument("--out", required=True, help="pipeline folder to write (the input one + the head)")
    trajectory.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    trajectory.set_defaults(func=cmd_train_trajectory)

    app = commands.add_parser("app", help="a web app for generation and editing (needs magdiff[app])")
    _add_model_arguments(app, sampling=False)
    app.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    app.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    app.set_defaults(func=cmd_app)

    preview = commands.add_parser("world-preview", help="render a few world samples to a PNG")
    preview.add_argument("--out", required=True)
    preview.add_argument("--num-samples", type=int, default=6)
    preview.add_argument("--seed", type=int, default=0)
    preview.set_defaults(func=cmd_world_preview)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, Docker, job schedulers), raised like Ctrl-C so every writer removes its partial
    output on the way out."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_of(argv)).parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        check_arguments(args)
        args.func(args)
    except MagDiffInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
