"""The world tokenizer: a byte-level BPE trained with ``tokenizers`` and wrapped as a transformers ``CLIPTokenizer``.

transformers ships no CLIP vocabulary and nothing is downloaded at run time, so the small models of this package bring
their own tokenizer. :func:`train_world_tokenizer` trains one with ``tokenizers``' ``BpeTrainer`` on

- world captions (every subject description, motion phrasing and background phrasing; each world word again), and
- a modest general English word list (:data:`ENGLISH_WORDS`), so that a user's words tokenise into sensible pieces;

with CLIP's normaliser, pre-tokeniser (lower case, words split off punctuation and digits, byte-level symbols) and
end-of-word suffix ``</w>``. Its vocabulary is laid out as CLIP's is: the 256 byte symbols, the same with ``</w>``,
one token per learned merge, then ``<|startoftext|>`` (BOS) and ``<|endoftext|>`` (EOS, also pad and unknown). Every
world word (``WORLD_VOCABULARY``) is exactly one token, which the builder checks. The packaged copy
(``magdiff/assets/world_tokenizer``) is what :func:`train_world_tokenizer` writes; a test rebuilds it and compares.

:func:`build_word_tokenizer` is the same recipe on a short word list (for tiny test models).
Models that use public CLIP text encoders load their own tokenizer with ``from_pretrained``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import CLIPTokenizer

from .errors import MagDiffInputError

__all__ = [
    "BOS_TOKEN",
    "ENGLISH_WORDS",
    "EOS_TOKEN",
    "WORLD_CONTEXT_LENGTH",
    "WORLD_TOKENIZER_DIR",
    "WORLD_VOCAB_SIZE",
    "build_word_tokenizer",
    "load_world_tokenizer",
    "train_world_tokenizer",
]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
WORLD_CONTEXT_LENGTH = 77
"""The world tokenizer's ``model_max_length`` (CLIP's context)."""
WORLD_VOCAB_SIZE = 2048
"""Size of the trained world vocabulary (bytes, merges and the two special tokens)."""
WORLD_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "world_tokenizer"
_WORLD_CAPTION_REPEATS = 3  # how many times the longer of (descriptions, scenes) is cycled through
_WORLD_WORD_REPEATS = 200  # each world word again on its own, so that its merges always win over English pieces

# CLIP's pre-tokenisation pattern (transformers' CLIPTokenizer uses the same).
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

ENGLISH_WORDS: tuple[str, ...] = tuple(
    """
able about above across act action added after again against age ago all almost alone along already also
although always am amber america american among an analysis and angry another ant any anything ape apple are
area areas arm around art as asked at available away azure back backdrop background backward backwards bag ball
balloon banana barn basis basket bat be beach beak bear beaver became because become bed bee been before began
behind beige being believe bell below belt beneath berry beside best better between bicycle big bike bird black
block board boat body book boot both bottle bottom bounce bouncing bow bowl box boy branch bread brick bridge
bright bronze brought brush bucket bus bush business but butter butterfly button by cake calf called came camel
can candle candy cannot cap car card carrot cart case castle cat center century certain chair change charcoal
checked checkered cheese cherry chick chicken child children church city class claw clean clear climb climbing
clock close cloud coat coffee coin cold college come coming common community company cone control cookie cool
coral corner could country course court cow crab crawl crawling crayon cream crimson crow cub cube cup curly cut
cute cylinder dance dancing dark day death deep deer department desert desk developed development did didn
different dirty disc do does dog doll dolphin don done door dotted down downward downwards dragon dress drift
drifting drum dry duck during each eagle ear early earth economic edge education effect egg either elephant end
engine english enough even ever every everywhere evidence example experience eye eyes face fact fall falling
family fancy far fast feather federal feel feet felt few field figure find fine finger first fish five flag flat
flies float floating floor flower fluffy flute fly flying following foot for force foreground forest fork form
forward forwards found four fox frame free frog from front full funny fur furry further future fuzzy garden gave
general gently get giraffe girl give given glide gliding glossy glove go goat god goes going gold golden gone
good goose got government grape grass great ground group guitar had hair half hand hands happy hard has hat have
having hawk he head heading hear heard heavy hedgehog held help her here high hill him himself his history home
hop hopping horn horse hot house how however huge human i ice idea if image important in increase indigo
individual information inside instead interest into is island it its itself ivory jar job john juice jump
jumping jumps just kangaroo keep kettle key khaki kind kite kitten knew knife know known koala lake lamb lamp
land large last later lavender law leaf least leave left leftward leftwards leg lemon less let letter level lid
life light like lilac lime line lines lion little living lizard local lock log long longer look looked love low
made magenta major make making man many map maroon matte matter may me mean means melon members men middle might
military milk million mind mint minutes mirror miss modern moment money monkey months moon moose more morning
most mother mountain mouse mouth move moved moves moving mr mrs much mug music must my name narrow national navy
near necessary need never new next night no nor north nose not nothing now nowhere number ocean octopus odd of
off office often old olive on once one onion only onto open or orange order other others otter our out outside
over owl own pale pan panda paper park parrot part party past patterned paw peace peach pear pebble pen pencil
penguin people per perhaps period personal phone photo piano picture pie pig pizza place plaid plain plan plane
planet plant plate play plum point policy political pond pony position possible pot potato power present
president pretty private probably problem problems process provide public pull puppy push put puzzle pyramid
question quickly quite rabbit race racing rain rat rate rather reached real really reason red rest resting
result results ribbon rice right rightward rightwards ring rise rising river road robot rock rocket roll rolling
rolls roof room root rough round run running runs rush sad said salt same sandwich saw say says scarf scarlet
scene school scooter screen sea seal second see seed seem seemed seems seen sense service set several shake
shall shark sharp she sheep shelf shell shiny ship shirt shoe short should show side sideways sign silver simple
simply since sit sitting situation six skirt sky slide slides sliding slow slowly small smooth smoothly snail
snake snow so social society sock sofa soft some something sometimes somewhere soon sort sound soup south space
special speed speeding sphere spider spin spinning spoon spotted spotty squirrel stairs stand standing star
started state states stay staying stays steadily stick still stone stood stop stopped stops storm straight
strange strawberry street striped strong students study such sugar sun sure surface swim swimming system table
tail take taken tall tan tax taxi tea teal teddy tell than the their them themselves then there therefore these
they thick thin thing things think this those though thought three through thus tiger time times tiny to today
together told tomato too took top total toward towards tower town tractor train travel traveling travelling
travels tree truck true turn turned turning turquoise turtle two type ugly under unicorn united university until
up upon upward upwards us use used usually valley value van various very video village violet voice wagon wait
waiting walk walking walks wall want wanted war warm was washington watch water wavy way we weird well went were
west wet whale what wheel when where whether which while whistle white who whole whose why wide wife wiggle will
wind window wing with within without wolf woman women word words work world worm would year years yet york you
young your zebra zigzag zoom
""".split()  # noqa: SIM905 (a word list reads better as text)
)
"""About a thousand common English words (frequent function words, animals, food, objects, places, colours, looks and
motion words): the general part of the world tokenizer's training text."""


def _byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE uses for the bytes 0..255, in byte order."""
    return sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)


@lru_cache(maxsize=1)
def _symbol_to_byte() -> dict[str, int]:
    # GPT-2's reversible mapping: printable Latin-1 bytes map to themselves, the others to 256, 257, ...
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {chr(byte): byte for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in printable:
            mapping[chr(256 + extra)] = byte
            extra += 1
    return mapping


def _byte_of(symbol: str) -> int:
    return _symbol_to_byte()[symbol]


def _bpe_backend() -> Tokenizer:
    backend = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD, unk_token=EOS_TOKEN))
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return backend


def _train_merges(texts: Iterable[str], vocab_size: int) -> list[tuple[str, str]]:
    """Merges learned by ``tokenizers``' BpeTrainer on ``texts``, in the order learned."""
    backend = _bpe_backend()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        # The word-final symbols ("x</w>") as fixed tokens: the trainer would otherwise number them in the order it
        # meets them in a hash map, which changes from process to process and with it how ties between merges break.
        special_tokens=[symbol + END_OF_WORD for symbol in _byte_symbols()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix=END_OF_WORD,
        continuing_subword_prefix="",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    merges = json.loads(backend.to_str())["model"]["merges"]

    return [tuple(pair.split(" ")) if isinstance(pair, str) else (pair[0], pair[1]) for pair in merges]


def _clip_tokenizer(merges: Sequence[tuple[str, str]], model_max_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer with CLIP's vocabulary layout: bytes, bytes + ``</w>``, merges, BOS, EOS."""
    vocab: dict[str, int] = {}
    symbols = _byte_symbols()
    for symbol in [*symbols, *(symbol + END_OF_WORD for symbol in symbols)]:
        vocab.setdefault(symbol, len(vocab))
    kept: list[tuple[str, str]] = []
    for left, right in merges:
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
        kept.append((left, right))
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=kept)
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _check_single_tokens(tokenizer: CLIPTokenizer, words: Iterable[str]) -> None:
    split = {word: tokenizer.tokenize(word) for word in words if len(tokenizer.tokenize(word)) != 1}
    if split:
        raise RuntimeError(f"These words are not single tokens of the trained tokenizer: {split}")


def world_tokenizer_corpus() -> list[str]:
    """The world tokenizer's training text (deterministic, nothing rendered): world captions pairing every subject
    description with every motion and background phrasing, each world word repeated, and the English words."""
    from itertools import combinations, product

    from .data.world import (
        BACKGROUND_COLOURS,
        BACKGROUND_PHRASES,
        GENERIC_NOUNS,
        MOTION_PHRASES,
        SHAPES,
        SUBJECT_COLOURS,
        TEXTURES,
        WORLD_VOCABULARY,
        compose_caption,
        describe_subject,
    )

    values = {"texture": (*TEXTURES,), "colour": (*SUBJECT_COLOURS,), "shape": (*SHAPES,)}
    descriptions = list(GENERIC_NOUNS)
    for size in (1, 2, 3):
        for keys in combinations(("texture", "colour", "shape"), size):
            for choice in product(*(values[key] for key in keys)):
                noun = GENERIC_NOUNS[len(descriptions) % len(GENERIC_NOUNS)]
                descriptions.append(describe_subject(**dict(zip(keys, choice)), noun=noun))
    scenes = [
        (motion, background, motion_phrasing, background_phrasing)
        for motion, phrases in MOTION_PHRASES.items()
        for motion_phrasing in range(len(phrases))
        for background in BACKGROUND_COLOURS
        for background_phrasing in range(len(BACKGROUND_PHRASES))
    ]
    count = max(len(descriptions), len(scenes)) * _WORLD_CAPTION_REPEATS
    captions = [compose_caption(descriptions[i % len(descriptions)], *scenes[i % len(scenes)]) for i in range(count)]
    world_words = [" ".join(WORLD_VOCABULARY)] * _WORLD_WORD_REPEATS
    return [*captions, *world_words, *ENGLISH_WORDS]


def train_world_tokenizer(
    out: str | Path | None = None,
    vocab_size: int = WORLD_VOCAB_SIZE,
    model_max_length: int = WORLD_CONTEXT_LENGTH,
) -> CLIPTokenizer:
    """Train the world tokenizer (deterministic) and, when ``out`` is given, ``save_pretrained`` it there.

    Raises:
        MagDiffInputError: a vocabulary too small to hold the byte symbols, the special tokens and every world word.
    """
    from .data.world import WORLD_VOCABULARY

    if vocab_size < 1024:
        raise MagDiffInputError(f"vocab_size must be at least 1024 for the world tokenizer, got {vocab_size}.")
    if model_max_length < 8:
        raise MagDiffInputError(f"model_max_length must be at least 8, got {model_max_length}.")
    # BpeTrainer's vocab_size counts the 256 byte symbols and the suffixed ones it saw; ours counts all 512 + BOS/EOS.
    merges = _train_merges(world_tokenizer_corpus(), vocab_size)
    tokenizer = _clip_tokenizer(merges, model_max_length)
    budget = vocab_size - 2 * 256 - 2
    if len(tokenizer) > vocab_size:
        tokenizer = _clip_tokenizer(merges[:budget], model_max_length)
    _check_single_tokens(tokenizer, WORLD_VOCABULARY)
    if out is not None:
        tokenizer.save_pretrained(str(out))
    return tokenizer


def load_world_tokenizer(path: str | Path | None = None) -> CLIPTokenizer:
    """The world tokenizer from ``path`` (default: the packaged copy; trained afresh when the package has none)."""
    from transformers import AutoTokenizer

    folder = Path(path) if path is not None else WORLD_TOKENIZER_DIR
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    if path is not None:
        raise FileNotFoundError(f"No tokenizer at {folder} (expected tokenizer.json).")
    return train_world_tokenizer()


def build_word_tokenizer(words: Iterable[str], model_max_length: int = 16) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` trained (``BpeTrainer``) on ``words`` only, so that each of them is one token; other
    text still tokenises, as pieces. For tiny test models; the world model uses :func:`train_world_tokenizer`.

    Args:
        words: words; each is lower-cased and split as CLIP's pre-tokeniser splits text.
        model_max_length: padded prompt length (77 for SD; short prompts need far less).
    """
    pieces = sorted({word.lower() for word in words if word.strip()})
    if not pieces:
        raise MagDiffInputError("build_word_tokenizer needs at least one word.")
    merges = _train_merges([" ".join(pieces)], vocab_size=1_000_000)
    tokenizer = _clip_tokenizer(merges, model_max_length)
    _check_single_tokens(tokenizer, (piece for word in pieces for piece in word.split()))
    return tokenizer


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Train the world tokenizer and save it (save_pretrained).")
    parser.add_argument("--out", default=str(WORLD_TOKENIZER_DIR), help="folder to write (default: the package's)")
    args = parser.parse_args(argv)
    tokenizer = train_world_tokenizer(args.out)
    print(f"world tokenizer: {len(tokenizer)} tokens, context {tokenizer.model_max_length}, saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
