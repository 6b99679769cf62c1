"""Training at scale: gradient checkpointing, accumulation, mixed precision, optimisers, the memory planner."""

from __future__ import annotations

import torch

from magdiff.tiny import TINY_IMAGE_HIDDEN, tiny_magdiff_pipeline


def _unet_inputs(frames: int = 4, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, frames, size, size, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    embeds = torch.randn(2, frames, 17, TINY_IMAGE_HIDDEN, generator=generator)
    latents = [torch.randn(2, 4, frames, s, s, generator=generator) for s in (size, size + 2, size + 4)]
    return sample, torch.tensor([10, 500]), text, embeds, latents


def _gradients(unet, inputs) -> dict[str, torch.Tensor]:
    sample, timesteps, text, embeds, latents = inputs
    unet.zero_grad(set_to_none=True)
    subject = unet.encode_subject(embeds, latents, tuple(sample.shape[-2:]))
    unet(sample, timesteps, text, subject=subject).sample.square().mean().backward()
    return {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_recomputes_every_block_and_gives_the_same_gradients():
    """Checkpointing recomputes each down/mid/up block (motion modules included) in the backward pass, and the
    gradients equal those without it within atol 1e-6, rtol 1e-5 (the same float ops, run twice)."""
    unet = tiny_magdiff_pipeline(seed=0).unet.train()
    inputs = _unet_inputs()
    plain = _gradients(unet, inputs)

    calls: dict[str, int] = {}
    blocks = {f"down.{i}": b for i, b in enumerate(unet.down_blocks)}
    blocks.update({f"up.{i}": b for i, b in enumerate(unet.up_blocks)}, mid=unet.mid_block)
    motion = {name: module for name, module in unet.named_modules() if name.endswith("motion_modules.0")}
    handles = [
        module.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls.get(key, 0) + 1))
        for key, module in {**blocks, **motion}.items()
    ]
    unet.enable_gradient_checkpointing()
    assert unet.is_gradient_checkpointing
    checkpointed = _gradients(unet, inputs)
    for handle in handles:
        handle.remove()

    assert motion and set(calls) == set(blocks) | set(motion)
    assert all(count == 2 for count in calls.values()), calls  # forward, then recomputed in the backward pass
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(unet.parameters()))
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, atol=1e-6, rtol=1e-5, msg=name)
    unet.disable_gradient_checkpointing()
    assert not unet.is_gradient_checkpointing
