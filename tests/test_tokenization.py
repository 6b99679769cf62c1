"""The world tokenizer (magdiff.tokenization): trained BPE, wrapped as a transformers CLIPTokenizer."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer, CLIPTokenizer

from magdiff.data.world import WORLD_VOCABULARY, WorldConfig, make_sample
from magdiff.errors import MagDiffInputError
from magdiff.tokenization import (
    BOS_TOKEN,
    ENGLISH_WORDS,
    EOS_TOKEN,
    WORLD_CONTEXT_LENGTH,
    WORLD_TOKENIZER_DIR,
    WORLD_VOCAB_SIZE,
    build_word_tokenizer,
    load_world_tokenizer,
    train_world_tokenizer,
)


@pytest.fixture(scope="module")
def packaged() -> CLIPTokenizer:
    return AutoTokenizer.from_pretrained(str(WORLD_TOKENIZER_DIR))  # offline: a local folder


def test_packaged_tokenizer_is_a_clip_tokenizer_with_clips_special_tokens(packaged) -> None:
    assert isinstance(packaged, CLIPTokenizer)
    assert packaged.model_max_length == WORLD_CONTEXT_LENGTH == 77
    assert len(packaged) == WORLD_VOCAB_SIZE
    assert packaged.bos_token == BOS_TOKEN and packaged.eos_token == EOS_TOKEN and packaged.pad_token == EOS_TOKEN
    # CLIP's layout: specials last, BOS before EOS
    assert (packaged.bos_token_id, packaged.eos_token_id) == (WORLD_VOCAB_SIZE - 2, WORLD_VOCAB_SIZE - 1)
    ids = packaged("a star moving left on a red background", padding="max_length").input_ids
    assert len(ids) == 77
    assert ids[0] == packaged.bos_token_id and ids[9] == packaged.eos_token_id  # BOS, 8 words, EOS
    assert set(ids[10:]) == {packaged.pad_token_id}


def test_every_world_word_is_exactly_one_token(packaged) -> None:
    for word in WORLD_VOCABULARY:
        tokens = packaged.tokenize(word)
        assert tokens == [word + "</w>"], (word, tokens)
        assert packaged.decode(packaged.convert_tokens_to_ids(tokens)) == word
    # and so inside captions: one token per word, whatever the phrasing
    for seed in range(200):
        caption = make_sample(seed, WorldConfig(paraphrase_probability=1.0))["caption"]
        assert len(packaged.tokenize(caption)) == len(caption.split())


def test_other_words_tokenise_into_pieces_never_unknown(packaged) -> None:
    for text in ("a fluffy quokka moving left on a red background", "An Elephant, jumping over 3 fences!", "xqzvbt"):
        tokens = packaged.tokenize(text)
        assert packaged.unk_token not in tokens
        assert packaged.decode(packaged(text).input_ids, skip_special_tokens=True) == text.lower().replace(
            ",", " ,"
        ).replace("!", " !")
    assert len(packaged.tokenize("quokka")) > 1
    common = sum(len(packaged.tokenize(word)) == 1 for word in ENGLISH_WORDS)
    assert common > 0.6 * len(ENGLISH_WORDS)  # most of the general words are whole; the rest are sensible pieces
    assert packaged.tokenize("café")  # bytes outside ASCII still tokenise


def test_context_is_77_and_long_prompts_are_not_silently_shortened(packaged) -> None:
    long_prompt = " ".join(["a red star"] * 40)
    assert len(packaged(long_prompt).input_ids) > 77  # the tokenizer itself never truncates unless asked
    assert len(packaged(long_prompt, truncation=True).input_ids) == 77


def test_training_is_deterministic_and_reproduces_the_packaged_files(tmp_path, packaged) -> None:
    rebuilt = train_world_tokenizer(tmp_path / "tok")
    assert rebuilt.get_vocab() == packaged.get_vocab()
    ours = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["model"]
    shipped = json.loads((WORLD_TOKENIZER_DIR / "tokenizer.json").read_text())["model"]
    assert ours["merges"] == shipped["merges"]
    assert load_world_tokenizer(tmp_path / "tok").get_vocab() == packaged.get_vocab()


def test_bad_arguments_raise(tmp_path) -> None:
    with pytest.raises(MagDiffInputError):
        train_world_tokenizer(vocab_size=100)
    with pytest.raises(MagDiffInputError):
        train_world_tokenizer(model_max_length=2)
    with pytest.raises(FileNotFoundError):
        load_world_tokenizer(tmp_path / "nothing")
    with pytest.raises(MagDiffInputError):
        build_word_tokenizer([])


def test_build_word_tokenizer_spells_each_given_word_whole() -> None:
    words = ["striped", "stripe", "ripe", "triangle", "tri", "angle", "strip", "red", "reds", "tried"]
    tokenizer = build_word_tokenizer(words, model_max_length=16)
    assert {word: tokenizer.tokenize(word) for word in words} == {word: [word + "</w>"] for word in words}
    assert tokenizer.tokenize("stripes")[:1] != ["stripes</w>"]
    assert tokenizer.model_max_length == 16


def test_world_text_tower_context_matches_the_tokenizer(packaged) -> None:
    from magdiff.world_model import world_text_encoder

    random_tower = world_text_encoder(len(packaged), random_init=True)
    assert random_tower.config.max_position_embeddings == packaged.model_max_length
    assert world_text_encoder().config.max_position_embeddings == packaged.model_max_length
