"""Which words of a world caption does each cross-attention layer read? The share of the text attention that goes
to each part of the caption, averaged over heads, query positions, frames and held-out clips, at one noise level.

A caption reads ``a <subject words> moving <left|right|up|down> on a <colour> background`` (or ``staying still``):
its tokens are grouped into the start token, the subject words, the motion words, the colour word, the rest of the
words ("a", "on", "background") and the end/padding tokens. "share" is the attention probability; "value-weighted"
is the attention probability times the norm of the token's value vector, as a share of the layer's total, which
is what a token adds to the layer's output.

    python scripts/probes/attention_probe.py                     # the packaged default model, t = 999
    python scripts/probes/attention_probe.py --model runs/x/model --t 700 --clips 32
    python scripts/probes/attention_probe.py --model BASE --checkpoint runs/x/checkpoints/step_000500 --ema
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from common import add_model_arguments, clean_latents, encode_captions, load_probed_pipeline, world_clips

from magdiff.models.unet import is_spatial_cross_attention

PARTS = ("start", "subject", "motion", "colour", "other words", "end/padding")


def caption_parts(tokens: list[str], meta: dict) -> list[str]:
    """The part of the caption each token belongs to (tokens as the tokenizer spells them)."""
    words = [token.removesuffix("</w>").lower() for token in tokens]
    parts = []
    in_subject, motion_seen = False, False
    for index, word in enumerate(words):
        if index == 0:
            parts.append("start")
        elif word.startswith("<|endoftext|>") or word.startswith("<|"):
            parts.append("end/padding")
        elif word in ("moving", "staying") or (motion_seen and word in ("left", "right", "up", "down", "still")):
            motion_seen = True
            parts.append("motion")
        elif index == 1:
            in_subject = True
            parts.append("other words")
        elif in_subject and not motion_seen:
            parts.append("subject")
        elif word == meta["background"]:
            parts.append("colour")
        else:
            parts.append("other words")
    return parts


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--t", type=int, default=999, help="the timestep")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipeline = load_probed_pipeline(args.model, args.checkpoint, args.ema)
    clips = world_clips(pipeline, args.clips)
    clean = clean_latents(pipeline, clips)  # (b, c, F, h, w)
    captions = [clip["caption"] for clip in clips]
    tokenizer = pipeline.tokenizer
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    parts = [caption_parts(tokenizer.convert_ids_to_tokens(row), clip["meta"]) for row, clip in zip(ids, clips)]
    text = encode_captions(pipeline, captions)

    recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(module, args_, kwargs, output):
            hidden = args_[0] if args_ else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            tokens = context[0] if isinstance(context, tuple) else context
            query, key = module.to_q(hidden), module.to_k(tokens)
            heads = module.heads
            batch, length, width = query.shape
            query = query.view(batch, length, heads, width // heads).transpose(1, 2)
            key = key.view(batch, -1, heads, width // heads).transpose(1, 2)
            probabilities = torch.softmax(query @ key.transpose(-1, -2) * module.scale, dim=-1)  # (b*F, h, n, T)
            recorded[name] = (probabilities.mean(dim=(1, 2)), module.to_v(tokens).norm(dim=-1))  # (b*F, T) each

        return hook

    for name, module in pipeline.unet.named_modules():
        if is_spatial_cross_attention(name, module):  # not the motion modules' attention
            module.register_forward_hook(record(name), with_kwargs=True)
    timesteps = torch.full((args.clips,), args.t)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(args.seed))
    pipeline.unet(pipeline.scheduler.add_noise(clean, noise, timesteps), timesteps, text)

    num_frames = clean.shape[2]
    print(f"{args.model}: {args.clips} held-out clips, t = {args.t}, no subject; attention share / value-weighted")
    print(f"{'layer':<44}" + "".join(f"{part:>20}" for part in PARTS))
    for name, (probabilities, value_norms) in recorded.items():
        probabilities = probabilities.view(args.clips, num_frames, -1).mean(dim=1)
        weighted = probabilities * value_norms.view(args.clips, num_frames, -1)[:, 0]
        weighted = weighted / weighted.sum(dim=1, keepdim=True)
        share: dict[str, float] = defaultdict(float)
        value_share: dict[str, float] = defaultdict(float)
        for clip_index, clip_parts in enumerate(parts):
            for position, part in enumerate(clip_parts):
                share[part] += probabilities[clip_index, position].item() / args.clips
                value_share[part] += weighted[clip_index, position].item() / args.clips
        cells = "".join(f"{share[p]:>11.3f} / {value_share[p]:.3f}" for p in PARTS)
        print(f"{name.removesuffix('.transformer_blocks.0.attn2'):<44}{cells}")


if __name__ == "__main__":
    main()
