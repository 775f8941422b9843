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
    assert "segment_ids" not in batch
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        proc.collate([short], padding_side="middle")


def test_max_length_truncates_text_but_never_an_image(tiny_model, tiny_processor):
    from mm.build import make_processor
    from mm.config import DataSection

    proc = make_processor(tiny_model, tiny_processor.tokenizer, DataSection(max_length=40))
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
    packed = proc.tokenize_branched(THREE_TURNS, 1)
    ids, labels, segs = packed["input_ids"], packed["labels"], packed["segments"]
    assert len(ids) == len(labels) == len(segs)
    assert sorted(set(segs)) == [0, 1, 2, 3]
    assert segs == sorted(segs)  # prefix first, then each branch in turn order
    prefix = [t for t, s in zip(ids, segs) if s == 0]
    assert prefix.count(proc.image_token_id) == 16  # one image, shared by every branch
    assert all(lab == IGNORE_INDEX for lab, s in zip(labels, segs) if s == 0)
    answers = [
        assistant_text_from_labels(
            [t for t, s in zip(ids, segs) if s == k],
            [lab for lab, s in zip(labels, segs) if s == k],
            proc.tokenizer,
        )
        for k in (1, 2, 3)
    ]
    assert answers == [
        ["red<|im_end|>"],
        ["2 objects: a small red circle<|im_end|>"],
        ["[12, 340, 560, 780]<|im_end|>"],
    ]


def test_tokenize_branched_falls_back_for_single_turn(tiny_processor):
    conv = THREE_TURNS[:2]
    packed = tiny_processor.tokenize_branched(conv, 1)
    plain = tiny_processor.tokenize(conv, 1)
    assert packed["input_ids"] == plain["input_ids"] and packed["labels"] == plain["labels"]
    assert packed["segments"] == [0] * len(plain["input_ids"])


@pytest.mark.parametrize("delta", [1.0, 0.5])
def test_branches_give_the_logits_of_single_turn_conversations(delta):
    model, proc = build_tiny(visual_delta=delta, seed=1)
    image = solid_image((255, 0, 0), (80, 60))
    packed = proc.tokenize_branched(THREE_TURNS, 1)
    batch = proc.collate([{**packed, "pixel_values": proc.pixels([image])}])
    assert batch["segment_ids"][0].tolist() == packed["segments"]
    with torch.no_grad():
        packed_logits = model(**batch).logits[0]
    segs = torch.tensor(packed["segments"])
    prefix = int((segs == 0).sum())
    for k in range(3):
        question = THREE_TURNS[2 * k]["value"].removeprefix("<image>\n")
        single = proc([{"from": "human", "value": "<image>\n" + question}, THREE_TURNS[2 * k + 1]], [image])
        with torch.no_grad():
            single_logits = model(**proc.collate([single])).logits[0]
        n = int((segs == k + 1).sum())
        assert single_logits.shape[0] == prefix + n
        assert torch.allclose(packed_logits[:prefix], single_logits[:prefix], atol=1e-5)
        diff = (packed_logits[segs == k + 1] - single_logits[prefix:]).abs().max().item()
        assert diff < 1e-4, f"branch {k + 1}: max |logit diff| {diff}"
    # without the segment mask, later branches would see earlier ones: the logits differ
    plain = {k: v for k, v in batch.items() if k != "segment_ids"}
    with torch.no_grad():
        leaky = model(**plain).logits[0]
    assert (leaky[segs == 3] - packed_logits[segs == 3]).abs().max().item() > 1e-3


TWO_TURNS = [{"from": "human", "value": "<image>\nDescribe the image."}, *THREE_TURNS[3:]]


def _branched_batch(proc):
    """Two branched records (3 and 2 branches, different images) and one single-turn record."""
    red, blue = solid_image((255, 0, 0), (80, 60)), solid_image((0, 0, 255), (50, 70))
    feats = [
        {**proc.tokenize_branched(THREE_TURNS, 1), "pixel_values": proc.pixels([red])},
        {**proc.tokenize_branched(TWO_TURNS, 1), "pixel_values": proc.pixels([blue])},
        {**proc.tokenize_branched(THREE_TURNS[:2], 1), "pixel_values": proc.pixels([blue])},
    ]
    return proc.collate(feats)


def test_split_branches_layout(tiny_processor):
    proc = tiny_processor
    packed = _branched_batch(proc)
    split = proc.split_branches(packed)
    assert "segment_ids" not in split
    assert sorted(split["branch_owner"].tolist()) == [0, 0, 0, 1, 1]
    lengths = split["branch_attention_mask"].sum(1).tolist()
    assert lengths == sorted(lengths)  # sorted by length, cut into groups padded to their own longest row
    groups = split["branch_groups"]
    assert [g[0] for g in groups] == [0] + [g[1] for g in groups[:-1]] and groups[-1][1] == 5
    assert all(g[2] == max(lengths[g[0] : g[1]]) for g in groups) and len(groups) == 2
    segs, mask = packed["segment_ids"], packed["attention_mask"].bool()
    for row in range(3):  # each prefix row is the record's segment 0, right-padded
        prefix = packed["input_ids"][row][mask[row] & (segs[row] == 0)]
        assert split["input_ids"][row][: len(prefix)].tolist() == prefix.tolist()
        assert int(split["attention_mask"][row].sum()) == len(prefix)
    branch = packed["input_ids"][0][segs[0] == 2]  # record 0's second branch, labels included
    ids, owner = split["branch_input_ids"], split["branch_owner"]
    rows = [r for r in range(5) if owner[r] == 0 and ids[r][: len(branch)].tolist() == branch.tolist()]
    assert len(rows) == 1 and lengths[rows[0]] == len(branch)
    expected_labels = packed["labels"][0][segs[0] == 2].tolist()
    assert split["branch_labels"][rows[0]][: len(branch)].tolist() == expected_labels
    # the single-turn record's answer lives in its prefix, so prefix labels are kept
    assert split["labels"] is not None and (split["labels"][2] != IGNORE_INDEX).any()
    only_branched = proc.split_branches(proc.collate([proc.tokenize_branched(THREE_TURNS, 1)]))
    assert only_branched["labels"] is None
    assert proc.split_branches({"input_ids": packed["input_ids"]}) == {"input_ids": packed["input_ids"]}


def test_split_branches_rejects_a_labelled_branch_start(tiny_processor):
    batch = tiny_processor.collate([tiny_processor.tokenize_branched(THREE_TURNS, 1)])
    first_branch = int((batch["segment_ids"][0] == 0).sum())
    batch["labels"][0, first_branch] = 5
    with pytest.raises(ValueError, match="row 0: a branch cannot begin with a labelled token"):
        tiny_processor.split_branches(batch)


@pytest.mark.parametrize(
    ("weighting", "attention"), [("token", "sdpa"), ("answer", "sdpa"), ("token", "eager")]
)
def test_split_branches_train_exactly_like_the_packed_mask(weighting, attention):
    """Same loss and same gradients as the packed 4-D mask (sdpa): the split layout and the eager attention
    kernel (`train.attn_implementation`) are only faster schedules of the same function."""
    model, proc = build_tiny(seed=2)
    model.config.loss_weighting = weighting
    model.train()
    packed = _branched_batch(proc)
    losses, grads = [], []
    layouts = (packed, packed, proc.split_branches(packed, groups=1), proc.split_branches(packed, groups=3))
    for i, batch in enumerate(layouts):
        if i == 1:
            model.llm.set_attn_implementation(attention)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.llm.config._attn_implementation == attention
    for other in (1, 2, 3):
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
