"""Chat templates and assistant-only labels.

Only assistant turns are trained. Rather than teaching this module every template's syntax, the assistant
spans are found by rendering prefixes of the conversation with the template itself: the text between
"everything up to this reply, plus the generation prompt" and "everything up to and including this reply" is
what the model must generate. That works for any prefix-consistent template (ChatML, Llama-3, Qwen2,
Vicuna, ...) and fails loudly for one that is not, so a new LLM can't silently train on nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2

__all__ = [
    "CHATML_TEMPLATE",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "LLAMA3_TEMPLATE",
    "QWEN2_TEMPLATE",
    "VICUNA_TEMPLATE",
    "VIDEO_TOKEN",
    "assistant_text_from_labels",
    "llava_to_messages",
    "render_with_assistant_spans",
    "tokenize_conversation",
]

IMAGE_TOKEN = "<image>"  # one placeholder token per image; the processor expands it to the visual tokens
VIDEO_TOKEN = "<video>"  # one placeholder per video; the processor expands it to the video's pooled tokens
IGNORE_INDEX = -100  # label of tokens the loss skips (HF / PyTorch cross-entropy convention)

# ChatML, our default: <|im_start|>{role}\n{content}<|im_end|>\n
CHATML_TEMPLATE = r"""{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""

# Llama-3 style: BOS, header tokens around the role, trimmed content, <|eot_id|> ends every turn.
LLAMA3_TEMPLATE = r"""{{- bos_token if bos_token else '' -}}
{%- for message in messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + (message['content'] | trim) -}}
{{- '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}"""

# Qwen2 style: ChatML with a default system prompt when the conversation has none.
QWEN2_TEMPLATE = r"""{%- if messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""

# Vicuna v1 / LLaVA-1.5 style: "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." (no BOS in the text: the
# tokenizer of those models adds it itself).
VICUNA_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions." -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{{- system_message + ' ' -}}
{%- for message in loop_messages -%}
{%- if message['role'] == 'user' -%}
{{- 'USER: ' + message['content'] + ' ' -}}
{%- elif message['role'] == 'assistant' -%}
{{- 'ASSISTANT: ' + message['content'] + '</s>' -}}
{%- else -%}
{{- raise_exception('Vicuna template has no role ' + message['role']) -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- 'ASSISTANT:' -}}
{%- endif -%}"""  # noqa: E501

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def llava_to_messages(conversations: Sequence[Mapping[str, Any]], system: str | None = None) -> list[dict]:
    """Convert LLaVA turns (`{"from": "human"|"gpt"|"system", "value": str}`) to HF chat messages.

    `system` is a default system prompt, used only when the record has no system turn of its own.
    """
    messages = []
    for index, turn in enumerate(conversations):
        speaker = turn.get("from")
        if speaker not in LLAVA_ROLES:
            raise ValueError(
                f"turn {index}: unknown speaker {speaker!r}; expected one of {sorted(LLAVA_ROLES)}"
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise ValueError(f"turn {index}: 'value' must be a string, got {type(value).__name__}")
        messages.append({"role": LLAVA_ROLES[speaker], "content": value})
    if system is not None and not any(message["role"] == "system" for message in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _renderer(tokenizer: Any, chat_template: str | None) -> Callable[[list[dict], bool], str]:
    """Render a prefix of one conversation; each (length, add_generation_prompt) is rendered once."""
    seen: dict[tuple[int, bool], str] = {}

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        key = (len(messages), add_generation_prompt)
        if key not in seen:
            try:
                seen[key] = tokenizer.apply_chat_template(
                    messages,
                    chat_template=chat_template,
                    add_generation_prompt=add_generation_prompt,
                    tokenize=False,
                )
            except jinja2.TemplateError as err:
                failed = f"chat template failed on the first {len(messages)} messages: {err}"
                raise ValueError(failed) from err
        return seen[key]

    return render


# Templates already seen to honour add_generation_prompt (checked once each, not once per conversation).
_HONOURS_GENERATION_PROMPT: set[str] = set()


def render_with_assistant_spans(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return `(text, spans)`: the character span of every assistant reply.

    A span is the reply plus its end-of-turn marker (so the model learns to stop), without the role header
    and without whitespace after the marker. Raises ValueError if the template is not prefix-consistent.
    """
    messages = [dict(message) for message in messages]
    render = _renderer(tokenizer, chat_template)
    text = render(messages, add_generation_prompt)
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", "")
    template_key = str(template)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        content = message.get("content")
        where = f"assistant message {index}"
        if not isinstance(content, str):
            raise ValueError(f"{where}: content must be a string, got {type(content).__name__}")
        if index == 0:
            raise ValueError(
                f"{where}: a conversation can't start with an assistant turn (nothing prompts it)"
            )
        prompt = render(messages[:index], True)
        through_reply = render(messages[: index + 1], False)
        if not spans and template_key not in _HONOURS_GENERATION_PROMPT:
            if prompt == render(messages[:index], False):
                raise ValueError(
                    "chat template ignores add_generation_prompt, so the assistant header can't be told "
                    "apart from the reply"
                )
            _HONOURS_GENERATION_PROMPT.add(template_key)
        if not through_reply.startswith(prompt):
            at = _first_difference(prompt, through_reply)
            raise ValueError(
                f"chat template is not prefix-consistent at {where}: the generation prompt ends with "
                f"{prompt[at:]!r} where the rendered reply has {through_reply[at : at + 40]!r}"
            )
        if not text.startswith(through_reply):
            raise ValueError(
                f"chat template is not prefix-consistent at {where}: the conversation rendered up to this "
                "reply is not a prefix of the whole rendered conversation (the template renders a turn "
                "differently depending on what follows it)"
            )
        start, end = len(prompt), len(through_reply.rstrip())
        reply = text[start:end]
        if spans and start < spans[-1][1]:
            raise ValueError(f"{where}: its span overlaps the previous assistant reply")
        if not reply or content.strip() not in reply:
            raise ValueError(
                f"{where}: assistant span not found: the rendered reply {reply!r} lacks its content"
            )
        spans.append((start, end))
    return text, spans


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _image_token_id(tokenizer: Any) -> int | None:
    added = tokenizer.get_added_vocab()
    return added.get(IMAGE_TOKEN)


def _video_token_id(tokenizer: Any) -> int | None:
    return tokenizer.get_added_vocab().get(VIDEO_TOKEN)


def _mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """True for every token whose characters overlap a span (offsets and spans both ascending)."""
    mask = []
    k = 0
    for start, end in offsets:
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        mask.append(k < len(spans) and end > start and end > spans[k][0])
    return mask


def tokenize_conversation(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    chat_template: str | None = None,
    max_length: int | None = None,
    add_generation_prompt: bool = False,
) -> dict[str, list[int]]:
    """Tokenize a chat once and label only the assistant replies (labels are -100 elsewhere).

    Each `<image>` must be a single token (see `data.tokenizer.ensure_image_token`) and is never labelled.
    A BOS is prepended only if the tokenizer adds one itself and the template did not already render it.
    `max_length` truncates on the right; it is an error if that drops every assistant token.
    """
    text, spans = render_with_assistant_spans(
        messages, tokenizer, chat_template=chat_template, add_generation_prompt=add_generation_prompt
    )
    bos = tokenizer.bos_token
    wants_bos = bos is not None and not text.startswith(str(bos))
    encoding = tokenizer(text, add_special_tokens=wants_bos, return_offsets_mapping=True)
    sequence_ids = encoding.sequence_ids(0)
    input_ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for position, (token_id, offset, sequence_id) in enumerate(
        zip(encoding["input_ids"], encoding["offset_mapping"], sequence_ids, strict=True)
    ):
        # Of what the tokenizer adds around the text, keep only a leading BOS (drop e.g. an appended EOS).
        if sequence_id is None and not (position == 0 and token_id == tokenizer.bos_token_id):
            continue
        input_ids.append(token_id)
        offsets.append((0, 0) if sequence_id is None else tuple(offset))

    image_id = _image_token_id(tokenizer)
    expected_images = text.count(IMAGE_TOKEN)
    if expected_images:
        found = input_ids.count(image_id) if image_id is not None else 0
        if found != expected_images:
            raise ValueError(
                f"{expected_images} {IMAGE_TOKEN} placeholder(s) tokenized to {found} single {IMAGE_TOKEN} "
                "token(s); call data.tokenizer.ensure_image_token(tokenizer) first"
            )

    mask = _mask_from_offsets(offsets, spans)
    media_ids = {image_id, _video_token_id(tokenizer)}
    labels = [
        token_id if labelled and token_id not in media_ids else IGNORE_INDEX
        for token_id, labelled in zip(input_ids, mask, strict=True)
    ]
    if max_length is not None and len(input_ids) > max_length:
        labelled_positions = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        if labelled_positions and labelled_positions[0] >= max_length:
            raise ValueError(
                f"max_length={max_length} would drop all {len(labelled_positions)} assistant tokens "
                f"({len(spans)} replies; the first starts at token {labelled_positions[0]} "
                f"of {len(input_ids)})"
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def assistant_text_from_labels(input_ids: Sequence[int], labels: Sequence[int], tokenizer: Any) -> list[str]:
    """Decode each contiguous run of labelled tokens: what the model is trained to say, in order."""
    input_ids = input_ids.tolist() if hasattr(input_ids, "tolist") else list(input_ids)
    labels = labels.tolist() if hasattr(labels, "tolist") else list(labels)
    if len(input_ids) != len(labels):
        raise ValueError(f"input_ids has {len(input_ids)} tokens but labels has {len(labels)}")
    runs: list[list[int]] = []
    current: list[int] = []
    for position, (token_id, label) in enumerate(zip(input_ids, labels)):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
                current = []
            continue
        if label != token_id:
            raise ValueError(f"label {label} at position {position} differs from its input id {token_id}")
        current.append(token_id)
    if current:
        runs.append(current)
    return [
        tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False) for run in runs
    ]
