"""Any HF causal LM directory as the LLM: a tiny Llama and a tiny Qwen2, each with its own tokenizer and chat
template, load through ``model.llm={"path": dir}``, train, generate, and survive save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, TINY_EXPERT, TINY_PROJECTOR, solid_image
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from data.templates import LLAMA3_TEMPLATE, QWEN2_TEMPLATE, assistant_text_from_labels
from data.tokenizer import train_tokenizer
from mm.build import build_tokenizer, build_vlm, load_vlm, make_processor, save_vlm
from mm.config import ModelConfig, build

LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BACKENDS = {
    # family: (config class, chat template, extra special tokens, end-of-turn token, bos token)
    "llama": (LlamaConfig, LLAMA3_TEMPLATE, LLAMA3_TOKENS, "<|eot_id|>", "<|begin_of_text|>"),
    "qwen2": (Qwen2Config, QWEN2_TEMPLATE, [], "<|im_end|>", None),
}
CONV = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]


def write_hf_llm(family: str, out_dir):
    """A random-weight HF model directory with its own tokenizer, as a downloaded checkpoint would be."""
    config_cls, template, extra, eos, bos = BACKENDS[family]
    tok = train_tokenizer(CORPUS, None, vocab_size=320, chat_template=template, extra_special_tokens=extra)
    tok.eos_token = eos
    if bos:
        tok.bos_token = bos
    tok.save_pretrained(out_dir)
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request, tmp_path_factory):
    family = request.param
    llm_dir = write_hf_llm(family, tmp_path_factory.mktemp(family))
    section = build(
        ModelConfig,
        {"llm": {"path": str(llm_dir)}, "experts": [dict(TINY_EXPERT)], "projector": dict(TINY_PROJECTOR)},
        "model",
    )
    torch.manual_seed(0)
    tokenizer = build_tokenizer(section)  # no corpus: the LLM directory's own tokenizer
    model = build_vlm(section, tokenizer)
    return family, llm_dir, model, make_processor(model, tokenizer)


def test_llm_is_loaded_from_the_directory(backend):
    family, llm_dir, model, proc = backend
    original = AutoModelForCausalLM.from_pretrained(llm_dir)
    assert model.llm.config.model_type == family
    assert model.config.text_config.model_type == family
    assert model.llm.config.num_key_value_heads == 2
    for name, tensor in original.state_dict().items():
        ours = model.llm.state_dict()[name]
        if ours.shape != tensor.shape:  # <image> / <video> grew the vocabulary: the old rows are kept
            assert ours.shape[0] == len(proc.tokenizer) > tensor.shape[0], name
            ours = ours[: tensor.shape[0]]
        assert torch.equal(ours, tensor), name
    assert proc.tokenizer.eos_token == BACKENDS[family][3]
    assert model.llm.generation_config.eos_token_id == proc.tokenizer.eos_token_id


def test_its_chat_template_shapes_the_sequence(backend):
    family, _, _, proc = backend
    feats = proc.tokenize(CONV, 1)
    text = proc.tokenizer.decode([t for t in feats["input_ids"] if t != proc.image_token_id])
    eos = BACKENDS[family][3]
    if family == "llama":
        assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    else:
        assert text.startswith(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        )
    assert assistant_text_from_labels(feats["input_ids"], feats["labels"], proc.tokenizer) == [f"red{eos}"]
    assert feats["input_ids"].count(proc.image_token_id) == proc.tokens_per_image


def test_trains_and_generates(backend, tmp_path):
    family, _, model, proc = backend
    batch = proc.collate(
        [
            proc(CONV, [solid_image((255, 0, 0))]),
            proc(
                [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": "blue"},
                ],
                [solid_image((0, 0, 255))],
            ),
        ]
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses

    prompt = proc.collate([proc(CONV[:1], [solid_image()], for_generation=True)], padding_side="left")
    new = model.generate(
        prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"], max_new_tokens=4
    )
    assert new.dtype == torch.long and new.shape[0] == 1 and 1 <= new.shape[1] <= 4
    assert int(new.max()) < len(proc.tokenizer)

    loaded, loaded_proc = load_vlm(save_vlm(model, proc, tmp_path / "vlm"))
    assert loaded.llm.config.model_type == family
    assert loaded_proc.tokenizer.chat_template == proc.tokenizer.chat_template
    again = loaded.generate(
        prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"], max_new_tokens=4
    )
    assert torch.equal(new, again)
