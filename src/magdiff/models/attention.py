"""Adaptive prompts alignment (APA): decoupled text/image cross-attention with a shared query.

Every spatial cross-attention layer of the U-Net computes

    APA(Z) = a_img * softmax(Q K_img^T / sqrt(d)) V_img  +  a_txt * softmax(Q K_txt^T / sqrt(d)) V_txt

with ``Q = Z W_q`` shared by both branches, ``K_txt, V_txt`` from the base model's own ``to_k`` / ``to_v`` and
``K_img, V_img`` from two new projections ``to_k_ip`` / ``to_v_ip`` (names kept from IP-Adapter so its public
weights load), followed by the layer's usual output projection and residual. ``a_img`` and ``a_txt`` are one
learnable scalar pair per layer (MagDiff, Zhao et al. 2024, Sec. 3.3).

The processor is installed by :class:`~magdiff.models.unet.MagDiffUNetModel` in its own ``__init__`` so that its
weights survive ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

APA_MODES = ("learned", "fixed")


def _multi_head_attention(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Scaled dot-product attention over ``attn.heads`` heads. Inputs (b, n, c); returns (b, n_query, c)."""
    batch_size = query.shape[0]
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (b, heads, n_q, d)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (b, heads, n_k, d)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (b, heads, n_k, d)
    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
    return hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (b, n_q, heads*d)


def _shared_context_attention(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of ``query`` (B, n, c) over ``key`` / ``value`` (b, m, c) given once for every ``B // b``
    consecutive query rows (the frames of one clip): the same result as repeating the tokens ``B // b`` times
    (``repeat_interleave``), computed by reading the rows of a group as one longer query, so the tokens are
    projected and attended once per clip instead of once per frame. ``attention_mask``: None or a bias that
    broadcasts over the query positions."""
    total, num_queries, channels = query.shape
    groups = key.shape[0]
    if total % groups:
        raise ValueError(f"{groups} token sets cannot be shared by {total} query rows.")
    query = query.reshape(groups, (total // groups) * num_queries, channels)  # (b, copies*n, c)
    hidden_states = _multi_head_attention(attn, query, key, value, attention_mask)  # (b, copies*n, c)
    return hidden_states.reshape(total, num_queries, channels)  # (B, n, c)


def merge_repeated_slots(image_tokens: torch.Tensor, tokens_per_slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distinct subject slots of ``image_tokens`` (b, S * tokens_per_slot, c) and, per kept token, the log of
    how many slots it stands for: ``softmax(s + log m) V`` over the distinct slots equals ``softmax(s) V`` over all
    slots when a slot repeats ``m`` times (generation fills slot 0, the empty slots 1..S-1 are equal). A slot is
    merged into an earlier one only when both hold equal tokens in every batch row. Returns ``(image_tokens, None)``
    when no slot repeats; otherwise ``(tokens (b, U * tokens_per_slot, c), bias (U * tokens_per_slot,))``."""
    batch_size, num_tokens, channels = image_tokens.shape
    if tokens_per_slot <= 0 or num_tokens % tokens_per_slot:
        return image_tokens, None
    slots = image_tokens.view(batch_size, num_tokens // tokens_per_slot, tokens_per_slot, channels)  # (b, S, n, c)
    kept: list[int] = []
    counts: list[int] = []
    for slot in range(slots.shape[1]):
        for index, first in enumerate(kept):
            if torch.equal(slots[:, slot], slots[:, first]):
                counts[index] += 1
                break
        else:
            kept.append(slot)
            counts.append(1)
    if len(kept) == slots.shape[1]:
        return image_tokens, None
    distinct = slots[:, kept].reshape(batch_size, len(kept) * tokens_per_slot, channels)  # (b, U*n, c)
    multiplicity = torch.tensor(counts, dtype=torch.float32, device=image_tokens.device)
    bias = multiplicity.log().repeat_interleave(tokens_per_slot).to(image_tokens.dtype)  # (U*n,)
    return distinct, bias


class APAAttnProcessor(nn.Module):
    r"""Attention processor for one APA layer.

    Args:
        hidden_size: inner dimension of the attention layer (output size of its ``to_k``).
        cross_attention_dim: channel size of the context tokens (text and image tokens share it).
        a_img_init: initial image-branch weight (1.5 in the authors' code).
        a_txt_init: initial text-branch weight (1.0 in the authors' code).
        learned: ``True`` for APA; ``False`` for the paper's "fixed prompts alignment" baseline, where the weights
            are frozen (``requires_grad=False``).

    The context comes as a tuple ``(text_tokens, image_tokens)``: ``text_tokens`` (b, n_txt, c) and
    ``image_tokens`` (b, n_img, c) or a one-element list of it (the form diffusers' IP-Adapter path uses). A plain
    tensor means "no image tokens": only the text branch runs. A third element, ``image_token_bias`` (n_img,), is
    added to the image branch's attention logits (:func:`merge_repeated_slots`). Token sets of batch ``b`` smaller
    than the ``B`` query rows are shared by each ``B // b`` consecutive rows, as if repeated with
    ``repeat_interleave`` (the U-Net passes one set per clip for its ``b * F`` frames).
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        a_img_init: float = 1.5,
        a_txt_init: float = 1.0,
        learned: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.a_img = nn.Parameter(torch.tensor(float(a_img_init)), requires_grad=learned)
        self.a_txt = nn.Parameter(torch.tensor(float(a_txt_init)), requires_grad=learned)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        text_tokens, image_tokens, image_token_bias = self._split_context(encoder_hidden_states)
        residual = hidden_states

        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channels, height * width).transpose(1, 2)  # (b, hw, c)
        batch_size = hidden_states.shape[0]

        if attention_mask is not None and text_tokens is not None:
            # The mask covers the text tokens only; image tokens are always attended to. A mask is given per query
            # row, so shared text tokens are repeated to one set per row.
            if text_tokens.shape[0] != batch_size:
                text_tokens = text_tokens.repeat_interleave(batch_size // text_tokens.shape[0], dim=0)
            attention_mask = attn.prepare_attention_mask(attention_mask, text_tokens.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        # Shared query for both branches.
        query = attn.to_q(hidden_states)  # (b, n, inner)

        if text_tokens is None:  # self-attention use (not expected for APA layers, kept for completeness)
            text_tokens = hidden_states
        elif attn.norm_cross:
            text_tokens = attn.norm_encoder_hidden_states(text_tokens)

        # Text branch: the base model's own projections. a * softmax(QK^T)V == softmax(QK^T)(aV): the weight is
        # applied to the few value tokens rather than to the many query positions. Tokens given once per clip
        # (batch b of the b*F query rows) are projected once per clip.
        text_key = attn.to_k(text_tokens)
        text_value = attn.to_v(text_tokens) * self.a_txt.to(query.dtype)
        hidden_states = _shared_context_attention(attn, query, text_key, text_value, attention_mask).to(query.dtype)

        # Image branch: new projections of the subject tokens (``image_token_bias``: log multiplicity of merged
        # repeated slots, see merge_repeated_slots).
        if image_tokens is not None:
            image_key = self.to_k_ip(image_tokens)
            image_value = self.to_v_ip(image_tokens) * self.a_img.to(query.dtype)
            bias = None if image_token_bias is None else image_token_bias.to(query.dtype).view(1, 1, 1, -1)
            image_out = _shared_context_attention(attn, query, image_key, image_value, bias).to(query.dtype)
            hidden_states = hidden_states + image_out

        hidden_states = attn.to_out[0](hidden_states)  # output projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _split_context(
        encoder_hidden_states: torch.Tensor | tuple | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(text_tokens, image_tokens, image_token_bias)`` from a tensor, ``(text, image)`` or
        ``(text, image, image_token_bias)``."""
        if encoder_hidden_states is None or isinstance(encoder_hidden_states, torch.Tensor):
            return encoder_hidden_states, None, None
        if len(encoder_hidden_states) == 3:
            text_tokens, image_tokens, image_token_bias = encoder_hidden_states
        else:
            (text_tokens, image_tokens), image_token_bias = encoder_hidden_states, None
        if isinstance(image_tokens, (list, tuple)):
            if len(image_tokens) != 1:
                raise ValueError(f"APA takes one set of image tokens, got {len(image_tokens)}.")
            image_tokens = image_tokens[0]
        if image_tokens is not None and image_tokens.ndim == 4:  # (b, slots, tokens, c) -> (b, slots*tokens, c)
            image_tokens = image_tokens.flatten(1, 2)
        return text_tokens, image_tokens, image_token_bias

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, cross_attention_dim={self.cross_attention_dim}"
