"""CSWin Transformer: official equivalence, checkpoint keys, any-size semantics, timm API, precision."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import vision
from vision import cswin
from vision.cswin import CSWinAttention, CSWinTransformer, checkpoint_filter_fn, to_official_state_dict

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
NAMES = [
    "cswin_tiny_224",
    "cswin_small_224",
    "cswin_base_224",
    "cswin_large_224",
    "cswin_base_384",
    "cswin_large_384",
]
# Exact official parameter counts (with head, without head), backbones.md section 1 / measured.
OFFICIAL_PARAMS = {
    "cswin_tiny_224": (22_320_552, 21_807_552),
    "cswin_small_224": (34_643_304, 34_130_304),
    "cswin_base_224": (77_382_184, 76_613_184),
    "cswin_large_224": (173_262_664, 172_109_664),
    "cswin_base_384": (77_382_184, 76_613_184),
    "cswin_large_384": (173_262_664, 172_109_664),
}
TINY = dict(
    embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 4), split_size=(1, 2, 7, 7), num_classes=10
)


def tiny_model(seed: int = 0, **kwargs) -> CSWinTransformer:
    torch.manual_seed(seed)
    model = CSWinTransformer(img_size=224, **dict(TINY, **kwargs))
    with torch.no_grad():  # non-trivial biases / norms so every parameter influences the output
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def need_golden():
    if not (GOLDEN / "cswin_micro.safetensors").exists():
        pytest.skip(f"golden tensors not found at {GOLDEN} (../shared is absent)")
    from safetensors.torch import load_file

    meta = json.loads((GOLDEN / "cswin_micro.json").read_text())
    tensors = load_file(str(GOLDEN / "cswin_micro.safetensors"))
    sd = {k.removeprefix("state_dict."): v for k, v in tensors.items() if k.startswith("state_dict.")}
    return meta, sd, tensors["input"], tensors["logits"]


# ---------------------------------------------------------------------------------------------------------
# Official equivalence and checkpoints


@pytest.mark.parametrize("container", ["plain", "state_dict_ema", "model", "state_dict", "ddp"])
def test_from_official_reproduces_golden_logits(container):
    meta, sd, x, logits = need_golden()
    assert len(sd) == meta["num_state_dict_keys"]
    wrapped = {
        "plain": sd,
        "state_dict_ema": {"state_dict_ema": sd, "state_dict": {}, "epoch": 3},
        "model": {"model": sd},
        "state_dict": {"state_dict": sd, "optimizer": {}},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }[container]
    model = vision.from_official("cswin", meta["kw"], wrapped)
    with torch.no_grad():
        out = model(x)
    assert out.shape == tuple(meta["logits_shape"])
    assert rel_err(out, logits) <= 1e-4


def test_golden_explicit_path_and_separate_branches_agree():
    meta, sd, x, logits = need_golden()
    model = vision.from_official("cswin", meta["kw"], sd)
    for m in model.modules():
        if isinstance(m, CSWinAttention):
            m.fused_attn, m.fuse_branches = False, False
    with torch.no_grad():
        assert rel_err(model(x), logits) <= 1e-4


def test_timm_pretrained_file_loads_official_checkpoint(tmp_path):
    """The timm route: an official-format training checkpoint (with pickled ``args``) via ``file=``."""
    meta, sd, x, logits = need_golden()
    kw = meta["kw"]
    path = tmp_path / "cswin_micro.pth"
    torch.save({"state_dict_ema": sd, "args": argparse.Namespace(lr=2e-3, model="CSWin"), "epoch": 1}, path)
    model = timm.create_model(
        "cswin_tiny_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=kw["num_classes"]),
        img_size=kw["img_size"],
        embed_dim=kw["embed_dim"],
        depths=tuple(kw["depth"]),
        split_size=tuple(kw["split_size"]),
        num_heads=tuple(kw["num_heads"]),
        num_classes=kw["num_classes"],
    ).eval()
    with torch.no_grad():
        assert rel_err(model(x), logits) <= 1e-4


def official_key_shapes() -> dict[str, dict[str, list[int]]]:
    path = GOLDEN / "official_keys.json"
    if not path.exists():
        pytest.skip(f"{path} not found (../shared is absent)")
    keys = json.loads(path.read_text())
    return {name: shapes for name, shapes in keys.items() if name.startswith("cswin")}


def test_official_keys_cover_full_size_models():
    models = official_key_shapes()
    assert set(models) == {"cswin_tiny_224", "cswin_small_224", "cswin_base_224"}
    for name, shapes in models.items():
        with torch.device("meta"):
            model = timm.create_model(name)
            official = {k: torch.empty(s) for k, s in shapes.items()}
        ours = model.state_dict()
        mapped = checkpoint_filter_fn(official, model)
        assert set(mapped) == set(ours), name
        assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
        model.load_state_dict(mapped, strict=True, assign=True)
        back = to_official_state_dict(ours, model)
        assert {k: list(v.shape) for k, v in back.items()} == shapes, name


def test_checkpoint_round_trip_and_noop_on_ours():
    model = tiny_model()
    ours = model.state_dict()
    assert checkpoint_filter_fn(ours, model) == ours  # same keys, same tensor objects
    official = to_official_state_dict(ours, model)
    assert "stage1.0.attns.1.get_v.weight" in official and "stage4.0.attns.1.get_v.weight" not in official
    assert official["stage4.0.attns.0.get_v.weight"].shape == (128, 1, 3, 3)
    back = checkpoint_filter_fn({"state_dict_ema": official}, model)
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_lepe_branch0_kernel_is_stored_transposed():
    model = tiny_model()
    official = to_official_state_dict(model.state_dict(), model)
    ours = model.stages[0].blocks[0].attn.lepe.weight
    assert torch.equal(ours[:8], official["stage1.0.attns.0.get_v.weight"].transpose(-1, -2))
    assert torch.equal(ours[8:], official["stage1.0.attns.1.get_v.weight"])


def test_filter_rejects_unknown_keys():
    sd = {"stage1_conv_embed.0.weight": torch.zeros(1), "stage1.0.attn_mask": torch.zeros(1)}
    with pytest.raises(KeyError, match="unrecognised CSWin checkpoint key 'stage1.0.attn_mask'"):
        checkpoint_filter_fn(sd, None)


def test_build_from_official_validates_arguments():
    kw = dict(img_size=64, embed_dim=16, depth=[1, 1, 1, 1], split_size=[1, 2, 2, 2], num_heads=[2, 2, 4, 4])
    with pytest.raises(TypeError, match=r"unknown official CSWin argument\(s\): \['window_size'\]"):
        cswin.build_from_official(dict(kw, window_size=7))
    with pytest.raises(ValueError, match="hybrid_backbone is not supported"):
        cswin.build_from_official(dict(kw, hybrid_backbone=nn.Identity()))
    model = cswin.build_from_official(dict(kw, norm_eps=1e-6, use_chk=True, num_classes=5))
    assert model.norm.eps == 1e-6 and model.stages[2].grad_checkpointing and model.num_classes == 5


def test_full_attention_layout_follows_build_size():
    """As officially: a stage whose build-time side equals its split size is one full-attention branch."""
    model = CSWinTransformer(img_size=112, **TINY)  # stage 3 side 7 == split 7
    kinds = [stage.blocks[0].attn.full_attention for stage in model.stages]
    assert kinds == [False, False, True, True]
    assert model.stages[2].blocks[0].attn.lepe.weight.shape == (64, 1, 3, 3)
    official = to_official_state_dict(model.state_dict(), model)
    assert "stage3.0.attns.1.get_v.weight" not in official
    out = model.eval()(torch.randn(1, 3, 160, 96))  # still runs at another size, full attention there
    assert out.shape == (1, 10) and out.isfinite().all()


@pytest.mark.parametrize("name", NAMES)
def test_exact_parameter_counts(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    with_head, without_head = OFFICIAL_PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == with_head
    model.reset_classifier(0)
    assert sum(p.numel() for p in model.parameters()) == without_head


# ---------------------------------------------------------------------------------------------------------
# Attention semantics: independent per-stripe reference, path equivalence


def reference_attention(attn: CSWinAttention, x: torch.Tensor) -> torch.Tensor:
    """The official algorithm stripe by stripe, explicit softmax; a last stripe narrower than the split size
    is simply smaller (the semantics our masked padding must reproduce)."""
    b, h, w, c = x.shape
    q, k, v = attn.qkv(x).view(b, h, w, 3, c).unbind(3)
    weight, bias = attn.lepe.weight, attn.lepe.bias

    def stripe(sl, heads, kernel, kbias):
        qs, ks, vs = q[sl], k[sl], v[sl]
        _, hh, ww, cc = qs.shape

        def split_heads(t):
            return t.reshape(b, hh * ww, heads, cc // heads).transpose(1, 2)

        logits = (split_heads(qs) * attn.scale) @ split_heads(ks).transpose(-1, -2)
        o = (logits.softmax(-1) @ split_heads(vs)).transpose(1, 2).reshape(b, hh, ww, cc)
        lepe = F.conv2d(vs.permute(0, 3, 1, 2), kernel, kbias, padding=1, groups=cc).permute(0, 2, 3, 1)
        return o + lepe

    if attn.full_attention:
        out = stripe((slice(None),) * 4, attn.heads_per_branch, weight, bias)
        return attn.proj(out)
    half, sw = c // 2, attn.split_size
    out = torch.empty(b, h, w, c)
    w0 = weight[:half].transpose(-1, -2)  # official orientation of the branch-0 kernel
    for x0 in range(0, w, sw):  # branch 0: vertical stripes, channels [0, C/2)
        sl = (slice(None), slice(None), slice(x0, x0 + sw), slice(0, half))
        out[sl] = stripe(sl, attn.heads_per_branch, w0, bias[:half])
    for y0 in range(0, h, sw):  # branch 1: horizontal stripes, channels [C/2, C)
        sl = (slice(None), slice(y0, y0 + sw), slice(None), slice(half, c))
        out[sl] = stripe(sl, attn.heads_per_branch, weight[half:], bias[half:])
    return attn.proj(out)


def random_attention(dim=16, heads=4, split=7, full=False, seed=0) -> CSWinAttention:
    torch.manual_seed(seed)
    attn = CSWinAttention(dim, heads, split, full)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn.eval()


@pytest.mark.parametrize(
    "split,size",
    [(7, (14, 14)), (7, (12, 12)), (7, (14, 12)), (7, (10, 14)), (7, (9, 5)), (2, (5, 8)), (1, (6, 4))],
)
def test_attention_paths_match_per_stripe_reference(split, size):
    attn = random_attention(split=split)
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        ref = reference_attention(attn, x)
        for fused_attn in (True, False):
            for fuse_branches in (True, False):
                attn.fused_attn, attn.fuse_branches = fused_attn, fuse_branches
                out = attn(x)
                assert out.shape == x.shape
                assert rel_err(out, ref) <= 1e-5, (fused_attn, fuse_branches)


def test_full_attention_matches_reference_at_any_size():
    attn = random_attention(dim=32, heads=4, split=7, full=True)
    x = torch.randn(2, 5, 9, 32)
    with torch.no_grad():
        ref = reference_attention(attn, x)
        assert rel_err(attn(x), ref) <= 1e-5
        attn.fused_attn = False
        assert rel_err(attn(x), ref) <= 1e-5


def test_lepe_per_stripe_differs_from_full_map_conv():
    """Zero padding at stripe borders is part of the algorithm: a whole-map conv gives other numbers."""
    attn = random_attention(split=2)
    x = torch.randn(1, 6, 6, 16)
    with torch.no_grad():
        ours = attn(x)
        full = CSWinAttention(16, 4, 2, True)
        full.load_state_dict(attn.state_dict())
        full.lepe.weight[:8] = attn.lepe.weight[:8].transpose(-1, -2)
        assert rel_err(reference_attention(full, x), ours) > 1e-2


def test_branch0_is_vertical_stripes_on_channel_half0():
    """Perturb one token: half 0 changes exactly its vertical stripe, half 1 exactly its horizontal one."""
    attn = random_attention(dim=16, heads=4, split=2)
    with torch.no_grad():
        attn.proj.weight.copy_(torch.eye(16))
        attn.proj.bias.zero_()
        x = torch.randn(1, 6, 6, 16)
        x2 = x.clone()
        x2[0, 2, 3] += 1.0
        changed = (attn(x2) - attn(x)).abs()[0] > 1e-6  # [H, W, C]
    vertical = torch.zeros(6, 6, dtype=torch.bool)
    vertical[:, 2:4] = True  # columns of the stripe that holds column 3
    horizontal = torch.zeros(6, 6, dtype=torch.bool)
    horizontal[2:4, :] = True
    assert torch.equal(changed[..., :8].any(-1), vertical)
    assert torch.equal(changed[..., 8:].any(-1), horizontal)


def test_key_masks_are_cached_per_input_size():
    attn = random_attention(split=7)
    x = torch.randn(2, 12, 10, 16)
    cswin._cached_key_mask.cache_clear()
    with torch.no_grad():
        attn(x)
        attn(x)
    info = cswin._cached_key_mask.cache_info()
    assert (info.misses, info.hits) == (1, 1)


def test_mask_cached_under_inference_mode_serves_training():
    attn = random_attention(split=7).train()
    x = torch.randn(2, 12, 10, 16)
    cswin._cached_key_mask.cache_clear()
    with torch.inference_mode():
        ref = attn(x)
    out = attn(x)
    out.square().sum().backward()
    assert cswin._cached_key_mask.cache_info().hits == 1
    assert torch.allclose(out, ref) and attn.qkv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Whole model: sizes, gradients, timm API


@pytest.mark.parametrize(
    "size,grid",
    [((224, 224), (7, 7)), ((256, 256), (8, 8)), ((384, 384), (12, 12)), ((320, 192), (10, 6))],
)
def test_forward_any_size_is_batch_consistent(size, grid):
    model = tiny_model()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
        single = model(x[1:])
        tokens, hw = model.forward_tokens(x)
    assert logits.shape == (2, 10) and logits.isfinite().all()
    assert hw == grid and tokens.shape == (2, grid[0] * grid[1], 128)
    assert rel_err(single, logits[1:]) <= 1e-5  # padding masks are per stripe, not mixed across the batch
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_real_variant_tiny_224_paths_agree():
    torch.manual_seed(0)
    model = timm.create_model("cswin_tiny_224").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        fast = model(x)
        for m in model.modules():
            if isinstance(m, CSWinAttention):
                m.fused_attn, m.fuse_branches = False, False
        slow = model(x)
    assert fast.shape == (1, 1000)
    assert rel_err(fast, slow) <= 1e-5


def test_gradients_reach_every_parameter():
    model = tiny_model().train()
    x = torch.randn(2, 3, 200, 136)  # padded stripes in stage 3
    model(x).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_grad_checkpointing_same_outputs_and_gradients():
    model = tiny_model().train()
    x = torch.randn(2, 3, 96, 80)
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    out2 = model(x)
    out2.square().mean().backward()
    assert torch.allclose(out, out2, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6, rtol=1e-4), n


def test_create_model_registers_every_variant():
    for name in NAMES:
        assert timm.is_model(name)
        with torch.device("meta"):
            model = timm.create_model(name)
        assert isinstance(model, CSWinTransformer)
        assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]
        assert model.pretrained_cfg["input_size"][-1] == (384 if name.endswith("384") else 224)
    with torch.device("meta"):
        base384 = timm.create_model("cswin_base_384")
    assert [s.blocks[0].attn.split_size for s in base384.stages] == [1, 2, 12, 12]
    assert base384.num_features == 768


def test_features_only_and_intermediates():
    torch.manual_seed(0)
    feats = timm.create_model("cswin_tiny_224", features_only=True, out_indices=(1, 3), **TINY).eval()
    full = tiny_model()
    wanted = feats.model.state_dict()
    feats.model.load_state_dict({k: v for k, v in full.state_dict().items() if k in wanted})
    x = torch.randn(2, 3, 160, 96)
    with torch.no_grad():
        maps = feats(x)
        final, inter = full.forward_intermediates(x)
        nhwc = full.forward_intermediates(x, indices=[0], output_fmt="NHWC", intermediates_only=True)
        normed = full.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)
        tokens2, hw2 = full.forward_tokens(x, index=1)
    assert feats.feature_info.channels() == [32, 128] and feats.feature_info.reduction() == [8, 32]
    assert [tuple(m.shape) for m in maps] == [(2, 32, 20, 12), (2, 128, 5, 3)]
    expected = [(2, 16, 40, 24), (2, 32, 20, 12), (2, 64, 10, 6), (2, 128, 5, 3)]
    assert [tuple(t.shape) for t in inter] == expected
    assert torch.allclose(maps[0], inter[1], atol=1e-6) and torch.allclose(maps[1], inter[3], atol=1e-6)
    assert torch.equal(nhwc[0], inter[0].permute(0, 2, 3, 1))
    assert torch.allclose(final, full.forward_features(x), atol=1e-6)
    assert torch.allclose(normed[0].permute(0, 2, 3, 1), final, atol=1e-6)
    assert hw2 == (20, 12) and torch.equal(tokens2, inter[1].flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NHWC'"):
        full.forward_intermediates(x, output_fmt="NLC")


def test_prune_and_stop_early():
    model = tiny_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.forward_intermediates(x, intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        kept = model.prune_intermediate_layers(indices=(0, 1))
        pruned = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
    assert kept == [0, 1] and len(model.stages) == 2 and isinstance(model.norm, nn.Identity)
    assert isinstance(model.head, nn.Identity) and model.num_classes == 0
    assert torch.equal(early[0], ref[1])
    assert all(torch.equal(a, b) for a, b in zip(pruned, ref[:2]))


def test_forward_tokens_and_classifier_api():
    model = tiny_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens, hw = model.forward_tokens(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    assert hw == (2, 2) and torch.equal(tokens, feats.reshape(1, 4, 128))
    assert torch.allclose(pooled, tokens.mean(1), atol=1e-6)
    with pytest.raises(IndexError, match="stage index 4 out of range for 4 stages"):
        model.forward_tokens(x, index=4)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\], got shape \(1, 4, 64, 64\)"):
        model(torch.randn(1, 4, 64, 64))
    assert model.get_classifier() is model.head and model.num_features == 128
    assert model.no_weight_decay() == set()
    model.reset_classifier(7)
    assert model.head.out_features == 7 and model(x).shape == (1, 7)
    model.reset_classifier(0, "")
    assert model(x).shape == (1, 2, 2, 128)


def test_low_precision_is_finite_and_close():
    model = tiny_model()
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x)
        half = model.half()(x.half())
    assert bf16.isfinite().all() and half.isfinite().all()
    assert rel_err(bf16.float(), ref) < 5e-2
    assert rel_err(half.float(), ref) < 1e-2


def test_bf16_autocast_backward_is_finite():
    model = tiny_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 96, 96)).float().square().mean()
    loss.backward()
    assert all(p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = tiny_model()
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model)(x)
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (fused SDPA kernels)")
@pytest.mark.parametrize("size", [(224, 224), (200, 136)])
def test_cuda_sdpa_kernels_match_explicit_path(size):
    """On GPU SDPA dispatches to flash / memory-efficient kernels: same numbers as the explicit softmax."""
    model = tiny_model().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, *size, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fast_bf16 = model(x).float()
    with torch.no_grad():
        fast = model(x)
        for m in model.modules():
            if isinstance(m, CSWinAttention):
                m.fused_attn, m.fuse_branches = False, False
        slow = model(x)
    assert rel_err(fast, slow) <= 1e-4
    assert fast_bf16.isfinite().all() and rel_err(fast_bf16, slow) < 5e-2
