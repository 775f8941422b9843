"""The Engine: one loaded model answering many threads at once, batched, streamed, each request with its own
settings; its answers equal one-by-one generation, and a bad request fails alone."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import build_tiny, solid_image
from transformers import DynamicCache

from mm.generation import GenerationSettings
from mm.inference import Engine, Request
from mm.llm import cache_argument

QUESTIONS = [
    ("<image>\nWhat colour is the circle?", [solid_image((255, 0, 0))]),
    (
        "<image>\n<image>\nHow many shapes are there?",
        [solid_image((0, 0, 255)), solid_image((0, 200, 0), (50, 90))],
    ),
    ("Where is the square?", []),
    ("<image>\nDescribe the image.", [solid_image((10, 200, 30), (120, 40))]),
]


def request(i: int, **settings) -> Request:
    text, images = QUESTIONS[i % len(QUESTIONS)]
    return Request([{"from": "human", "value": text}], list(images), GenerationSettings(**settings))


@pytest.fixture(scope="module")
def engine():
    model, processor = build_tiny(seed=3)
    engine = Engine(model, processor, max_batch=4, batch_window_s=0.2)
    yield engine
    engine.close()


def test_concurrent_threads_are_batched_and_get_their_own_answers(engine):
    alone = [engine.generate([request(i, max_new_tokens=6)])[0] for i in range(8)]
    before = dict(engine.batch_sizes)
    results: dict[int, tuple[str, str]] = {}

    def user(i: int) -> None:
        handle = engine.submit(request(i, max_new_tokens=6))
        streamed = "".join(handle.stream())
        results[i] = (streamed, handle.result().text)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(8))
    for i in range(8):
        streamed, text = results[i]
        assert text == alone[i].text, f"request {i}"
        assert streamed.strip() == text
    batched = {size: n - before.get(size, 0) for size, n in engine.batch_sizes.items()}
    assert sum(size * n for size, n in batched.items()) == 8
    assert max(size for size, n in batched.items() if n) > 1  # some requests really shared a batch
    assert all(size <= engine.max_batch for size in batched)


def test_each_row_keeps_its_own_settings(engine):
    greedy = request(0, max_new_tokens=8)
    sampled = request(1, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    short = request(3, max_new_tokens=2)
    together = engine.generate([greedy, sampled, short])
    assert together[0].text == engine.generate([request(0, max_new_tokens=8)])[0].text
    again = request(1, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, top_k=50, seed=7)
    assert together[1].text == engine.generate([again])[0].text  # its own generator: same seed, same draw
    other_seed = request(1, max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.9, top_k=50, seed=8)
    assert engine.generate([other_seed])[0].text != together[1].text
    assert together[2].new_tokens <= 2 and together[2].finish in ("eos", "length")
    assert together[0].new_tokens <= 8


def test_answer_stats_count_tokens_and_the_real_kv_cache(engine):
    answer = engine.generate([request(1, max_new_tokens=5)])[0]
    features = engine.prepare(request(1))
    per_image = engine.processor.tokens_per_image
    assert answer.prompt_tokens == len(features["input_ids"])
    assert answer.visual_tokens == 2 * per_image
    assert 1 <= answer.new_tokens <= 5 and answer.seconds >= answer.first_token_seconds > 0
    assert answer.tokens_per_s == pytest.approx(answer.new_tokens / answer.seconds)
    # the per-token size is what a DynamicCache really holds for this LLM
    cache = DynamicCache(config=engine.model.llm.config)
    with torch.no_grad():
        llm = engine.model.llm
        llm(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **{cache_argument(llm): cache})
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert engine.kv_bytes_per_token == held // 3
    assert answer.kv_bytes == engine.kv_bytes_per_token * (answer.prompt_tokens + answer.new_tokens)
    assert answer.kv_bytes_prompt == engine.kv_bytes_per_token * answer.prompt_tokens


def test_a_bad_request_fails_alone(engine):
    bad = Request([{"from": "human", "value": "<image>\n<image>\nTwo?"}], [solid_image()])
    good = engine.submit(request(0, max_new_tokens=4))
    failing = engine.submit(bad)
    assert good.result(timeout=60).text == engine.generate([request(0, max_new_tokens=4)])[0].text
    with pytest.raises(ValueError, match="2 <image>|placeholder"):
        failing.result(timeout=60)
    with pytest.raises(ValueError):
        list(
            engine.submit(
                Request([{"from": "human", "value": "<image>\n<image>\nTwo?"}], [solid_image()])
            ).stream()
        )


def test_a_request_carries_its_own_v2pe_delta():
    model, processor = build_tiny(seed=4)
    engine = Engine(model, processor)
    own = request(1, max_new_tokens=6)
    own.visual_delta = 0.25
    plain = engine.generate([request(1, max_new_tokens=6)])[0]
    mixed = engine.generate([own, request(1, max_new_tokens=6)])
    model.config.visual_delta = processor.delta = 0.25
    assert mixed[0].text == engine.generate([request(1, max_new_tokens=6)])[0].text
    assert mixed[1].text == plain.text
    bad = request(1)
    bad.visual_delta = 2.0
    with pytest.raises(ValueError, match=r"V2PE delta must be in \(0, 1\], got 2.0"):
        engine.generate([bad])


def test_settings_are_checked():
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        GenerationSettings(top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        GenerationSettings(max_new_tokens=-1)
    model, processor = build_tiny(seed=3)
    with pytest.raises(ValueError, match="max_batch must be >= 1, got 0"):
        Engine(model, processor, max_batch=0)
