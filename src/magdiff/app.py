"""``magdiff app``: a Gradio app over :class:`~magdiff.pipelines.pipeline_magdiff.MagDiffPipeline` (``magdiff[app]``).

A thin shell, as the CLI is: every input goes through the same library functions as ``magdiff generate`` / ``magdiff
edit`` (so a bad input is the same message, shown as a ``gr.Error``), the pipeline is loaded once and shared, and
the queue runs one job at a time on it. Two tabs:

- **Generate**: a subject (RGBA, or RGB with an optional mask, or segmented), the cut-out actually used, the prompt
  and the sampling settings, the trajectory (auto / off / a path), the result as a playable, downloadable video;
- **Edit**: a source video with optional masks (a mask video; segmented when absent), the masks over the frames,
  keep subject / background, DDIM inversion on or off, the result beside the source.

Gradio never reports usage: analytics are switched off before it is imported.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import MagDiffInputError

if TYPE_CHECKING:
    import gradio as gr

    from .pipelines.pipeline_magdiff import MagDiffPipeline

__all__ = ["build_app", "launch", "write_examples"]

#: The README's examples: held-out world clips (index, motion, background) for generation, indices for editing.
GENERATION_EXAMPLES = [(3, "left", "purple"), (11, "up", "yellow"), (17, "right", "green")]
EDITING_EXAMPLES = [5, 23]
MAX_FRAMES = 128
_OFFLINE = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1"}


def _gradio() -> Any:
    for key, value in _OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        raise MagDiffInputError("the app needs Gradio: pip install 'magdiff[app]'.") from None
    return gradio


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((image.float().clamp(-1, 1).permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)


def _mask_overlay(frames: torch.Tensor, masks: torch.Tensor, count: int = 8) -> np.ndarray:
    """Up to ``count`` frames side by side, the masked region tinted green: (H, count * W, 3) uint8."""
    step = max(1, len(frames) // count)
    tiles = []
    for index in range(0, len(frames), step)[:count]:
        tile = _to_uint8(frames[index]).astype(np.float32)
        mask = masks[index, 0].numpy()[..., None] > 0.5
        tile = np.where(mask, 0.5 * tile + 0.5 * np.array([0, 255, 0], np.float32), 0.6 * tile)
        tiles.append(tile.round().astype(np.uint8))
    return np.concatenate(tiles, axis=1)


def write_examples(folder: str | os.PathLike[str]) -> tuple[list[list[Any]], list[list[Any]]]:
    """The README's examples as files in ``folder``: generation rows ``[subject.png, prompt]`` and editing rows
    ``[source.mp4, masks.gif, prompt]``, drawn from the held-out world clips they come from."""
    import PIL.Image

    from .data.world import EVAL_SEED_OFFSET, caption_for, make_sample, subject_cutout
    from .evaluation.world_benchmark import edit_background
    from .media import save_video

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    generation = []
    for index, motion, background in GENERATION_EXAMPLES:
        sample = make_sample(EVAL_SEED_OFFSET + index, motion=motion)
        image, mask = subject_cutout(sample["frames"], sample["masks"])
        rgba = np.dstack([_to_uint8(image), (mask[0].numpy() * 255).astype(np.uint8)])
        path = out / f"subject_{index}.png"
        PIL.Image.fromarray(rgba, "RGBA").save(path)
        generation.append([str(path), caption_for(sample["meta"], background=background, canonical=True)])
    editing = []
    for index in EDITING_EXAMPLES:
        sample = make_sample(EVAL_SEED_OFFSET + index)
        source = save_video(sample["frames"], out / f"edit_source_{index}.mp4")
        masks = save_video(sample["masks"], out / f"edit_masks_{index}.gif")
        prompt = caption_for(sample["meta"], background=edit_background(sample["meta"], index), canonical=True)
        editing.append([str(source), str(masks), prompt])
    return generation, editing


class MagDiffApp:
    """The app's handlers over one loaded pipeline; each returns what the page shows, or raises ``gr.Error``."""

    def __init__(self, pipeline: MagDiffPipeline, output_dir: str | os.PathLike[str]) -> None:
        self.pipeline = pipeline
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def _out(self, stem: str) -> Path:
        self._count += 1
        return self.output_dir / f"{stem}_{os.getpid()}_{self._count}.mp4"

    # ------------------------------------------------------------------ generate

    def subject(self, subject: str | None, mask: str | None) -> tuple[Any, np.ndarray]:
        """The subject as the pipeline gets it (the same checks as ``magdiff generate``) and its cut-out."""
        from .cli_checks import check_input_file
        from .media import load_image, load_subject
        from .sda import cut_out

        if not subject:
            raise MagDiffInputError("upload a subject image first.")
        check_input_file(subject, "--subject")
        if mask:
            check_input_file(mask, "--subject-mask")
        size = self.pipeline.default_size
        loaded = load_subject(subject, mask_path=mask or None, size=size)
        if mask:  # the size and emptiness of the mask, as the CLI checks them
            load_subject(subject, mask_path=mask, size=load_image(subject).size[::-1])
        return loaded, _to_uint8(cut_out(loaded.image, loaded.mask))

    def preview_subject(self, subject: str | None, mask: str | None) -> np.ndarray | None:
        if not subject:
            return None
        return self._guard(lambda: self.subject(subject, mask)[1])

    def generate(
        self,
        subject: str | None,
        mask: str | None,
        prompt: str,
        negative_prompt: str,
        num_frames: float,
        steps: float,
        guidance_scale: float,
        seed: float,
        trajectory_mode: str,
        path: str,
        progress: Callable | None = None,
    ) -> tuple[np.ndarray, str]:
        from .media import load_trajectory

        def run() -> tuple[np.ndarray, str]:
            loaded, cutout = self.subject(subject, mask)
            trajectory = load_trajectory(path if trajectory_mode == "path" else trajectory_mode)
            video = self._run(
                progress,
                prompt=prompt,
                negative_prompt=negative_prompt or None,
                num_frames=int(num_frames),
                num_inference_steps=int(steps),
                guidance_scale=float(guidance_scale),
                seed=int(seed),
                subject_image=loaded.image,
                subject_mask=loaded.mask,
                trajectory=trajectory,
            )
            return cutout, video

        return self._guard(run)

    # ------------------------------------------------------------------ edit

    def source(self, video: str | None, masks: str | None) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """The source frames, their masks (the uploaded ones, or segmented as the pipeline would segment them) and
        the masks over the frames."""
        from .media import load_masks, load_video, probe_video
        from .segmentation import segment_video

        if not video:
            raise MagDiffInputError("upload a source video first.")
        info = probe_video(video)
        size = self.pipeline.default_size
        frames = load_video(video, size=size)
        loaded = None
        if masks:
            expected = (info.height, info.width)
            loaded = load_masks(masks, num_frames=len(frames), size=size, expected_size=expected)
        used = loaded if loaded is not None else segment_video(frames)
        return frames, used, _mask_overlay(frames, used)

    def preview_source(self, video: str | None, masks: str | None) -> np.ndarray | None:
        if not video:
            return None
        return self._guard(lambda: self.source(video, masks)[2])

    def edit(
        self,
        video: str | None,
        masks: str | None,
        prompt: str,
        keep: str,
        invert: bool,
        steps: float,
        guidance_scale: float,
        seed: float,
        progress: Callable | None = None,
    ) -> tuple[np.ndarray, str, str]:
        from .inversion import check_invertible
        from .media import save_video

        def run() -> tuple[np.ndarray, str, str]:
            frames, used, overlay = self.source(video, masks)  # segmented once, for the preview and the edit
            if invert:
                check_invertible(self.pipeline.scheduler)
            result = self._run(
                progress,
                prompt=prompt,
                num_frames=len(frames),
                num_inference_steps=int(steps),
                guidance_scale=float(guidance_scale),
                seed=int(seed),
                video=frames,
                video_masks=used,
                keep=keep,
                invert=bool(invert),
            )
            shown_source = str(save_video(frames, self._out("source")))
            return overlay, shown_source, result

        return self._guard(run)

    # ------------------------------------------------------------------ shared

    def _run(self, progress: Callable | None, seed: int, **inputs: Any) -> str:
        """One pipeline call, its steps reported to ``progress``; returns the written mp4."""
        from .media import save_video

        if not 0 <= seed < 2**63:
            raise MagDiffInputError(f"--seed {seed}: give an integer from 0 to 2**63 - 1.")
        if not str(inputs.get("prompt") or "").strip():
            raise MagDiffInputError("give a prompt: what the video should show.")

        def on_step(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
            if progress is not None:
                progress((step + 1, int(inputs["num_inference_steps"])), desc="denoising")
            return {}

        output = self.pipeline(
            generator=torch.Generator().manual_seed(seed),
            output_type="pt",
            callback_on_step_end=on_step,
            **inputs,
        )
        video = output.frames[0] * 2.0 - 1.0  # (F, 3, H, W) in [-1, 1]
        return str(save_video(video, self._out("result")))

    @staticmethod
    def _guard(function: Callable[[], Any]) -> Any:
        """Bad input -> ``gr.Error`` with the CLI's message (never a traceback); the app keeps serving."""
        gr = _gradio()
        try:
            return function()
        except MagDiffInputError as error:
            raise gr.Error(str(error), print_exception=False) from None


def build_app(pipeline: MagDiffPipeline, output_dir: str | os.PathLike[str] | None = None) -> gr.Blocks:
    """The Blocks app over ``pipeline`` (loaded by the caller, once)."""
    gr = _gradio()
    work = Path(output_dir or tempfile.mkdtemp(prefix="magdiff_app_"))
    app = MagDiffApp(pipeline, work / "outputs")
    generation_examples, editing_examples = write_examples(work / "examples")
    trajectory_help = "auto: the model's trajectory head reads the prompt; off: the paper's slot-0-only generation"

    with gr.Blocks(title="magdiff", analytics_enabled=False) as demo:
        gr.Markdown("# magdiff\nSubject-driven video generation and tuning-free video editing (MagDiff).")
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column():
                    subject = gr.Image(
                        type="filepath",
                        image_mode="RGBA",
                        format="png",
                        label="Subject (RGBA, or RGB)",
                        sources=["upload"],
                    )
                    subject_mask = gr.Image(
                        type="filepath",
                        image_mode="L",
                        format="png",
                        label="Subject mask (optional; white = subject)",
                        sources=["upload"],
                    )
                    cutout_label = "Cut-out used (segmented when there is no alpha or mask)"
                    cutout = gr.Image(label=cutout_label, interactive=False)
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", elem_id="generate-prompt")
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        frames = gr.Number(
                            8, label="Frames", precision=0, minimum=1, maximum=MAX_FRAMES, elem_id="generate-frames"
                        )
                        steps = gr.Number(25, label="Steps", precision=0, minimum=1, elem_id="generate-steps")
                        guidance = gr.Number(7.5, label="Guidance scale", minimum=0)
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                        random_seed = gr.Button("Random seed")
                    modes = ["auto", "off", "path"]
                    trajectory = gr.Radio(modes, value="auto", label="Trajectory", info=trajectory_help)
                    path = gr.Textbox(label="Path: [[dx, dy], ...] pixels per frame (with 'path')")
                    generate = gr.Button("Generate", variant="primary", elem_id="generate-button")
                with gr.Column():
                    result = gr.Video(label="Result", elem_id="generate-result", loop=True, autoplay=True)
            gr.Examples(generation_examples, inputs=[subject, prompt], label="Examples")
        with gr.Tab("Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    source = gr.File(label="Source video (mp4, gif, ...)", file_types=[".mp4", ".gif", ".webm", ".mov"])
                    masks = gr.File(label="Masks (optional mask video; segmented when absent)")
                    overlay = gr.Image(label="Masks over the frames", interactive=False)
                with gr.Column():
                    edit_prompt = gr.Textbox(label="Prompt", elem_id="edit-prompt")
                    keep = gr.Radio(["subject", "background"], value="subject", label="Keep")
                    invert = gr.Checkbox(False, label="Start from the DDIM inversion of the source")
                    with gr.Row():
                        edit_steps = gr.Number(25, label="Steps", precision=0, minimum=1, elem_id="edit-steps")
                        edit_guidance = gr.Number(7.5, label="Guidance scale", minimum=0)
                        edit_seed = gr.Number(0, label="Seed", precision=0, minimum=0)
                    edit = gr.Button("Edit", variant="primary", elem_id="edit-button")
            with gr.Row():
                shown_source = gr.Video(label="Source", interactive=False, loop=True)
                edited = gr.Video(label="Result", elem_id="edit-result", interactive=False, loop=True, autoplay=True)
            gr.Examples(editing_examples, inputs=[source, masks, edit_prompt], label="Examples")

        def generate_handler(
            subject: str | None,
            subject_mask: str | None,
            prompt: str,
            negative_prompt: str,
            num_frames: float,
            steps: float,
            guidance_scale: float,
            seed: float,
            trajectory_mode: str,
            path: str,
            progress: Any = gr.Progress(),  # noqa: B008 (how Gradio asks for a progress bar)
        ) -> tuple[np.ndarray, str]:
            values = (prompt, negative_prompt, num_frames, steps, guidance_scale, seed, trajectory_mode, path)
            return app.generate(subject, subject_mask, *values, progress=progress)

        def edit_handler(
            video: str | None,
            masks: str | None,
            prompt: str,
            keep: str,
            invert: bool,
            steps: float,
            guidance_scale: float,
            seed: float,
            progress: Any = gr.Progress(),  # noqa: B008
        ) -> tuple[np.ndarray, str, str]:
            return app.edit(video, masks, prompt, keep, invert, steps, guidance_scale, seed, progress=progress)

        generate_inputs = [subject, subject_mask, prompt, negative, frames, steps, guidance, seed, trajectory, path]
        generate.click(generate_handler, generate_inputs, [cutout, result], api_name="generate")
        subject.change(app.preview_subject, [subject, subject_mask], cutout, api_name="preview_subject")
        subject_mask.change(app.preview_subject, [subject, subject_mask], cutout, api_visibility="private")
        random_seed.click(lambda: random.randrange(2**31), None, seed, api_visibility="private")
        edit_inputs = [source, masks, edit_prompt, keep, invert, edit_steps, edit_guidance, edit_seed]
        edit.click(edit_handler, edit_inputs, [overlay, shown_source, edited], api_name="edit")
        source.change(app.preview_source, [source, masks], overlay, api_name="preview_source")
        masks.change(app.preview_source, [source, masks], overlay, api_visibility="private")
    demo.queue(default_concurrency_limit=1)  # one pipeline: jobs wait their turn, every user gets a result
    return demo


def launch(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str = "auto",
    prevent_thread_lock: bool = False,
) -> gr.Blocks:
    """Load the pipeline once and serve the app on ``host:port``."""
    _gradio()
    from .loading import load_pipeline

    pipeline = load_pipeline(model, device=device)
    pipeline.set_progress_bar_config(disable=True)
    demo = build_app(pipeline)
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=prevent_thread_lock,
        footer_links=["api"],
        ssr_mode=False,  # no Node server: one process
    )
    return demo
