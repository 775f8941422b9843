"""BiFormer: Vision Transformer with Bi-Level Routing Attention, reimplemented for any input size and speed.

Paper: "BiFormer: Vision Transformer with Bi-Level Routing Attention", Zhu et al., CVPR 2023
(https://arxiv.org/abs/2303.08810). Origin: rayleizhu/BiFormer (MIT). Written from scratch for mmstack. At the
sizes the official ImageNet code accepts (every stage side divisible by ``n_win``: 224, 448, ...) outputs
equal the released models (``models/biformer.py`` with the legacy operator ``ops/bra_legacy.py``), and
official checkpoints load through ``checkpoint_filter_fn``.

Algorithm. A conv stem (two stride-2 3x3 convs with BN) and three stride-2 conv+BN downsamplings give four
stages at strides 4, 8, 16, 32. Every block is ``x += dwconv3x3(x)``, ``x += attn(norm1(x))``,
``x += mlp(norm2(x))``. Stages 1-3 use bi-level routing attention (BRA): the map is cut into ``n_win x n_win``
regions; region-averaged queries and keys (detached) score region pairs, each query region keeps its ``topk``
best key regions (shared by all heads), and every token attends to the tokens of those regions. Both steps use
``scale = qk_dim ** -0.5`` (full width, not per head). A 5x5 depthwise conv of ``v`` over the whole map (LePE)
is added before the output projection. Stage 4 is plain 8-head attention (qkv without bias) whose LePE acts
on the attention input ``x``, not on ``v``. The head is BatchNorm2d, global average pooling and a Linear.

How this implementation differs from the official code (same numbers, different route):

* Tokens stay ``[B, H, W, C]`` (channels last) from stem to head; convolutions see the NCHW view of that
  memory, which is ``channels_last``, so no layout copies happen around them.
* Attention goes through ``F.scaled_dot_product_attention`` on two interchangeable paths.
  ``gather``: tokens are laid out region-major once, the chosen key regions are gathered with one
  ``index_select`` over whole regions (no ``expand`` + ``torch.gather``), one SDPA call for all regions.
  ``dense``: attention over the whole map in raster order with an additive mask that only allows the chosen
  regions, built by two ``index_select`` from the ``[B, R, R]`` region choice (no token permutes at all).
  ``attn_paths='auto'`` takes ``dense`` when a stage has at most ``dense_max_tokens`` tokens (stages 2-3 at
  224, where the official per-region matmuls are tiny) and ``gather`` otherwise (stage 1). Same results.
* Routing pools the whole ``qkv`` map per region (one ``avg_pool2d``, as the official mean of q and k) and
  leaves out the positive scale of the region logits (the top k do not depend on it).
* Under autocast each stage casts all its weights with one ``cat`` + cast (``cast_weights_together``)
  instead of autocast's cast per parameter, and the layers run functionally on them: about 30 fewer kernel
  launches per block in training, same values and gradients.
* Index tensors depend only on the input size; they are cached per size and device.
* Under autocast, LayerNorm keeps bf16/fp16 activations in their dtype (statistics are fp32 inside the
  kernel) instead of emitting fp32 that the next Linear casts back.

Any input size (the official ImageNet code asserts that every stage side is divisible by ``n_win``):

* A side of ``S`` tokens is cut into regions ``L = ceil(S / n_win)`` tokens long; there are ``ceil(S / L)``
  (at most ``n_win``) regions along it, so only the last row / column of regions can be partial and no
  region is empty. Region means average real tokens only, padded positions never act as keys (masked), and
  LePE is the conv over the unpadded map (zero padding only at the image border): "the last regions are
  smaller". At divisible sizes nothing is padded and the model is the official one.
* ``topk`` is capped at the number of regions; when it covers all of them the block is full attention.
* The official dense-task option ``auto_pad=True`` instead zero-pads the block input before ``qkv``, so
  padded tokens (q = k = v = bias) enter the region means and act as keys. We chose the masked policy
  because its result does not depend on how much padding a size needs; official ``auto_pad`` models give
  the same numbers here at divisible sizes and slightly different ones near the border otherwise.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._stages import (
    Weights,
    cast_weights_together,
    layer_norm_keep_dtype,
    prune_stages,
    unwrap_checkpoint,
    weights_or_own,
)
from .official import register_official

__all__ = ["BiFormer", "RegionGrid", "build_from_official", "checkpoint_filter_fn"]

ATTN_PATHS = ("auto", "dense", "gather")


# ----------------------------------------------------------------------------------------------------------
# Region geometry and cached index tensors


class RegionGrid(NamedTuple):
    """How a ``height x width`` token map splits into routing regions (row-major; last row/column partial)."""

    height: int
    width: int
    region_h: int
    region_w: int
    rows: int
    cols: int

    @classmethod
    def for_size(cls, height: int, width: int, n_win: int) -> RegionGrid:
        region_h, region_w = -(-height // n_win), -(-width // n_win)
        return cls(height, width, region_h, region_w, -(-height // region_h), -(-width // region_w))

    @property
    def num_regions(self) -> int:
        return self.rows * self.cols

    @property
    def region_tokens(self) -> int:
        return self.region_h * self.region_w

    @property
    def padded_size(self) -> tuple[int, int]:
        return self.rows * self.region_h, self.cols * self.region_w

    @property
    def is_padded(self) -> bool:
        return self.padded_size != (self.height, self.width)


_INDEX_CACHE: dict[tuple, Tensor] = {}
_INDEX_CACHE_SIZE = 64


def _cached(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """Build size-dependent index tensors once per key (while compiling they are built inside the graph)."""
    if torch.compiler.is_compiling():
        return make()
    hit = _INDEX_CACHE.get(key)
    if hit is None:
        if len(_INDEX_CACHE) >= _INDEX_CACHE_SIZE:
            _INDEX_CACHE.clear()
        with torch.inference_mode(False):  # a cache filled under inference_mode must still serve training
            hit = _INDEX_CACHE[key] = make()
    return hit


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _token_regions(grid: RegionGrid, device: torch.device) -> Tensor:
    """Region id of every raster token, zero-padded to a multiple of 16 entries.

    The padding lets the dense mask be built with a row stride the fused SDPA kernels accept without a copy.
    """

    def make() -> Tensor:
        rows = torch.arange(grid.height, device=device) // grid.region_h
        cols = torch.arange(grid.width, device=device) // grid.region_w
        ids = (rows[:, None] * grid.cols + cols[None, :]).flatten()
        return F.pad(ids, (0, _round_up(ids.numel(), 16) - ids.numel()))

    return _cached(("token_regions", grid, device), make)


def _batch_offsets(batch: int, regions: int, device: torch.device) -> Tensor:
    """``[B, 1, 1]`` offsets turning per-image region ids into rows of the ``[B * R, ...]`` region tensor."""
    return _cached(
        ("batch_offsets", batch, regions, device),
        lambda: (torch.arange(batch, device=device) * regions).view(batch, 1, 1),
    )


def _region_key_bias(grid: RegionGrid, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[R, t]`` additive key bias of region-major tokens: 0 for real tokens, -inf for padding."""

    def make() -> Tensor:
        pad_h, pad_w = grid.padded_size
        real = (torch.arange(pad_h, device=device) < grid.height)[:, None] & (
            torch.arange(pad_w, device=device) < grid.width
        )[None, :]
        real = real.view(grid.rows, grid.region_h, grid.cols, grid.region_w).transpose(1, 2)
        real = real.reshape(grid.num_regions, grid.region_tokens)
        return torch.zeros(real.shape, dtype=dtype, device=device).masked_fill_(~real, float("-inf"))

    return _cached(("region_key_bias", grid, dtype, device), make)


def _token_region_pairs(grid: RegionGrid, device: torch.device) -> Tensor:
    """``[N * N16]`` int32 ids ``region(n) * R + region(m)`` of raster token pairs (``m`` padded as above).

    One ``index_select`` with it turns the ``[B, R * R]`` region choice into the ``[B, N, N16]`` token mask.
    """

    def make() -> Tensor:
        tokens = _token_regions(grid, device)
        n = grid.height * grid.width
        return (tokens[:n, None] * grid.num_regions + tokens[None, :]).flatten().int()

    return _cached(("token_region_pairs", grid, device), make)


def _dense_region_bias(topk_index: Tensor, grid: RegionGrid, dtype: torch.dtype) -> Tensor:
    """``[B, 1, N, N]`` additive mask (0 / -inf): raster tokens attend iff their regions were routed.

    Two ops: an out-of-place scatter into a broadcast ``-inf`` scalar, one ``index_select`` to tokens.
    """
    batch, regions, _ = topk_index.shape
    device = topk_index.device
    blocked = _cached(
        ("blocked", dtype, device), lambda: torch.full((1, 1, 1), float("-inf"), dtype=dtype, device=device)
    )
    allowed = blocked.expand(batch, regions, regions).scatter(-1, topk_index, 0.0)
    bias = allowed.reshape(batch, regions * regions).index_select(1, _token_region_pairs(grid, device))
    n = grid.height * grid.width
    return bias.view(batch, 1, n, -1)[..., :n]


def _to_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """``[B, Hp, Wp, C]`` -> ``[B * R, t, C]`` region-major tokens (one copy)."""
    batch, _, _, channels = x.shape
    x = x.view(batch, grid.rows, grid.region_h, grid.cols, grid.region_w, channels).transpose(2, 3)
    return x.reshape(batch * grid.num_regions, grid.region_tokens, channels)


def _from_regions(x: Tensor, grid: RegionGrid) -> Tensor:
    """``[B * R, t, C]`` -> ``[B, rows, region_h, cols, region_w, C]`` raster-ordered view (no copy)."""
    x = x.view(-1, grid.rows, grid.cols, grid.region_h, grid.region_w, x.shape[-1])
    return x.transpose(2, 3)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B', N, h * d]`` -> ``[B', h, N, d]`` view."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# Layers


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` keeping bf16/fp16 activations in their dtype under autocast."""

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm_keep_dtype(x, self, self.weight, self.bias)


def _dwconv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Same-size depthwise conv of ``[B, H, W, C]`` tokens through their channels_last NCHW view."""
    pad = weight.shape[-1] // 2
    return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=pad, groups=x.shape[-1]).permute(0, 2, 3, 1)


class DepthwiseConvNHWC(nn.Conv2d):
    """Same-size depthwise conv on ``[B, H, W, C]`` tokens through their channels_last NCHW view."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return _dwconv(x, self.weight, self.bias)


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, fused: bool) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` on ``[B', h, N, d]``: SDPA, or the explicit (export) path."""
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    return logits.softmax(dim=-1) @ v


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention with LePE on ``v`` (stages 1-3); ``[B, H, W, C]`` in and out.

    ``weights`` (from the stage, see ``cast_weights_together``) holds ``qkv``, ``lepe``, ``proj``; default:
    own.
    """

    fused_attn: torch.jit.Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        topk: int,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
        attn_path: str = "auto",
        dense_max_tokens: int = 1024,
    ):
        super().__init__()
        qk_dim = qk_dim or dim
        if topk < 1 or qk_dim % num_heads or dim % num_heads:
            raise ValueError(
                f"need topk >= 1 and dims divisible by heads; got {topk=}, {dim=}, {qk_dim=}, {num_heads=}"
            )
        if attn_path not in ATTN_PATHS:
            raise ValueError(f"attn_path must be one of {ATTN_PATHS}, got {attn_path!r}")
        self.dim, self.qk_dim, self.num_heads, self.topk = dim, qk_dim, num_heads, topk
        self.scale = qk_scale or qk_dim**-0.5  # full qk width, in routing and in attention
        self.attn_path = attn_path
        self.dense_max_tokens = dense_max_tokens
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim)  # rows: q, k (qk_dim each), v (dim)
        self.lepe = DepthwiseConvNHWC(dim, side_dwconv) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)

    def layers(self) -> dict[str, nn.Module | None]:
        return {"qkv": self.qkv, "lepe": self.lepe, "proj": self.proj}

    def path_for(self, grid: RegionGrid) -> str:
        """The attention path used at this map size."""
        if self.attn_path != "auto":
            return self.attn_path
        return "dense" if grid.height * grid.width <= self.dense_max_tokens else "gather"

    @torch.no_grad()
    def route(self, qkv: Tensor, grid: RegionGrid) -> Tensor:
        """``[B, R, k]`` ids of the key regions each query region attends to (no gradient, all heads).

        Region means of the projected q and k (as the official code; real tokens only, ``ceil_mode``), pooled
        over the whole contiguous ``qkv`` map (a slice would be copied first). The positive ``scale`` of the
        region logits is left out: it does not change which regions are the top k.
        """
        means = F.avg_pool2d(qkv.permute(0, 3, 1, 2), (grid.region_h, grid.region_w), ceil_mode=True)
        means = means.flatten(2).transpose(1, 2)  # [B, R, 2 qk + C]
        logits = means[..., : self.qk_dim] @ means[..., self.qk_dim : 2 * self.qk_dim].transpose(-2, -1)
        return logits.topk(min(self.topk, grid.num_regions), dim=-1, sorted=False).indices

    def forward(self, x: Tensor, grid: RegionGrid, weights: Weights | None = None) -> Tensor:
        w = weights_or_own(weights, self.layers(), x)
        qkv = F.linear(x, *w["qkv"])  # [B, H, W, 2 qk + C]
        if self.topk >= grid.num_regions:  # every region is routed: plain attention
            return self._dense(qkv, grid, None, w)
        topk_index = self.route(qkv, grid)
        if self.path_for(grid) == "dense":
            return self._dense(qkv, grid, topk_index, w)
        return self._gather(qkv, grid, topk_index, w)

    def _lepe_plus(self, v: Tensor, out: Tensor, w: Weights) -> Tensor:
        """``lepe(v) + out`` (``v`` ``[B, H, W, C]``, ``out`` any raster-ordered view); the sum takes LePE's
        contiguous layout."""
        if self.lepe is None:
            return out
        return _dwconv(v, *w["lepe"]).view(out.shape) + out

    def _dense(self, qkv: Tensor, grid: RegionGrid, topk_index: Tensor | None, w: Weights) -> Tensor:
        batch, height, width, _ = qkv.shape
        q, k, v = qkv.view(batch, height * width, -1).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        mask = None if topk_index is None else _dense_region_bias(topk_index, grid, q.dtype)
        heads = self.num_heads
        out = _attention(
            _split_heads(q, heads),
            _split_heads(k, heads),
            _split_heads(v, heads),
            mask,
            self.scale,
            self.fused_attn,
        )
        v = v.view(batch, height, width, self.dim)  # from the split: its backward joins the LePE gradient
        out = self._lepe_plus(v, out.transpose(1, 2).reshape(batch, height, width, self.dim), w)
        return F.linear(out, *w["proj"])

    def _gather(self, qkv: Tensor, grid: RegionGrid, topk_index: Tensor, w: Weights) -> Tensor:
        batch, height, width, _ = qkv.shape
        channels, regions, tokens = self.dim, grid.num_regions, grid.region_tokens
        pad_h, pad_w = grid.padded_size
        padded = F.pad(qkv, (0, 0, 0, pad_w - width, 0, pad_h - height)) if grid.is_padded else qkv
        q, kv = _to_regions(padded, grid).split([self.qk_dim, self.qk_dim + channels], dim=-1)  # [B*R, t, .]
        topk = topk_index.shape[-1]
        rows = (topk_index + _batch_offsets(batch, regions, qkv.device)).flatten()
        kv = kv.index_select(0, rows).view(batch * regions, topk * tokens, -1)
        k, v = kv.split([self.qk_dim, channels], dim=-1)
        mask = None
        if grid.is_padded:  # padded tokens of the selected regions must not act as keys
            mask = _region_key_bias(grid, q.dtype, qkv.device).index_select(0, topk_index.flatten())
            mask = mask.view(batch * regions, 1, 1, topk * tokens)
        heads = self.num_heads
        out = _attention(
            _split_heads(q, heads),
            _split_heads(k, heads),
            _split_heads(v, heads),
            mask,
            self.scale,
            self.fused_attn,
        )
        out = _from_regions(out.transpose(1, 2).reshape(batch * regions, tokens, channels), grid)
        if grid.is_padded:
            out = out.reshape(batch, pad_h, pad_w, channels)[:, :height, :width]
        out = self._lepe_plus(qkv[..., 2 * self.qk_dim :], out, w)
        return F.linear(out.reshape(batch, height, width, channels), *w["proj"])


class GlobalAttention(nn.Module):
    """Plain multi-head attention of the last stage (official ``AttentionLePE``); LePE acts on input ``x``."""

    fused_attn: torch.jit.Final[bool]

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, side_dwconv: int = 5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lepe = DepthwiseConvNHWC(dim, side_dwconv) if side_dwconv > 0 else None
        self.proj = nn.Linear(dim, dim)

    def layers(self) -> dict[str, nn.Module | None]:
        return {"qkv": self.qkv, "lepe": self.lepe, "proj": self.proj}

    def forward(self, x: Tensor, grid: RegionGrid | None = None, weights: Weights | None = None) -> Tensor:
        w = weights_or_own(weights, self.layers(), x)
        batch, height, width, channels = x.shape
        qkv = F.linear(x, *w["qkv"]).view(batch, height * width, 3 * channels)
        # split, not select: its backward is one cat instead of three zero-filled copies
        q, k, v = (_split_heads(t, self.num_heads) for t in qkv.split(channels, dim=-1))
        out = _attention(q, k, v, None, self.scale, self.fused_attn)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        if self.lepe is not None:
            out = _dwconv(x, *w["lepe"]) + out
        return F.linear(out, *w["proj"])


class BiFormerBlock(nn.Module):
    """``x += dwconv(x)``; ``x += attn(norm1(x))``; ``x += mlp(norm2(x))`` on ``[B, H, W, C]`` tokens.

    The layers run functionally on ``weights`` from ``cast_weights_together`` (the stage casts all its
    blocks').
    """

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 3.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        pos_kernel: int = 3,
    ):
        super().__init__()
        self.pos_embed = DepthwiseConvNHWC(dim, pos_kernel) if pos_kernel > 0 else None
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def layers(self) -> dict[str, nn.Module | None]:
        """The layers with weights, by the names ``forward`` (and the attention) look them up."""
        return dict(
            pos_embed=self.pos_embed,
            norm1=self.norm1,
            norm2=self.norm2,
            fc1=self.mlp.fc1,
            fc2=self.mlp.fc2,
            **self.attn.layers(),
        )

    def forward(self, x: Tensor, grid: RegionGrid | None, weights: Weights | None = None) -> Tensor:
        mlp = self.mlp
        w = weights_or_own(weights, self.layers(), x)
        if self.pos_embed is not None:
            x = x + _dwconv(x, *w["pos_embed"])
        x = x + self.drop_path1(self.attn(layer_norm_keep_dtype(x, self.norm1, *w["norm1"]), grid, w))
        h = mlp.drop1(mlp.act(F.linear(layer_norm_keep_dtype(x, self.norm2, *w["norm2"]), *w["fc1"])))
        return x + self.drop_path2(mlp.drop2(F.linear(mlp.norm(h), *w["fc2"])))


class Stem(nn.Module):
    """Image ``[B, 3, H, W]`` -> ``[B, H/4, W/4, C]``: conv3x3/2, BN, GELU, conv3x3/2, BN."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(dim // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(dim)

    def forward(self, x: Tensor) -> Tensor:
        w = cast_weights_together([{"conv1": self.conv1, "conv2": self.conv2}], x)[0]
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.act(self.norm1(F.conv2d(x, *w["conv1"], stride=2, padding=1)))
        return self.norm2(F.conv2d(x, *w["conv2"], stride=2, padding=1)).permute(0, 2, 3, 1)


class Downsample(nn.Module):
    """``[B, H, W, C]`` -> ``[B, H/2, W/2, C']``: conv3x3/2 + BN."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_dim)

    def layers(self) -> dict[str, nn.Module | None]:
        return {"conv": self.conv}

    def forward(self, x: Tensor, weights: Weights | None = None) -> Tensor:
        weight, bias = (self.conv.weight, self.conv.bias) if weights is None else weights["conv"]
        return self.norm(F.conv2d(x.permute(0, 3, 1, 2), weight, bias, stride=2, padding=1)).permute(
            0, 2, 3, 1
        )


class BiFormerStage(nn.Module):
    """Optional downsampling, then blocks that share one region grid per input size."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        *,
        downsample: bool,
        topk: int,
        num_heads: int,
        qk_dim: int,
        n_win: int,
        last_stage_heads: int,
        qk_scale: float | None,
        mlp_ratio: float,
        side_dwconv: int,
        pos_kernel: int,
        norm_eps: float,
        drop_path: Sequence[float],
        attn_path: str,
        dense_max_tokens: int,
    ):
        super().__init__()
        if topk == 0 or topk == -1 or topk < -2:
            raise NotImplementedError(
                f"topk={topk}: only routed stages (topk > 0) and -2 (AttentionLePE) exist here"
            )
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.n_win = n_win
        self.routed = topk > 0
        self.grad_checkpointing = False

        def make_attn() -> nn.Module:
            if self.routed:
                return BiLevelRoutingAttention(
                    dim, num_heads, topk, qk_dim, qk_scale, side_dwconv, attn_path, dense_max_tokens
                )
            return GlobalAttention(dim, last_stage_heads, qkv_bias=False, side_dwconv=side_dwconv)

        self.blocks = nn.ModuleList(
            BiFormerBlock(dim, make_attn(), mlp_ratio, drop_path[j], norm_eps, pos_kernel)
            for j in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        # one cast of the whole stage's weights under autocast (cast_weights_together); else the parameters
        down = self.downsample if isinstance(self.downsample, Downsample) else None
        weights = cast_weights_together(
            [down.layers() if down else {}, *(b.layers() for b in self.blocks)], x
        )
        x = down(x, weights[0]) if down else self.downsample(x)
        grid = RegionGrid.for_size(x.shape[1], x.shape[2], self.n_win) if self.routed else None
        for block, w in zip(self.blocks, weights[1:]):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, grid, w, use_reentrant=False)
            else:
                x = block(x, grid, w)
        return x


# ----------------------------------------------------------------------------------------------------------
# Model


def _per_stage(value: Any, n: int = 4) -> list:
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n


class BiFormer(nn.Module):
    """BiFormer backbone + classifier on ``[B, in_chans, H, W]`` images of any size."""

    def __init__(
        self,
        depths: Sequence[int] = (2, 2, 8, 2),
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        head_dim: int = 32,
        qk_dims: Sequence[int | None] | None = None,
        topks: Sequence[int] = (1, 4, 16, -2),
        n_win: int = 7,
        mlp_ratios: Sequence[float] = (3, 3, 3, 3),
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        last_stage_heads: int = 8,
        qk_scale: float | None = None,
        norm_eps: float = 1e-6,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_paths: str | Sequence[str] = "auto",
        dense_max_tokens: int = 1024,
    ):
        """``attn_paths``: 'auto' | 'dense' | 'gather', or one per stage (see module docstring)."""
        super().__init__()
        n = len(depths)
        qk_dims = [q or d for q, d in zip(_per_stage(qk_dims, n), embed_dims)]
        attn_paths = _per_stage(attn_paths, n)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.output_fmt = "NHWC"
        self.grad_checkpointing = False

        self.stem = Stem(in_chans, embed_dims[0])
        rates = [drop_path_rate * j / max(sum(depths) - 1, 1) for j in range(sum(depths))]  # linear rule
        stages, self.feature_info = [], []
        for i in range(n):
            stages.append(
                BiFormerStage(
                    embed_dims[max(i - 1, 0)],
                    embed_dims[i],
                    depths[i],
                    downsample=i > 0,
                    topk=topks[i],
                    num_heads=qk_dims[i] // head_dim,
                    qk_dim=qk_dims[i],
                    n_win=n_win,
                    last_stage_heads=last_stage_heads,
                    qk_scale=qk_scale,
                    mlp_ratio=mlp_ratios[i],
                    side_dwconv=side_dwconv,
                    pos_kernel=before_attn_dwconv,
                    norm_eps=norm_eps,
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    attn_path=attn_paths[i],
                    dense_max_tokens=dense_max_tokens,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(
            self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, input_fmt="NHWC"
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # ---- timm API -----------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """No named exclusions: biases and norm weights are 1-D and excluded by timm's optimizer factory."""
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)

    def _final_norm(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (NCHW ones are channels_last in memory); ``norm``: final norm on the last stage."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self.stem(x)
        i = -1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self._final_norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        if i == last:
            x = self._final_norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop stages (and norm / head) not needed for ``indices``; returns the kept absolute indices."""
        take_indices = prune_stages(self, indices, prune_norm, prune_head)
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, H/32, W/32, C]`` after the final norm."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self._final_norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # ---- visual-expert hook -------------------------------------------------------------------------------

    def forward_tokens(self, x: Tensor, index: int = -1) -> tuple[Tensor, tuple[int, int]]:
        """Token grid ``[B, H*W, C]`` (row-major) of stage ``index`` and its ``(H, W)``; last stage normed."""
        n = len(self.stages)
        if not -n <= index < n:
            raise IndexError(f"stage index {index} out of range for {n} stages")
        index %= n
        x = self.stem(x)
        for stage in self.stages[: index + 1]:
            x = stage(x)
        if index == n - 1:
            x = self._final_norm(x)
        batch, height, width, channels = x.shape
        return x.reshape(batch, height * width, channels), (height, width)


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints and constructor arguments


# official key prefix -> ours (first match wins; the order matters for attn.qkv.qkv vs attn.qkv)
_OFFICIAL_KEY_RULES = [
    (re.compile(r"^downsample_layers\.0\.0\."), "stem.conv1."),
    (re.compile(r"^downsample_layers\.0\.1\."), "stem.norm1."),
    (re.compile(r"^downsample_layers\.0\.3\."), "stem.conv2."),
    (re.compile(r"^downsample_layers\.0\.4\."), "stem.norm2."),
    (re.compile(r"^downsample_layers\.(\d+)\.0\."), r"stages.\1.downsample.conv."),
    (re.compile(r"^downsample_layers\.(\d+)\.1\."), r"stages.\1.downsample.norm."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\.attn\.qkv\.qkv\."), r"stages.\1.blocks.\2.attn.qkv."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\.attn\.wo\."), r"stages.\1.blocks.\2.attn.proj."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\.mlp\.0\."), r"stages.\1.blocks.\2.mlp.fc1."),
    (re.compile(r"^stages\.(\d+)\.(\d+)\.mlp\.3\."), r"stages.\1.blocks.\2.mlp.fc2."),
    (
        re.compile(r"^stages\.(\d+)\.(\d+)\.(pos_embed|norm1|norm2|attn\.qkv|attn\.proj|attn\.lepe)\."),
        r"stages.\1.blocks.\2.\3.",
    ),
    (re.compile(r"^norm\."), "norm."),
    (re.compile(r"^head\."), "head.fc."),
]


def _official_to_ours(key: str) -> str:
    for pattern, replacement in _OFFICIAL_KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    raise KeyError(f"unexpected key in an official BiFormer state dict: {key!r}")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Official BiFormer checkpoint (or container) -> our state dict; ours pass through unchanged."""
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith("stem.") or ".blocks." in k for k in state_dict):
        return state_dict
    return {_official_to_ours(k): v for k, v in state_dict.items()}


# Official constructor arguments that must keep the released models' value (other values are other operators).
_FIXED_OFFICIAL_ARGS = {
    "kv_downsample_mode": "identity",
    "param_routing": False,
    "diff_routing": False,
    "soft_routing": False,
    "pre_norm": True,
    "pe": None,
    "param_attention": "qkvo",
    "mlp_dwconv": False,
}
# Accepted and without effect here (unused by the released configuration, or training-only).
_IGNORED_OFFICIAL_ARGS = (
    "kv_per_wins",
    "kv_downsample_kernels",
    "kv_downsample_ratios",
    "pe_stages",
    "auto_pad",
)


def build_from_official(official_kwargs: dict[str, Any]) -> BiFormer:
    """Our model from the official ``BiFormer(**kwargs)`` arguments (missing keys: the released-model values).

    ``norm_eps`` stands for ``norm_layer=partial(nn.LayerNorm, eps=...)``.
    """
    kw = dict(official_kwargs)
    for name, required in _FIXED_OFFICIAL_ARGS.items():
        value = kw.pop(name, required)
        if value != required:
            raise NotImplementedError(
                f"official BiFormer argument {name}={value!r} is not supported ({required!r} is)"
            )
    if kw.pop("representation_size", None):
        raise NotImplementedError("a pre-logits layer (representation_size) is not supported")
    if kw.pop("layer_scale_init_value", -1) > 0:
        raise NotImplementedError("layer scale (layer_scale_init_value > 0) is not supported")
    if kw.get("auto_pad"):
        warnings.warn(
            "auto_pad=True: sizes not divisible by n_win use masked padding here (see vision/biformer.py), "
            "which differs from the official zero padding at the image border",
            stacklevel=2,
        )
    for name in _IGNORED_OFFICIAL_ARGS:
        kw.pop(name, None)
    checkpoint_stages = kw.pop("use_checkpoint_stages", [])
    depths = kw.pop("depth", (2, 2, 8, 2))
    model = BiFormer(
        depths=depths,
        embed_dims=kw.pop("embed_dim", (64, 128, 256, 512)),
        head_dim=kw.pop("head_dim", 32),
        qk_dims=kw.pop("qk_dims", None),
        topks=kw.pop("topks", (1, 4, 16, -2)),
        n_win=kw.pop("n_win", 7),
        mlp_ratios=kw.pop("mlp_ratios", (3, 3, 3, 3)),
        side_dwconv=kw.pop("side_dwconv", 5),
        before_attn_dwconv=kw.pop("before_attn_dwconv", 3),
        qk_scale=kw.pop("qk_scale", None),
        norm_eps=kw.pop("norm_eps", 1e-6),
        in_chans=kw.pop("in_chans", 3),
        num_classes=kw.pop("num_classes", 1000),
        drop_rate=kw.pop("drop_rate", 0.0),
        drop_path_rate=kw.pop("drop_path_rate", 0.0),
    )
    if kw:
        raise TypeError(f"unexpected official BiFormer arguments: {sorted(kw)}")
    for i in checkpoint_stages:
        model.stages[i].grad_checkpointing = True
    return model


register_official("biformer", build_from_official, checkpoint_filter_fn)


# ----------------------------------------------------------------------------------------------------------
# timm registration


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "mit",
        "paper_ids": "arXiv:2303.08810",
        "origin_url": "https://github.com/rayleizhu/BiFormer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": _cfg(),
        "biformer_small.in1k": _cfg(),
        "biformer_base.in1k": _cfg(),
    }
)


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: Any) -> BiFormer:
    return build_model_with_cfg(
        BiFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-T: 13.1 M parameters, 2.2 GFLOPs at 224, 81.4% ImageNet-1k top-1 (official)."""
    args = dict(depths=(2, 2, 8, 2), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_tiny", pretrained, **dict(args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-S: 25.5 M parameters, 4.5 GFLOPs at 224, 83.8% ImageNet-1k top-1 (official)."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(64, 128, 256, 512))
    return _create_biformer("biformer_small", pretrained, **dict(args, **kwargs))


@register_model
def biformer_base(pretrained: bool = False, **kwargs: Any) -> BiFormer:
    """BiFormer-B: 56.8 M parameters, 9.8 GFLOPs at 224, 84.3% ImageNet-1k top-1 (official)."""
    args = dict(depths=(4, 4, 18, 4), embed_dims=(96, 192, 384, 768))
    return _create_biformer("biformer_base", pretrained, **dict(args, **kwargs))
