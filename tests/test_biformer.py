"""BiFormer (vision/biformer.py): equal to the official model, any input size, both attention paths agree."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import vision
from vision import biformer as bf
from vision.biformer import BiFormer, BiLevelRoutingAttention, RegionGrid, checkpoint_filter_fn

SHARED = Path(__file__).resolve().parents[2] / "shared"
GOLDEN = SHARED / "golden"
NAMES = ("biformer_tiny", "biformer_small", "biformer_base")
# backbones.md section 1: exact official counts (with head, without head), state-dict tensors
OFFICIAL_COUNTS = {
    "biformer_tiny": (13_142_760, 12_629_760, 264),
    "biformer_small": (25_536_232, 25_536_232 - 513_000, 518),
    "biformer_base": (56_804_968, 56_804_968 - 769_000, 518),
}
MICRO = dict(depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), head_dim=8, num_classes=10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The test machine's 2 cores are shared: one thread avoids OpenMP oversubscription (20x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _micro(seed: int = 0, **kwargs) -> BiFormer:
    torch.manual_seed(seed)
    return BiFormer(**{**MICRO, **kwargs}).eval()


def _set_paths(model: torch.nn.Module, path: str | None = None, fused: bool | None = None) -> None:
    for module in model.modules():
        if path is not None and isinstance(module, BiLevelRoutingAttention):
            module.attn_path = path
        if fused is not None and hasattr(module, "fused_attn"):
            module.fused_attn = fused


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _golden() -> tuple[dict, dict[str, torch.Tensor]]:
    if not (GOLDEN / "biformer_micro.json").exists():
        pytest.skip(f"golden tensors not found under {GOLDEN} (shared data absent)")
    from safetensors.torch import load_file

    meta = json.loads((GOLDEN / "biformer_micro.json").read_text())
    return meta, load_file(str(GOLDEN / "biformer_micro.safetensors"))


def _official_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}


# ----------------------------------------------------------------------------------------------------------
# Equivalence with the official model


@pytest.mark.parametrize("path", ["auto", "dense", "gather"])
def test_golden_logits_match_official(path):
    meta, tensors = _golden()
    model = vision.from_official("biformer", meta["kw"], _official_state_dict(tensors))
    _set_paths(model, path)
    with torch.no_grad():
        logits = model(tensors["input"])
    assert logits.shape == tuple(meta["logits_shape"])
    assert _rel(logits, tensors["logits"]) <= 1e-4


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"model": sd, "epoch": 299},
        lambda sd: {"state_dict_ema": sd, "state_dict": {}},
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    ],
    ids=["model", "state_dict_ema", "ddp_state_dict"],
)
def test_from_official_unwraps_containers(wrap):
    meta, tensors = _golden()
    model = vision.from_official("biformer", meta["kw"], wrap(_official_state_dict(tensors)))
    with torch.no_grad():
        assert _rel(model(tensors["input"]), tensors["logits"]) <= 1e-4


def test_timm_pretrained_file_loads_official_checkpoint(tmp_path):
    meta, tensors = _golden()
    kw = meta["kw"]
    path = tmp_path / "biformer_micro.pth"
    torch.save({"model": _official_state_dict(tensors)}, path)
    model = timm.create_model(
        "biformer_tiny",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=kw["num_classes"]),
        depths=kw["depth"],
        embed_dims=kw["embed_dim"],
        head_dim=kw["head_dim"],
        num_classes=kw["num_classes"],
    ).eval()
    with torch.no_grad():
        assert _rel(model(tensors["input"]), tensors["logits"]) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_official_full_size_keys_map_exactly(name):
    if not (GOLDEN / "official_keys.json").exists():
        pytest.skip(f"official_keys.json not found under {GOLDEN} (shared data absent)")
    official = json.loads((GOLDEN / "official_keys.json").read_text())[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        state = {k: torch.empty(shape) for k, shape in official.items()}
    remapped = checkpoint_filter_fn({"model": state}, model)
    ours = model.state_dict()
    assert set(remapped) == set(ours)
    assert {k: tuple(v.shape) for k, v in remapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
    model.load_state_dict(remapped, strict=True, assign=True)


def test_filter_is_noop_on_our_state_dicts_and_rejects_unknown_keys():
    model = _micro()
    ours = model.state_dict()
    filtered = checkpoint_filter_fn(ours, model)
    assert list(filtered) == list(ours) and all(filtered[k] is ours[k] for k in ours)
    with pytest.raises(
        KeyError, match="unexpected key in an official BiFormer state dict: 'stages.0.0.attn.gamma'"
    ):
        checkpoint_filter_fn({"head.weight": torch.zeros(1), "stages.0.0.attn.gamma": torch.zeros(1)})


def test_build_from_official_rejects_other_operators():
    with pytest.raises(NotImplementedError, match="kv_downsample_mode='ada_avgpool' is not supported"):
        bf.build_from_official({"kv_downsample_mode": "ada_avgpool"})
    with pytest.raises(NotImplementedError, match="layer scale"):
        bf.build_from_official({"layer_scale_init_value": 1e-6})
    with pytest.raises(TypeError, match=r"unexpected official BiFormer arguments: \['bogus'\]"):
        bf.build_from_official({"bogus": 1})
    with pytest.raises(NotImplementedError, match="topk=-1"):
        bf.build_from_official({"topks": [1, 4, 16, -1]})


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_equal_official(name):
    total, without_head, tensors = OFFICIAL_COUNTS[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        headless = timm.create_model(name, num_classes=0)
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in headless.parameters()) == without_head
    assert len(model.state_dict()) == tensors


# ----------------------------------------------------------------------------------------------------------
# Any input size: a from-the-definition reference of the padding policy, and path agreement


def _reference_bra(attn: BiLevelRoutingAttention, x: torch.Tensor, n_win: int) -> torch.Tensor:
    """BRA by its definition with explicit loops: regions ceil(side / n_win) long (last ones partial),
    region means of the projected q / k over real tokens, top-k regions, softmax over their real tokens."""
    batch, height, width, channels = x.shape
    rh, rw = math.ceil(height / n_win), math.ceil(width / n_win)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    region_of = ((ys // rh) * math.ceil(width / rw) + xs // rw).flatten()
    regions = [torch.nonzero(region_of == r).flatten() for r in range(int(region_of.max()) + 1)]
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(batch, height * width, -1)
    q, k, v = qkv.split([attn.qk_dim, attn.qk_dim, channels], dim=-1)
    heads, out = attn.num_heads, torch.zeros(batch, height * width, channels, dtype=x.dtype)
    for b in range(batch):
        q_mean = torch.stack([q[b, toks].mean(0) for toks in regions])
        k_mean = torch.stack([k[b, toks].mean(0) for toks in regions])
        chosen = ((q_mean * attn.scale) @ k_mean.T).topk(min(attn.topk, len(regions))).indices
        for r, toks in enumerate(regions):
            keys = torch.cat([regions[s] for s in chosen[r].tolist()])
            for h in range(heads):
                dq, dv = attn.qk_dim // heads, channels // heads
                qh, kh = q[b, toks, h * dq : (h + 1) * dq], k[b, keys, h * dq : (h + 1) * dq]
                vh = v[b, keys, h * dv : (h + 1) * dv]
                out[b, toks, h * dv : (h + 1) * dv] = ((qh @ kh.T) * attn.scale).softmax(-1) @ vh
    v_img = v.view(batch, height, width, channels).permute(0, 3, 1, 2)
    lepe = F.conv2d(v_img, attn.lepe.weight, attn.lepe.bias, padding=attn.lepe.padding, groups=channels)
    return attn.proj(out.view(batch, height, width, channels) + lepe.permute(0, 2, 3, 1))


@pytest.mark.parametrize("size", [(14, 14), (10, 13), (9, 6), (5, 3)], ids=str)
@pytest.mark.parametrize("path", ["dense", "gather"])
def test_routing_attention_matches_definition(size, path):
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(16, num_heads=2, topk=4, attn_path=path).double()
    x = torch.randn(2, *size, 16, dtype=torch.double)
    grid = RegionGrid.for_size(*size, n_win=7)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, grid), _reference_bra(attn, x, 7), rtol=1e-9, atol=1e-9)


def test_region_grid_has_no_empty_regions():
    grid = RegionGrid.for_size(12, 20, n_win=7)  # rows of 2 tokens -> 6 rows, columns of 3 -> 7 columns
    assert (grid.region_h, grid.region_w, grid.rows, grid.cols) == (2, 3, 6, 7)
    assert grid.is_padded and grid.padded_size == (12, 21)
    assert not RegionGrid.for_size(56, 28, 7).is_padded


@pytest.mark.parametrize("size", [(14, 14), (16, 16), (10, 13), (12, 20)], ids=str)
def test_dense_gather_and_explicit_paths_agree_with_gradients(size):
    torch.manual_seed(1)
    base = BiLevelRoutingAttention(32, num_heads=4, topk=4).double()
    x = torch.randn(2, *size, 32, dtype=torch.double)
    grid = RegionGrid.for_size(*size, n_win=7)
    results = []
    for path, fused in [("dense", True), ("gather", True), ("dense", False), ("gather", False)]:
        base.attn_path, base.fused_attn = path, fused
        xi = x.clone().requires_grad_(True)
        base.zero_grad()
        out = base(xi, grid)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad, base.qkv.weight.grad.clone(), base.lepe.weight.grad.clone()))
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (384, 384), (320, 192)], ids=str)
def test_forward_any_size_auto_and_gather_paths(size):
    model = _micro()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        auto = model(x)  # dense where a stage has <= 1024 tokens, gather elsewhere
        tokens, grid = model.forward_tokens(x)
        _set_paths(model, "gather")
        gather = model(x)
    assert auto.shape == (1, 10) and torch.isfinite(auto).all()
    torch.testing.assert_close(auto, gather, rtol=1e-4, atol=1e-5)
    assert grid == (math.ceil(size[0] / 32), math.ceil(size[1] / 32))
    assert tokens.shape == (1, grid[0] * grid[1], 128)


def test_real_variant_forward_at_224():
    model = timm.create_model("biformer_tiny").eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_auto_path_choice_per_stage():
    model = _micro()
    sides = [56, 28, 14]
    paths = [
        model.stages[i].blocks[0].attn.path_for(RegionGrid.for_size(s, s, 7)) for i, s in enumerate(sides)
    ]
    assert paths == ["gather", "dense", "dense"]


def test_index_tensors_are_cached_per_size_and_serve_training_after_inference_mode():
    grid = RegionGrid.for_size(30, 30, 7)
    with torch.inference_mode():
        first = bf._token_regions(grid, torch.device("cpu"))
    assert bf._token_regions(grid, torch.device("cpu")) is first
    assert not first.is_inference()
    assert bf._token_regions(RegionGrid.for_size(31, 30, 7), torch.device("cpu")) is not first
    # a model first run under inference_mode must still train at that size
    model = _micro()
    x = torch.randn(1, 3, 96, 160)
    with torch.inference_mode():
        model(x)
    model.train()
    model(x).sum().backward()
    assert model.stages[1].blocks[0].attn.qkv.weight.grad is not None


# ----------------------------------------------------------------------------------------------------------
# Training behaviour


def test_gradients_reach_every_parameter():
    model = _micro().train()
    model(torch.randn(2, 3, 112, 80)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_grad_checkpointing_gives_same_outputs_and_gradients():
    x = torch.randn(2, 3, 96, 96)
    grads = []
    for enable in (False, True):
        model = _micro().train()
        model.set_grad_checkpointing(enable)
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_and_fp16_are_finite():
    model = _micro()
    x = torch.randn(2, 3, 128, 96) * 3
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        half = model.half()(x.half())
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert _rel(low.float(), ref) < 5e-2
    assert torch.isfinite(half).all() and _rel(half.float(), ref) < 1e-2


def test_layernorm_keeps_low_precision_under_autocast():
    norm = bf.LayerNorm(16, eps=1e-6)
    x = torch.randn(4, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.layer_norm(x.float(), (16,), eps=1e-6), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = _micro()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# timm integration and feature API


@pytest.mark.parametrize("name", NAMES)
def test_create_model_every_name(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert isinstance(model, BiFormer) and model.pretrained_cfg["architecture"] == name
    assert (
        model.num_features == model.get_classifier().in_features == (768 if name == "biformer_base" else 512)
    )


def test_features_only_and_intermediates():
    torch.manual_seed(0)
    features = timm.create_model(
        "biformer_tiny", features_only=True, **{k: v for k, v in MICRO.items()}
    ).eval()
    assert features.feature_info.channels() == [16, 32, 64, 128]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 320, 192))
    assert [tuple(m.shape) for m in maps] == [
        (1, 16, 80, 48),
        (1, 32, 40, 24),
        (1, 64, 20, 12),
        (1, 128, 10, 6),
    ]

    model = _micro()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[1, 3], norm=True, output_fmt="NHWC")
        early = model.forward_intermediates(x, indices=[1, 2], stop_early=True, intermediates_only=True)
        tokens, grid = model.forward_tokens(x, index=1)
        features_ref = model.forward_features(x)
    assert [tuple(t.shape) for t in inter] == [(1, 28, 28, 32), (1, 7, 7, 128)]
    torch.testing.assert_close(inter[1], features_ref)
    torch.testing.assert_close(final, features_ref)
    assert [tuple(t.shape) for t in early] == [(1, 32, 28, 28), (1, 64, 14, 14)]
    torch.testing.assert_close(early[0].permute(0, 2, 3, 1).reshape(1, -1, 32), tokens)
    assert grid == (28, 28)
    with pytest.raises(IndexError, match="stage index 4 out of range for 4 stages"):
        model.forward_tokens(x, index=4)

    kept = model.prune_intermediate_layers(indices=(0, 1), prune_head=True)
    assert kept == [0, 1] and len(model.stages) == 2 and model.num_features == 32
    assert isinstance(model.norm, torch.nn.Identity)


def test_head_api():
    model = _micro()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, feats.mean((1, 2)))
        torch.testing.assert_close(model.forward_head(feats), model.get_classifier()(pooled))
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, 128)
    assert model.no_weight_decay() == set()
