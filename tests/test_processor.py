"""The processor: placeholder expansion, count checks, assistant-only labels, collation, branched packing."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, solid_image

from data.templates import IGNORE_INDEX, assistant_text_from_labels


def image_runs(ids: list[int], image_id: int) -> list[int]:
    """Lengths of the contiguous runs of image tokens in ``ids``."""
    runs, current = [], 0
    for tok in ids:
        if tok == image_id:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    return runs + ([current] if current else [])


@pytest.mark.parametrize(
    "question",
    [
        "<image>\nWhat colour is the circle?",
        "Left <image> and right <image>: which is red?",
        "<image>\nfirst\n<image>\nsecond\n<image>\nHow many shapes are there?",
    ],
)
def test_each_placeholder_expands_to_tokens_per_image(tiny_processor, question):
    proc = tiny_processor
    n = question.count("<image>")
    conv = [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]
    feats = proc(conv, [solid_image()] * n)
    ids = feats["input_ids"]
    assert proc.tokens_per_image == 16
    assert image_runs(ids, proc.image_token_id) == [16] * n
    assert len(ids) == len(feats["labels"])
    # the text around the images survives, in order
    text = proc.tokenizer.decode([t for t in ids if t != proc.image_token_id])
    for part in question.replace("<image>", "\x00").split("\x00"):
        assert part.strip() in text
    assert feats["pixel_values"]["main"].shape == (n, 3, 64, 64)
    assert feats["pixel_values"]["main"].dtype == torch.uint8


@pytest.mark.parametrize(("placeholders", "images"), [(1, 2), (2, 1), (0, 1), (1, 0)])
def test_placeholder_count_mismatch_is_an_error(tiny_processor, placeholders, images):
    conv = [{"from": "human", "value": "<image> " * placeholders + "What?"}, {"from": "gpt", "value": "red"}]
    message = (
        f"conversation has {placeholders} <image> placeholder\\(s\\) but {images} image\\(s\\) were given"
    )
    with pytest.raises(ValueError, match=message):
        tiny_processor(conv, [solid_image()] * images)


def test_labels_cover_only_assistant_text(tiny_processor):
    proc = tiny_processor
    conv = [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "Where is the square?"},
        {"from": "gpt", "value": "[12, 340, 560, 780]"},
    ]
    feats = proc.tokenize(conv, 1)
    ids, labels = feats["input_ids"], feats["labels"]
    assert assistant_text_from_labels(ids, labels, proc.tokenizer) == [
        "red<|im_end|>",
        "[12, 340, 560, 780]<|im_end|>",
    ]
    image_positions = [i for i, t in enumerate(ids) if t == proc.image_token_id]
    assert all(labels[i] == IGNORE_INDEX for i in image_positions)
    assert sum(lab != IGNORE_INDEX for lab in labels) < len(ids) // 3


def test_generation_prompt_ends_with_assistant_header(tiny_processor):
    proc = tiny_processor
    feats = proc([{"from": "human", "value": "<image>\nWhat colour?"}], [solid_image()], for_generation=True)
    assert proc.tokenizer.decode(feats["input_ids"]).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="must end with a user turn"):
        proc.tokenize(
            [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}], 0, for_generation=True
        )


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_on_the_requested_side(tiny_processor, side):
    proc = tiny_processor
    short = proc(
        [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}], [solid_image()]
    )
    long = proc(
        [
            {"from": "human", "value": "<image>\n<image>\nDescribe the image."},
            {"from": "gpt", "value": "2 objects: a small red circle and a big blue square."},
        ],
        [solid_image(), solid_image((0, 0, 255))],
    )
    batch = proc.collate([short, long], padding_side=side)
    n, length = len(short["input_ids"]), len(long["input_ids"])
    pad = proc.tokenizer.pad_token_id
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, length)
    real = slice(0, n) if side == "right" else slice(length - n, length)
    padding = slice(n, length) if side == "right" else slice(0, length - n)
    assert batch["input_ids"][0, real].tolist() == short["input_ids"]
    assert batch["labels"][0, real].tolist() == short["labels"]
    assert batch["attention_mask"][0].sum().item() == n
    assert batch["attention_mask"][0, real].all() and not batch["attention_mask"][0, padding].any()
    assert (batch["input_ids"][0, padding] == pad).all()
    assert (batch["labels"][0, padding] == IGNORE_INDEX).all()
    assert batch["input_ids"][1].tolist() == long["input_ids"]
    # pixels of all images in placeholder order: short's red, then long's red and blue
    pixels = batch["pixel_values"]["main"]
    assert pixels.shape == (3, 3, 64, 64)
    assert pixels[:, 0, 0, 0].tolist() == [255, 255, 0] and pixels[:, 2, 0, 0].tolist() == [0, 0, 255]
    assert "branches" not in batch
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        proc.collate([short], padding_side="middle")


def test_max_length_truncates_text_but_never_an_image(tiny_model, tiny_processor):
    from mm.build import make_processor
    from mm.config import DataConfig

    proc = make_processor(tiny_model, tiny_processor.tokenizer, DataConfig(max_length=40))
    conv = [
        {"from": "human", "value": "<image>\nWhat?"},
        {"from": "gpt", "value": "a small red circle " * 10},
    ]
    feats = proc.tokenize(conv, 1)
    full = tiny_processor.tokenize(conv, 1)
    assert len(full["input_ids"]) > 40
    assert feats["input_ids"] == full["input_ids"][:40] and feats["labels"] == full["labels"][:40]
    late = [
        {"from": "human", "value": "Describe the image. " * 5 + "<image>"},
        {"from": "gpt", "value": "red"},
    ]
    with pytest.raises(ValueError, match="would cut an image"):
        proc.tokenize(late, 1)


THREE_TURNS = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "Describe the image."},
    {"from": "gpt", "value": "2 objects: a small red circle"},
    {"from": "human", "value": "Where?"},
    {"from": "gpt", "value": "[12, 340, 560, 780]"},
]


def test_tokenize_branched_layout(tiny_processor):
    proc = tiny_processor
    feats = proc.tokenize_branched(THREE_TURNS, 1)
    prefix, labels, branches = feats["input_ids"], feats["labels"], feats["branches"]
    assert len(prefix) == len(labels) and len(branches) == 3
    assert prefix.count(proc.image_token_id) == 16  # one image, shared by every branch
    assert all(lab == IGNORE_INDEX for lab in labels)
    answers = [assistant_text_from_labels(b["input_ids"], b["labels"], proc.tokenizer) for b in branches]
    assert answers == [
        ["red<|im_end|>"],
        ["2 objects: a small red circle<|im_end|>"],
        ["[12, 340, 560, 780]<|im_end|>"],
    ]
    # prefix + branch k is exactly the single-turn conversation of question k
    for k, branch in enumerate(branches):
        question = THREE_TURNS[2 * k]["value"].removeprefix("<image>\n")
        single = proc.tokenize(
            [{"from": "human", "value": "<image>\n" + question}, THREE_TURNS[2 * k + 1]], 1
        )
        assert prefix + branch["input_ids"] == single["input_ids"]
        assert labels + branch["labels"] == single["labels"]


def test_tokenize_branched_falls_back_for_single_turn(tiny_processor):
    conv = THREE_TURNS[:2]
    assert tiny_processor.tokenize_branched(conv, 1) == tiny_processor.tokenize(conv, 1)


def test_branch_must_not_begin_with_a_labelled_token(tiny_processor):
    # identical questions: the shared prefix runs up to the answers, whose first tokens the prefix would have
    # to predict; the branched layout cannot score them, so it refuses rather than silently dropping them
    same = [
        {"from": "human", "value": "<image>\nWhat colour?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "What colour?"},
        {"from": "gpt", "value": "blue"},
    ]
    with pytest.raises(ValueError, match="branched packing: a branch cannot begin with a labelled token"):
        tiny_processor.tokenize_branched(same, 1)


TWO_TURNS = [{"from": "human", "value": "<image>\nDescribe the image."}, *THREE_TURNS[3:]]
RED, BLUE = solid_image((255, 0, 0), (80, 60)), solid_image((0, 0, 255), (50, 70))
RECORDS = [(THREE_TURNS, RED), (TWO_TURNS, BLUE), (THREE_TURNS[:2], BLUE)]  # 3, 2 and 1 turn(s)


def _branched_batch(proc, groups=2):
    feats = [{**proc.tokenize_branched(conv, 1), "pixel_values": proc.pixels([im])} for conv, im in RECORDS]
    return proc.collate(feats, branch_groups=groups)


def _single_turn_batch(proc):
    """Every (question, answer) of RECORDS as its own single-turn conversation: what branches stand for."""
    feats = []
    for conv, image in RECORDS:
        for k in range(len(conv) // 2):
            question = conv[2 * k]["value"].removeprefix("<image>\n")
            single = [{"from": "human", "value": "<image>\n" + question}, conv[2 * k + 1]]
            feats.append(proc(single, [image]))
    return proc.collate(feats)


def test_branch_batch_layout(tiny_processor):
    proc = tiny_processor
    batch = _branched_batch(proc)
    branches = batch["branches"]
    assert sorted(branches.owner.tolist()) == [0, 0, 0, 1, 1]
    lengths = branches.attention_mask.sum(1).tolist()
    assert lengths == sorted(lengths)  # sorted by length, cut into groups padded to their own longest row
    groups = branches.groups
    assert len(groups) == 2 and groups[0][0] == 0 and groups[0][1] == groups[1][0] and groups[-1][1] == 5
    assert all(g[2] == max(lengths[g[0] : g[1]]) for g in groups)
    for row, (conv, _) in enumerate(RECORDS):  # each prefix row is its record's prefix, right-padded
        feats = proc.tokenize_branched(conv, 1)
        n = len(feats["input_ids"])
        assert batch["input_ids"][row][:n].tolist() == feats["input_ids"]
        assert int(batch["attention_mask"][row].sum()) == n
        for branch in feats.get("branches", []):  # every branch is one row, owned by its record
            match = [
                r
                for r in range(5)
                if branches.owner[r] == row
                and branches.input_ids[r][: len(branch["input_ids"])].tolist() == branch["input_ids"]
                and lengths[r] == len(branch["input_ids"])
            ]
            assert len(match) == 1
            assert branches.labels[match[0]][: lengths[match[0]]].tolist() == branch["labels"]
    # the single-turn record's answer lives in its prefix, so prefix labels are kept
    assert batch["labels"] is not None and (batch["labels"][2] != IGNORE_INDEX).any()
    only_branched = proc.collate([proc.tokenize_branched(THREE_TURNS, 1)])
    assert only_branched["labels"] is None
    with pytest.raises(ValueError, match="collate them with padding_side='right'"):
        proc.collate([proc.tokenize_branched(THREE_TURNS, 1)], padding_side="left")


@pytest.mark.parametrize(
    ("weighting", "attention", "delta", "fused"),
    [
        ("token", "sdpa", 1.0, False),
        ("answer", "sdpa", 1.0, False),
        ("token", "eager", 1.0, False),
        ("token", "sdpa", 0.5, False),
        ("answer", "sdpa", 0.5, True),
    ],
)
def test_branches_train_exactly_like_single_turn_conversations(weighting, attention, delta, fused):
    """Same loss and same gradients as every question asked on its own: the branched layout (any number of
    length groups), the eager attention kernel (`train.attn_implementation`) and the fused loss
    (`train.fused_loss`: the LM head on labelled positions only, chunked) are only faster schedules of the
    same function, also with V2PE-style fractional visual positions. The reference is always the plain
    single-turn batch with full logits."""
    model, proc = build_tiny(visual_delta=delta, seed=2)
    model.loss_weighting = weighting
    model.train()
    model.experts.eval()  # BatchNorm on running statistics: the unrolled batch repeats images
    model.llm.set_attn_implementation(attention)
    losses, grads = [], []
    batches = [_single_turn_batch(proc), _branched_batch(proc, groups=1), _branched_batch(proc, groups=3)]
    if fused:
        batches.append(_single_turn_batch(proc))
    for k, batch in enumerate(batches):
        model.fused_loss = fused and k > 0
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.llm.config._attn_implementation == attention
    assert 3.0 < losses[0].item() < 9.0
    for other in range(1, len(batches)):
        assert torch.allclose(losses[0], losses[other], atol=1e-5), losses
        assert grads[0].keys() == grads[other].keys() and any("experts" in n for n in grads[0])
        for name, g in grads[0].items():
            assert torch.allclose(g, grads[other][name], atol=1e-5, rtol=1e-4), name


def test_processor_settings_roundtrip(tmp_path, tiny_model, tiny_processor):
    from data.processor import VLMProcessor

    tiny_processor.save_pretrained(tmp_path)
    loaded = VLMProcessor.from_pretrained(tmp_path, {"main": tiny_model.experts["main"].preprocess})
    assert loaded.settings() == tiny_processor.settings()
    conv = THREE_TURNS[:2]
    assert loaded.tokenize(conv, 1) == tiny_processor.tokenize(conv, 1)
    with pytest.raises(FileNotFoundError, match="no processor settings"):
        VLMProcessor.from_pretrained(tmp_path / "nowhere", {})


@pytest.mark.parametrize(
    ("attention", "delta", "weighting"), [("sdpa", 0.5, "answer"), ("eager", 1.0, "token")]
)
def test_packed_rows_train_exactly_like_padded_rows(attention, delta, weighting):
    """data.packing: the multi-turn and single-turn records packed into rows of at most 140 tokens give the
    loss and gradients of the same samples padded one per row: positions restart per sample (V2PE's
    fractional ones too) and no sample attends to another."""
    model, proc = build_tiny(visual_delta=delta, seed=2)
    model.loss_weighting = weighting
    model.train()
    model.experts.eval()
    model.llm.set_attn_implementation(attention)
    feats = [proc(conv, [image]) for conv, image in RECORDS]
    feats += [proc(conv[:2], [image]) for conv, image in RECORDS]
    pack_to = 140
    packed = proc.collate(feats, pack_to=pack_to)
    padded = proc.collate(feats)
    lengths = [len(f["input_ids"]) for f in feats]
    assert packed["input_ids"].shape[0] < len(feats) and packed["input_ids"].shape[1] <= max(
        pack_to, *lengths
    )
    assert packed["segment_ids"].max() >= 2  # some row holds several samples
    assert (packed["segment_ids"] > 0).sum() == sum(lengths) == padded["attention_mask"].sum()
    losses, grads = [], []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.allclose(losses[0], losses[1], atol=1e-5), losses
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5, rtol=1e-4), name
    with pytest.raises(ValueError, match="branched features cannot be packed"):
        proc.collate([proc.tokenize_branched(THREE_TURNS, 1)], pack_to=pack_to)
