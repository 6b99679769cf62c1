"""The U-Net's fast paths compute what the plain formulas compute.

APA layers take one set of text and image tokens per clip and share it among the clip's frames, and at inference
repeated subject slots are attended once with a log-count bias. Each is checked here against a reference written
plainly: tokens repeated per frame (``repeat_interleave``, what the U-Net used to pass), every slot attended, an
explicit softmax. Tolerances are float32 rounding (1e-5 absolute on activations of order 1).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import UNetMotionModel
from diffusers.models.attention_processor import Attention

from magdiff.models import APAAttnProcessor, MagDiffUNetModel
from magdiff.models.attention import merge_repeated_slots
from magdiff.models.unet import SubjectConditioning
from magdiff.tiny import TINY_IMAGE_HIDDEN, tiny_motion_adapter, tiny_stable_diffusion

TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def _plain_branch(attn: Attention, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, heads concatenated; all inputs (B, n, c) with one token set per row."""
    batch, length, inner = query.shape
    head_dim = inner // attn.heads
    query = query.view(batch, length, attn.heads, head_dim).transpose(1, 2)
    keys = keys.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    values = values.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    weights = torch.softmax(query @ keys.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    return (weights @ values).transpose(1, 2).reshape(batch, length, inner)


class PlainAPA(torch.nn.Module):
    """The APA formula with per-row token sets, reading the weights of an :class:`APAAttnProcessor`."""

    def __init__(self, apa: APAAttnProcessor) -> None:
        super().__init__()
        self.apa = apa

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        text, image = encoder_hidden_states[0], encoder_hidden_states[1]
        assert len(encoder_hidden_states) == 2 or encoder_hidden_states[2] is None
        rows = hidden_states.shape[0]
        assert text.shape[0] == rows and image.shape[0] == rows, "the reference takes one token set per row"
        query = attn.to_q(hidden_states)
        out = self.apa.a_txt * _plain_branch(attn, query, attn.to_k(text), attn.to_v(text))
        out = out + self.apa.a_img * _plain_branch(attn, query, self.apa.to_k_ip(image), self.apa.to_v_ip(image))
        assert not attn.residual_connection and attn.rescale_output_factor == 1
        return attn.to_out[0](out)


def _attention(seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(query_dim=32, cross_attention_dim=24, heads=4, dim_head=8).eval()


def _processor(seed: int = 0) -> APAAttnProcessor:
    torch.manual_seed(seed)
    processor = APAAttnProcessor(32, 24, a_img_init=1.5, a_txt_init=0.7)
    torch.nn.init.normal_(processor.to_k_ip.weight)
    torch.nn.init.normal_(processor.to_v_ip.weight)
    return processor


def _generation_tokens(batch: int, slots: int, per_slot: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Slot 0 filled, slots 1.. equal to one another (the empty slot), as the pipeline's generation mode."""
    generator = torch.Generator().manual_seed(seed)
    filled = torch.randn(batch, 1, per_slot, channels, generator=generator)
    empty = torch.randn(1, 1, per_slot, channels, generator=generator).expand(batch, slots - 1, -1, -1)
    return torch.cat([filled, empty], dim=1).flatten(1, 2)  # (b, S*n, c)


# ---------------------------------------------------------------------- the processor


def test_tokens_shared_by_a_clips_frames_equal_tokens_repeated_per_frame():
    attn, processor = _attention(), _processor()
    clips, frames = 2, 3
    hidden = torch.randn(clips * frames, 10, 32)
    text, image = torch.randn(clips, 6, 24), torch.randn(clips, 5, 24)
    shared = processor(attn, hidden, (text, image))
    repeated = PlainAPA(processor)(
        attn, hidden, (text.repeat_interleave(frames, 0), image.repeat_interleave(frames, 0))
    )
    torch.testing.assert_close(shared, repeated, **TOLERANCE)
    # and the per-frame form still works and agrees
    torch.testing.assert_close(
        processor(attn, hidden, (text.repeat_interleave(frames, 0), image.repeat_interleave(frames, 0))),
        repeated,
        **TOLERANCE,
    )


def test_shared_tokens_give_the_same_gradients():
    attn, processor = _attention(), _processor()
    hidden = torch.randn(6, 10, 32, requires_grad=True)
    text, image = torch.randn(2, 6, 24), torch.randn(2, 5, 24)

    def gradients(output):
        parameters = [hidden, processor.to_k_ip.weight, processor.a_img, processor.a_txt, attn.to_k.weight]
        return torch.autograd.grad(output.square().sum(), parameters)

    shared = gradients(processor(attn, hidden, (text, image)))
    repeated = gradients(
        PlainAPA(processor)(attn, hidden, (text.repeat_interleave(3, 0), image.repeat_interleave(3, 0)))
    )
    for ours, reference in zip(shared, repeated):  # float32 rounding, relative to the gradient's size
        torch.testing.assert_close(ours, reference, atol=1e-5 * float(reference.abs().max()), rtol=1e-4)


def test_merged_repeated_slots_attend_as_all_slots():
    attn, processor = _attention(), _processor()
    image = _generation_tokens(batch=2, slots=6, per_slot=4, channels=24)
    merged, bias = merge_repeated_slots(image, tokens_per_slot=4)
    assert merged.shape == (2, 8, 24)  # slot 0 and one empty slot
    torch.testing.assert_close(bias, torch.tensor([0.0] * 4 + [math.log(5)] * 4))
    hidden, text = torch.randn(2 * 3, 10, 32), torch.randn(2, 6, 24)
    fast = processor(attn, hidden, (text, merged, bias))
    plain = PlainAPA(processor)(attn, hidden, (text.repeat_interleave(3, 0), image.repeat_interleave(3, 0)))
    torch.testing.assert_close(fast, plain, **TOLERANCE)


def test_only_slots_equal_in_every_batch_row_are_merged():
    distinct = torch.randn(2, 3 * 4, 24)
    assert merge_repeated_slots(distinct, 4)[1] is None
    tokens = _generation_tokens(batch=2, slots=3, per_slot=4, channels=24).clone()
    tokens[1, 8:] += 1.0  # row 1's slot 2 differs from its slot 1: no slot repeats in both rows
    merged, bias = merge_repeated_slots(tokens, 4)
    assert bias is None and merged is tokens
    editing = torch.randn(1, 4, 4, 24)
    editing[:, 3] = editing[:, 1]  # slots 1 and 3 equal, 0 and 2 not
    merged, bias = merge_repeated_slots(editing.flatten(1, 2), 4)
    torch.testing.assert_close(merged, editing[:, :3].flatten(1, 2))
    torch.testing.assert_close(bias, torch.tensor([0.0] * 4 + [math.log(2)] * 4 + [0.0] * 4))


# ---------------------------------------------------------------------- the U-Net


@pytest.fixture(scope="module")
def fast_and_plain():
    sd = tiny_stable_diffusion(0)
    base = UNetMotionModel.from_unet2d(sd.unet, tiny_motion_adapter(0))
    torch.manual_seed(1)
    fast = MagDiffUNetModel.from_unet_motion(
        base, image_embed_dim=TINY_IMAGE_HIDDEN, resampler_hidden_dim=64, resampler_heads=1, hfa_hidden_channels=8
    ).eval()
    with torch.no_grad():  # a trained-looking image branch: the fresh one's zero-initialised parts would hide it
        for processor in fast.apa_processors().values():
            processor.to_k_ip.weight.normal_(0, 0.3)
            processor.to_v_ip.weight.normal_(0, 0.3)
        fast.conv_in.weight.normal_(0, 0.1)
    plain = copy.deepcopy(fast)
    plain.set_attn_processor(
        {
            name: PlainAPA(proc) if isinstance(proc, APAAttnProcessor) else proc
            for name, proc in plain.attn_processors.items()
        }
    )
    return fast, plain


def _unet_inputs(frames: int = 4, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, frames, size, size, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    tokens = _generation_tokens(batch=2, slots=frames, per_slot=16, channels=32, seed=seed)
    subject = SubjectConditioning(tokens, torch.randn(2, 4, frames, size, size, generator=generator))
    return sample, text, subject


def test_unet_inference_fast_path_equals_per_frame_tokens(fast_and_plain):
    fast, plain = fast_and_plain
    sample, text, subject = _unet_inputs()
    with torch.no_grad():
        ours = fast(sample, torch.tensor(10), text, subject=subject).sample
        reference = plain(sample, torch.tensor(10), text, subject=subject).sample
        text_only = fast(sample, torch.tensor(10), text).sample
    torch.testing.assert_close(ours, reference, **TOLERANCE)
    assert (ours - text_only).abs().max() > 1e-2  # the image branch does contribute


def test_unet_training_fast_path_gives_the_same_loss_and_gradients(fast_and_plain):
    fast, plain = fast_and_plain
    sample, text, subject = _unet_inputs(seed=3)

    def loss_and_gradients(unet):
        loss = unet(sample, torch.tensor(10), text, subject=subject).sample.square().mean()
        names = [name for name, parameter in unet.named_parameters() if "to_k_ip" in name or "attn2.to_q" in name]
        parameters = dict(unet.named_parameters())
        gradients = torch.autograd.grad(loss, [parameters[name] for name in names])
        return loss, {name.replace(".processor.apa.", ".processor."): grad for name, grad in zip(names, gradients)}

    loss, gradients = loss_and_gradients(fast)
    reference_loss, reference_gradients = loss_and_gradients(plain)
    torch.testing.assert_close(loss, reference_loss, **TOLERANCE)
    assert gradients.keys() == reference_gradients.keys() and gradients
    for name, gradient in gradients.items():
        scale = float(reference_gradients[name].abs().max())
        torch.testing.assert_close(gradient, reference_gradients[name], atol=1e-5 * scale, rtol=1e-4, msg=name)
