"""The standard metrics of the video generation and editing literature, as pure functions over features.

Every metric is a small function over features (embeddings, activations, class probabilities); the networks that
produce the features are injected and always load from LOCAL paths (nothing is ever downloaded):

==========================  ===============================================  ==========================================
metric                      definition                                       features from
==========================  ===============================================  ==========================================
text alignment              mean over frames of ``100 cos(image_f, text)``   CLIP (:class:`ClipEmbedder`)
frame consistency           mean of ``100 cos(image_f, image_f+1)``          CLIP
CLIP-T                      text alignment / 100 (DreamBooth's convention)   CLIP
CLIP-I                      mean of ``cos(image_f, subject_r)``              CLIP
DINO                        mean of ``cos(cls_f, cls_r)``                    DINO ViT (:class:`DinoEmbedder`)
FVD                         Frechet distance of I3D features                 TorchScript I3D (:class:`I3DFeatures`)
video IS                    ``exp E_x KL(p(y|x) || p(y))``                   TorchScript C3D (:class:`C3DClassifier`)
==========================  ===============================================  ==========================================

Videos follow magdiff's convention: float ``(F, 3, H, W)`` tensors in ``[-1, 1]`` (what
:func:`magdiff.media.load_video` returns). See ``docs/metrics.md`` for the protocols and how the numbers relate to
published tables.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from magdiff.errors import MagDiffInputError
from magdiff.media import tensor_to_uint8

__all__ = [
    "FVD_NUM_FRAMES",
    "FVD_SIZE",
    "IS_NUM_FRAMES",
    "IS_SPLITS",
    "C3DClassifier",
    "ClipEmbedder",
    "DinoEmbedder",
    "FeatureAccumulator",
    "I3DFeatures",
    "extract_features",
    "feature_statistics",
    "frame_consistency",
    "frechet_distance",
    "frechet_video_distance",
    "fvd_clip",
    "inception_score",
    "is_clip",
    "load_torchscript",
    "subject_similarity",
    "text_alignment",
]

FVD_NUM_FRAMES = 16
"""Frames per clip for FVD (StyleGAN-V protocol)."""

FVD_SIZE = 224
"""Side of the square frames the I3D network sees."""

IS_NUM_FRAMES = 16
"""Frames per clip for the video Inception Score (C3D's input length)."""

IS_SPLITS = 10
"""Number of splits of the video Inception Score (the mean and the standard deviation over splits are reported)."""

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
"""Anything that maps a batch of clips to a ``(b, d)`` tensor of features or probabilities."""


# --------------------------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------------------------


def _matrix(values: Any, what: str) -> np.ndarray:
    """``values`` as a finite float64 ``(n, d)`` array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise MagDiffInputError(f"{what} must be a 2-D (samples, dimensions) array, got shape {array.shape}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise MagDiffInputError(f"{what} is empty (shape {array.shape}).")
    if not np.isfinite(array).all():
        raise MagDiffInputError(f"{what} contains NaN or infinite values; check the feature extractor and its input.")
    return array


def _unit_rows(values: Any, what: str) -> torch.Tensor:
    """``values`` as a float64 ``(n, d)`` tensor with rows scaled to unit length (a zero row is an error)."""
    matrix = torch.from_numpy(_matrix(values, what))
    norms = matrix.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise MagDiffInputError(f"{what} has an all-zero embedding, whose direction (and cosine) is undefined.")
    return matrix / norms


def _video(video: Any, what: str = "video") -> torch.Tensor:
    """A float ``(F, 3, H, W)`` video in [-1, 1] as a float32 CPU tensor (checked, not converted)."""
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[1] != 3 or not video.is_floating_point():
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise MagDiffInputError(f"{what} must be a float (F, 3, H, W) tensor in [-1, 1], got {shape}.")
    return video.detach().to("cpu", torch.float32)


# --------------------------------------------------------------------------------------------------------------------
# Frechet distance (FID / FVD)
# --------------------------------------------------------------------------------------------------------------------


def feature_statistics(features: Any, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a set of features.

    ``mu = mean_i x_i`` and ``sigma = sum_i (x_i - mu)(x_i - mu)^T / (n - ddof)`` over the ``n`` rows of
    ``features`` ``(n, d)``. ``ddof=0`` (the default) is the population covariance that StyleGAN-V's FVD uses;
    pytorch-fid and clean-fid use ``np.cov``, i.e. ``ddof=1`` (a relative difference of ``1/(n-1)`` in ``sigma``).

    Raises:
        MagDiffInputError: not a 2-D array, non-finite values, or fewer than two samples.
    """
    array = _matrix(features, "features")
    if ddof not in (0, 1):
        raise MagDiffInputError(f"ddof must be 0 or 1, got {ddof!r}.")
    count = array.shape[0]
    if count < 2:
        raise MagDiffInputError(
            f"a covariance needs at least 2 samples, got {count}; evaluate more videos (FVD is usually computed on "
            "2048 videos)."
        )
    mean = array.mean(axis=0)
    centred = array - mean
    return mean, centred.T @ centred / (count - ddof)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Frechet (2-Wasserstein) distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`` (Dowson & Landau 1982), the
    formula of FID (Heusel et al. 2017) and FVD (Unterthiner et al. 2018). The matrix square root is
    ``scipy.linalg.sqrtm``. When it is not finite (singular covariances, e.g. fewer samples than dimensions) both
    covariances are offset by ``eps * I`` and it is recomputed; an imaginary part left by rounding is dropped when
    its diagonal is below 1e-3. Tiny negative results from rounding are returned as 0.

    Raises:
        MagDiffInputError: shapes that do not match, non-finite input, or a square root with a large imaginary part.
    """
    try:
        import scipy.linalg
    except ImportError:  # pragma: no cover - scipy is in the metrics extra
        raise MagDiffInputError("the Frechet distance needs scipy: pip install 'magdiff[metrics]'.") from None
    mean1, mean2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mean1.ndim != 1 or mean1.shape != mean2.shape:
        raise MagDiffInputError(f"the means must be vectors of equal length, got shapes {mean1.shape}, {mean2.shape}.")
    dims = mean1.shape[0]
    if cov1.shape != (dims, dims) or cov2.shape != (dims, dims):
        raise MagDiffInputError(
            f"the covariances must be ({dims}, {dims}) for {dims}-dimensional means, got {cov1.shape}, {cov2.shape}."
        )
    if not all(np.isfinite(x).all() for x in (mean1, mean2, cov1, cov2)):
        raise MagDiffInputError("the means or covariances contain NaN or infinite values.")

    difference = mean1 - mean2
    root = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(root).all():
        offset = np.eye(dims) * eps
        root = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
    if np.iscomplexobj(root):
        largest = float(np.abs(np.diagonal(root).imag).max())
        if largest > 1e-3:
            raise MagDiffInputError(
                f"the square root of the covariance product has an imaginary part of {largest:.3g}: the covariances "
                "are numerically singular. Use more samples than feature dimensions (FVD: I3D has 400)."
            )
        root = root.real
    distance = float(difference @ difference + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(root))
    return max(distance, 0.0)  # a distance; rounding can leave -1e-12 for identical sets


def frechet_video_distance(generated_features: Any, reference_features: Any) -> float:
    """FVD from I3D features: :func:`frechet_distance` of the :func:`feature_statistics` of both sets."""
    return frechet_distance(*feature_statistics(generated_features), *feature_statistics(reference_features))


# --------------------------------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------------------------------


def inception_score(probabilities: Any, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) of class probabilities ``(n, k)``.

    The rows are cut, in order, into ``splits`` consecutive parts (part ``i`` = rows ``i n // splits`` to
    ``(i + 1) n // splits``). For each part, ``IS = exp(mean_x KL(p(y|x) || p(y)))`` with ``p(y)`` the mean of the
    part's rows and ``0 log 0 = 0``. Returns the mean and the (population) standard deviation over parts. IS lies in
    ``[1, k]``: 1 when every sample has the same prediction, ``k`` for confident predictions spread evenly.

    Raises:
        MagDiffInputError: rows that are not probability distributions (negative, or not summing to 1 within 1e-3;
            give softmax outputs, not logits) or fewer samples than splits.
    """
    probs = _matrix(probabilities, "class probabilities")
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise MagDiffInputError(f"splits must be a positive integer, got {splits!r}.")
    count = probs.shape[0]
    if count < splits:
        raise MagDiffInputError(
            f"the Inception Score with {splits} splits needs at least {splits} videos, got {count}."
        )
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise MagDiffInputError(
            "class probabilities must be non-negative and sum to 1 per row; the classifier seems to return logits "
            "(apply a softmax, or use C3DClassifier(..., outputs='logits'))."
        )
    scores = []
    for split in range(splits):
        part = probs[split * count // splits : (split + 1) * count // splits]
        marginal = part.mean(axis=0, keepdims=True)
        positive = part > 0  # where p(y|x) > 0, p(y) > 0 too
        log_ratio = np.log(np.where(positive, part, 1.0)) - np.log(np.where(positive, marginal, 1.0))
        kl = (np.where(positive, part * log_ratio, 0.0)).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------------------------------
# Embedding similarities (CLIP, DINO)
# --------------------------------------------------------------------------------------------------------------------


def text_alignment(frame_embeddings: Any, text_embedding: Any) -> float:
    """Text alignment of a video: ``100 * mean_f cos(image_f, text)``.

    ``frame_embeddings`` ``(F, d)``: CLIP image embeddings of the frames; ``text_embedding`` ``(d,)`` or ``(1, d)``:
    the CLIP text embedding of the prompt. This is the "textual alignment" of the DAVIS editing tables (x100, not
    clamped). torchmetrics' ``CLIPScore`` over the same (frame, prompt) pairs returns ``max(this, 0)`` (version 1.9
    clamps the mean at 0); DreamBooth's CLIP-T is this divided by 100.
    """
    frames = _unit_rows(frame_embeddings, "frame embeddings")
    text = _unit_rows(np.atleast_2d(_to_numpy(text_embedding)), "text embedding")
    if text.shape[0] != 1 or text.shape[1] != frames.shape[1]:
        raise MagDiffInputError(
            f"the text embedding must be one {frames.shape[1]}-dimensional vector like the frame embeddings, got shape "
            f"{tuple(text.shape)}."
        )
    return float(100.0 * (frames @ text[0]).mean())


def frame_consistency(frame_embeddings: Any, pairs: Literal["consecutive", "all"] = "consecutive") -> float:
    """Frame consistency of a video: ``100 * mean cos(image_f, image_g)`` of CLIP image embeddings ``(F, d)``.

    ``pairs="consecutive"`` averages over ``(f, f + 1)`` (the DAVIS tables' convention); ``pairs="all"`` over all
    ``F (F - 1) / 2`` pairs ``f < g`` (as the Tune-A-Video paper describes it). A static video scores 100.

    Raises:
        MagDiffInputError: fewer than two frames, or an unknown ``pairs``.
    """
    frames = _unit_rows(frame_embeddings, "frame embeddings")
    if frames.shape[0] < 2:
        raise MagDiffInputError(f"frame consistency needs at least 2 frames, got {frames.shape[0]}.")
    if pairs == "consecutive":
        cosines = (frames[:-1] * frames[1:]).sum(dim=1)
    elif pairs == "all":
        first, second = torch.triu_indices(frames.shape[0], frames.shape[0], offset=1)
        cosines = (frames[first] * frames[second]).sum(dim=1)
    else:
        raise MagDiffInputError(f"pairs must be 'consecutive' or 'all', got {pairs!r}.")
    return float(100.0 * cosines.mean())


def subject_similarity(frame_embeddings: Any, reference_embeddings: Any) -> float:
    """Subject similarity of a video (DreamBooth's CLIP-I and DINO): ``mean_{f, r} cos(image_f, reference_r)``.

    The mean over every pair of a frame ``(F, d)`` and a reference image of the subject ``(R, d)`` (DreamBooth
    averages over all pairs of generated and real images of the subject). Not scaled by 100.
    """
    frames = _unit_rows(frame_embeddings, "frame embeddings")
    references = _unit_rows(reference_embeddings, "reference embeddings")
    if references.shape[1] != frames.shape[1]:
        raise MagDiffInputError(
            f"frame and reference embeddings differ in size ({frames.shape[1]} vs {references.shape[1]}); embed both "
            "with the same model."
        )
    return float((frames @ references.T).mean())


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------------------------------------------------
# Image embedders (transformers models from local folders)
# --------------------------------------------------------------------------------------------------------------------


def _local_model_folder(path: str | os.PathLike[str], option: str, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise MagDiffInputError(f"{option} {str(folder)!r} does not exist; give the local folder of {what}.")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise MagDiffInputError(
            f"{option} {str(folder)!r} is not a model folder (no config.json); give the local folder of {what}, "
            "as written by save_pretrained or a Hugging Face snapshot."
        )
    return folder


def _model_type(folder: Path, option: str) -> str:
    try:
        return str(json.loads((folder / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError) as error:
        raise MagDiffInputError(f"{option}: cannot read {str(folder / 'config.json')!r} ({error}).") from error


def _images_uint8(images: Any) -> list[np.ndarray]:
    """A video/image batch as a list of uint8 ``(H, W, 3)`` arrays (what the Hugging Face processors expect)."""
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        return list(tensor_to_uint8(_video(images, "images")))
    arrays = [np.asarray(image) for image in images]
    for array in arrays:
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise MagDiffInputError(f"images must be uint8 (H, W, 3) arrays, got {array.dtype} {array.shape}.")
    return arrays


def _features_tensor(output: Any) -> torch.Tensor:
    """transformers < 5 returns the projected features as a tensor, >= 5 as an output's ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _embed_images(embedder: Any, images: Any, features: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``embedder.processor`` and ``features`` over ``images`` in batches of ``embedder.batch_size``."""
    arrays = _images_uint8(images)
    out = []
    for start in range(0, len(arrays), embedder.batch_size):
        pixels = embedder.processor(images=arrays[start : start + embedder.batch_size], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(embedder.device, embedder.model.dtype)
        out.append(features(pixel_values).float().cpu())
    return torch.cat(out)


class ClipEmbedder:
    """CLIP image and text embeddings from a transformers ``CLIPModel`` and its ``CLIPProcessor``.

    The frames go through the model's own processor (resize the shorter side, centre crop, normalise) as uint8
    images, exactly what torchmetrics' ``CLIPScore`` does; embeddings are the projected features
    (``get_image_features`` / ``get_text_features``), returned un-normalised as float32 CPU ``(n, d)`` tensors.
    Prompts longer than the text model's context are truncated.
    """

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], device: str | torch.device = "cpu", batch_size: int = 32
    ) -> ClipEmbedder:
        """Load a full CLIP model (vision + text towers, e.g. a local copy of ``openai/clip-vit-large-patch14``)
        and its processor files (tokenizer and ``preprocessor_config.json``) from a local folder; no download."""
        from transformers import CLIPModel, CLIPProcessor

        what = "a CLIP model (CLIPModel with its tokenizer and preprocessor files)"
        folder = _local_model_folder(path, "--clip", what)
        if _model_type(folder, "--clip") != "clip":
            raise MagDiffInputError(
                f"--clip {str(folder)!r} holds a {_model_type(folder, '--clip') or 'non-CLIP'} model; the CLIP metrics "
                "need a full CLIP model with both towers (a CLIP vision encoder alone has no text embeddings)."
            )
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise MagDiffInputError(
                f"--clip: cannot load a CLIP model and processor from {str(folder)!r} ({error})."
            ) from error
        return cls(model, processor, device=device, batch_size=batch_size)

    @torch.no_grad()
    def image_embeddings(self, images: Any) -> torch.Tensor:
        """Embeddings ``(n, d)`` of a float ``(F, 3, H, W)`` tensor in [-1, 1] or a list of uint8 ``(H, W, 3)``."""
        return _embed_images(
            self, images, lambda pixels: _features_tensor(self.model.get_image_features(pixel_values=pixels))
        )

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings ``(n, d)`` of prompts."""
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.processor(
            text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        output = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return _features_tensor(output).float().cpu()


class DinoEmbedder:
    """DINO image embeddings: the final-layer CLS token of a self-supervised ViT (``ViTModel``, e.g. a local copy of
    ``facebook/dino-vits16`` as in DreamBooth, or ``Dinov2Model``), after the model's own image processor.

    Returns float32 CPU ``(n, d)`` tensors (``last_hidden_state[:, 0]``, un-normalised).
    """

    def __init__(self, model: Any, processor: Any, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], device: str | torch.device = "cpu", batch_size: int = 32
    ) -> DinoEmbedder:
        """Load a ViT/DINOv2 model and its ``preprocessor_config.json`` from a local folder; no download."""
        from transformers import AutoImageProcessor, AutoModel, ViTModel

        folder = _local_model_folder(path, "--dino", "a DINO ViT (ViTModel or Dinov2Model)")
        model_type = _model_type(folder, "--dino")
        if model_type not in ("vit", "dinov2", "dinov2_with_registers"):
            raise MagDiffInputError(
                f"--dino {str(folder)!r} holds a {model_type or 'unknown'} model; give a ViT (e.g. "
                "facebook/dino-vits16) or DINOv2 model folder."
            )
        try:
            if model_type == "vit":  # DINO checkpoints have no pooler: do not build a random one
                model = ViTModel.from_pretrained(
                    folder, add_pooling_layer=False, local_files_only=True, use_safetensors=True
                )
            else:
                model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise MagDiffInputError(
                f"--dino: cannot load a model and image processor from {str(folder)!r} ({error})."
            ) from error
        return cls(model, processor, device=device, batch_size=batch_size)

    @torch.no_grad()
    def image_embeddings(self, images: Any) -> torch.Tensor:
        """CLS embeddings ``(n, d)`` of a float ``(F, 3, H, W)`` tensor in [-1, 1] or a list of uint8 images."""
        return _embed_images(self, images, lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])


# --------------------------------------------------------------------------------------------------------------------
# Video networks (TorchScript files): I3D for FVD, C3D for the video Inception Score
# --------------------------------------------------------------------------------------------------------------------


def load_torchscript(path: str | os.PathLike[str], option: str, device: str | torch.device = "cpu") -> Any:
    """Load a TorchScript module (``torch.jit.load``) from a local file, in eval mode on ``device``.

    Raises:
        MagDiffInputError: a missing path, a folder, or a file that is not TorchScript.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise MagDiffInputError(f"{option} {str(file)!r} does not exist; give the local TorchScript file (.pt).")
    if file.is_dir():
        raise MagDiffInputError(f"{option} {str(file)!r} is a folder; give the TorchScript file itself (.pt).")
    try:
        module = torch.jit.load(str(file), map_location=device)
    except (RuntimeError, ValueError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MagDiffInputError(
            f"{option} {str(file)!r} is not a TorchScript module ({first_line}); give a file saved with "
            "torch.jit.save (e.g. i3d_torchscript.pt / c3d_ucf101.pt)."
        ) from error
    return module.eval()


def _run(extractor: Callable[..., Any], batch: torch.Tensor, what: str, **kwargs: Any) -> torch.Tensor:
    """Call an extractor on a batch and check that it returns a ``(b, d)`` tensor; failures become input errors."""
    try:
        with torch.no_grad():
            output = extractor(batch, **kwargs)
    except (MagDiffInputError, torch.OutOfMemoryError):
        raise
    except (RuntimeError, TypeError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MagDiffInputError(
            f"the {what} network failed on a batch of shape {tuple(batch.shape)} ({first_line}); check that the file "
            f"is the expected {what} model."
        ) from error
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != batch.shape[0]:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise MagDiffInputError(
            f"the {what} network returned {shape} for a batch of {batch.shape[0]}; expected a (batch, dimensions) "
            "tensor."
        )
    return output.detach().float().cpu()


def _too_few_frames(video: torch.Tensor, num_frames: int, metric: str, what: str) -> None:
    if video.shape[0] < num_frames:
        raise MagDiffInputError(
            f"{what} has {video.shape[0]} frames but {metric} uses clips of {num_frames} frames; pass --num-frames "
            f"{video.shape[0]} (or fewer) to use shorter clips (the number is then not comparable with published "
            "tables), or evaluate longer videos."
        )


def fvd_clip(
    video: torch.Tensor, num_frames: int = FVD_NUM_FRAMES, size: int = FVD_SIZE, what: str = "a video"
) -> torch.Tensor:
    """The first ``num_frames`` frames of a video as the I3D input ``(3, num_frames, size, size)`` in [-1, 1].

    Frames are resized to ``size x size`` (bilinear, ``align_corners=False``, no antialiasing; non-square frames
    are stretched, as StyleGAN-V does), the values stay in [-1, 1].
    """
    frames = _video(video, what)
    _too_few_frames(frames, num_frames, "FVD", what)
    frames = F.interpolate(frames[:num_frames], size=(size, size), mode="bilinear", align_corners=False)
    return frames.clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()  # (3, T, size, size)


def is_clip(video: torch.Tensor, num_frames: int = IS_NUM_FRAMES, what: str = "a video") -> torch.Tensor:
    """The first ``num_frames`` frames of a video as the C3D input: uint8 ``(3, num_frames, H, W)`` in [0, 255]
    at the video's own size (StyleGAN-V's convention; the C3D TorchScript resizes and normalises internally)."""
    frames = _video(video, what)
    _too_few_frames(frames, num_frames, "the video Inception Score", what)
    return torch.from_numpy(tensor_to_uint8(frames[:num_frames])).permute(3, 0, 1, 2).contiguous()


class I3DFeatures:
    """FVD features from the TorchScript I3D of StyleGAN-V (``i3d_torchscript.pt``, Kinetics-400).

    Called on ``(b, 3, T, 224, 224)`` float clips in [-1, 1] (see :func:`fvd_clip`); runs
    ``detector(clips, rescale=False, resize=False, return_features=True)`` (the raw 400-d features before the
    softmax) and returns them as float32 CPU ``(b, 400)``.
    """

    def __init__(self, detector: Callable[..., torch.Tensor], device: str | torch.device = "cpu") -> None:
        self.detector = detector
        self.device = torch.device(device)

    @classmethod
    def from_torchscript(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> I3DFeatures:
        return cls(load_torchscript(path, "--i3d", device), device)

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        return _run(self.detector, clips.to(self.device), "I3D", rescale=False, resize=False, return_features=True)


class C3DClassifier:
    """Class probabilities from the TorchScript C3D fine-tuned on UCF-101 (StyleGAN-V's ``c3d_ucf101.pt``).

    Called on uint8 ``(b, 3, 16, H, W)`` clips (see :func:`is_clip`); runs ``detector(clips)``, which returns the
    101 class probabilities. ``outputs="logits"`` applies a softmax for classifiers that return logits.
    """

    def __init__(
        self,
        detector: Callable[[torch.Tensor], torch.Tensor],
        device: str | torch.device = "cpu",
        outputs: Literal["probabilities", "logits"] = "probabilities",
    ) -> None:
        if outputs not in ("probabilities", "logits"):
            raise MagDiffInputError(f"outputs must be 'probabilities' or 'logits', got {outputs!r}.")
        self.detector = detector
        self.device = torch.device(device)
        self.outputs = outputs

    @classmethod
    def from_torchscript(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        outputs: Literal["probabilities", "logits"] = "probabilities",
    ) -> C3DClassifier:
        return cls(load_torchscript(path, "--c3d", device), device, outputs)

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        output = _run(self.detector, clips.to(self.device), "C3D")
        return output.softmax(dim=1) if self.outputs == "logits" else output


class FeatureAccumulator:
    """Runs an extractor over clips as they come, in batches of up to ``batch_size`` (consecutive clips of equal
    shape are stacked), so that only one batch of clips is in memory at a time.

    ``extractor`` is any callable from a stacked batch ``(b, ...)`` to ``(b, d)``: :class:`I3DFeatures`,
    :class:`C3DClassifier`, or a plain ``nn.Module``.
    """

    def __init__(self, extractor: FeatureExtractor, batch_size: int = 8, what: str = "feature") -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MagDiffInputError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.extractor = extractor
        self.batch_size = batch_size
        self.what = what
        self._features: list[torch.Tensor] = []
        self._pending: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(f.shape[0] for f in self._features) + len(self._pending)

    def add(self, clip: torch.Tensor) -> None:
        """Queue one clip; runs the extractor when a batch is full (or the clip shape changes)."""
        if self._pending and clip.shape != self._pending[0].shape:
            self._flush()
        self._pending.append(clip)
        if len(self._pending) == self.batch_size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._features.append(_run(self.extractor, torch.stack(self._pending), self.what))
            self._pending.clear()

    def features(self) -> np.ndarray:
        """All features so far, float64 ``(n, d)`` (runs the last, partial batch)."""
        self._flush()
        if not self._features:
            raise MagDiffInputError(f"no clips to extract {self.what} features from.")
        dims = sorted({f.shape[1] for f in self._features})
        if len(dims) > 1:
            raise MagDiffInputError(f"the {self.what} network returned features of different sizes {dims}.")
        return torch.cat(self._features).double().numpy()


def extract_features(
    clips: Iterable[torch.Tensor], extractor: FeatureExtractor, batch_size: int = 8, what: str = "feature"
) -> np.ndarray:
    """Features ``(n, d)`` (float64) of clips, computed in batches (see :class:`FeatureAccumulator`)."""
    accumulator = FeatureAccumulator(extractor, batch_size, what)
    for clip in clips:
        accumulator.add(clip)
    return accumulator.features()
