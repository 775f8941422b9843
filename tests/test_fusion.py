"""Fusion families, token pooling and MouSi position occupancy: lengths, layouts, values, positions."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, solid_image, tiny_model_section

from mm.positions import build_position_ids, next_positions, positions_occupied, visual_offsets
from projectors import FUSIONS, ProjectorConfig, TokenPool, build_fusion
from projectors.channel_concat import resample_grid

EXPERTS = {"cnn": (8, (4, 4)), "vit": (6, (2, 2)), "sam": (4, (8, 8))}  # dim, grid


def features(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(batch, h * w, d, generator=g) for n, (d, (h, w)) in EXPERTS.items()}


# -- pooling ---------------------------------------------------------------------------------------
def test_token_pool_shuffle_stacks_and_avg_averages_each_block():
    grid = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # a 4x4 grid holding its own index
    shuffled = TokenPool((4, 4), 1, 2, "shuffle")(grid)
    assert shuffled.shape == (1, 4, 4)
    assert shuffled[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    averaged = TokenPool((4, 4), 1, 2, "avg")(grid)
    assert averaged[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="token grid 4x4 is not divisible by pool=3"):
        TokenPool((4, 4), 1, 3)


# -- each family -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("settings", "layout"),
    [
        ({"type": "concat"}, [(4, 4), (2, 2), (8, 8)]),
        ({"type": "concat", "pool": 2, "experts": {"vit": {"pool": 1}}}, [(2, 2), (2, 2), (4, 4)]),
        ({"type": "concat", "experts": {"sam": {"pool": 4, "pool_mode": "avg"}}}, [(4, 4), (2, 2), (2, 2)]),
        ({"type": "channel_concat"}, [(2, 2)]),  # the smallest grid
        ({"type": "channel_concat", "grid": [3, 5]}, [(3, 5)]),
        ({"type": "resampler", "grid": [3, 3], "hidden_dim": 16}, [(3, 3)]),
        ({"type": "resampler", "pool": 2, "experts": {"vit": {"pool": 1}}}, [(2, 2)]),
    ],
)
def test_each_fusion_gives_the_length_and_layout_it_declares(settings, layout):
    fusion = build_fusion(ProjectorConfig(**settings), EXPERTS, out_dim=12)
    out = fusion(features())
    assert fusion.layout == layout
    assert fusion.num_tokens == sum(h * w for h, w in layout)
    assert out.shape == (2, fusion.num_tokens, 12) and torch.isfinite(out).all()
    # every expert shapes the output (none is silently ignored)
    for name in EXPERTS:
        changed = {k: v.clone() for k, v in features().items()}
        changed[name] += 1.0
        assert not torch.allclose(fusion(changed), out), name


def test_concat_is_each_experts_own_projection_in_order():
    fusion = build_fusion(ProjectorConfig(type="concat", depth=1), EXPERTS, out_dim=5)
    feats = features()
    out = fusion(feats)
    parts = []
    for name in EXPERTS:
        parts.append(fusion.projectors[name](feats[name]))
    torch.testing.assert_close(out, torch.cat(parts, dim=1))
    lin = fusion.projectors["vit"].net[0]
    torch.testing.assert_close(out[:, 16:20], feats["vit"] @ lin.weight.T + lin.bias)


def test_channel_concat_resamples_every_grid_then_stacks_channels():
    fusion = build_fusion(ProjectorConfig(type="channel_concat", depth=1, grid=[4, 4]), EXPERTS, out_dim=3)
    feats = features()
    stacked = torch.cat([resample_grid(feats[n], EXPERTS[n][1], (4, 4)) for n in EXPERTS], dim=-1)
    assert stacked.shape == (2, 16, 8 + 6 + 4)
    torch.testing.assert_close(feats["cnn"], stacked[..., :8])  # already 4x4: untouched
    lin = fusion.mlp.net[0]
    torch.testing.assert_close(fusion(feats), stacked @ lin.weight.T + lin.bias)
    # a constant map stays constant whatever the resampling
    flat = resample_grid(torch.full((1, 64, 2), 3.0), (8, 8), (3, 5))
    assert flat.shape == (1, 15, 2) and torch.allclose(flat, torch.full_like(flat, 3.0))


def test_resampler_output_does_not_depend_on_the_order_of_an_experts_tokens_only_through_positions():
    torch.manual_seed(0)
    fusion = build_fusion(ProjectorConfig(type="resampler", grid=[2, 3], hidden_dim=8, heads=2), EXPERTS, 4)
    assert fusion.num_tokens == 6 and fusion.queries.shape == (6, 8)
    feats = features(batch=3)
    out = fusion(feats)
    # batch rows are independent
    torch.testing.assert_close(fusion({k: v[1:2] for k, v in feats.items()}), out[1:2])


def test_unknown_per_expert_settings_and_types_are_named():
    with pytest.raises(ValueError, match=r"settings for unknown expert\(s\) \['clip'\]"):
        build_fusion(ProjectorConfig(experts={"clip": {"pool": 2}}), EXPERTS, 4)
    with pytest.raises(ValueError, match="heads: 3 does not divide the resampler width 8"):
        build_fusion(ProjectorConfig(type="resampler", hidden_dim=8, heads=3), EXPERTS, 4)
    assert ProjectorConfig(type="mlp").type == "concat"  # the older name still loads
    assert set(FUSIONS) == {"concat", "channel_concat", "resampler"}


# -- MouSi position occupancy -----------------------------------------------------------------------
IMG = 9


def test_visual_offsets_of_each_scheme_by_hand():
    layout = [(2, 3), (1, 2)]  # two segments: a 2x3 grid, then a 1x2 grid (8 tokens)
    assert visual_offsets("original", layout) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert visual_offsets("share_by_row", layout) == [1, 1, 1, 2, 2, 2, 3, 3]
    assert visual_offsets("share_all", layout) == [1] * 8
    with pytest.raises(ValueError, match="visual_positions: unknown scheme 'by_col'"):
        visual_offsets("by_col", layout)


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        # text, 8 visual tokens (2x3 then 1x2), text, text
        ("original", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
        # row 0 of the 2x3 grid at 1, row 1 at 2, the 1x2 grid's row at 3: the image occupies 3 positions
        ("share_by_row", [0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5]),
        ("share_all", [0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 3]),
    ],
)
def test_position_ids_of_each_scheme_and_text_resumes_after_the_occupied_positions(scheme, expected):
    ids = torch.tensor([[1] + [IMG] * 8 + [2, 3]])
    offsets = visual_offsets(scheme, [(2, 3), (1, 2)])
    pos = build_position_ids(ids, torch.ones_like(ids), IMG, offsets)
    assert pos[0].tolist() == expected
    # two images in a row and left padding: each image restarts the pattern
    ids2 = torch.tensor([[0, 0] + [1] + [IMG] * 16 + [2]])
    mask2 = torch.tensor([[0, 0] + [1] * 18])
    pos2 = build_position_ids(ids2, mask2, IMG, offsets)[0, 2:].tolist()
    assert pos2[-1] == 1 + 2 * max(offsets)
    assert next_positions(pos, torch.ones_like(ids)).tolist() == [expected[-1] + 1]
    # with V2PE's delta the shared rows step by delta too: share_by_row at 1/2 -> rows at 0.5, 1, 1.5
    half = build_position_ids(ids, torch.ones_like(ids), IMG, offsets, 0.5)[0].tolist()
    assert half[-2:] == [1 + positions_occupied(offsets, 0.5), 2 + positions_occupied(offsets, 0.5)]


@pytest.mark.parametrize("scheme", ["original", "share_by_row", "share_all"])
def test_each_scheme_reaches_the_forward_and_the_processor_reports_it(scheme):
    from mm.build import build_tokenizer, build_vlm, make_processor

    section = tiny_model_section(visual_positions=scheme)
    torch.manual_seed(0)
    tok = build_tokenizer(section, CORPUS)
    model = build_vlm(section, tok).eval()
    proc = make_processor(model, tok)
    h, w = model.fusion.layout[0]
    assert proc.tokens_per_image == h * w
    assert (
        proc.positions_per_image
        == model.positions_per_image
        == {
            "original": h * w,
            "share_by_row": h,
            "share_all": 1,
        }[scheme]
    )
    conv = [
        {"from": "human", "value": "<image>\nWhat colour is the circle?"},
        {"from": "gpt", "value": "red"},
    ]
    other = conv[:1] + [{"from": "gpt", "value": "a"}]
    batch = proc.collate([proc(conv, [solid_image()]), proc(other, [solid_image()])])
    with torch.no_grad():
        loss = model(**batch).loss
        ids = batch["input_ids"]
        plain = model(**batch, position_ids=torch.arange(ids.shape[1]).expand_as(ids).double())
    # the positions do matter: every token at its own position gives another loss (unless original)
    assert (scheme == "original") == bool(torch.allclose(plain.loss, loss))
