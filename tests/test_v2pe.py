"""V2PE in HF RoPE LLMs: float positions reach every family's rotary embedding untruncated, the precise
rotary keeps fractions far out, delta = 1 is the plain encoding, batched generation equals one by one,
per-image deltas are drawn reproducibly, and a learned-position LLM is refused."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CORPUS, TINY_EXPERT, TINY_PROJECTOR, solid_image
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from mm.build import build_tokenizer, build_vlm, make_processor
from mm.config import ModelConfig, build
from mm.rope import PreciseRotary, install_precise_rotary, rotary_modules

FAMILIES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "gemma": GemmaConfig,
    "phi3": Phi3Config,
}
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
)


def tiny_llm(family: str, attn: str = "eager"):
    torch.manual_seed(0)
    config = FAMILIES[family](**TINY, **({"head_dim": 8} if family == "gemma" else {}))
    config._attn_implementation = attn
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_family_takes_float_positions_untruncated(family, attn):
    llm = tiny_llm(family, attn)
    ids = torch.randint(0, 64, (1, 6))
    mask = torch.ones_like(ids)
    integer = torch.arange(6)[None]
    with torch.no_grad():
        plain = llm(input_ids=ids, attention_mask=mask, position_ids=integer).logits
        as_float = llm(input_ids=ids, attention_mask=mask, position_ids=integer.double()).logits
        shifted = llm(input_ids=ids, attention_mask=mask, position_ids=integer.double() * 0.5).logits
    assert torch.equal(plain, as_float)  # float ids of integer positions: the same numbers
    assert not torch.allclose(plain[:, 1:], shifted[:, 1:])  # 0.5, 1.5 ... were not truncated to integers
    assert rotary_modules(llm), family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_precise_rotary_keeps_the_fraction_above_100k_against_a_float64_reference(family):
    llm = tiny_llm(family)
    (name, module), *_ = rotary_modules(llm)
    x = torch.zeros(1, 1, 8)
    pos = torch.tensor([[100_000 + 1 / 256, 123_456 + 3 / 64]], dtype=torch.float64)
    inv = module.inv_freq.double()
    ref = (pos[..., None] * inv).repeat(1, 1, 2)
    scale = getattr(module, "attention_scaling", 1.0)
    ref_cos, ref_sin = ref.cos() * scale, ref.sin() * scale
    plain_cos, plain_sin = module(x, pos)  # HF's own: fp32 angles
    assert install_precise_rotary(llm) >= 1 and install_precise_rotary(llm) >= 1  # idempotent
    wrapped = dict(rotary_modules(llm))[name]
    assert isinstance(wrapped, PreciseRotary)
    cos, sin = wrapped(x, pos)
    assert cos.dtype == torch.float32
    torch.testing.assert_close(cos.double(), ref_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=1e-6, rtol=0)
    # the fp32 path lost the 1/256 step (an angle error of ~0.004 at the highest frequency)
    lost = torch.maximum((plain_cos.double() - ref_cos).abs(), (plain_sin.double() - ref_sin).abs())
    assert lost.max() > 2e-3
    # fp32 positions (a plain model) take the wrapped module's own path, bit for bit
    assert torch.equal(wrapped(x, pos.float())[0], module(x, pos.float())[0])
    # a model cast to bf16 casts inv_freq too; the precise rotary recomputes its frequencies from the config
    llm.to(torch.bfloat16)
    assert module.inv_freq.dtype == torch.bfloat16
    cos16, _ = dict(rotary_modules(llm))[name](x.to(torch.bfloat16), pos)
    torch.testing.assert_close(cos16.double(), ref_cos, atol=8e-3, rtol=0)  # only the bf16 output rounding


def vlm(family: str = "llama", **changes):
    values = dict(
        llm={"family": family, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        experts=[dict(TINY_EXPERT)],
        projector=dict(TINY_PROJECTOR),
        tokenizer={"vocab_size": 300},
    )
    values.update(changes)
    section = build(ModelConfig, values, "model")
    torch.manual_seed(0)
    tok = build_tokenizer(section, CORPUS)
    model = build_vlm(section, tok).eval()
    return model, make_processor(model, tok)


CONV = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"}]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_delta_one_is_the_plain_integer_path(family, attn):
    model, proc = vlm(family)
    model.llm.set_attn_implementation(attn)
    batch = proc.collate([proc(CONV, [solid_image()])])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours = model(**batch).logits
        embeds = model.embed(ids, batch["pixel_values"])
        plain = model.llm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None]
        )
    assert torch.equal(ours, plain.logits)
    # a V2PE model at delta 1: its positions are the integers, through its own (precise) rotary
    v2, vproc = vlm(family, v2pe=True)
    v2.llm.set_attn_implementation(attn)
    vb = vproc.collate([vproc(CONV, [solid_image()])])
    with torch.no_grad():
        by_rule = v2(**vb).logits
        by_arange = v2(**vb, position_ids=torch.arange(ids.shape[1])[None].double()).logits
    assert torch.equal(by_rule, by_arange)
    torch.testing.assert_close(by_rule, ours, atol=1e-4, rtol=0)  # precise vs fp32 angles: the same model


def test_batched_generation_with_v2pe_equals_one_by_one():
    model, proc = vlm("qwen2", v2pe=True, visual_delta=0.25)
    prompts = [
        ([{"from": "human", "value": "<image>\nWhat colour is the circle?"}], [solid_image()]),
        (
            [{"from": "human", "value": "<image>\n<image>\nDescribe the image. How many shapes are there?"}],
            [solid_image((0, 0, 255)), solid_image((0, 200, 0), (50, 90))],
        ),
    ]
    feats = [proc(c, ims, for_generation=True) for c, ims in prompts]
    settings = dict(max_new_tokens=6, eos_token_id=-1)

    def gen(fs):
        b = proc.collate(fs, padding_side="left")
        b.pop("labels")
        return model.generate(**b, **settings)

    together = gen(feats)
    for row, f in enumerate(feats):
        assert torch.equal(gen([f])[0], together[row])
    # and the delta matters: the same prompts at delta 1 decode differently somewhere
    b = proc.collate(feats, padding_side="left")
    b.pop("labels")
    b["image_deltas"] = torch.ones_like(b["image_deltas"])
    with torch.no_grad():
        at_one = model(**b).logits
        at_quarter = model(**{**b, "image_deltas": torch.full_like(b["image_deltas"], 0.25)}).logits
    assert not torch.allclose(at_one, at_quarter)


def test_a_learned_position_llm_is_refused_when_delta_is_not_one(tmp_path):
    from data.tokenizer import train_tokenizer

    tok = train_tokenizer(CORPUS, None, vocab_size=300)
    tok.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=512)
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="GPT2LMHeadModel has learned absolute position embeddings"):
        vlm(llm={"path": str(tmp_path)}, visual_delta=0.5)
    model, proc = vlm(llm={"path": str(tmp_path)})  # delta 1: integer positions, allowed
    batch = proc.collate([proc(CONV, [solid_image()])])
    assert torch.isfinite(model(**batch).loss)


def test_each_images_delta_is_drawn_per_record_and_the_same_on_every_run(tmp_path):
    from data.dataset import ConversationDataset
    from data.media import MediaPaths
    from mm.positions import V2PE_DELTAS

    solid_image().save(tmp_path / "a.png")
    records = [
        {
            "id": str(i),
            "image": ["a.png", "a.png"],
            "conversations": [
                {"from": "human", "value": "<image>\n<image>\nWhat colour is the circle?"},
                {"from": "gpt", "value": "red"},
            ],
        }
        for i in range(40)
    ]
    _, proc = vlm()

    def draws(seed):
        data = ConversationDataset(
            records, proc, MediaPaths(tmp_path), deltas=V2PE_DELTAS, seed=seed, progress=False
        )
        return [data[i]["image_deltas"] for i in range(len(data))]

    first, again, other = draws(0), draws(0), draws(1)
    assert first == again  # a resumed run re-tokenises to the same draws
    assert first != other
    assert all(len(d) == 2 and set(d) <= set(V2PE_DELTAS) for d in first)
    assert len({d for pair in first for d in pair}) >= 5  # the set is used, not one value
    batch = proc.collate(
        [
            ConversationDataset(records[:2], proc, MediaPaths(tmp_path), deltas=V2PE_DELTAS, progress=False)[
                i
            ]
            for i in range(2)
        ]
    )
    assert batch["image_deltas"].dtype == torch.float64 and batch["image_deltas"].shape == (2, 2)
    assert batch["image_deltas"].tolist() == first[:2]
    assert math.isclose(sum(V2PE_DELTAS), 2 - 2**-8)
