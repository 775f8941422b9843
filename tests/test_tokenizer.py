"""Our byte-level BPE tokenizer: special tokens, digit splits, save/load, `<image>` for any tokenizer."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from data.templates import CHATML_TEMPLATE, IMAGE_TOKEN, LLAMA3_TEMPLATE
from data.tokenizer import (
    CHAT_END_TOKEN,
    CHAT_START_TOKEN,
    ENDOFTEXT_TOKEN,
    ensure_image_token,
    train_tokenizer,
)

WORDS = (
    "the a red blue green circle square triangle left right top bottom box at of and in image video".split()
)


def corpus(n: int = 800, seed: int = 0) -> list[str]:
    """Short captions full of repeated numbers: without digit splitting BPE would merge them."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        box = ", ".join(str(rng.choice([100, 250, 417, 2024, 999])) for _ in range(4))
        lines.append(f"{words} [{box}]")
    return lines


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), None, vocab_size=340)


SAMPLES = [
    "a red circle at [100, 250, 417, 2024]",
    "<|im_start|>user\n<image>\nWhere is the box?<|im_end|>\n",
    "unseen wörds, emoji 🙂 and 中文 with\ttabs  and  spaces",
]


def test_special_tokens_have_fixed_ids_and_roles(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    expected = {ENDOFTEXT_TOKEN: 0, CHAT_START_TOKEN: 1, CHAT_END_TOKEN: 2, IMAGE_TOKEN: 3}
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert tok.pad_token == ENDOFTEXT_TOKEN and tok.pad_token_id == 0
    assert tok.eos_token == CHAT_END_TOKEN and tok.eos_token_id == 2
    assert tok.bos_token is None
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.model_max_length == 4096
    assert len(tok) == 340


@pytest.mark.parametrize("token", [ENDOFTEXT_TOKEN, CHAT_START_TOKEN, CHAT_END_TOKEN, IMAGE_TOKEN])
def test_special_tokens_are_single_ids_inside_text(tok, token):
    token_id = tok.convert_tokens_to_ids(token)
    for text in (f"box{token}left", f"a {token} b", f"{token}{token}\n{token}"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids.count(token_id) == text.count(token)
        assert tok.decode(ids) == text


def test_no_special_tokens_added_around_text(tok):
    ids = tok("a red box")["input_ids"]
    assert ids == tok("a red box", add_special_tokens=False)["input_ids"]
    assert not set(ids) & {0, 1, 2, 3}


def test_digits_are_split_individually(tok):
    for number in ("2024", "417", "1234567890"):
        assert tok.tokenize(number) == list(number)
    assert tok.tokenize(" 417") == ["Ġ", "4", "1", "7"]
    assert tok.decode(tok.encode("at [100, 2024]")) == "at [100, 2024]"


def test_grouped_digits_merge_frequent_numbers_and_stay_lossless():
    texts = [f"Locate it. [{x}, 417, {x + 1}, 805]" for x in range(100, 300)] * 3
    grouped = train_tokenizer(texts, None, vocab_size=600, digits="grouped")
    assert grouped.tokenize("[417, 805]") == ["[", "417", ",", "Ġ805", "]"]
    assert grouped.decode(grouped.encode("at [100, 2024]")) == "at [100, 2024]"
    single = train_tokenizer(texts, None, vocab_size=600)
    assert single.tokenize("[417, 805]") == ["[", "4", "1", "7", ",", "Ġ", "8", "0", "5", "]"]
    with pytest.raises(ValueError, match="digits must be one of"):
        train_tokenizer(texts, None, vocab_size=600, digits="pairs")


def test_merges_are_learned(tok):
    assert tok.tokenize(" triangle") == ["Ġtriangle"] and tok.tokenize(" circle") == ["Ġcircle"]


def test_chat_role_names_are_single_tokens(tok):
    """Role names never occur in the task text; trained without the template they cost ~6 tokens a turn."""
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "a red circle"}, {"role": "assistant", "content": "a box"}],
        tokenize=False,
    )
    pieces = tok.convert_ids_to_tokens(tok.encode(rendered))
    assert pieces[:3] == [CHAT_START_TOKEN, "user", "Ċ"]
    turn = [CHAT_END_TOKEN, "Ċ", CHAT_START_TOKEN, "assistant", "Ċ"]
    assert any(pieces[i : i + 5] == turn for i in range(len(pieces))), pieces
    without = train_tokenizer(corpus(), None, vocab_size=340, chat_template=None)
    assert len(without.tokenize("assistant")) > 1  # the scaffold, not the corpus, taught the merge


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_is_lossless(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_save_and_load_round_trip(tok, tmp_path):
    tokenizer = train_tokenizer(corpus(), tmp_path / "tok", vocab_size=320, chat_template=LLAMA3_TEMPLATE)
    assert {p.name for p in (tmp_path / "tok").iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in SAMPLES:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == LLAMA3_TEMPLATE
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token, loaded.eos_token, loaded.bos_token) == (ENDOFTEXT_TOKEN, CHAT_END_TOKEN, None)
    assert loaded.model_max_length == 4096
    assert sorted(loaded.all_special_tokens) == sorted(tokenizer.all_special_tokens)
    messages = [{"role": "user", "content": "<image> where?"}, {"role": "assistant", "content": "left"}]
    assert loaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_training_is_deterministic(tok):
    again = train_tokenizer(corpus(), None, vocab_size=340)
    assert again.get_vocab() == tok.get_vocab()
    assert json.loads(again.backend_tokenizer.to_str()) == json.loads(tok.backend_tokenizer.to_str())


def test_extra_special_tokens_follow_base_ones():
    extra = ["<|start_header_id|>", "<|end_header_id|>"]
    tokenizer = train_tokenizer(corpus(100), None, vocab_size=300, extra_special_tokens=extra)
    assert [tokenizer.convert_tokens_to_ids(t) for t in extra] == [4, 5]
    tokens = tokenizer.tokenize("<|start_header_id|>user<|end_header_id|>")
    assert [tokens[0], tokens[-1]] == extra and "".join(tokens[1:-1]) == "user"


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small: byte-level BPE needs at least 260"):
        train_tokenizer(corpus(10), None, vocab_size=200)
    with pytest.raises(TypeError, match="train_tokenizer expects strings, got int"):
        train_tokenizer(["ok", 3], None, vocab_size=300)


def foreign_tokenizer(pre_tokenizer, decoder) -> PreTrainedTokenizerFast:
    """A tokenizer trained without any knowledge of `<image>`, standing in for a real LLM's one."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder
    texts = corpus(200) + ["<image> <image>"] * 50  # "<image>" is common text, yet not a token
    alphabet = sorted(set("".join(texts)))
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


FOREIGN = {
    "byte_level": (pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()),
    "metaspace": (
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
        decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]),
    ),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_ensure_image_token_adds_it_once(kind):
    tokenizer = foreign_tokenizer(*FOREIGN[kind])
    assert IMAGE_TOKEN not in tokenizer.get_added_vocab()
    assert len(tokenizer("x <image>y", add_special_tokens=False)["input_ids"]) > 3
    size = len(tokenizer)
    image_id = ensure_image_token(tokenizer)
    assert image_id == size and len(tokenizer) == size + 1  # appended: the caller resizes embeddings to match
    ids = tokenizer("x <image>y<image>", add_special_tokens=False)["input_ids"]
    assert ids.count(image_id) == 2
    assert tokenizer.convert_ids_to_tokens(image_id) == IMAGE_TOKEN
    assert IMAGE_TOKEN in tokenizer.all_special_tokens
    assert ensure_image_token(tokenizer) == image_id and len(tokenizer) == size + 1  # idempotent


def test_ensure_image_token_keeps_existing_one(tok):
    size = len(tok)
    assert ensure_image_token(tok) == 3 and len(tok) == size


def test_ensure_image_token_survives_save_and_load(tmp_path):
    tokenizer = foreign_tokenizer(*FOREIGN["byte_level"])
    image_id = ensure_image_token(tokenizer)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.convert_tokens_to_ids(IMAGE_TOKEN) == image_id
    assert loaded("a <image> b", add_special_tokens=False)["input_ids"].count(image_id) == 1
