"""The VLM: loss, gradient flow, save/load round trip, batched and streamed generation."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, overfit, solid_image

from mm.build import load_vlm, save_vlm

TRAIN_CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "red"},
]
PROMPTS = [
    ([{"from": "human", "value": "<image>\nWhat colour is the circle?"}], [solid_image((255, 0, 0))]),
    (
        [{"from": "human", "value": "<image>\n<image>\nDescribe the image. How many shapes are there?"}],
        [solid_image((0, 0, 255)), solid_image((0, 200, 0), (50, 90))],
    ),
    ([{"from": "human", "value": "Where is the square?"}], []),
]


@pytest.fixture(scope="module")
def model_and_processor():
    return build_tiny(seed=3)


ANSWER = "2 objects: a small red circle and a big blue square."


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    """A tiny model overfitted on one answer (so generation yields real text), saved with ``save_vlm``."""
    model, proc = build_tiny(seed=6)
    conv = [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": ANSWER}]
    batch = proc.collate([proc(conv, [solid_image((255, 0, 0))])])
    loss = overfit(model, batch, steps=80, lr=3e-3)
    model.eval()
    assert loss < 0.1
    return save_vlm(model, proc, tmp_path_factory.mktemp("vlm") / "model")


def train_batch(proc):
    feats = [
        proc(TRAIN_CONV, [solid_image((255, 0, 0))]),
        proc(
            [{"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "blue"}],
            [solid_image((0, 0, 255))],
        ),
    ]
    return proc.collate(feats)


def greedy(model, proc, prompts, max_new_tokens=6):
    feats = [proc(conv, images, for_generation=True) for conv, images in prompts]
    batch = proc.collate(feats, padding_side="left")
    return model.generate(
        batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=max_new_tokens
    )


def test_forward_loss_is_finite_and_matches_manual_cross_entropy(model_and_processor):
    model, proc = model_and_processor
    batch = train_batch(proc)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.llm.config.vocab_size)
    assert torch.isfinite(out.loss)
    # next-token cross-entropy over the labelled (assistant) tokens only
    logits, labels = out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten()
    manual = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    # random weights over a vocabulary of ~300: the loss is near log(vocab)
    assert 3.0 < out.loss.item() < 9.0


def test_visual_embeddings_land_on_image_tokens(model_and_processor):
    model, proc = model_and_processor
    feats = proc(TRAIN_CONV, [solid_image()])
    batch = proc.collate([feats])
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        visual = model.encode_images(batch["pixel_values"])
        text = model.get_input_embeddings()(batch["input_ids"])
    is_image = batch["input_ids"][0] == model.config.image_token_id
    assert visual.shape == (1, model.tokens_per_image, model.llm.config.hidden_size)
    assert torch.equal(embeds[0, is_image], visual[0])
    assert torch.equal(embeds[0, ~is_image], text[0, ~is_image])


def test_gradients_reach_experts_projector_and_llm():
    model, proc = build_tiny(seed=4)
    model.train()
    model(**train_batch(proc)).loss.backward()
    for part in ("experts", "fusion", "llm"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), part
        assert sum(float(g.abs().sum()) for g in grads) > 0, part
    first_conv = next(model.experts["main"].model.parameters())
    assert first_conv.grad.abs().sum() > 0  # through the projector into the first expert layer


def test_save_load_gives_identical_loss_and_generations(saved_dir):
    model, proc = build_tiny(seed=6)  # same architecture, different weights: replaced by the taught ones
    model.load_state_dict(load_vlm(saved_dir)[0].state_dict())
    loaded, loaded_proc = load_vlm(saved_dir)
    assert not (saved_dir.parent / "model.tmp").exists()
    assert loaded_proc.settings() == proc.settings()
    assert loaded.config.visual_delta == model.config.visual_delta
    batch = train_batch(proc)
    with torch.no_grad():
        assert model(**batch).loss.item() == loaded(**train_batch(loaded_proc)).loss.item()
    before = greedy(model, proc, PROMPTS, max_new_tokens=8)
    after = greedy(loaded, loaded_proc, PROMPTS, max_new_tokens=8)
    assert before.shape[0] == 3 and before.shape[1] >= 1
    assert torch.equal(before, after)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_vlm(saved_dir.parent / "missing")


def test_left_padded_batch_generation_equals_per_sample(model_and_processor):
    model, proc = model_and_processor
    batched = greedy(model, proc, PROMPTS, max_new_tokens=8)
    pad = proc.tokenizer.pad_token_id
    for row, prompt in enumerate(PROMPTS):
        alone = greedy(model, proc, [prompt], max_new_tokens=8)[0].tolist()
        got = batched[row].tolist()[: len(alone)]
        assert got == alone, f"prompt {row}"
        assert all(t == pad for t in batched[row].tolist()[len(alone) :])


def test_generation_stops_at_eos():
    model, proc = build_tiny(seed=5)
    eos = proc.tokenizer.eos_token_id
    with torch.no_grad():  # make every next token the EOS (whatever the hidden state): stop after one step
        head = torch.nn.Linear(model.llm.lm_head.in_features, model.llm.lm_head.out_features)
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 1.0
        model.llm.lm_head = head
    feats = proc(*PROMPTS[0], for_generation=True)
    batch = proc.collate([feats], padding_side="left")
    new = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=5)
    assert new.tolist() == [[eos]]


def test_stream_yields_the_same_text_as_ask(saved_dir):
    from mm.inference import Assistant

    assistant = Assistant(saved_dir, device="cpu")
    image = solid_image((255, 0, 0))
    answer = assistant.ask("Describe the image.", [image], max_new_tokens=40)
    assert answer == ANSWER
    assert len(assistant.conversation.turns) == 2 and assistant.conversation.turns[1] == {
        "from": "gpt",
        "value": answer,
    }
    assistant.reset()
    pieces = list(assistant.stream("Describe the image.", [image], max_new_tokens=40))
    assert len(pieces) > 1  # really streamed, piece by piece
    assert "".join(pieces).strip() == answer
    assert assistant.conversation.turns[0]["value"] == "<image>\nDescribe the image."
    assert len(assistant.conversation.images) == 1


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_prompt_is_rejected(saved_dir, question):
    from mm.inference import Assistant

    assistant = Assistant(saved_dir, device="cpu")
    with pytest.raises(ValueError, match="empty prompt"):
        assistant.ask(question, [solid_image()])
    with pytest.raises(ValueError, match="empty prompt"):
        list(assistant.stream(question))
    with pytest.raises(ValueError, match="has 2 <image> but 1 image"):
        assistant.ask("<image> <image> What?", [solid_image()])
