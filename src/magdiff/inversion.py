"""Deterministic DDIM inversion: clean latents -> the noise that DDIM sampling maps back to them.

Sampling with :class:`~diffusers.DDIMScheduler` (``eta=0``) walks the timesteps ``t_n > ... > t_1`` and maps
``x_t`` to ``x_prev`` with the model's prediction at ``(x_t, t)``. Inversion walks the same pairs upwards, from the
clean latents at the level of the last sampling step to ``x_{t_n}``, using the prediction at ``(x_prev, t)``.
When the predicted noise does not depend on the sample (a fixed noise prediction, in either parameterisation), the
two walks are exact inverses; with a real model the round trip is close because consecutive samples are close
(Song et al. 2021, sec. 4.3; Mokady et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler

from .errors import MagDiffInputError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_fn(sample, timestep) -> model output`` in the scheduler's ``prediction_type``."""


def check_invertible(scheduler) -> DDIMScheduler:
    """Inversion is defined here for DDIM; anything else gets one clear error."""
    if not isinstance(scheduler, DDIMScheduler):
        raise MagDiffInputError(
            f"Inversion needs the DDIM scheduler, but the pipeline uses {type(scheduler).__name__}; "
            "load it with DDIMScheduler (CLI: --scheduler ddim)."
        )
    if scheduler.config.get("thresholding", False) or scheduler.config.get("clip_sample", False):
        raise MagDiffInputError("Inversion needs a DDIM scheduler without clip_sample or thresholding.")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise MagDiffInputError(
            f"Inversion supports epsilon and v_prediction models, not {scheduler.config.prediction_type!r}."
        )
    return scheduler


def predicted_noise(
    output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The noise a model output means, read as DDIM reads it: at the cumulative alpha of the timestep the model was
    given, whatever sample it saw."""
    if prediction_type == "epsilon":
        return output
    return alpha.sqrt() * output + (1 - alpha).sqrt() * sample  # v_prediction


@torch.no_grad()
def ddim_invert(
    latents: torch.Tensor,
    model_fn: ModelFn,
    scheduler: DDIMScheduler,
    num_inference_steps: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Invert clean ``latents`` into the starting noise of a ``num_inference_steps`` DDIM sampling run.

    ``scheduler`` is the sampling scheduler; its timesteps are set here to ``num_inference_steps`` (sampling must use
    the same number). Returns a tensor shaped like ``latents``, to be passed as the sampler's initial ``latents``.
    """
    scheduler = check_invertible(scheduler)
    if num_inference_steps < 1:
        raise MagDiffInputError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}.")
    scheduler.set_timesteps(num_inference_steps, device=device)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(device=latents.device, dtype=torch.float64)
    final_alpha = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64, device=latents.device)
    prediction_type = scheduler.config.prediction_type
    sample = latents.to(torch.float64)
    for timestep in reversed(scheduler.timesteps):  # ascending: undo the last sampling step first
        t = int(timestep)
        previous = t - stride
        alpha_prev = alphas[previous] if previous >= 0 else final_alpha
        alpha_t = alphas[t]
        output = model_fn(sample.to(latents.dtype), timestep).to(torch.float64)
        # The model saw (x_prev, t): take the noise it predicts, then apply the DDIM update in the other direction.
        noise = predicted_noise(output, sample, alpha_t, prediction_type)
        clean = (sample - (1 - alpha_prev).sqrt() * noise) / alpha_prev.sqrt()
        sample = alpha_t.sqrt() * clean + (1 - alpha_t).sqrt() * noise
    return sample.to(latents.dtype)
