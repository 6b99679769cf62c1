"""The ``magdiff`` command: a thin shell over the pipelines (parse, load, call, export).

    magdiff generate --subject cat.png --prompt "a cat moving left on a blue background" --out cat.gif
    magdiff edit --video dog.mp4 --masks dog_masks/ --prompt "a dog walking in the snow" --out snow.mp4
    magdiff assemble --base-model DIR_OR_ID --motion-adapter DIR_OR_ID --image-encoder DIR_OR_ID --out MODEL_DIR
    magdiff evaluate folder --videos DIR --clip CLIP_DIR --i3d i3d_torchscript.pt --reference REAL_DIR --out r.json

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


def load_pipeline(args: argparse.Namespace, **components: object):  # -> MagDiffPipeline
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
    pipeline = MagDiffPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True, **components)
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
    trajectory = _trajectory_option(args.trajectory)
    _run_and_save(pipeline, args, fmt, subject_image=subject.image, subject_mask=subject.mask, trajectory=trajectory)


def _trajectory_option(value: str):
    """``--trajectory``: 'auto', 'off', inline JSON ``[[dx, dy], ...]`` or a JSON file holding that list."""
    import json

    if value in ("auto", "off"):
        return value
    text = value
    if not value.lstrip().startswith("["):
        path = Path(value)
        if not path.is_file():
            raise MagDiffInputError(
                f"--trajectory {value!r} is neither 'auto', 'off', a JSON list [[dx, dy], ...] nor a JSON file."
            )
        text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MagDiffInputError(f"--trajectory is not valid JSON ({error}); give [[dx, dy], ...] in pixels.") from None


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
        num_frames=args.num_frames,
        resolution=args.resolution,
        seed=args.seed,
        tasks=tasks,
        preview_path=args.preview,
        first_sample=args.first_sample,
        per_sample=per_sample,
        subject_input=args.subject_input,
        trajectory=args.trajectory,
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
            "trajectory": args.trajectory,
            "results": results,
            "per_sample": per_sample,
        }
        write_text_atomically(args.out, json.dumps(record, indent=1))
        print(f"wrote {args.out}")


_EXTRACTOR_HELP = {
    "clip": "local CLIP model folder (CLIPModel + tokenizer + preprocessor files, e.g. a copy of "
    "openai/clip-vit-large-patch14): text alignment, frame consistency, CLIP-T, CLIP-I",
    "dino": "local DINO ViT folder (ViTModel/Dinov2Model + preprocessor_config.json, e.g. a copy of "
    "facebook/dino-vits16): DINO subject similarity",
    "i3d": "local TorchScript I3D file (StyleGAN-V's i3d_torchscript.pt, Kinetics-400): FVD",
    "c3d": "local TorchScript C3D file fine-tuned on UCF-101 (StyleGAN-V's c3d_ucf101.pt): video IS",
}

_LAYOUT_FOOTER = """
Extractors are read from local paths only (nothing is downloaded); a metric whose extractor is not given is
skipped with a note. Metadata paths are relative to the metadata file's folder (or absolute); unknown keys are
ignored. See docs/metrics.md for the definitions and protocols.
"""

_FOLDER_HELP = (
    """Score a folder of generated videos with the standard metrics.

Layout:
  VIDEOS/metadata.jsonl (or prompts.jsonl), one JSON object per line:
    {"video": "cat_000.mp4", "prompt": "a cat walking on the beach",
     "subject": "subjects/cat.png", "reference": "real/cat_000.mp4"}
  video (or file_name): a video file or frame folder (required)
  prompt: the text it was made from (text alignment, CLIP-T; optional)
  subject: an image, a folder of images, or a list of them (CLIP-I, DINO; optional)
  reference: a real video for the FVD reference set when --reference is not given (optional)
  Without a metadata file every video file directly inside VIDEOS is scored (no prompts).
  --reference DIR: every video file under DIR (recursively) is a real video for FVD.
"""
    + _LAYOUT_FOOTER
)

_DAVIS_HELP = (
    """Score edited DAVIS sequences: textual alignment, frame consistency (CLIP, x100) and the
error inside the kept region.

Layout:
  DAVIS/JPEGImages/480p/<sequence>/00000.jpg ...   (the DAVIS release: --davis DAVIS)
  DAVIS/Annotations/480p/<sequence>/00000.png ...  (optional: the kept-region error)
  VIDEOS/metadata.jsonl, one JSON object per edited video:
    {"video": "blackswan_snow.mp4", "sequence": "blackswan",
     "prompt": "a swan swimming in the snow", "keep": "subject"}
  keep: subject (default: the annotated object was kept) or background.
  Edited frame i is compared with source frame i (what `magdiff edit` produces).
"""
    + _LAYOUT_FOOTER
)

_DREAMBOOTH_HELP = (
    """Score videos of DreamBooth subjects: DINO, CLIP-I, CLIP-T (cosines, not x100).

Layout:
  DATASET/<subject>/*.jpg        (the DreamBooth dataset folder: --dataset DATASET)
  VIDEOS/metadata.jsonl, one JSON object per video:
    {"video": "dog6_00.mp4", "subject": "dog6", "prompt": "a dog swimming in a pool"}
  Each frame is compared with every image of its subject; means over frames, then over videos.
"""
    + _LAYOUT_FOOTER
)


def _check_json_output(path: str | None) -> None:
    if path is None:
        return
    out = Path(path).expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise MagDiffInputError(f"the output folder {str(parent)!r} for --out {str(out)!r} does not exist.")
    if out.is_dir():
        raise MagDiffInputError(f"--out {str(out)!r} is an existing folder; give a file name.")


def _check_extractor_paths(args: argparse.Namespace, kinds: Sequence[str]) -> None:
    """Fail on a missing extractor path before any model is loaded."""
    for kind in kinds:
        path = getattr(args, kind)
        if path is not None and not Path(path).expanduser().exists():
            what = {
                "clip": "folder of a CLIP model",
                "dino": "folder of a DINO ViT",
                "i3d": "TorchScript file of the I3D network",
                "c3d": "TorchScript file of the C3D network",
            }[kind]
            raise MagDiffInputError(f"--{kind} {path!r} does not exist; give the local {what}.")


def _load_extractors(args: argparse.Namespace, kinds: Sequence[str]):  # -> Extractors
    from transformers.utils import logging as transformers_logging

    from .evaluation.metrics import C3DClassifier, ClipEmbedder, DinoEmbedder, I3DFeatures
    from .evaluation.standard import Extractors

    _check_extractor_paths(args, kinds)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    device = _device(args.device)
    extractors = Extractors()
    if "clip" in kinds and args.clip:
        extractors.clip = ClipEmbedder.from_pretrained(args.clip, device=device)
    if "dino" in kinds and args.dino:
        extractors.dino = DinoEmbedder.from_pretrained(args.dino, device=device)
    if "i3d" in kinds and args.i3d:
        extractors.i3d = I3DFeatures.from_torchscript(args.i3d, device=device)
    if "c3d" in kinds and args.c3d:
        outputs = "logits" if args.c3d_logits else "probabilities"
        extractors.c3d = C3DClassifier.from_torchscript(args.c3d, device=device, outputs=outputs)
    extractors.paths = {kind: getattr(args, kind) for kind in kinds if getattr(args, kind)}
    return extractors


def _report(args: argparse.Namespace, benchmark: str, inputs: dict, extractors, **evaluate_kwargs) -> None:
    import json

    from .evaluation.standard import evaluate_videos

    skipped: dict[str, str] = {}
    per_video: list[dict] = []
    results = evaluate_videos(
        extractors=extractors,
        progress=not args.no_progress,
        per_video=per_video,
        skipped=skipped,
        **evaluate_kwargs,
    )
    width = max(len(key) for key in [*results, *skipped])
    for key, value in results.items():
        shown = str(int(value)) if key.startswith(("num_", "fvd_num_")) else f"{value:.4f}"
        print(f"{key:<{width}}  {shown}")
    for metric, reason in skipped.items():
        print(f"{metric:<{width}}  skipped: {reason}")
    if args.out:
        from .media import write_text_atomically

        record = {
            "benchmark": benchmark,
            **inputs,
            "extractors": extractors.paths,
            "results": results,
            "skipped": skipped,
            "per_video": per_video,
        }
        write_text_atomically(args.out, json.dumps(record, indent=1))
        print(f"wrote {args.out}")


def cmd_evaluate_folder(args: argparse.Namespace) -> None:
    from .evaluation.standard import FOLDER_METRICS, list_videos, read_folder

    _check_json_output(args.out)
    items = read_folder(args.videos)
    references: list[Path] = []
    if args.reference is not None:
        references = list_videos(args.reference, recursive=True)
        if not references:
            raise MagDiffInputError(f"--reference {args.reference!r} contains no video files.")
    extractors = _load_extractors(args, ("clip", "dino", "i3d", "c3d"))
    inputs = {"videos": args.videos, "reference": args.reference, "num_frames": args.num_frames}
    _report(
        args,
        "folder",
        inputs,
        extractors,
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
    extractors = _load_extractors(args, ("clip",))
    inputs = {"videos": args.videos, "davis": args.davis, "resolution": args.resolution}
    _report(args, "davis", inputs, extractors, items=items, metrics=DAVIS_METRICS, frame_pairs=args.frame_pairs)


def cmd_evaluate_dreambooth(args: argparse.Namespace) -> None:
    from .evaluation.standard import DREAMBOOTH_METRICS, read_dreambooth

    _check_json_output(args.out)
    items = read_dreambooth(args.dataset, args.videos)
    extractors = _load_extractors(args, ("clip", "dino"))
    inputs = {"videos": args.videos, "dataset": args.dataset}
    _report(args, "dreambooth", inputs, extractors, items=items, metrics=DREAMBOOTH_METRICS)


def _add_standard_arguments(parser: argparse.ArgumentParser, kinds: Sequence[str]) -> None:
    parser.add_argument("--videos", required=True, metavar="DIR", help="folder of the videos to score (see above)")
    for kind in kinds:
        metavar = "DIR" if kind in ("clip", "dino") else "FILE"
        parser.add_argument(f"--{kind}", default=None, metavar=metavar, help=_EXTRACTOR_HELP[kind])
    parser.add_argument("--out", default=None, metavar="JSON", help="write results, skipped metrics, per-video scores")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_standard_parsers(targets: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    pairs_help = "frame pairs of frame consistency: consecutive (default) or all pairs"

    folder = targets.add_parser(
        "folder", help="standard metrics of a folder of videos", description=_FOLDER_HELP, formatter_class=formatter
    )
    _add_standard_arguments(folder, ("clip", "dino", "i3d", "c3d"))
    folder.add_argument("--reference", default=None, metavar="DIR", help="folder of real videos for FVD")
    folder.add_argument(
        "--num-frames",
        type=int,
        default=16,
        help="frames per clip for FVD and IS (default 16, the published protocol; other values are not comparable)",
    )
    folder.add_argument("--is-splits", type=int, default=10, help="splits of the Inception Score (default 10)")
    folder.add_argument("--c3d-logits", action="store_true", help="the --c3d network returns logits, not softmax")
    folder.add_argument("--frame-pairs", choices=("consecutive", "all"), default="consecutive", help=pairs_help)
    folder.add_argument("--batch-size", type=int, default=8, help="clips per I3D/C3D batch (default 8)")
    folder.set_defaults(func=cmd_evaluate_folder)

    davis = targets.add_parser(
        "davis",
        help="textual alignment and frame consistency of DAVIS edits",
        description=_DAVIS_HELP,
        formatter_class=formatter,
    )
    davis.add_argument("--davis", required=True, metavar="DIR", help="the DAVIS folder (JPEGImages/, Annotations/)")
    davis.add_argument("--resolution", default="480p", help="DAVIS resolution folder (default 480p)")
    davis.add_argument("--frame-pairs", choices=("consecutive", "all"), default="consecutive", help=pairs_help)
    _add_standard_arguments(davis, ("clip",))
    davis.set_defaults(func=cmd_evaluate_davis)

    dreambooth = targets.add_parser(
        "dreambooth",
        help="DINO, CLIP-I and CLIP-T of DreamBooth subject videos",
        description=_DREAMBOOTH_HELP,
        formatter_class=formatter,
    )
    dreambooth.add_argument("--dataset", required=True, metavar="DIR", help="the DreamBooth dataset folder")
    _add_standard_arguments(dreambooth, ("clip", "dino"))
    dreambooth.set_defaults(func=cmd_evaluate_dreambooth)


def _trajectory_data(args: argparse.Namespace, size: tuple[int, int], count: int, offset: int):
    """(captions, paths) of ``count`` clips from the world (seeds from ``offset``; with ``--made-up-subjects``, some
    again with made-up subject words) or from a manifest (entries from ``offset``)."""
    import torch

    from .training.trajectory import random_subject_words, subject_path

    captions: list[str] = []
    paths: list[torch.Tensor] = []
    if args.data == "world":
        from .data.world import WorldConfig, caption_for, make_sample

        world = WorldConfig(num_frames=args.num_frames)  # 64 px: paths are fractions of the frame, any size will do
        metas = []
        for i in range(count):
            sample = make_sample(offset + i, world)
            captions.append(sample["caption"])
            paths.append(subject_path(sample["masks"]))
            metas.append(sample["meta"])
        # The world has few subject words; made-up ones teach the head that they do not decide the path.
        generator = torch.Generator().manual_seed(offset)
        for i in range(round(args.made_up_subjects * count)):
            captions.append(caption_for({**metas[i], "subject_words": random_subject_words(generator)}))
            paths.append(paths[i])
    else:
        from .data.manifest import ManifestDataset

        dataset = ManifestDataset(args.data, num_frames=args.num_frames, size=size)
        for i in range(offset, min(len(dataset), offset + count)):
            sample = dataset[i]
            captions.append(sample["caption"])
            paths.append(subject_path(sample["masks"]))
    if not captions:
        raise MagDiffInputError(f"No clips to train the trajectory head on in {args.data!r} (from clip {offset}).")
    return captions, torch.stack(paths)


def cmd_train_trajectory(args: argparse.Namespace) -> None:
    import json

    from .data.world import EVAL_SEED_OFFSET, TRAIN_SEED_OFFSET
    from .media import write_text_atomically
    from .pipelines.assembly import save_pipeline_atomically
    from .training.trajectory import evaluate_trajectory_head, train_trajectory_head

    out = Path(args.out)
    if out.exists() and not args.overwrite and out.resolve() != Path(resolve_model(args.model)).resolve():
        raise MagDiffInputError(f"{out} exists; pass --overwrite to replace it.")
    args.scheduler, args.dtype = "default", "float32"
    pipeline = load_pipeline(args, trajectory=None)  # a head already there is replaced, whatever its shape
    pipeline.set_progress_bar_config(disable=True)
    size = pipeline.default_size
    if args.data == "world":
        captions, paths = _trajectory_data(args, size, args.num_samples, TRAIN_SEED_OFFSET)
        held_captions, held_paths = _trajectory_data(args, size, args.held_out, EVAL_SEED_OFFSET)
        held_out = {
            "world eval split": slice(0, args.held_out),
            "same, made-up subject words": slice(args.held_out, None),
        }
    else:
        captions, paths = _trajectory_data(args, size, args.num_samples, 0)
        held_captions, held_paths = captions, paths
        held_out = {"first training clips": slice(0, args.held_out)}
    print(f"trajectory head: {len(captions)} clips from {args.data}, {args.steps} steps")
    result = train_trajectory_head(
        pipeline,
        captions,
        paths,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        on_log=lambda record: print(f"step {record['step']:>6}  loss {record['loss']:.6f}  {record['seconds']:.0f} s"),
    )
    scores: dict[str, dict[str, float]] = {}
    for name, part in held_out.items():
        if not held_captions[part]:
            continue
        figures = evaluate_trajectory_head(pipeline, result.head, held_captions[part], held_paths[part])
        scores[name] = figures
        print(f"held out ({name}): " + ", ".join(f"{key} {value:.4f}" for key, value in figures.items()))
    pipeline.register_modules(trajectory=result.head)
    save_pipeline_atomically(pipeline, out)
    write_text_atomically(
        out / "trajectory" / "training_log.json",
        json.dumps({"data": args.data, "num_samples": len(captions), "log": result.log, "held_out": scores}),
    )
    print(f"wrote {out} (with its trajectory head)")


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
    generate.add_argument(
        "--trajectory",
        default="auto",
        help="where the subject goes: auto (the model's trajectory head reads the prompt; default), off (the "
        "paper's slot-0-only generation), or [[dx, dy], ...] pixels per frame, inline or in a JSON file",
    )
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

    evaluate = commands.add_parser("evaluate", help="score a model or a folder of videos")
    targets = evaluate.add_subparsers(dest="target", required=True)
    world = targets.add_parser("world", help="the world benchmark, scored exactly by the oracle")
    world.add_argument("--model", default=None, help="MagDiff pipeline folder (default: the packaged model)")
    world.add_argument("--num-samples", type=int, default=200)
    world.add_argument("--first-sample", type=int, default=0, help="first held-out clip (to split a run in shards)")
    world.add_argument("--steps", type=int, default=25)
    world.add_argument("--num-frames", type=int, default=8, help="frames of the world clips (the model's own)")
    world.add_argument("--resolution", type=int, default=64, help="size of the world clips in pixels")
    world.add_argument("--guidance-scale", type=float, default=7.5)
    world.add_argument("--seed", type=int, default=0)
    world.add_argument(
        "--tasks",
        default=None,
        help="comma-separated, from generation,empty_subject,editing,editing_inverted (default: the first three)",
    )
    world.add_argument(
        "--subject-input",
        choices=("segmented", "whole"),
        default="segmented",
        help="generation's subject: the cut-out (default) or the whole first frame (models trained on uncut subjects)",
    )
    world.add_argument(
        "--trajectory",
        choices=("auto", "off"),
        default="auto",
        help="generation along the model's trajectory head (auto, default) or the paper's slot 0 only (off)",
    )
    world.add_argument("--preview", default=None, help="write a GIF of the first samples here")
    world.add_argument("--out", default=None, help="write the results as JSON here")
    world.add_argument("--device", default="auto")
    world.add_argument("--dtype", choices=DTYPES, default="float32")
    world.add_argument("--scheduler", choices=SCHEDULERS, default="default")
    world.set_defaults(func=cmd_evaluate_world)
    _add_standard_parsers(targets)

    from .data.manifest import add_segment_dataset_parser

    add_segment_dataset_parser(commands)

    trajectory = commands.add_parser(
        "train-trajectory", help="train a pipeline's trajectory head (prompt -> the subject's path) from clip masks"
    )
    trajectory.add_argument("--model", default=None, help="MagDiff pipeline folder (default: the packaged model)")
    trajectory.add_argument("--data", default="world", help="'world' or a manifest (JSONL/CSV) with per-frame masks")
    trajectory.add_argument("--num-samples", type=int, default=8000, help="training clips (default 8000)")
    trajectory.add_argument("--held-out", type=int, default=200, help="clips scored at the end (default 200)")
    trajectory.add_argument("--num-frames", type=int, default=8, help="frames per clip (default 8)")
    trajectory.add_argument(
        "--made-up-subjects",
        type=float,
        default=1.0,
        help="world only: add this fraction of the clips again with made-up subject words (default 1.0)",
    )
    trajectory.add_argument("--steps", type=int, default=5000)
    trajectory.add_argument("--batch-size", type=int, default=64)
    trajectory.add_argument("--learning-rate", type=float, default=1e-3)
    trajectory.add_argument("--seed", type=int, default=0)
    trajectory.add_argument("--device", default="auto")
    trajectory.add_argument("--out", required=True, help="pipeline folder to write (the input one + the head)")
    trajectory.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    trajectory.set_defaults(func=cmd_train_trajectory)

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
