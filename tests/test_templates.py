"""Assistant-only labels for every chat template we ship: the labelled text must be exactly the replies."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.templates import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    LLAMA3_TEMPLATE,
    QWEN2_TEMPLATE,
    VICUNA_TEMPLATE,
    assistant_text_from_labels,
    llava_to_messages,
    render_with_assistant_spans,
    tokenize_conversation,
)
from data.tokenizer import ensure_image_token, train_tokenizer

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
VICUNA_TOKENS = ["<s>", "</s>"]
WORDS = (
    "a the red blue green circle square triangle shape shapes is are at of and with this one first others "
    "describe compare where what thanks you welcome empty has two image careful assistant user helpful"
).split()


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        lines.append(
            " ".join(words).capitalize() + rng.choice([".", "?", "!", ","]) + f" {rng.randint(0, 999)}"
        )
    return lines


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(), None, vocab_size=400, extra_special_tokens=LLAMA3_TOKENS + VICUNA_TOKENS)


SINGLE = [
    {"role": "user", "content": "<image>\nWhat shape is this?"},
    {"role": "assistant", "content": "A red circle."},
]
MULTI_TURN_SYSTEM = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "<image>\nDescribe the image."},
    {"role": "assistant", "content": "Two shapes: a blue square and a green triangle."},
    {"role": "user", "content": "Where is the square?"},
    {"role": "assistant", "content": "At 12, 40, 56, 88."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
INTERLEAVED_IMAGES = [
    {"role": "user", "content": "Compare <image> with <image> and <image>."},
    {"role": "assistant", "content": "The first has 3 shapes, the others 2."},
    {"role": "user", "content": "And this one? <image>"},
    {"role": "assistant", "content": "It is empty.\n"},
]
CONVERSATIONS = {"single": SINGLE, "multi_turn_system": MULTI_TURN_SYSTEM, "interleaved": INTERLEAVED_IMAGES}

# What the model must learn to say for one reply, per template: the reply and the end-of-turn marker.
TEMPLATES = {
    "chatml_own": (None, lambda reply: reply + "<|im_end|>"),
    "llama3": (LLAMA3_TEMPLATE, lambda reply: reply.strip() + "<|eot_id|>"),
    "qwen2": (QWEN2_TEMPLATE, lambda reply: reply + "<|im_end|>"),
    "vicuna": (VICUNA_TEMPLATE, lambda reply: " " + reply + "</s>"),
}


@pytest.mark.parametrize("conversation_name", list(CONVERSATIONS))
@pytest.mark.parametrize("template_name", list(TEMPLATES))
def test_labels_are_exactly_the_assistant_replies(tok, template_name, conversation_name):
    template, expected_reply = TEMPLATES[template_name]
    messages = CONVERSATIONS[conversation_name]
    out = tokenize_conversation(messages, tok, chat_template=template)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)

    rendered = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == rendered  # one pass, nothing lost, no BOS added

    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert assistant_text_from_labels(ids, labels, tok) == [expected_reply(r) for r in replies]

    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    image_positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(image_positions) == rendered.count(IMAGE_TOKEN) > 0
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    assert set(labels) - {IGNORE_INDEX} <= set(ids)


def test_default_system_prompt_is_rendered_but_not_labelled(tok):
    out = tokenize_conversation(SINGLE, tok, chat_template=QWEN2_TEMPLATE)
    text = tok.decode(out["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert assistant_text_from_labels(out["input_ids"], out["labels"], tok) == ["A red circle.<|im_end|>"]


def test_spans_are_character_exact_and_exclude_role_header(tok):
    text, spans = render_with_assistant_spans(MULTI_TURN_SYSTEM, tok)
    assert [text[a:b] for a, b in spans] == [
        "Two shapes: a blue square and a green triangle.<|im_end|>",
        "At 12, 40, 56, 88.<|im_end|>",
        "You are welcome.<|im_end|>",
    ]
    assert all(text[a - len("<|im_start|>assistant\n") : a] == "<|im_start|>assistant\n" for a, _ in spans)


def test_image_inside_a_reply_is_never_labelled(tok):
    messages = [
        {"role": "user", "content": "Draw a square."},
        {"role": "assistant", "content": "Here: <image> done."},
    ]
    out = tokenize_conversation(messages, tok)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    position = out["input_ids"].index(image_id)
    assert out["labels"][position] == IGNORE_INDEX
    assert out["labels"][position - 1] != IGNORE_INDEX and out["labels"][position + 1] != IGNORE_INDEX
    assert assistant_text_from_labels(out["input_ids"], out["labels"], tok) == ["Here: ", " done.<|im_end|>"]


def test_generation_prompt_for_inference_has_no_labels(tok):
    prompt = SINGLE[:1]
    out = tokenize_conversation(prompt, tok, add_generation_prompt=True)
    assert tok.decode(out["input_ids"]).endswith("What shape is this?<|im_end|>\n<|im_start|>assistant\n")
    assert set(out["labels"]) == {IGNORE_INDEX}
    followup = tokenize_conversation(MULTI_TURN_SYSTEM[:4], tok, add_generation_prompt=True)
    assert assistant_text_from_labels(followup["input_ids"], followup["labels"], tok) == [
        "Two shapes: a blue square and a green triangle.<|im_end|>"
    ]


def test_only_one_tokenizer_call_per_conversation(tok, monkeypatch):
    calls = []
    original = type(tok).__call__

    def counting_call(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting_call)
    tokenize_conversation(MULTI_TURN_SYSTEM, tok)
    assert len(calls) == 1


# --- templates that are not prefix-consistent must fail loudly --------------------------------------------

# Like reasoning templates that drop earlier replies: a reply renders differently once a later turn follows.
REWRITES_EARLIER_REPLIES = r"""{%- for message in messages -%}
{%- if message['role'] == 'assistant' and not loop.last -%}
{{- '<|im_start|>assistant\n[earlier reply]<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""

# The generation prompt says "assistant" but replies are rendered under "bot".
MISMATCHED_GENERATION_PROMPT = CHATML_TEMPLATE.replace(
    "'<|im_start|>' + message['role'] + '\\n'",
    "'<|im_start|>' + ('bot' if message['role'] == 'assistant' else message['role']) + '\\n'",
)

IGNORES_GENERATION_PROMPT = r"""{%- for message in messages -%}
{{- message['role'] + ': ' + message['content'] + '\n' -}}
{%- endfor -%}"""


def test_template_rewriting_earlier_turns_raises(tok):
    # a single reply is fine: it is the last turn either way
    tokenize_conversation(SINGLE, tok, chat_template=REWRITES_EARLIER_REPLIES)
    with pytest.raises(ValueError, match="not prefix-consistent at assistant message 2: the conversation"):
        tokenize_conversation(MULTI_TURN_SYSTEM, tok, chat_template=REWRITES_EARLIER_REPLIES)


def test_generation_prompt_mismatch_raises(tok):
    assert "bot" in MISMATCHED_GENERATION_PROMPT
    with pytest.raises(ValueError) as info:
        tokenize_conversation(SINGLE, tok, chat_template=MISMATCHED_GENERATION_PROMPT)
    assert str(info.value) == (
        "chat template is not prefix-consistent at assistant message 1: the generation prompt ends with "
        "'assistant\\n' where the rendered reply has 'bot\\nA red circle.<|im_end|>\\n'"
    )


def test_template_ignoring_generation_prompt_raises(tok):
    with pytest.raises(ValueError, match="ignores add_generation_prompt"):
        tokenize_conversation(SINGLE, tok, chat_template=IGNORES_GENERATION_PROMPT)


def test_reply_whose_content_is_not_rendered_raises(tok):
    drops_content = CHATML_TEMPLATE.replace("message['content']", "message['content'][:3]")
    with pytest.raises(ValueError, match="assistant message 1: assistant span not found"):
        tokenize_conversation(SINGLE, tok, chat_template=drops_content)


def test_conversation_starting_with_assistant_raises(tok):
    with pytest.raises(ValueError, match="assistant message 0: a conversation can't start with an assistant"):
        tokenize_conversation(SINGLE[::-1], tok)


def test_template_errors_become_value_errors(tok):
    with pytest.raises(
        ValueError, match="chat template failed on the first 4 messages: Vicuna template has no"
    ):
        tokenize_conversation(
            SINGLE + [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}],
            tok,
            chat_template=VICUNA_TEMPLATE,
        )


# --- truncation ---------------------------------------------------------------------------------------------


def test_truncation_keeps_a_prefix_and_partial_replies(tok):
    full = tokenize_conversation(MULTI_TURN_SYSTEM, tok)
    labelled = [i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX]
    cut = labelled[0] + 3  # three tokens into the first reply
    short = tokenize_conversation(MULTI_TURN_SYSTEM, tok, max_length=cut)
    assert short["input_ids"] == full["input_ids"][:cut]
    assert short["labels"] == full["labels"][:cut]
    assert sum(label != IGNORE_INDEX for label in short["labels"]) == 3
    same = tokenize_conversation(MULTI_TURN_SYSTEM, tok, max_length=len(full["input_ids"]))
    assert same == full


def test_truncation_dropping_every_assistant_token_raises(tok):
    full = tokenize_conversation(MULTI_TURN_SYSTEM, tok)
    labelled = [i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX]
    first = labelled[0]
    with pytest.raises(ValueError) as info:
        tokenize_conversation(MULTI_TURN_SYSTEM, tok, max_length=first)
    message = str(info.value)
    assert f"max_length={first} would drop all {len(labelled)} assistant tokens" in message
    assert f"3 replies; the first starts at token {first} of {len(full['input_ids'])}" in message
    assert len(tokenize_conversation(MULTI_TURN_SYSTEM, tok, max_length=first + 1)["input_ids"]) == first + 1


# --- BOS handling -------------------------------------------------------------------------------------------


def test_bos_rendered_by_template_is_not_doubled():
    tok = train_tokenizer(corpus(), None, vocab_size=400, extra_special_tokens=LLAMA3_TOKENS)
    tok.bos_token = "<|begin_of_text|>"
    tok.add_bos_token = True  # like Llama-3: the tokenizer adds BOS itself AND the template renders it
    bos = tok.bos_token_id
    assert tok("hi")["input_ids"][0] == bos
    out = tokenize_conversation(MULTI_TURN_SYSTEM, tok, chat_template=LLAMA3_TEMPLATE)
    assert out["input_ids"][0] == bos and out["input_ids"].count(bos) == 1
    assert out["labels"][0] == IGNORE_INDEX
    replies = assistant_text_from_labels(out["input_ids"], out["labels"], tok)
    assert replies == [m["content"] + "<|eot_id|>" for m in MULTI_TURN_SYSTEM if m["role"] == "assistant"]


def test_bos_added_by_tokenizer_is_kept_once_and_eos_not_appended():
    tok = train_tokenizer(corpus(), None, vocab_size=400, extra_special_tokens=VICUNA_TOKENS)
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    tok.add_bos_token = True
    tok.add_eos_token = True  # would append a stray </s> after the template's own
    out = tokenize_conversation(SINGLE, tok, chat_template=VICUNA_TEMPLATE)
    ids = out["input_ids"]
    assert (
        ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and out["labels"][0] == IGNORE_INDEX
    )
    rendered = tok.apply_chat_template(SINGLE, chat_template=VICUNA_TEMPLATE, tokenize=False)
    assert tok.decode(ids) == "<s>" + rendered
    assert ids.count(tok.eos_token_id) == 1
    assert assistant_text_from_labels(ids, out["labels"], tok) == [" A red circle.</s>"]


def sentencepiece_style_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-like tokenizer (Metaspace pre-tokenizer, adds <s> itself, no <image>), trained here."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    texts = corpus() + [
        "USER: ASSISTANT: <image> A chat between a curious human and an artificial intelligence"
    ]
    alphabet = sorted(set("".join(texts)) | set("'\n"))
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        add_bos_token=True,
        chat_template=VICUNA_TEMPLATE,
    )


def test_llava_style_tokenizer_needs_image_token_then_labels_replies():
    tok = sentencepiece_style_tokenizer()
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) tokenized to 0 single <image> token"):
        tokenize_conversation(SINGLE, tok)
    ensure_image_token(tok)
    out = tokenize_conversation(MULTI_TURN_SYSTEM, tok)
    ids = out["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    replies = assistant_text_from_labels(ids, out["labels"], tok)
    # this decoder drops the leading space of each decoded run, as Llama-2's does
    assert replies == [m["content"] + "</s>" for m in MULTI_TURN_SYSTEM if m["role"] == "assistant"]


# --- LLaVA records and label decoding -----------------------------------------------------------------------


def test_llava_to_messages_maps_roles_and_default_system():
    record = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A square."},
    ]
    assert llava_to_messages(record) == [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A square."},
    ]
    with_default = llava_to_messages(record, system="Be brief.")
    assert with_default[0] == {"role": "system", "content": "Be brief."} and len(with_default) == 3
    own_system = [{"from": "system", "value": "Own prompt."}] + record
    assert llava_to_messages(own_system, system="Be brief.")[0] == {
        "role": "system",
        "content": "Own prompt.",
    }
    assert len(llava_to_messages(own_system, system="Be brief.")) == 3


def test_llava_to_messages_rejects_bad_turns():
    with pytest.raises(ValueError, match=r"turn 1: unknown speaker 'bot'; expected one of \['gpt', 'human'"):
        llava_to_messages([{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}])
    with pytest.raises(ValueError, match="turn 0: 'value' must be a string, got NoneType"):
        llava_to_messages([{"from": "human", "value": None}])


def test_llava_record_end_to_end(tok):
    record = [{"from": "human", "value": "<image>\nCount the shapes."}, {"from": "gpt", "value": "3"}]
    out = tokenize_conversation(llava_to_messages(record), tok)
    assert assistant_text_from_labels(out["input_ids"], out["labels"], tok) == ["3<|im_end|>"]


def test_assistant_text_from_labels_validates_inputs(tok):
    with pytest.raises(ValueError, match="input_ids has 3 tokens but labels has 2"):
        assistant_text_from_labels([5, 6, 7], [5, 6], tok)
    with pytest.raises(ValueError, match="label 9 at position 1 differs from its input id 6"):
        assistant_text_from_labels([5, 6, 7], [IGNORE_INDEX, 9, 7], tok)
    assert assistant_text_from_labels([5, 6, 7], [IGNORE_INDEX] * 3, tok) == []
