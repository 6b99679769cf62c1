"""A small, offline CLIP tokenizer for a known vocabulary.

transformers ships no CLIP vocabulary, and nothing is downloaded at run time. For tiny models (tests, the default
model trained on the benchmark world) we build a real ``CLIPTokenizer`` whose BPE vocabulary holds every byte
symbol (so any text tokenises, unknown words fall back to pieces) plus byte-pair merges learned on the given words,
so each of them is one token.
Models that use public CLIP text encoders load their own tokenizer with ``from_pretrained``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from itertools import pairwise

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


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    merged: list[str] = []
    index = 0
    while index < len(symbols):
        if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
            merged.append(symbols[index] + symbols[index + 1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return merged


def learn_merges(pieces: Iterable[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``pieces`` themselves (each counted once) until every piece is one symbol.

    BPE encodes by applying the lowest-ranked merge present, again and again; with merges ranked in the order they
    were learned that replays the learning on each piece, so every piece comes out whole."""
    words = [[*piece[:-1], piece[-1] + "</w>"] for piece in pieces]
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for symbols in words:
            counts.update(pairwise(symbols))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # most frequent; ties in a fixed order
        merges.append(best)
        words = [_merge_pair(symbols, best) for symbols in words]


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 16) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` whose vocabulary spells each of ``words`` as one token (other text still tokenises, as
    pieces).

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
    pieces = sorted({piece for word in words for piece in re.findall(r"[a-z]+|[0-9]", word.lower())})
    merges = learn_merges(pieces)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab.setdefault(BOS_TOKEN, len(vocab))
    vocab.setdefault(EOS_TOKEN, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = model_max_length
    return tokenizer
