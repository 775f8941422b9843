"""CSWin Transformer: cross-shaped window self-attention, reimplemented for any input size and for speed.

Paper: "CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
Dong et al., CVPR 2022 (https://arxiv.org/abs/2107.00652). Origin: microsoft/CSWin-Transformer (MIT).
Written from scratch for mmstack; outputs equal the official ImageNet model at its build size, and official
checkpoints load through ``checkpoint_filter_fn``.

Algorithm (per block, pre-norm): ``x += proj(attn(norm1(x)))``, ``x += mlp(norm2(x))``. The attention of
stages 1-3 splits channels and heads in two halves: half 0 attends within vertical stripes (full height,
``split`` columns wide), half 1 within horizontal stripes (``split`` rows, full width). Each half adds a
locally enhanced positional encoding (LePE): a depthwise 3x3 conv of ``v`` computed inside each stripe, i.e.
zero padded at every stripe border. The last stage (and any stage whose build-time side equals its split size)
is a single full-attention branch whose LePE is a 3x3 conv over the whole map.

How this implementation differs from the official code (same numbers, different route):

* Tokens stay ``[B, H, W, C]`` (channels last) from stem to head; H and W are read at run time. Inside a
  stage the blocks pass them on as rows ``[B * H * W, C]`` with the size alongside, so every Linear runs as
  one ``addmm`` without reshapes around it (eager training at small sizes is bound by per-op CPU overhead).
* Vertical stripes are handled as horizontal stripes of the transposed map, so both branches have the same
  ``[B * n_stripes, split * side, C/2]`` geometry on square maps and run as the two head groups of **one**
  ``scaled_dot_product_attention`` call and **one** depthwise LePE conv (non-square maps: one call per
  branch). Attention is invariant to the order of tokens inside a stripe, so the transposition changes
  nothing but the layout; it costs one copy of ``qkv`` in and one copy of the output back.
* Under autocast each stage casts all its weights with one ``cat`` + cast (``cast_weights_together``) and
  the layers run functionally on them, instead of autocast's cast per parameter (about 10 casts forward and
  10 backward per block; eager training at 224 is bound by such per-op host cost). LayerNorms keep bf16/fp16
  tokens in their dtype (fp32 statistics inside the kernel), so the token stream between blocks is 16-bit
  under autocast, as in pure bf16 training, instead of fp32 that every Linear casts back.
* Weight layout: the two LePE convs are stored as one conv ``attn.lepe`` of ``C`` channels; the branch-0 half
  holds the official kernels transposed (it acts on the transposed map). ``checkpoint_filter_fn`` converts
  official state dicts and ``to_official_state_dict`` converts back.

Any input size (the official ImageNet model only runs at its build size with sides divisible by the split):

* Split sizes stay those of the build (e.g. 7 for stage 3 of a 224 model, also at 384 input).
* When a side is not a multiple of the split size, the projected ``qkv`` is padded with zeros at the bottom /
  right and the padded keys are masked out of the softmax. This is exactly "the last stripe is narrower": a
  real token never sees a padded one, and its LePE sees zeros there, as at any stripe border. (The official
  segmentation code instead pads symmetrically without a mask; we chose the masked variant because its result
  does not depend on how much padding the layout needed.) At sizes that need no padding nothing changes.
* A stage built as full attention stays full attention at every size (its weights only fit that layout).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from ._stages import (
    Weights,
    cast_weights_together,
    layer_norm_keep_dtype,
    prune_stages,
    unwrap_checkpoint,
    weights_or_own,
)
from .official import register_official

__all__ = [
    "CSWinTransformer",
    "build_from_official",
    "checkpoint_filter_fn",
    "to_official_state_dict",
]


# ----------------------------------------------------------------------------------------------------
# Padding masks


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _stripe_validity(
    n_stripes: int, split: int, length: int, limit_across: int, limit_along: int, device
) -> Tensor:
    """``[nS, split * length]`` bool: stripe token (s, a, c) is real iff s*split + a and c are in range."""
    across = torch.arange(n_stripes * split, device=device).view(n_stripes, split, 1) < limit_across
    along = torch.arange(length, device=device).view(1, 1, length) < limit_along
    return (across & along).view(n_stripes, split * length)


def _build_key_mask(
    batch: int, height: int, width: int, split: int, heads: int, fused: bool, dtype: torch.dtype, device
) -> tuple[Tensor, ...]:
    """Additive key masks (0 / -inf) for padded stripes: one for the fused call, else one per branch.

    Shapes broadcast against SDPA logits ``[B * nS, heads, N, N]`` over queries (and over heads when all
    head groups share the mask).
    """
    hp, wp = _ceil_to(height, split), _ceil_to(width, split)
    valid0 = _stripe_validity(wp // split, split, hp, width, height, device)  # vertical (transposed) branch
    valid1 = _stripe_validity(hp // split, split, wp, height, width, device)  # horizontal branch

    def additive(valid: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(valid, zero, torch.full((), float("-inf"), dtype=dtype, device=device))

    if not fused:
        return tuple(
            additive(v)[None, :, None, None, :].expand(batch, -1, 1, 1, -1).reshape(-1, 1, 1, v.shape[-1])
            for v in (valid0, valid1)
        )
    n_stripes, n = valid0.shape
    if height == width:  # both head groups see the same pattern: broadcast over heads
        return (additive(valid0)[None, :, None, :].expand(batch, -1, 1, -1).reshape(-1, 1, 1, n),)
    both = torch.stack([valid0, valid1], dim=1)  # [nS, 2, N]
    mask = additive(both)[None, :, :, None, None, :].expand(batch, n_stripes, 2, heads, 1, n)
    return (mask.reshape(batch * n_stripes, 2 * heads, 1, n),)


@functools.lru_cache(maxsize=64)
def _cached_key_mask(*args) -> tuple[Tensor, ...]:
    with torch.inference_mode(False):  # a mask first built under inference_mode must still serve autograd
        return _build_key_mask(*args)


def _key_mask(*args) -> tuple[Tensor, ...]:
    """Masks are cached per input size / batch / dtype / device (rebuilt only while compiling, where the
    cache cannot be traced)."""
    if torch.compiler.is_compiling():
        return _build_key_mask(*args)
    return _cached_key_mask(*args)


# ----------------------------------------------------------------------------------------------------
# Modules


class CSWinAttention(nn.Module):
    """qkv projection, cross-shaped (or full) attention with LePE, output projection; ``[B, H, W, C]``."""

    fused_attn: torch.jit.Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int,
        full_attention: bool,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        branches = 1 if full_attention else 2
        heads = num_heads if full_attention else num_heads // 2
        if heads < 1 or dim % branches or (dim // branches) % heads:
            raise ValueError(f"dim {dim} does not split into {branches} branch(es) of {heads} head(s)")
        self.dim = dim
        self.full_attention = full_attention
        self.split_size = split_size
        self.heads_per_branch = heads
        # Official scale: head_dim of one branch (channels per branch / heads per branch), unless given.
        self.scale = qk_scale or ((dim // branches) // heads) ** -0.5
        self.fused_attn = use_fused_attn()
        self.fuse_branches = True  # one SDPA call for both branches when the (padded) map is square
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.lepe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """``[B', h, N, d]`` attention; SDPA, or the explicit softmax reference path."""
        drop = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=self.scale)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if mask is not None:
            attn = attn + mask
        attn = F.dropout(attn.softmax(dim=-1), drop, self.training)
        return attn @ v

    def _attend_with_lepe(self, q: Tensor, k: Tensor, v: Tensor, hw: tuple[int, int], weight, bias, mask):
        """``[B', N, h, d]`` q, k, v of ``hw = (rows, cols)`` maps (tokens row-major) -> ``[B', N, h, d]``:
        attention plus LePE, a depthwise 3x3 conv of ``v`` zero padded at the map border.

        Callers unbind q, k, v from one tensor along a dim before ``N``, so the backward stack of their
        gradients lands in that tensor's layout without a further copy; ``v``'s channels are contiguous, so
        the conv reads it through an NCHW (channels-last) view.
        """
        bs, n, heads, d = v.shape
        c = heads * d
        out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)
        lepe = F.conv2d(v.reshape(bs, *hw, c).permute(0, 3, 1, 2), weight, bias, padding=1, groups=c)
        return out + lepe.permute(0, 2, 3, 1).reshape(bs, n, heads, d)

    def _full(self, qkv: Tensor, b: int, h: int, w: int, lepe: tuple[Tensor, Tensor | None]) -> Tensor:
        heads, c = self.heads_per_branch, self.dim
        q, k, v = qkv.view(b, h * w, 3, heads, c // heads).unbind(2)
        return self._attend_with_lepe(q, k, v, (h, w), *lepe, None).reshape(-1, c)

    def _cross(self, qkv: Tensor, b: int, h: int, w: int, lepe: tuple[Tensor, Tensor | None]) -> Tensor:
        split, heads, c, half = self.split_size, self.heads_per_branch, self.dim, self.dim // 2
        hp, wp = _ceil_to(h, split), _ceil_to(w, split)
        padded = (hp, wp) != (h, w)
        if padded:  # zeros after the projection: padded v is 0, like the LePE border; keys masked below
            qkv = F.pad(qkv.view(b, h, w, 3 * c), (0, 0, 0, wp - w, 0, hp - h))
        fused = self.fuse_branches and hp == wp
        masks = _key_mask(b, h, w, split, heads, fused, qkv.dtype, qkv.device) if padded else (None, None)
        weight, bias = lepe
        # unbind, not indexing: its backward is one stack, where each index would zero-fill a gradient
        part0, part1 = qkv.view(b, hp, wp, 3, 2, half).unbind(4)
        # [3, B, Wp, Hp, C'] (transposed map) and [3, B, Hp, Wp, C']: stripes are `split` rows of either map
        vertical, horizontal = part0.permute(3, 0, 2, 1, 4), part1.permute(3, 0, 1, 2, 4)
        d = half // heads
        if fused:  # one copy (stack) puts the branches side by side as two head groups of one SDPA call
            stripes = torch.stack([vertical, horizontal], dim=-2).view(3, -1, split * hp, 2 * heads, d)
            y = self._attend_with_lepe(*stripes.unbind(0), (split, hp), weight, bias, masks[0])
            y0, y1 = y.reshape(b, wp, hp, c).split(half, dim=-1)  # square: either half is [B, Wp, Hp, C']
        else:
            b0, b1 = (None, None) if bias is None else (bias[:half], bias[half:])
            vertical = vertical.reshape(3, -1, split * hp, heads, d).unbind(0)
            horizontal = horizontal.reshape(3, -1, split * wp, heads, d).unbind(0)
            y0 = self._attend_with_lepe(*vertical, (split, hp), weight[:half], b0, masks[0])
            y1 = self._attend_with_lepe(*horizontal, (split, wp), weight[half:], b1, masks[1])
            y0, y1 = y0.reshape(b, wp, hp, half), y1.reshape(b, hp, wp, half)
        y0 = y0.transpose(1, 2)  # back from the transposed map
        if padded:
            y0, y1 = y0[:, :h, :w], y1[:, :h, :w]
        # cat of 4-D (strided) inputs: a single CUDA kernel (stack / cat of more dims copy input by input);
        # split above makes its backward such a cat as well
        return torch.cat([y0, y1], dim=-1).view(-1, c)

    def layers(self) -> dict[str, nn.Module]:
        """The layers with weights, by the names ``forward`` looks them up in ``weights``."""
        return {"qkv": self.qkv, "lepe": self.lepe, "proj": self.proj}

    def forward(
        self, x: Tensor, size: tuple[int, int, int] | None = None, weights: Weights | None = None
    ) -> Tensor:
        """``x``: a map ``[B, H, W, C]``, or its tokens as rows ``[B * H * W, C]`` with ``size = (B, H, W)``
        (how blocks call it: Linear on 2-D input needs no reshapes); the output has the layout of ``x``.
        ``weights``: the ``layers()``' weights as computed with (see ``CSWinStage``); default: own."""
        if size is None:
            b, h, w, c = x.shape
            return self.forward(x.reshape(-1, c), (b, h, w), weights).view(b, h, w, c)
        w = weights_or_own(weights, self.layers(), x)
        qkv = F.linear(x, *w["qkv"])
        attend = self._full if self.full_attention else self._cross
        return self.proj_drop(F.linear(attend(qkv, *size, w["lepe"]), *w["proj"]))


def _norm(x: Tensor, norm: nn.Module, weights: tuple[Tensor | None, Tensor | None]) -> Tensor:
    """``norm`` with ``weights``: a LayerNorm keeps bf16/fp16 activations in their dtype under autocast
    (statistics stay fp32 inside the kernel), so the next Linear needs no cast back."""
    if isinstance(norm, nn.LayerNorm):
        return layer_norm_keep_dtype(x, norm, *weights)
    return norm(x)


class CSWinBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        split_size: int,
        full_attention: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = CSWinAttention(
            dim, num_heads, split_size, full_attention, qkv_bias, qk_scale, attn_drop, proj_drop
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @staticmethod
    def _residual(x: Tensor, y: Tensor, drop_path: nn.Module, batch: int) -> Tensor:
        """``x + drop_path(y)`` on token rows; drop path drops whole samples, so it sees ``[B, N, C]``."""
        if isinstance(drop_path, nn.Identity):
            return x + y
        return x + drop_path(y.view(batch, -1, y.shape[-1])).view_as(y)

    def layers(self) -> dict[str, nn.Module]:
        """The layers with weights, by the names ``forward`` (and the attention) look them up."""
        return dict(
            norm1=self.norm1, norm2=self.norm2, fc1=self.mlp.fc1, fc2=self.mlp.fc2, **self.attn.layers()
        )

    def forward(
        self, x: Tensor, size: tuple[int, int, int] | None = None, weights: Weights | None = None
    ) -> Tensor:
        """``x``: ``[B, H, W, C]``, or token rows ``[B * H * W, C]`` with ``size = (B, H, W)`` (as stages call
        it, saving the reshapes around every Linear); the output has the layout of ``x``. ``weights``: the
        layers' weights as computed with, cast together by the stage under autocast; default: own."""
        if size is None:
            b, h, w, c = x.shape
            return self.forward(x.reshape(-1, c), (b, h, w), weights).view(b, h, w, c)
        w = weights_or_own(weights, self.layers(), x)
        mlp = self.mlp
        attn = self.attn(_norm(x, self.norm1, w["norm1"]), size, w)
        x = self._residual(x, attn, self.drop_path1, size[0])
        h = mlp.drop1(mlp.act(F.linear(_norm(x, self.norm2, w["norm2"]), *w["fc1"])))
        return self._residual(x, mlp.drop2(F.linear(mlp.norm(h), *w["fc2"])), self.drop_path2, size[0])


class ConvStem(nn.Module):
    """Conv 7x7 stride 4 (padding 2) + norm; image ``[B, 3, H, W]`` -> tokens ``[B, H/4, W/4, C]``."""

    def __init__(self, in_chans: int, dim: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, 7, stride=4, padding=2)
        self.norm = norm_layer(dim)

    def forward(self, x: Tensor) -> Tensor:
        # bf16/fp16 tokens stay so under autocast: the residual stream and every norm read half the bytes
        return _norm(self.conv(x).permute(0, 2, 3, 1), self.norm, (self.norm.weight, self.norm.bias))


class MergeBlock(nn.Module):
    """Conv 3x3 stride 2 + norm between stages; ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), C_out]``."""

    def __init__(self, dim: int, out_dim: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, 3, stride=2, padding=1)
        self.norm = norm_layer(out_dim)

    def layers(self) -> dict[str, nn.Module]:
        return {"conv": self.conv, "norm": self.norm}

    def forward(self, x: Tensor, weights: Weights | None = None) -> Tensor:
        w = weights_or_own(weights, self.layers(), x)
        x = F.conv2d(x.permute(0, 3, 1, 2), *w["conv"], stride=2, padding=1)
        return _norm(x.permute(0, 2, 3, 1), self.norm, w["norm"])


class CSWinStage(nn.Module):
    def __init__(
        self,
        dim: int,
        out_dim: int,
        depth: int,
        num_heads: int,
        split_size: int,
        full_attention: bool,
        downsample: bool,
        drop_path: Sequence[float],
        norm_layer: Callable[[int], nn.Module],
        **block_kwargs: Any,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = MergeBlock(dim, out_dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                CSWinBlock(
                    out_dim,
                    num_heads,
                    split_size,
                    full_attention,
                    drop_path=drop_path[i],
                    norm_layer=norm_layer,
                    **block_kwargs,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        # one cast of the whole stage's weights under autocast (cast_weights_together); else the parameters
        down = self.downsample if isinstance(self.downsample, MergeBlock) else None
        weights = cast_weights_together(
            [down.layers() if down else {}, *(b.layers() for b in self.blocks)], x
        )
        x = down(x, weights[0]) if down else x
        b, h, w, c = x.shape
        x = x.reshape(-1, c)  # blocks pass token rows [B * H * W, C] along
        for block, block_weights in zip(self.blocks, weights[1:]):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                # non-reentrant: gradients reach the cast weights passed in (not a positional tensor)
                x = checkpoint(block, x, (b, h, w), block_weights, use_reentrant=False)
            else:
                x = block(x, (b, h, w), block_weights)
        return x.view(b, h, w, c)


class CSWinTransformer(nn.Module):
    """CSWin Transformer; any input size, channels-last tokens inside, timm feature API.

    ``img_size`` only decides which stages are built as full attention (those whose side at that size equals
    their split size, plus the last stage), as in the official model; inputs of any size are accepted.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        split_size: Sequence[int] = (1, 2, 7, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        num_stages = len(depths)
        if len(num_heads) != num_stages or len(split_size) < num_stages - 1:
            raise ValueError(
                f"need {num_stages} num_heads and >= {num_stages - 1} split sizes, "
                f"got {list(num_heads)} and {list(split_size)}"
            )
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-5)
        img_h = img_size if isinstance(img_size, int) else img_size[0]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate

        self.stem = ConvStem(in_chans, embed_dim, norm_layer)
        total = sum(depths)  # drop-path rate rises linearly over all blocks (plain floats: meta-device safe)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            last = i == num_stages - 1
            split = split_size[min(i, len(split_size) - 1)]
            full = last or img_h // (4 * 2**i) == split  # the official layout rule
            start = sum(depths[:i])
            stages.append(
                CSWinStage(
                    dims[max(i - 1, 0)],
                    dims[i],
                    depths[i],
                    num_heads[i],
                    split,
                    full,
                    downsample=i > 0,
                    drop_path=dpr[start : start + depths[i]],
                    norm_layer=norm_layer,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    act_layer=act_layer,
                )
            )
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- timm model API --------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # no position tables or tokens; norms/biases are excluded by timm's param groups

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
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: Tensor) -> None:
        in_chans = self.stem.conv.in_channels
        if x.ndim != 4 or x.shape[1] != in_chans:
            raise ValueError(f"expected images [B, {in_chans}, H, W], got shape {tuple(x.shape)}")

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (``NCHW`` / ``NHWC``) for ``indices``; ``norm``: final norm on the last stage."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if (torch.jit.is_scripting() or not stop_early) else self.stages[: max_index + 1]
        last = len(self.stages) - 1
        intermediates = []
        x = self.stem(x)
        i = -1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                inter = self.norm(x) if norm and i == last else x
                intermediates.append(
                    inter.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else inter
                )
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop stages (and norm / head) not needed for ``indices``; returns the kept absolute indices."""
        take_indices = prune_stages(self, indices, prune_norm, prune_head)
        self.feature_info = self.feature_info[: len(self.stages)]
        return take_indices

    def forward_tokens(self, x: Tensor, index: int = -1) -> tuple[Tensor, tuple[int, int]]:
        """Visual-expert hook: token grid ``[B, H*W, C]`` (row-major) of stage ``index`` and its ``(H, W)``.

        The last stage's tokens are normalised by the final norm, like ``forward_features``.
        """
        n = len(self.stages)
        if not -n <= index < n:
            raise IndexError(f"stage index {index} out of range for {n} stages")
        index %= n
        self._check_input(x)
        x = self.stages[: index + 1](self.stem(x))
        if index == n - 1:
            x = self.norm(x)
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c), (h, w)

    def forward_features(self, x: Tensor) -> Tensor:
        """Final-normed tokens ``[B, H/32, W/32, C]``."""
        self._check_input(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ----------------------------------------------------------------------------------------------------
# Official checkpoints


_OFFICIAL_BLOCK = re.compile(r"^stage(\d+)\.(\d+)\.(.+)$")
_OFFICIAL_MERGE = re.compile(r"^merge(\d+)\.(conv|norm)\.(weight|bias)$")
_OFFICIAL_STEM = {"stage1_conv_embed.0": "stem.conv", "stage1_conv_embed.2": "stem.norm"}
_BLOCK_PARTS = {"qkv": "attn.qkv", "proj": "attn.proj", "norm1": "norm1", "norm2": "norm2", "mlp": "mlp"}


def _is_official(state_dict: dict[str, Tensor]) -> bool:
    return any(k.startswith("stage1_conv_embed.") or _OFFICIAL_BLOCK.match(k) for k in state_dict)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module | None = None) -> dict[str, Tensor]:
    """Official CSWin state dict (or a checkpoint holding one) -> ours; our own state dicts pass unchanged.

    Renames ``stage1_conv_embed`` -> ``stem``, ``stage{s}.{j}`` -> ``stages.{s-1}.blocks.{j}``,
    ``merge{i}`` -> ``stages.{i}.downsample``, and joins the two LePE convs ``attns.{0,1}.get_v`` into one
    ``attn.lepe`` (branch-0 kernels transposed, see the module docstring). Unknown keys raise ``KeyError``.
    """
    state_dict = unwrap_checkpoint(state_dict)
    if not _is_official(state_dict):
        return state_dict
    out: dict[str, Tensor] = {}
    lepe: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key in ("norm.weight", "norm.bias", "head.weight", "head.bias"):
            out[key] = value
            continue
        stem, _, leaf = key.rpartition(".")
        if stem in _OFFICIAL_STEM:
            out[f"{_OFFICIAL_STEM[stem]}.{leaf}"] = value
            continue
        if m := _OFFICIAL_MERGE.match(key):
            out[f"stages.{m[1]}.downsample.{m[2]}.{m[3]}"] = value
            continue
        m = _OFFICIAL_BLOCK.match(key)
        if m is None:
            raise KeyError(f"unrecognised CSWin checkpoint key {key!r}")
        prefix, rest = f"stages.{int(m[1]) - 1}.blocks.{m[2]}", m[3]
        if lm := re.fullmatch(r"attns\.([01])\.get_v\.(weight|bias)", rest):
            lepe.setdefault(prefix, {})[f"{lm[1]}.{lm[2]}"] = value
            continue
        head, _, tail = rest.partition(".")
        if head not in _BLOCK_PARTS:
            raise KeyError(f"unrecognised CSWin checkpoint key {key!r}")
        out[f"{prefix}.{_BLOCK_PARTS[head]}.{tail}"] = value
    for prefix, parts in lepe.items():
        for leaf in ("weight", "bias"):
            if f"1.{leaf}" in parts:  # two branches: branch 0 acts on the transposed map
                first = parts[f"0.{leaf}"]
                first = first.transpose(-1, -2) if leaf == "weight" else first
                out[f"{prefix}.attn.lepe.{leaf}"] = torch.cat([first, parts[f"1.{leaf}"]], dim=0)
            elif f"0.{leaf}" in parts:
                out[f"{prefix}.attn.lepe.{leaf}"] = parts[f"0.{leaf}"]
    return out


def to_official_state_dict(state_dict: dict[str, Tensor], model: CSWinTransformer) -> dict[str, Tensor]:
    """Inverse of ``checkpoint_filter_fn``: our state dict -> official key names and LePE layout."""
    full = {
        f"stages.{i}.blocks.{j}": blk.attn.full_attention
        for i, stage in enumerate(model.stages)
        for j, blk in enumerate(stage.blocks)
    }
    inverse_parts = {v: k for k, v in _BLOCK_PARTS.items()}
    inverse_stem = {v: k for k, v in _OFFICIAL_STEM.items()}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("stem."):
            stem, _, leaf = key.rpartition(".")
            out[f"{inverse_stem[stem]}.{leaf}"] = value
        elif m := re.fullmatch(r"stages\.(\d+)\.downsample\.(.+)", key):
            out[f"merge{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(r"(stages\.(\d+)\.blocks\.(\d+))\.(.+)", key):
            official = f"stage{int(m[2]) + 1}.{m[3]}"
            rest = m[4]
            if rest.startswith("attn.lepe."):
                leaf = rest.rpartition(".")[2]
                if full[m[1]]:
                    out[f"{official}.attns.0.get_v.{leaf}"] = value
                else:
                    first, second = value.chunk(2, dim=0)
                    first = first.transpose(-1, -2) if leaf == "weight" else first
                    out[f"{official}.attns.0.get_v.{leaf}"] = first
                    out[f"{official}.attns.1.get_v.{leaf}"] = second
                continue
            part = next(p for p in inverse_parts if rest.startswith(p + "."))
            out[f"{official}.{inverse_parts[part]}{rest[len(part) :]}"] = value
        else:
            out[key] = value
    return out


_OFFICIAL_ARGS = {
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "embed_dim",
    "depth",
    "split_size",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "qk_scale",
    "drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "hybrid_backbone",
    "norm_layer",
    "norm_eps",
    "use_chk",
}


def build_from_official(official_kwargs: dict[str, Any]) -> CSWinTransformer:
    """Our model from official ``CSWinTransformer`` constructor kwargs (``norm_eps: e`` = LayerNorm eps e)."""
    kw = dict(official_kwargs)
    unknown = set(kw) - _OFFICIAL_ARGS
    if unknown:
        raise TypeError(f"unknown official CSWin argument(s): {sorted(unknown)}")
    if kw.pop("hybrid_backbone", None) is not None:
        raise ValueError("hybrid_backbone is not supported")
    kw.pop("patch_size", None)  # unused by the official model as well (the stem is a fixed 7x7/4 conv)
    norm_layer = kw.pop("norm_layer", None)
    if "norm_eps" in kw:
        norm_layer = partial(nn.LayerNorm, eps=kw.pop("norm_eps"))
    use_chk = kw.pop("use_chk", False)
    model = CSWinTransformer(
        img_size=kw.pop("img_size", 224),
        in_chans=kw.pop("in_chans", 3),
        num_classes=kw.pop("num_classes", 1000),
        embed_dim=kw.pop("embed_dim", 96),
        depths=tuple(kw.pop("depth", (2, 2, 6, 2))),
        num_heads=tuple(kw.pop("num_heads")),
        split_size=tuple(kw.pop("split_size", (3, 5, 7))),
        mlp_ratio=kw.pop("mlp_ratio", 4.0),
        qkv_bias=kw.pop("qkv_bias", True),
        qk_scale=kw.pop("qk_scale", None),
        proj_drop_rate=kw.pop("drop_rate", 0.0),  # official drop_rate is the block (proj / MLP) dropout
        attn_drop_rate=kw.pop("attn_drop_rate", 0.0),
        drop_path_rate=kw.pop("drop_path_rate", 0.0),
        norm_layer=norm_layer,
    )
    model.set_grad_checkpointing(bool(use_chk))
    return model


register_official("cswin", build_from_official, checkpoint_filter_fn)


# ----------------------------------------------------------------------------------------------------
# timm registration


def _create_cswin(variant: str, pretrained: bool = False, **kwargs: Any) -> CSWinTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    # timm's file loader unwraps `state_dict_ema` and allows the pickled training `args` of released files.
    return build_model_with_cfg(
        CSWinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(input_size: int = 224, **kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, input_size, input_size),
        "pool_size": (input_size // 32, input_size // 32),
        "crop_pct": 0.9 if input_size == 224 else 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2107.00652",
        "origin_url": "https://github.com/microsoft/CSWin-Transformer",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "cswin_tiny_224.ms_in1k": _cfg(),
        "cswin_small_224.ms_in1k": _cfg(),
        "cswin_base_224.ms_in1k": _cfg(),
        "cswin_large_224.ms_in22k_ft_in1k": _cfg(),
        "cswin_base_384.ms_in1k": _cfg(384),
        "cswin_large_384.ms_in22k_ft_in1k": _cfg(384),
    }
)

_SMALL_DEPTHS = (2, 4, 32, 2)


def _variant(name: str, pretrained: bool, build_size: int, **model_args: Any) -> CSWinTransformer:
    split = (1, 2, 7, 7) if build_size == 224 else (1, 2, 12, 12)
    defaults = dict(img_size=build_size, split_size=split, mlp_ratio=4.0, qkv_bias=True)
    return _create_cswin(name, pretrained=pretrained, **dict(defaults, **model_args))


@register_model
def cswin_tiny_224(pretrained: bool = False, **kwargs: Any) -> CSWinTransformer:
    """CSWin-T (official ``CSWin_64_12211_tiny_224``)."""
    args = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16))
    return _variant("cswin_tiny_224", pretrained, 224, **dict(args, **kwargs))


@register_model
def cswin_small_224(pretrained: bool = False, **kwargs: Any) -> CSWinTransformer:
    """CSWin-S (official ``CSWin_64_24322_small_224``)."""
    args = dict(embed_dim=64, depths=_SMALL_DEPTHS, num_heads=(2, 4, 8, 16))
    return _variant("cswin_small_224", pretrained, 224, **dict(args, **kwargs))


@register_model
def cswin_base_224(pretrained: bool = False, **kwargs: Any) -> CSWinTransformer:
    """CSWin-B (official ``CSWin_96_24322_base_224``)."""
    args = dict(embed_dim=96, depths=_SMALL_DEPTHS, num_heads=(4, 8, 16, 32))
    return _variant("cswin_base_224", pretrained, 224, **dict(args, **kwargs))


@register_model
def cswin_large_224(pretrained: bool = False, **kwargs: Any) -> CSWinTransformer:
    """CSWin-L (official ``CSWin_144_24322_large_224``)."""
    args = dict(embed_dim=144, depths=_SMALL_DEPTHS, num_heads=(6, 12, 24, 24))
    return _variant("cswin_large_224", pretrained, 224, **dict(args, **kwargs))


@register_model
def cswin_base_384(pretrained: bool = False, **kwargs: Any) -> CSWinTransformer:
    """CSWin-B at 384 (official ``CSWin_96_24322_base_384``; split sizes 1, 2, 12, 12)."""
    args = dict(embed_dim=96, depths=_SMALL_DEPTHS, num_heads=(4, 8, 16, 32))
    return _variant("cswin_base_384", pretrained, 384, **dict(args, **kwargs))


@register_model
def cswin_large_384(pretrained: bool = False, **kwargs: Any) -> CSWinTransformer:
    """CSWin-L at 384 (official ``CSWin_144_24322_large_384``; split sizes 1, 2, 12, 12)."""
    args = dict(embed_dim=144, depths=_SMALL_DEPTHS, num_heads=(6, 12, 24, 24))
    return _variant("cswin_large_384", pretrained, 384, **dict(args, **kwargs))
