"""A small, offline CLIP tokenizer for a known vocabulary.

transformers ships no CLIP vocabulary, and nothing is downloaded at run time. For tiny models (tests, the default
model trained on the benchmark world) we build a real ``CLIPTokenizer`` whose BPE vocabulary holds every byte
symbol (so any text tokenises, unknown words fall back to pieces) plus merges that spell the given words left to
right. Where two words' merges compete, a word can come out in a few pieces (never as an unknown token).
Models that use public CLIP text encoders load their own tokenizer with ``from_pretrained``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """The 256 printable symbols CLIP's byte-level BPE uses for the bytes 0..255 (GPT-2's reversible mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 16) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose vocabulary spells each of ``words`` (almost always as one token).

    Args:
        words: lower-case words; non-alphanumeric characters are split off as CLIP's pre-tokenizer would.
        model_max_length: padded prompt length (77 for SD; short prompts need far less).
    """
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    for symbol in symbols:
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    seen_merges: set[str] = set()
    pieces = sorted({piece for word in words for piece in re.findall(r"[a-z]+|[0-9]", word.lower())})
    for piece in pieces:
        parts = [*list(piece[:-1]), piece[-1] + "</w>"]
        current = parts[0]
        for part in parts[1:]:
            merge = f"{current} {part}"
            current_left = current
            current = current + part
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append((current_left, part))
            vocab.setdefault(current, len(vocab))
    vocab.setdefault(BOS_TOKEN, len(vocab))
    vocab.setdefault(EOS_TOKEN, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = model_max_length
    return tokenizer
