"""Our own byte-level BPE tokenizer, and the `<image>` / `<video>` placeholder tokens for any HF tokenizer.

The tiny default LLM has no pretrained tokenizer, so we train one on the task's text. ``digits`` chooses how
numbers (box coordinates) become tokens: ``"single"`` splits them one digit per token ("417" is "4" "1" "7",
compositional, small vocabulary); ``"grouped"`` lets BPE merge whole numbers as GPT-2 / Llama-3 tokenizers do
("417" is one token when frequent), so a coordinate is one prediction instead of a digit sequence whose tens
digit is a sawtooth of the position (measured: grounding 0.10 -> 0.22 at 2500 steps, BENCHMARKS.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import jinja2
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .templates import CHATML_TEMPLATE, IMAGE_TOKEN, VIDEO_TOKEN

__all__ = [
    "CHAT_END_TOKEN",
    "CHAT_START_TOKEN",
    "ENDOFTEXT_TOKEN",
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "ensure_image_token",
    "ensure_video_token",
    "train_tokenizer",
]

ENDOFTEXT_TOKEN = "<|endoftext|>"  # padding, and the document separator when used as a base LM
CHAT_START_TOKEN = "<|im_start|>"
CHAT_END_TOKEN = "<|im_end|>"  # end of a chat turn: the eos, so generation stops after one reply
BASE_SPECIAL_TOKENS = (ENDOFTEXT_TOKEN, CHAT_START_TOKEN, CHAT_END_TOKEN, IMAGE_TOKEN)
BYTE_ALPHABET_SIZE = 256
TRAIN_BATCH = 1000
DIGIT_MODES = ("single", "grouped")


def _batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """Feed the trainer lists of strings: one Python->Rust call per batch instead of per string."""
    batch: list[str] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer expects strings, got {type(text).__name__}")
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _template_scaffold(chat_template: str | None) -> str | None:
    """The chat template's own text around an empty exchange (role names, headers, newlines)."""
    if not chat_template:
        return None
    messages = [{"role": r, "content": ""} for r in ("system", "user", "assistant")]
    return (
        jinja2.Environment()
        .from_string(chat_template)
        .render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")
    )


def _with_scaffold(texts: Iterable[str], scaffold: str | None) -> Iterator[str]:
    """Every text followed by the template scaffold, so role names such as "assistant" (seen once per turn
    in training, never in the task text) become single tokens instead of ~6 byte pieces per turn."""
    for text in texts:
        yield text
        if scaffold:
            yield scaffold


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 1024,
    chat_template: str | None = CHATML_TEMPLATE,
    extra_special_tokens: Sequence[str] = (),
    model_max_length: int = 4096,
    digits: str = "single",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it as an HF fast tokenizer.

    Special tokens come first (ids 0..3: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<image>`), then
    `extra_special_tokens` (e.g. another template's header tokens), then the 256 byte symbols and the merges.
    No BOS is used; pad is `<|endoftext|>`, eos is `<|im_end|>`. Saved to `out_dir` when given.
    `digits`: "single" (one token per digit) or "grouped" (BPE may merge a whole number into one token).
    """
    if digits not in DIGIT_MODES:
        raise ValueError(f"digits must be one of {DIGIT_MODES}, got {digits!r}")
    specials = list(dict.fromkeys([*BASE_SPECIAL_TOKENS, *extra_special_tokens]))
    minimum = BYTE_ALPHABET_SIZE + len(specials)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum} "
            f"({BYTE_ALPHABET_SIZE} bytes + {len(specials)} special tokens)"
        )

    backend = Tokenizer(models.BPE())
    splitters = [pre_tokenizers.Digits(individual_digits=True)] if digits == "single" else []
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splitters, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[AddedToken(tok, special=True, normalized=False) for tok in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    scaffold = _template_scaffold(chat_template)
    backend.train_from_iterator(_batched(_with_scaffold(texts, scaffold), TRAIN_BATCH), trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=CHAT_END_TOKEN,
        pad_token=ENDOFTEXT_TOKEN,
        extra_special_tokens=[tok for tok in specials if tok not in (CHAT_END_TOKEN, ENDOFTEXT_TOKEN)],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer


def _is_single_added_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    if token not in tokenizer.get_added_vocab():
        return False
    token_id = tokenizer.convert_tokens_to_ids(token)
    return tokenizer.encode(f"a {token}b", add_special_tokens=False).count(token_id) == 1


def _ensure_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    if not _is_single_added_token(tokenizer, text):
        token = AddedToken(text, special=True, normalized=False, lstrip=False, rstrip=False)
        tokenizer.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
        if not _is_single_added_token(tokenizer, text):
            raise RuntimeError(f"could not make {text!r} a single token of {type(tokenizer).__name__}")
    return tokenizer.convert_tokens_to_ids(text)


def ensure_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Make `<image>` one special token of `tokenizer` (adding it if missing) and return its id.

    Works for any HF tokenizer (a real Llama/Qwen one included). When it adds a token the vocabulary grows, so
    the caller must resize the LLM's input embeddings to `len(tokenizer)`.
    """
    return _ensure_token(tokenizer, IMAGE_TOKEN)


def ensure_video_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Make `<video>` one special token of `tokenizer` (as ``ensure_image_token``) and return its id."""
    return _ensure_token(tokenizer, VIDEO_TOKEN)
