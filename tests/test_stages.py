"""Stage-wise weight casting under autocast (``vision._stages.cast_weights_together``) gives exactly what
autocast's per-parameter casts give, in the helper and in every backbone that uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vision._stages as stages
from vision import biformer, cswin, sgformer
from vision.biformer import BiFormer
from vision.cswin import CSWinTransformer
from vision.sgformer import SGFormer


def one_by_one(groups, x):
    """The reference: each parameter cast on its own, as autocast does."""
    pairs = [{name: (m.weight, m.bias) for name, m in g.items() if m is not None} for g in groups]
    if not torch.is_autocast_enabled(x.device.type):
        return pairs
    dtype = torch.get_autocast_dtype(x.device.type)
    return [
        {k: tuple(None if t is None else t.to(dtype) for t in pair) for k, pair in g.items()} for g in pairs
    ]


def test_cast_weights_together_values_and_gradients():
    torch.manual_seed(0)
    layers = {
        "fc": nn.Linear(6, 5),
        "conv": nn.Conv2d(3, 3, 3, groups=3),
        "nobias": nn.Linear(5, 4, bias=False),
    }
    x = torch.randn(2, 6)

    def run(cast):
        for p in nn.ModuleList(layers.values()).parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (w,) = cast([layers], x)
        assert set(w) == set(layers) and w["nobias"][1] is None
        out = (w["fc"][0].float() * 3).sum() + w["fc"][1].float().square().sum()
        out = (
            out
            + (w["conv"][0].float() ** 3).sum()
            + w["conv"][1].float().sum()
            + w["nobias"][0].float().sum()
        )
        out.backward()
        return w, {f"{n}.{pn}": p.grad for n, m in layers.items() for pn, p in m.named_parameters()}

    together, grads = run(stages.cast_weights_together)
    reference, ref_grads = run(one_by_one)
    for name in layers:
        for got, want in zip(together[name], reference[name]):
            if want is not None:
                assert got.dtype == torch.bfloat16 and got.shape == want.shape
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (
        set(grads) == set(ref_grads) == {"fc.weight", "fc.bias", "conv.weight", "conv.bias", "nobias.weight"}
    )
    for name, grad in ref_grads.items():
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0)


def test_cast_weights_together_is_a_no_op_without_autocast():
    layer = nn.Linear(3, 3)
    (w,) = stages.cast_weights_together([{"fc": layer}], torch.zeros(1))
    assert w["fc"][0] is layer.weight and w["fc"][1] is layer.bias


def _cswin():
    torch.manual_seed(0)
    return CSWinTransformer(embed_dim=16, depths=(1, 2, 2, 1), num_heads=(2, 2, 4, 4), num_classes=10)


def _sgformer():
    torch.manual_seed(0)
    return SGFormer(
        embed_dims=(16, 32, 64, 128), num_heads=(2, 4, 8, 16), depths=(2, 2, 2, 1), num_classes=10
    )


def _biformer():
    torch.manual_seed(0)
    return BiFormer(depths=(1, 1, 2, 1), embed_dims=(16, 32, 64, 128), head_dim=8, num_classes=10)


@pytest.mark.parametrize(
    "build, module, size",
    [(_cswin, cswin, (96, 64)), (_sgformer, sgformer, (112, 112)), (_biformer, biformer, (64, 64))],
    ids=["cswin", "sgformer", "biformer"],
)
def test_backbone_under_autocast_equals_per_parameter_casts(build, module, size, monkeypatch):
    """Same logits and same fp32 gradients as with autocast casting every parameter on its own."""
    x = torch.randn(2, 3, *size)

    def step(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model = build().train()
    out, grads = step(model)
    monkeypatch.setattr(module, "cast_weights_together", one_by_one)
    reference = build().train()
    ref_out, ref_grads = step(reference)
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert set(grads) == set(ref_grads) and len(grads) > 20
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


def test_cswin_token_stream_stays_bf16_under_autocast():
    """LayerNorms keep the 16-bit dtype, so blocks pass bf16 tokens on (no fp32 copy between blocks)."""
    model = _cswin().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert [f.dtype for f in feats] == [torch.bfloat16] * 4
    with torch.no_grad():
        assert all(
            f.dtype == torch.float32 for f in model.forward_intermediates(torch.randn(1, 3, 64, 64))[1]
        )


@pytest.mark.parametrize("build", [_cswin, _sgformer, _biformer], ids=["cswin", "sgformer", "biformer"])
def test_grad_checkpointing_under_autocast_keeps_outputs_and_gradients(build):
    """Checkpointed blocks recompute with the stage's cast weights; gradients still reach the parameters."""
    x = torch.randn(2, 3, 64, 64)
    results = []
    for enabled in (False, True):
        model = build().train()
        model.set_grad_checkpointing(enabled)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out, grads), (ckpt_out, ckpt_grads) = results
    torch.testing.assert_close(ckpt_out, out, rtol=0, atol=0)
    assert all(g is not None for g in ckpt_grads.values()) and set(ckpt_grads) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=0, atol=0, msg=name)
