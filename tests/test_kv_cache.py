"""KV-cache compression after the prefill: a full budget changes nothing, a batch equals its rows alone, GQA
works, LOOK-M never evicts text, the merges match hand-computed values, decoding keeps the logical
positions, the scores equal eager attention's probabilities, and the reported KV size shrinks."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, TINY_EXPERT, TINY_PROJECTOR, solid_image

from mm.build import build_tokenizer, build_vlm, make_processor
from mm.config import ModelConfig, build
from mm.generation import GenerationSettings
from mm.inference import Engine, Request
from mm.kv_cache import KV_METHODS, KVCompression, LookM, RowPrompt, attention_mass, merge_evicted

PROMPTS = [
    ("<image>\n<image>\nHow many shapes are there in the two images?", [(0, 0, 255), (0, 200, 0)]),
    ("<image>\nWhat colour is the circle?", [(255, 0, 0)]),
    ("Where is the square? Answer in one short sentence, please.", []),
]
METHODS = [("lookm", m) for m in ("pivotal", "averaged", "weighted", "none")] + [
    (m, "pivotal") for m in ("h2o", "snapkv", "streaming", "random")
]


def tiny_vlm(family: str = "qwen2", **changes):
    llm = {"family": family, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    llm["num_key_value_heads"] = 2  # GQA: two query heads share each KV head
    values = dict(
        llm=llm, experts=[dict(TINY_EXPERT)], projector=dict(TINY_PROJECTOR), tokenizer={"vocab_size": 300}
    )
    values.update(changes)
    torch.manual_seed(0)
    section = build(ModelConfig, values, "model")
    tok = build_tokenizer(section, CORPUS)
    model = build_vlm(section, tok).eval()
    return model, make_processor(model, tok)


@pytest.fixture(scope="module")
def engine():
    model, proc = tiny_vlm()
    return Engine(model, proc)


def requests(kv: KVCompression | None, which=range(3), max_new_tokens: int = 8) -> list[Request]:
    out = []
    for i in which:
        text, colours = PROMPTS[i]
        images = [solid_image(c, (60 + 10 * j, 50)) for j, c in enumerate(colours)]
        out.append(
            Request([{"from": "human", "value": text}], images, GenerationSettings(max_new_tokens, kv=kv))
        )
    return out


def tokens(engine: Engine, reqs: list[Request], capture: list | None = None) -> torch.Tensor:
    batch = engine._batch(reqs)
    run = engine.model.run_llm
    if capture is not None:  # record every decode step's positions

        def spy(**kw):
            if kw.get("input_ids") is not None:
                capture.append(kw["position_ids"].clone())
            return run(**kw)

        engine.model.run_llm = spy
    try:
        with torch.no_grad():
            return engine.model.generate(**batch, settings=[r.settings for r in reqs])
    finally:
        engine.model.run_llm = run


@pytest.mark.parametrize("method,merge", METHODS + [("full", "pivotal")])
def test_a_full_budget_is_the_full_cache(engine, method, merge):
    full = tokens(engine, requests(None))
    assert torch.equal(tokens(engine, requests(KVCompression(method, 1.0, merge))), full)


def test_held_out_prompt_tokens_run_on_the_compressed_cache(engine):
    """hold_out: the prompt's last tokens run after the compression. With nothing evicted (a token budget
    above every prompt's length) that is one prefill in two parts: the same tokens as the full cache, for a
    padded batch. With eviction the first answer token comes from the compressed cache, so it can change."""
    full = tokens(engine, requests(None))
    for method in ("lookm", "h2o", "snapkv"):
        kept_all = KVCompression(method, 10_000, window=4, hold_out=3)
        assert torch.equal(tokens(engine, requests(kept_all)), full), method
    # a 2-entry cache: the held-out last token is the one that gives the first answer token, attending to
    # the 2 kept entries and itself
    calls = []
    run = engine.model.run_llm

    def spy(**kw):
        if kw.get("inputs_embeds") is not None:
            calls.append((kw["inputs_embeds"].shape[1], kw["attention_mask"].shape[1]))
        return run(**kw)

    reqs = requests(KVCompression("h2o", 2, window=1, hold_out=1), max_new_tokens=1)
    width = engine._batch(reqs)["input_ids"].shape[1]
    engine.model.run_llm = spy
    try:
        tokens(engine, reqs)
    finally:
        engine.model.run_llm = run
    assert calls == [(width - 1, width - 1), (1, 3)]
    with pytest.raises(ValueError, match="KV hold_out must be >= 0 prompt tokens, got -1"):
        KVCompression("lookm", 0.2, hold_out=-1)


@pytest.mark.parametrize("method,merge", METHODS)
def test_a_padded_batch_equals_each_prompt_alone(engine, method, merge):
    kv = KVCompression(method, 0.5, merge, window=4)
    batched = tokens(engine, requests(kv))
    pad = engine.processor.tokenizer.pad_token_id
    for row in range(3):
        alone = tokens(engine, requests(kv, [row]))[0].tolist()
        assert batched[row].tolist()[: len(alone)] == alone, f"{method}/{merge} row {row}"
        assert all(t == pad for t in batched[row].tolist()[len(alone) :])


def test_decoding_keeps_the_logical_positions_with_v2pe():
    model, proc = tiny_vlm(v2pe=True, visual_delta=0.25)
    engine = Engine(model, proc)
    plain, squeezed = [], []
    tokens(engine, requests(None), plain)
    tokens(engine, requests(KVCompression("lookm", 0.2)), squeezed)
    assert len(plain) == len(squeezed) > 0
    for a, b in zip(plain, squeezed):
        assert torch.equal(a, b)
    prompt = engine._batch(requests(None))
    start = model.position_ids_for(
        prompt["input_ids"], prompt["attention_mask"], image_deltas=prompt["image_deltas"]
    )
    assert torch.equal(plain[0][:, 0], start.max(1).values.ceil() + 1)  # from the prompt's last position


def test_lookm_keeps_every_text_token_and_the_window():
    n, heads = 20, 2
    is_image = torch.zeros(n, dtype=torch.bool)
    is_image[2:14] = True  # text 0-1, image 2-13, text 14-19
    scores = torch.rand(heads, n)
    scores[:, ~is_image] = -1.0  # text gets the least attention: the prior must still keep it
    kept = LookM().select(RowPrompt(torch.arange(n), is_image, scores), KVCompression("lookm", 0.5), heads)
    # budget 10, recent window 5 (15-19); text outside it: 0, 1, 14; so 10 - 5 - 3 = 2 image slots
    assert kept.shape == (heads, 10)
    for h in range(heads):
        images = sorted(torch.topk(scores[h, 2:14], 2).indices.add(2).tolist())
        assert kept[h].tolist() == [0, 1, *images, 14, 15, 16, 17, 18, 19]
    # more text than the budget: all of it stays anyway (max(budget - recent, text) + recent)
    kept = LookM().select(RowPrompt(torch.arange(n), is_image, scores), KVCompression("lookm", 0.2), heads)
    assert kept[0].tolist() == [0, 1, 14, 15, 16, 17, 18, 19]


def test_lookm_never_evicts_text_in_the_cache(engine):
    from transformers import DynamicCache

    from mm.kv_cache import ScoreHooks, compress_cache

    batch = engine._batch(requests(None))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model = engine.model
    cache = DynamicCache(config=model.llm.config)
    hooks = ScoreHooks(model.llm, cache, mask, "all")
    positions = model.position_ids_for(ids, mask, image_deltas=batch["image_deltas"])
    with torch.no_grad():
        model.run_llm(
            cache=cache, inputs_embeds=model.embed(ids, batch["pixel_values"]), attention_mask=mask,
            position_ids=positions, use_cache=True,
        )  # fmt: skip
    hooks.remove()
    before = [layer.keys.clone() for layer in cache.layers]
    is_image = ids == engine.processor.image_token_id
    done = compress_cache(cache, mask, is_image, [KVCompression("lookm", 0.1, "none")] * 3, hooks.scores)
    text = (~is_image & mask.bool()).sum(1).tolist()
    assert done.after[2] == done.before[2] == text[2]  # no image: nothing to evict
    assert text[0] <= done.after[0] < done.before[0]
    for layer, old in zip(cache.layers, before):
        for row in range(3):
            held = layer.keys[row][:, done.mask[row].bool()]  # [H, kept, D]
            for col in torch.nonzero(~is_image[row] & mask[row].bool()).flatten():
                for h in range(held.shape[0]):
                    assert (held[h] == old[row, h, col]).all(-1).any(), f"text column {int(col)} evicted"


def test_each_merge_on_a_hand_computed_two_head_example():
    # head 0: kept keys e1, e2; evicted (1, 1) -> pivot e1 (cos .71 vs .71: first), (0, 2) -> pivot e2
    keys = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 2.0]],
            [[1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [3.0, 0.1]],
        ]
    )
    values = torch.arange(16, dtype=torch.float32).view(2, 4, 2)
    kept = torch.tensor([[0, 1], [0, 1]])
    evicted = torch.tensor([[2, 3], [2, 3]])
    # pivots: head 0: (2,1)->e1 (cos .894), (0,2)->e2 (cos 1); head 1: (0,3)->e2 (1), (3,.1)->e1 (.9994)
    k, v = merge_evicted(keys, values, kept, evicted, "pivotal")
    expected_k = torch.tensor(
        [
            [[(1 + (2 + 1) / 2) / 2, (0 + (1 + 0) / 2) / 2], [(0 + 0) / 2, (1 + (2 + 1) / 2) / 2]],
            [[(1 + (3 + 1) / 2) / 2, (0 + (0.1 + 0) / 2) / 2], [(0 + 0) / 2, (1 + (3 + 1) / 2) / 2]],
        ]
    )
    assert torch.allclose(k, expected_k)
    # values follow the keys: head 0 value rows 0..3 = (0,1) (2,3) (4,5) (6,7)
    assert torch.allclose(
        v[0, 0], (torch.tensor([0.0, 1.0]) + (torch.tensor([4.0, 5.0]) + torch.tensor([0.0, 1.0])) / 2) / 2
    )
    # averaged / weighted: the filter keeps evicted entries whose best similarity (mean over heads) >= mean
    best = torch.tensor([[2 / 5**0.5, 1.0], [1.0, 3 / (9.01**0.5)]])
    per_entry = best.mean(0)
    use = per_entry >= per_entry.mean()
    assert use.tolist() == [False, True]
    k, _ = merge_evicted(keys, values, kept, evicted, "averaged")
    assert torch.allclose(k[0, 0], keys[0, 0]) and torch.allclose(k[0, 1], (keys[0, 1] + keys[0, 3]) / 2)
    assert torch.allclose(k[1, 0], (keys[1, 0] + keys[1, 3]) / 2) and torch.allclose(k[1, 1], keys[1, 1])
    k, v = merge_evicted(keys, values, kept, evicted, "weighted")
    assert torch.allclose(k[0, 1], (keys[0, 1] + 1.0 * keys[0, 3]) / 2)
    assert torch.allclose(k[1, 0], (keys[1, 0] + best[1, 1] * keys[1, 3]) / 2)
    assert torch.allclose(v[1, 0], (values[1, 0] + best[1, 1] * values[1, 3]) / 2)
    k, v = merge_evicted(keys, values, kept, evicted, "none")
    assert torch.equal(k, keys[:, :2]) and torch.equal(v, values[:, :2])


def test_scores_equal_eager_attention_probabilities(engine):
    llm = engine.model.llm
    llm.set_attn_implementation("eager")
    try:
        batch = engine._batch(requests(None))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        embeds = engine.model.embed(ids, batch["pixel_values"])
        positions = engine.model.position_ids_for(ids, mask, image_deltas=batch["image_deltas"])
        from transformers import DynamicCache

        from mm.kv_cache import ScoreHooks

        cache = DynamicCache(config=llm.config)
        hooks = ScoreHooks(llm, cache, mask, "all")
        few = ScoreHooks(llm, cache, mask, "all", max_queries=5)  # 5 evenly spaced queries, the last included
        with torch.no_grad():
            out = engine.model.run_llm(
                cache=cache, inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                use_cache=True, output_attentions=True,
            )  # fmt: skip
        hooks.remove()
        few.remove()
        for layer, probs in enumerate(out.attentions):  # [B, H, L, L]
            b, h, length, _ = probs.shape
            ask = mask.bool()[:, None, :, None]
            expected = (probs.float() * ask).sum(2).view(b, 2, h // 2, length).sum(2)
            assert torch.allclose(
                hooks.scores[layer] * mask[:, None, :], expected * mask[:, None, :], atol=1e-5
            )
            rows = torch.tensor([round(i * (length - 1) / 4) for i in range(5)])
            assert rows[-1] == length - 1
            sampled = (probs.float() * ask)[:, :, rows].sum(2).view(b, 2, h // 2, length).sum(2)
            assert torch.allclose(few.scores[layer] * mask[:, None, :], sampled * mask[:, None, :], atol=1e-5)
    finally:
        llm.set_attn_implementation("sdpa")


def test_fewer_scoring_queries_still_keep_the_budget_and_the_text(engine):
    full = engine.generate(requests(None))
    few = engine.generate(requests(KVCompression("lookm", 0.3, queries=8)))
    assert any(a.visual_tokens for a in full)
    for a, b in zip(full, few):  # LOOK-M keeps all text: only a prompt with images shrinks
        assert (b.kv_bytes_kept < a.kv_bytes_prompt) == bool(a.visual_tokens) and b.new_tokens > 0
    with pytest.raises(ValueError, match="scoring queries must be a positive count"):
        KVCompression("h2o", 0.2, queries=0)


def test_the_reported_kv_size_shrinks(engine):
    full = engine.generate(requests(None, [0]))[0]
    squeezed = engine.generate(requests(KVCompression("lookm", 0.2), [0]))[0]
    assert squeezed.kv_bytes_prompt == full.kv_bytes_prompt
    assert (
        full.kv_bytes == full.kv_bytes_prompt + full.new_tokens * full.kv_bytes_prompt // full.prompt_tokens
    )
    per_token = full.kv_bytes_prompt // full.prompt_tokens
    ids = torch.tensor(engine.prepare(requests(None, [0])[0])["input_ids"])
    is_text = ids != engine.processor.image_token_id
    n = len(ids)
    keep, recent = round(0.2 * n), int(round(0.2 * n) * 0.5)
    kept = max(keep - recent, int(is_text[: n - recent].sum())) + recent  # LOOK-M's count
    assert squeezed.kv_bytes == (kept + squeezed.new_tokens) * per_token < full.kv_bytes
    assert squeezed.kv_bytes_kept == kept * per_token and full.kv_bytes_kept == full.kv_bytes_prompt
    h2o = engine.generate(requests(KVCompression("h2o", 0.2), [0]))[0]
    assert h2o.kv_bytes == (keep + h2o.new_tokens) * per_token


def test_bad_settings_name_the_choices():
    with pytest.raises(ValueError, match=r"method 'snap': choose from \['full', 'h2o', 'lookm'"):
        KVCompression("snap")
    with pytest.raises(
        ValueError, match="KV budget must be a fraction in .0, 1. or a whole token count, got 1.5"
    ):
        KVCompression("lookm", 1.5)
    with pytest.raises(ValueError, match=r"KV merge 'sum': choose from \['pivotal'"):
        KVCompression("lookm", 0.2, "sum")
    assert (
        KVCompression("h2o", 64).keep_count(1000) == 64 and KVCompression("h2o", 0.2).keep_count(1000) == 200
    )
    assert set(KV_METHODS) == {"full", "lookm", "h2o", "snapkv", "streaming", "random"}


def _mass_reference(q, k, pos, mask, scaling):
    """The square way: every query head's full softmax row (GQA keys repeated), masked, summed."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scaling
    allowed = mask.bool()[:, None, None, :] & (torch.arange(k.shape[2])[None, :] <= pos[:, None])
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    probs = probs * mask.bool()[:, pos][:, None, :, None]
    return probs.sum(2).view(q.shape[0], -1, group, k.shape[2]).sum(2)


@pytest.mark.parametrize("chunk_bytes", [2**30, 300])  # one chunk; a chunk of a few queries
def test_attention_mass_equals_the_square_softmax(monkeypatch, chunk_bytes):
    import mm.kv_cache as kv

    monkeypatch.setattr(kv, "SCORE_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    b, heads, kv_heads, length, dim = 3, 6, 2, 11, 8
    q, k = torch.randn(b, heads, length, dim), torch.randn(b, kv_heads, length, dim)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, :4] = 0  # left padding of different lengths
    mask[2, :1] = 0
    for pos in (torch.arange(length), torch.tensor([0, 3, 5, 10]), torch.arange(7, length)):
        mass = attention_mass(q[:, :, pos], k, pos, mask, 0.35)
        ref = _mass_reference(q[:, :, pos], k, pos, mask, 0.35)
        assert mass.dtype == torch.float32 and mass.shape == (b, kv_heads, length)
        assert torch.allclose(mass.double(), ref, atol=1e-5), (pos, (mass - ref).abs().max())
        assert (mass[1, :, :4] == 0).all()  # padding keys receive nothing


def test_attention_mass_ignores_padding_queries_and_keys():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    mask = torch.tensor([[0, 1, 1, 1]])
    mass = attention_mass(q, k, torch.arange(4), mask, 1.0)
    assert mass.shape == (1, 1, 4) and mass[0, 0, 0] == 0
    assert torch.allclose(mass.sum(), torch.tensor(2 * 3.0))  # 3 real queries x 2 heads, each sums to 1
