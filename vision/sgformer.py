"""SG-Former: Self-guided Transformer with Evolving Token Reallocation (Ren et al., ICCV 2023).

Paper: https://arxiv.org/abs/2308.12216 -- official code: https://github.com/OliverRensu/SG-Former.
Written from scratch for mmstack; only hyper-parameters and checkpoint key names follow the official release,
so its weights load through :func:`checkpoint_filter_fn` (``from_official("sgformer", ...)`` for raw kwargs).

The model, in the official's terms: a conv stem (GroupNorm(1, C) after every conv, a LayerNorm and a learned
56x56 ``pos_embed``), then four stages. In stages 1-3 blocks alternate: even blocks run hybrid-scale attention
(HSA: half the heads attend to ``sr``-reduced global tokens, half to 7x7 windows) and also emit a significance
map (column means of both attention maps, summed); odd blocks run significance-guided attention (SGA): tokens
are sorted by significance and runs of consecutive sorted tokens are merged by learned weights (``f1/f2/f3``)
into 60 / 60 / 147 key-value tokens at 224 px. Stage 4 is plain attention. Every attention adds a
``lepe_conv(lepe_linear(x))`` positional term before ``proj``.

Any input size (the official model runs only at multiples of 224). Choices, none active at 224, so outputs
there equal the official model's:

* ``pos_embed`` is resampled bicubically (align_corners=False) to the stage-1 grid when the grid differs.
* HSA global branch: the ``sr`` conv input is zero padded at the bottom/right to a multiple of ``sr``; a
  reduced token's significance is given to the ``sr x sr`` tokens it covers (the official nearest upsampling).
* HSA local branch: the map is padded at the bottom/right to a multiple of 7; padded keys are masked out,
  padded queries are dropped and excluded from the local significance mean.
* SGA token reallocation keeps the group length of each merge weight (196/56/28 at sr 8, 49/14/7 at sr 4,
  2/1 at sr 2) and lets the number of merged tokens grow with the token count, exactly as the official code
  does at 448 px. When a part of the sorted sequence is not a multiple of its group length, its last group
  of ``r`` tokens uses the ``g`` weights area-resampled to ``r`` taps (each tap integrates the weights over
  ``g / r`` positions: same total weight), so every token is merged exactly once.

Other deliberate differences:

* Block roles are structural (even = HSA, odd = SGA in stages 1-3). The official code decides at run time from
  whether a map is pending, which only works for even stage depths (all released models): an odd depth
  leaks the map into the next stage's first block, which then fails. Here a trailing HSA's map is dropped.
* Tokens are sorted with ``torch.sort`` (not stable), as officially, and the significance is reduced in the
  official op order, so exact fp32 ties resolve alike. Near-ties make the output sensitive to rounding: with
  near-uniform attention (random weights, the golden micro model) a 1e-7 relative input change moves the
  official logits by ~5e-4, and running the official model in fp64 by ~1.4e-3.
* With ``attn_drop_rate > 0`` the significance is taken from the probabilities before dropout.
* Official key ``SGFormer`` (official_keys.json) is the class's default constructor: heads 1,2,4,8,
  depths 3,4,6,3, no q/kv bias, LayerNorm eps 1e-5, 19,737,508 parameters. It was never released and cannot
  run officially (HSA splits heads in halves, 1 // 2 = 0; depth 3 leaks a map). We build and load it; a
  forward raises ValueError naming the odd head count.

Efficiency (the step is bound by the number of small ops, so each layer is written for few aten ops and
copies): all projections reading the same input are one GEMM (``in_proj``: q/kv plus ``lepe_linear``), split
with ``split`` (backward: one cat) and k/v taken with ``unbind`` (backward: one stack, straight into place);
attention runs through ``F.scaled_dot_product_attention`` (significance from a no-grad recomputation of the
probabilities, cheap with <= 49 keys); windows are formed with one copy of the packed q/k/v slab, and both
HSA halves return to the map with one stack; attention outputs join the lepe term in one out-of-place add
(in-place adds into slices cost CopySlices copies in the backward); sorted tokens are gathered once for both
sequences (index from one sort and one gather through a cached table; custom backward: gather through the
inverse permutation, no atomics) and merged by one GEMM with the (T, N) merge matrix built from the f weights
(per-part GEMVs for large inputs); GroupNorm(1, C) has a hand-derived backward; activations stay
channels-last (B, H, W, C) end to end. Index plans are cached per size. Under autocast each stage casts its
blocks' projection and conv weights with one ``cat`` + cast (``cast_weights_together``; the layers run
functionally on them) instead of autocast's cast per parameter, forward and backward.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import nn

from ._stages import (
    Weights,
    cast_weights_together,
    layer_norm_keep_dtype,
    prune_stages,
    unwrap_checkpoint,
    weights_or_own,
)
from .official import register_official

__all__ = ["SGFormer", "build_from_official", "checkpoint_filter_fn", "convert_official_state_dict"]

WINDOW = 7
# Group lengths of the released merge weights f1, f2, f3 per spatial-reduction ratio.
MERGE_GROUPS: dict[int, tuple[int, ...]] = {8: (196, 56, 28), 4: (49, 14, 7), 2: (2, 1)}
# SGA merges into at most this many tokens run as one GEMM with an explicit (T, N) matrix (T MACs per merged
# element: cheap while T is small, e.g. 60 / 60 / 147 at 224 px); beyond it, per-part GEMVs (linear in N).
DENSE_MERGE_MAX_TOKENS = 256


# ----------------------------------------------------------------------------------------------------------
# helpers


def _amp_dtype(x: torch.Tensor) -> torch.Tensor:
    """Cast once to the autocast dtype: consumers skip their own casts and gathers move half the bytes."""
    device = x.device.type
    if device in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


def _conv_nhwc(
    x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Run ``conv``'s geometry with ``weight`` / ``bias`` (its own, or cast copies) on a (B, H, W, C) tensor
    through its channels-last NCHW view; returns (B, H', W', C')."""
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, conv.stride, conv.padding, 1, conv.groups)
    return out.permute(0, 2, 3, 1)


class _GroupNorm1Fn(torch.autograd.Function):
    """GroupNorm(1, C) on (B, H, W, C) with a hand-derived backward (~15 ops instead of autograd's ~35, ~60
    in 16-bit, through the moment reductions). Statistics come from reductions that parallelise over the whole
    map (layer_norm / group_norm kernels give each image one thread block) and accumulate in fp32; one fused
    multiply-add applies them in the input dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        dims = (1, 2, 3)
        if x.dtype in (torch.float32, torch.float64):
            var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        else:  # 16-bit input: fp32 moments without an fp32 copy of x
            mean = x.mean(dims, keepdim=True, dtype=torch.float32)
            norm = torch.linalg.vector_norm(x, 2, dims, keepdim=True, dtype=torch.float32)
            var = torch.addcmul(norm.square_().div_(x[0].numel()), mean, mean, value=-1).clamp_(min=0)
        rstd = torch.rsqrt(var + eps)
        scale = rstd * weight.to(var.dtype)
        shift = torch.addcmul(bias.to(var.dtype), mean, scale, value=-1)
        ctx.save_for_backward(x, weight, mean, rstd)
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # dx = rstd * (g w - mean(g w) - xhat mean(g w xhat)), means over one image's H*W*C; as
        # g * a + x * beta + c with per-image/channel coefficients from two per-(image, channel) sums.
        x, weight, mean, rstd = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            acc = mean.dtype
            n = x[0].numel()
            mean, rstd = mean.view(-1), rstd.view(-1)
            g_sum = grad.sum((1, 2), dtype=acc)  # (B, C)
            g_x = (grad * x).sum((1, 2), dtype=acc)
            g_xc = torch.addcmul(g_x, mean[:, None], g_sum, value=-1)  # sum of g * (x - mean)
            w = weight.to(acc)
            # u = -rstd / n * (sum of g w, sum of g w (x - mean)) per image
            u = (torch.stack((g_sum, g_xc)) @ w).mul_(rstd * (-1 / n))
            beta = u[1].mul_(rstd * rstd)
            c = torch.addcmul(u[0], beta, mean, value=-1)
            a = rstd[:, None] * w
            B, C = g_sum.shape
            dx = torch.addcmul(c.view(B, 1, 1, 1), x, beta.view(B, 1, 1, 1))
            dx = torch.addcmul(dx, grad, a.view(B, 1, 1, C)).to(x.dtype)
            grad_w = (g_xc.t() @ rstd).to(weight.dtype)
            return dx, grad_w, g_sum.sum(0).to(weight.dtype), None


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """2-D sin-cos table (1, H*W, dim), row-major; the first half of the channels encodes the column."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    parts = []
    for pos in (cols, rows):
        angle = pos[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float().unsqueeze(0)


def _cached(builder):
    """LRU cache for constant index/plan tensors keyed by sizes, device (and dtype). Built outside inference
    mode so training may reuse them; under torch.compile the builder is traced instead (plain index math)."""
    cached = lru_cache(maxsize=64)(builder)

    def get(*args):
        if torch.compiler.is_compiling():
            return builder(*args)
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return cached(*args)
        return cached(*args)

    get.cache_clear = cached.cache_clear
    return get


@_cached
def _window_plan(height: int, width: int, window: int, heads: int, device: torch.device):
    """Masks for padded 7x7 windows: key mask (1, nW*heads, L, L) for SDPA, query weights (1, nW, 1, L, 1)
    that average the local significance over valid queries only. ``None`` when no padding is needed."""
    if height % window == 0 and width % window == 0:
        return None
    ph, pw = -(-height // window) * window, -(-width // window) * window
    rows = torch.arange(ph, device=device) < height
    cols = torch.arange(pw, device=device) < width
    valid = (rows[:, None] & cols[None, :]).view(ph // window, window, pw // window, window)
    valid = valid.permute(0, 2, 1, 3).reshape(-1, window * window)  # (nW, L)
    key_mask = valid[:, None, None, :].expand(-1, heads, window * window, -1)
    key_mask = key_mask.reshape(1, -1, window * window, window * window)
    query_weight = valid.float() / valid.sum(1, keepdim=True).float()
    return key_mask, query_weight[None, :, None, :, None]


@_cached
def _merge_plan(num_tokens: int, groups: tuple[int, ...], device: torch.device, dtype: torch.dtype):
    """How significance-sorted positions are merged, for any token count: per part ``(start, full, rest,
    resample)``.

    The sorted sequence is cut into parts (1/4, 1/2, 1/4 for three groups, halves for two, at the official cut
    points N//4, N//4*3, N//2); part p is merged in ``full`` runs of ``groups[p]`` tokens. A partial last run
    of ``rest`` < g tokens uses the g weights area-resampled to ``rest`` taps (``resample`` (rest, g): tap k
    integrates the weights over [k*g/rest, (k+1)*g/rest)), i.e. the same total weight.
    """
    n = num_tokens
    cuts = (0, n // 4, n // 4 * 3, n) if len(groups) == 3 else (0, n // 2, n)
    plan = []
    for p, g in enumerate(groups):
        full, rest = divmod(cuts[p + 1] - cuts[p], g)
        resample = None
        if rest:
            k = torch.arange(rest, device=device, dtype=torch.float64)[:, None]
            tap = torch.arange(g, device=device, dtype=torch.float64)
            overlap = torch.minimum((k + 1) * (g / rest), tap + 1) - torch.maximum(k * (g / rest), tap)
            resample = overlap.clamp(min=0).to(dtype)
        plan.append((cuts[p], full, rest, resample))
    return tuple(plan)


@_cached
def _dense_merge_plan(num_tokens: int, groups: tuple[int, ...], device: torch.device, dtype: torch.dtype):
    """The merge of :func:`_merge_plan` as constants for one GEMM: ``taps`` (N + T, G + P) maps the
    concatenated [f weights (G = sum of groups) | f biases (P)] to [the weight of every sorted position | the
    bias of every merged token]; ``flat`` (N,) is where position j's weight sits in the flattened (T, N)
    merge matrix."""
    parts = _merge_plan(num_tokens, groups, device, dtype)
    n, num_groups, tap, token = num_tokens, sum(groups), 0, 0
    rows_total = n + sum(full + (rest > 0) for _, full, rest, _ in parts)
    taps = torch.zeros(rows_total, num_groups + len(groups), dtype=torch.float64)  # exact for any dtype
    rows = torch.empty(n, dtype=torch.long)
    for p, ((start, full, rest, resample), g) in enumerate(zip(parts, groups)):
        run = torch.arange(full * g)
        taps[start + run, tap + run % g] = 1
        rows[start : start + full * g] = token + run // g
        if rest:
            taps[start + full * g : start + full * g + rest, tap : tap + g] = resample.cpu().to(taps.dtype)
            rows[start + full * g : start + full * g + rest] = token + full
        count = full + (rest > 0)
        taps[n + token : n + token + count, num_groups + p] = 1
        tap, token = tap + g, token + count
    flat = rows * n + torch.arange(n)
    return taps.to(device, dtype), flat.to(device)


class _GatherPermutations(torch.autograd.Function):
    """Rows of ``x`` (B*N, C) taken by ``index`` (K,), where ``index`` holds S whole permutations per image.

    The backward is a gather through the inverse permutations (``inverse`` (S, B*N)) and a sum over S, instead
    of autograd's atomic scatter-add.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        rows = grad.index_select(0, inverse.reshape(-1)).view(inverse.shape[0], inverse.shape[1], -1)
        return rows.sum(0), None, None


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    fused: bool,
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
    with_probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale) v through SDPA (``fused``) or explicitly; optionally also the probabilities
    (detached, for the significance; recomputed without grad on the SDPA path)."""
    if fused:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        if not with_probs:
            return out, None
        with torch.no_grad():
            return out, _probs(q, k, scale, mask)
    probs = _probs(q, k, scale, mask)
    out = F.dropout(probs, dropout_p, training=dropout_p > 0) @ v
    return out, probs.detach()


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1, dtype=scores.dtype)  # explicit dtype: no fp32 upcast under CUDA autocast


# ----------------------------------------------------------------------------------------------------------
# layers


class PackedLinear(nn.Module):
    """Several projections of one input as one GEMM. ``bias`` covers only the trailing ``bias_features``
    outputs: official q/kv projections may lack a bias, ``lepe_linear`` (packed last) always has one."""

    def __init__(self, in_features: int, out_features: int, bias_features: int):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(out_features, in_features), std=0.02))
        self.bias = nn.Parameter(torch.zeros(bias_features)) if bias_features else None

    def forward(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """With ``weight`` / ``bias`` (cast parameter copies, see ``cast_weights_together``), or own."""
        if weight is None:
            weight, bias = self.weight, self.bias
        if bias is not None and bias.shape[0] != weight.shape[0]:
            bias = F.pad(bias, (weight.shape[0] - bias.shape[0], 0))
        return F.linear(x, weight, bias)


class StackedLinear(nn.Module):
    """``count`` independent Linear layers applied to ``count`` inputs with one batched GEMM."""

    def __init__(self, count: int, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(trunc_normal_(torch.empty(count, out_features, in_features), std=0.02))
        self.bias = nn.Parameter(torch.zeros(count, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (count, M, in) -> (count, M, out)
        return self.forward_transposed(x).transpose(1, 2)

    def forward_transposed(
        self, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(count, M, in) -> (count, out, M). Computed as W @ x^T, so the weight gradient comes out in the
        weight's own layout (x @ W^T would hand AccumulateGrad a transposed gradient to copy). ``weight`` /
        ``bias``: cast copies of the parameters (see ``cast_weights_together``); default: own."""
        if weight is None:
            weight, bias = self.weight, self.bias
        if bias is None:
            return torch.bmm(weight, x.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(2), weight, x.transpose(1, 2))


class GroupNorm1(nn.Module):
    """GroupNorm(1, C) for channels-last (B, H, W, C) maps (the official ``Conv2d_BN.bn``)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return _GroupNorm1Fn.apply(x, self.weight, self.bias, self.eps)


class ConvNorm(nn.Module):
    """Bias-free conv + GroupNorm(1, C) on channels-last maps; 1x1 convs run as a Linear."""

    def __init__(
        self, cin: int, cout: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        self.norm = GroupNorm1(cout)
        self.pointwise = kernel == 1 and stride == 1 and groups == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight
        x = F.linear(x, weight.flatten(1)) if self.pointwise else _conv_nhwc(x, self.conv, weight)
        return self.norm(x)


class Stem(nn.Module):
    """Three 3x3 convs (stride 2, 1, 2) with GroupNorm and GELU, then LayerNorm: image -> (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = ConvNorm(in_chans, dim, 3, 2, 1)
        self.conv2 = ConvNorm(dim, dim, 3, 1, 1)
        self.conv3 = ConvNorm(dim, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim)  # official: default eps 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.norm(self.conv3(x))


class Downsample(nn.Module):
    """1x1 conv, depthwise 3x3 stride-2 conv, 1x1 conv, each with GroupNorm(1, C), GELU between."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.conv1 = ConvNorm(dim, out_dim, 1)
        self.conv2 = ConvNorm(out_dim, out_dim, 3, 2, 1, groups=out_dim)
        self.conv3 = ConvNorm(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


class Mlp(nn.Module):
    """fc1 -> GELU(h + depthwise3x3(h)) -> fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def layers(self) -> dict[str, nn.Module]:
        return {"fc1": self.fc1, "dwconv": self.dwconv, "fc2": self.fc2}

    def forward(self, x: torch.Tensor, weights: Weights | None = None) -> torch.Tensor:
        w = weights_or_own(weights, self.layers(), x)
        h = F.linear(x, *w["fc1"])
        h = F.gelu(_conv_nhwc(h, self.dwconv, *w["dwconv"]) + h)  # out of place: no CopySlices backward
        return self.drop(F.linear(self.drop(h), *w["fc2"]))


class _AttentionBase(nn.Module):
    fused_attn: torch.jit.Final[bool]

    def __init__(
        self, dim: int, num_heads: int, packed_out: int, bias_out: int, qk_scale, attn_drop, proj_drop
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.scale = qk_scale or self.head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.in_proj = PackedLinear(dim, packed_out, bias_out)
        self.lepe_conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()

    def layers(self) -> dict[str, nn.Module]:
        """The layers with weights, by the names ``forward`` looks them up in its ``weights``."""
        return {"in_proj": self.in_proj, "lepe_conv": self.lepe_conv, "proj": self.proj}

    def _finish(self, lepe_in: torch.Tensor, attn: torch.Tensor, w: Weights) -> torch.Tensor:
        """proj(lepe_conv(lepe_in) + attn); ``attn`` is the (B, H, W, C) map or a (B, N, heads, d) view of it
        (any strides). One out-of-place add: adding into slices of the lepe buffer in place costs autograd
        CopySlices copies in the backward, and reshaping ``attn`` first could cost a copy."""
        lepe = _conv_nhwc(lepe_in, self.lepe_conv, *w["lepe_conv"])
        return self.proj_drop(F.linear((lepe.reshape(attn.shape) + attn).reshape(lepe.shape), *w["proj"]))

    @property
    def _dropout_p(self) -> float:
        return self.attn_drop if self.training else 0.0


class HybridScaleAttention(_AttentionBase):
    """HSA: heads [0, h/2) attend to sr-reduced global tokens, heads [h/2, h) within 7x7 windows. Returns
    the output and the significance map (B, H, W): column means of both attention maps, summed.

    ``in_proj`` packs [q1 (C/2) | q2 (C/2) | kv2 (C) | lepe_linear (C)]; ``global_kv`` is official ``kv1``.
    """

    def __init__(self, dim, num_heads, sr_ratio, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__(
            dim, num_heads, 3 * dim, 3 * dim if qkv_bias else dim, qk_scale, attn_drop, proj_drop
        )
        self.sr_ratio = sr_ratio
        self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
        self.sr_norm = nn.LayerNorm(dim)  # official: default eps 1e-5
        self.global_kv = nn.Linear(dim, dim, bias=qkv_bias)

    def layers(self) -> dict[str, nn.Module]:
        return dict(super().layers(), sr=self.sr, sr_norm=self.sr_norm, global_kv=self.global_kv)

    def forward(
        self, x: torch.Tensor, significance: torch.Tensor | None = None, weights: Weights | None = None
    ):
        B, H, W, C = x.shape
        if self.num_heads % 2:
            raise ValueError(
                f"hybrid-scale attention splits heads between a global and a local branch and needs an even "
                f"num_heads, got {self.num_heads} (the official default SGFormer() has this problem too)"
            )
        heads, d, half, n = self.num_heads // 2, self.head_dim, C // 2, H * W
        # split, not slicing: the backward joins the three gradients with one cat
        w = weights_or_own(weights, self.layers(), x)
        q1, qkv2, lepe_in = self.in_proj(x, *w["in_proj"]).split((half, 3 * half, C), -1)

        # global branch: queries are a strided view of `packed`, keys come from the sr-reduced map
        q1 = q1.reshape(B, n, heads, d).transpose(1, 2)
        reduced, (hg, wg) = self._reduce(x, w)
        # unbind where k and v sit side by side: the backward stacks their gradients straight into place
        kv1 = F.linear(reduced, *w["global_kv"]).view(B, hg * wg, 2, heads, d)
        k1, v1 = (t.transpose(1, 2) for t in kv1.unbind(2))
        x1, p1 = _attention(q1, k1, v1, self.scale, self.fused_attn, self._dropout_p, with_probs=True)
        global_sig = _mean_heads_then_queries(p1, head_dim=1).view(B, hg, 1, wg, 1)

        # local branch: one copy forms the windows of q2, k2, v2
        q2, k2, v2 = _window_partition(qkv2, WINDOW, 3, heads).unbind(0)  # (B, nW*heads, L, d) each
        plan = _window_plan(H, W, WINDOW, heads, x.device)
        key_mask = plan[0] if plan is not None else None
        x2, p2 = _attention(q2, k2, v2, self.scale, self.fused_attn, self._dropout_p, key_mask, True)
        hp, wp = -(-H // WINDOW) * WINDOW, -(-W // WINDOW) * WINDOW
        nh, nw, L = hp // WINDOW, wp // WINDOW, WINDOW * WINDOW
        p2 = p2.view(B, nh * nw, heads, L, L)
        x2 = x2.view(B, nh, nw, heads, WINDOW, WINDOW, d).permute(0, 1, 4, 2, 5, 3, 6)  # (B,nh,7,nw,7,h,d)
        if plan is None:  # both halves as (B, nh, 7, nw, 7, heads, d) views: one stack makes the map
            x1 = x1.transpose(1, 2).view(B, nh, WINDOW, nw, WINDOW, heads, d)
            attn = torch.stack((x1, x2), 5).view(B, H, W, C)
            local_sig = _mean_heads_then_queries(p2, head_dim=2)
        else:
            x1 = x1.transpose(1, 2).reshape(B, H, W, half)
            attn = torch.cat((x1, x2.reshape(B, hp, wp, half)[:, :H, :W]), -1)
            local_sig = (p2 * plan[1].to(p2.dtype)).sum(dim=(2, 3), dtype=torch.float32).div_(heads)
        local_sig = local_sig.view(B, nh, nw, WINDOW, WINDOW).permute(0, 1, 3, 2, 4).reshape(B, hp, wp)
        s = self.sr_ratio
        if (hp, wp) == (H, W) == (hg * s, wg * s):  # no padding: add the reduced map in place, broadcast
            significance = local_sig.view(B, hg, s, wg, s).add_(global_sig).view(B, H, W)
        else:
            global_sig = global_sig.expand(B, hg, s, wg, s).reshape(B, hg * s, wg * s)[:, :H, :W]
            significance = local_sig[:, :H, :W] + global_sig
        return self._finish(lepe_in, attn, w), significance

    def _reduce(self, x: torch.Tensor, w: Weights | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """sr x sr patchify conv (zero padded to a multiple of sr), LayerNorm, GELU -> (B, Hg*Wg, C)."""
        w = weights_or_own(w, self.layers(), x)
        s = self.sr_ratio
        pad_h, pad_w = -x.shape[1] % s, -x.shape[2] % s
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        reduced = _conv_nhwc(x, self.sr, *w["sr"])
        hg, wg = reduced.shape[1], reduced.shape[2]
        # LayerNorm in the conv's dtype (its kernel keeps fp32 statistics): CUDA autocast would otherwise
        # cast to fp32 and back (two copies forward, two backward) around this tiny map
        norm, reduced = self.sr_norm, reduced.reshape(x.shape[0], hg * wg, -1)
        reduced = layer_norm_keep_dtype(reduced, norm, *w["sr_norm"])
        return F.gelu(reduced), (hg, wg)


class SignificanceGuidedAttention(_AttentionBase):
    """SGA: all heads query the full map; keys/values are tokens merged along the significance order.

    Heads [0, h/2) use the row-major sorted sequence (official ``kv1``), heads [h/2, h) the column-major one
    (official ``kv2``); both are one gather and one merge GEMM. ``in_proj`` packs [q (C) | lepe_linear (C)];
    ``seq_kv`` stacks the official ``kv1``/``kv2``.
    """

    def __init__(self, dim, num_heads, sr_ratio, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__(
            dim, num_heads, 2 * dim, 2 * dim if qkv_bias else dim, qk_scale, attn_drop, proj_drop
        )
        if sr_ratio not in MERGE_GROUPS:
            raise ValueError(
                f"significance-guided attention needs sr_ratio in {sorted(MERGE_GROUPS)}, got {sr_ratio}"
            )
        self.sr_ratio = sr_ratio
        self.groups = MERGE_GROUPS[sr_ratio]
        self.seq_kv = StackedLinear(2, dim, dim, qkv_bias)
        for i, g in enumerate(self.groups):
            setattr(self, f"f{i + 1}", nn.Linear(g, 1))

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, K) significance-sorted rows -> (T, K) merged rows: each run of g consecutive rows becomes the
        f-weighted sum (plus bias) of its rows.

        Up to ``DENSE_MERGE_MAX_TOKENS`` merged tokens the (T, N) matrix is built (one mv through a constant
        tap table, one scatter) and applied by one addmm: a handful of ops forward and backward whatever the
        part count, where per-part GEMVs, their copies and their backward cost several per part."""
        fs = [getattr(self, f"f{i + 1}") for i in range(len(self.groups))]
        dtype, n = fs[0].weight.dtype, tokens.shape[0]
        plan = _merge_plan(n, self.groups, tokens.device, dtype)
        t = sum(full + (rest > 0) for _, full, rest, _ in plan)
        if t <= DENSE_MERGE_MAX_TOKENS:
            taps, flat = _dense_merge_plan(n, self.groups, tokens.device, dtype)
            # tiny matrix work outside autocast (the tap table stays in its dtype); one cast of the N + T
            # values to the tokens' dtype instead of autocast casting the (T, N) matrix and the bias
            with torch.autocast(tokens.device.type, enabled=False):
                params = torch.cat([f.weight.view(-1) for f in fs] + [f.bias for f in fs])
                weights, bias = (taps @ params).to(tokens.dtype).split((n, t))
                matrix = weights.new_zeros(t * n).scatter_(0, flat, weights).view(t, n)
                return torch.addmm(bias[:, None], matrix, tokens)
        chunks, biases = [], []
        for (start, full, rest, resample), f in zip(plan, fs):
            weight, g = f.weight.view(-1), f.in_features
            if full:
                runs = tokens[start : start + full * g].view(full, g, -1)
                chunks.append(torch.matmul(weight, runs))  # (full, K)
            if rest:
                tail = tokens[start + full * g : start + full * g + rest]
                chunks.append(torch.matmul(resample @ weight, tail).unsqueeze(0))
            biases.append(f.bias.expand(full + (1 if rest else 0)))
        return torch.cat(chunks).add_(torch.cat(biases)[:, None])

    def layers(self) -> dict[str, nn.Module]:
        return dict(super().layers(), seq_kv=self.seq_kv)  # f1-f3 stay fp32: merge() runs without autocast

    def forward(
        self, x: torch.Tensor, significance: torch.Tensor | None = None, weights: Weights | None = None
    ):
        B, H, W, C = x.shape
        if significance is None:
            raise ValueError(
                "significance-guided attention needs the map of the preceding hybrid-scale block"
            )
        h, d, n = self.num_heads, self.head_dim, H * W
        w = weights_or_own(weights, self.layers(), x)
        q, lepe_in = self.in_proj(x, *w["in_proj"]).split(C, -1)
        q = q.reshape(B, n, h, d).transpose(1, 2)

        with_grad = torch.is_grad_enabled() and x.requires_grad
        index, inverse = _sorted_gather_index(significance, with_grad)  # (N*2*B,), (2, B*N)
        rows = x.reshape(B * n, C)  # gathered below as (N*2*B, C) = (N, 2, B, C)
        tokens = _GatherPermutations.apply(rows, index, inverse) if with_grad else rows.index_select(0, index)
        merged = self.merge(tokens.view(n, 2 * B * C))  # (T, 2*B*C)
        t = merged.shape[0]
        seqs = merged.view(t, 2, B, C).permute(1, 2, 0, 3).reshape(2, B * t, C)
        # (2, 2C, B*t): [sequence, (k|v, head, d), (image, token)]
        kv = self.seq_kv.forward_transposed(seqs, *w["seq_kv"])
        # one copy to (k|v, B, heads, t, d); contiguous() where reshape could merge a unit dim into a view
        kv = kv.view(2, 2, h // 2, d, B, t).permute(1, 4, 0, 2, 5, 3).reshape(2, B, h, t, d).contiguous()
        out, _ = _attention(q, *kv.unbind(0), self.scale, self.fused_attn, self._dropout_p)
        return self._finish(lepe_in, out.transpose(1, 2), w), None


def _mean_heads_then_queries(probs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Average attention a key receives: mean over heads, then over queries, in the official order, so that
    fp32 significance is bitwise equal to the official and exact ties sort the same way."""
    probs = probs.squeeze(head_dim) if probs.shape[head_dim] == 1 else probs.mean(head_dim)
    return probs.mean(head_dim, dtype=torch.float32)


@_cached
def _gather_layout(batch: int, height: int, width: int, device: torch.device):
    """Constant index tables for sorting tokens: ``table`` (N, 2, B), the row of x (B*N, C) that holds token j
    of sequence s (row-major / column-major id) in image b at [j, s, b]; ``offset`` (1, 2, 1), s*B*N, and
    ``positions`` (N*2*B,), the rows of the gathered layout, which build the inverse map."""
    n = height * width
    ids = torch.arange(n, device=device)
    col_to_row = ids.view(height, width).t().reshape(-1)
    table = torch.stack((ids, col_to_row), 1)[:, :, None] + torch.arange(batch, device=device) * n
    offset = torch.arange(2, device=device).view(1, 2, 1) * (batch * n)
    return table, offset, torch.arange(2 * batch * n, device=device)


def _sorted_gather_index(significance: torch.Tensor, with_inverse: bool):
    """Row indices into x (B*N, C) laid out (N, 2, B) -- position, sequence, image -- for the row-major and
    column-major significance orders, and (for the backward) the inverse map (2, B*N). Three ops (stack the
    keys, sort, one gather through the constant table), two more for the inverse."""
    B, H, W = significance.shape
    n = H * W
    table, offset, positions = _gather_layout(B, H, W, significance.device)
    with torch.no_grad():
        if H == W:  # both orders as (B, H, W) views: one stack
            keys = torch.stack((significance, significance.mT))
        else:
            keys = torch.stack((significance.reshape(B, n), significance.mT.reshape(B, n)))
        order = torch.sort(keys.view(2, B, n), dim=-1).indices  # not stable, as officially (see docstring)
        index = torch.gather(table, 0, order.permute(2, 0, 1))  # (N, 2, B)
        if not with_inverse:
            return index.view(-1), None
        inverse = torch.empty_like(positions).scatter_(0, (index + offset).view(-1), positions)
        return index.view(-1), inverse.view(2, B * n)


def _window_partition(slab: torch.Tensor, window: int, parts: int, heads: int) -> torch.Tensor:
    """(B, H, W, parts*heads*d) -> (parts, B, nW*heads, window^2, d) in one copy (zero pad bottom/right)."""
    B, H, W, K = slab.shape
    pad_h, pad_w = -H % window, -W % window
    if pad_h or pad_w:
        slab = F.pad(slab, (0, 0, 0, pad_w, 0, pad_h))
    nh, nw, d = (H + pad_h) // window, (W + pad_w) // window, K // (parts * heads)
    x = slab.view(B, nh, window, nw, window, parts, heads, d).permute(5, 0, 1, 3, 6, 2, 4, 7)
    return x.reshape(parts, B, nh * nw * heads, window * window, d)


class MultiHeadAttention(_AttentionBase):
    """Stage-4 attention over all tokens. ``in_proj`` packs [q (C) | kv (2C) | lepe_linear (C)]."""

    def __init__(self, dim, num_heads, qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__(
            dim, num_heads, 4 * dim, 4 * dim if qkv_bias else dim, qk_scale, attn_drop, proj_drop
        )

    def forward(
        self, x: torch.Tensor, significance: torch.Tensor | None = None, weights: Weights | None = None
    ):
        B, H, W, C = x.shape
        h, d, n = self.num_heads, self.head_dim, H * W
        w = weights_or_own(weights, self.layers(), x)
        qkv, lepe_in = self.in_proj(x, *w["in_proj"]).split((3 * C, C), -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.reshape(B, n, 3, h, d).unbind(2))
        out, _ = _attention(q, k, v, self.scale, self.fused_attn, self._dropout_p)
        return self._finish(lepe_in, out.transpose(1, 2), w), None


# ----------------------------------------------------------------------------------------------------------
# blocks, stages, model


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), x + mlp(norm2(x)); passes the significance map along."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kind: str,
        sr_ratio: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.kind = kind
        common = dict(qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if kind == "hsa":
            self.attn = HybridScaleAttention(dim, num_heads, sr_ratio, **common)
        elif kind == "sga":
            self.attn = SignificanceGuidedAttention(dim, num_heads, sr_ratio, **common)
        elif kind == "mhsa":
            self.attn = MultiHeadAttention(dim, num_heads, **common)
        else:
            raise ValueError(f"unknown block kind {kind!r}")
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def layers(self) -> dict[str, nn.Module]:
        """Layers whose weights the stage casts together under autocast (the norms run in fp32 there)."""
        return dict(**self.attn.layers(), **self.mlp.layers())

    def forward(
        self, x: torch.Tensor, significance: torch.Tensor | None = None, weights: Weights | None = None
    ):
        w = weights_or_own(weights, self.layers(), x)
        out, significance = self.attn(_amp_dtype(self.norm1(x)), significance, w)
        x = x + self.drop_path(out)
        x = x + self.drop_path(self.mlp(self.norm2(x), w))
        return x, significance


def block_kinds(depth: int, sr_ratio: int, last_stage: bool) -> list[str]:
    """Official parameter layout: alternate HSA/SGA where sr > 1 (SGA only outside the last stage)."""
    if sr_ratio == 1:
        return ["mhsa"] * depth
    return ["sga" if j % 2 == 1 and not last_stage else "hsa" for j in range(depth)]


class SGFormerStage(nn.Module):
    """Optional downsample, blocks (HSA hands its significance map to the next SGA), optional stage norm."""

    def __init__(self, in_dim: int | None, dim: int, kinds: list[str], norm: bool, drop_paths, **block_kw):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if in_dim is not None else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(dim, kind=k, drop_path=dp, **block_kw) for k, dp in zip(kinds, drop_paths)
        )
        self.norm = nn.LayerNorm(dim, eps=block_kw["norm_eps"]) if norm else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        # one cast of all the blocks' weights under autocast (cast_weights_together); else the parameters
        weights = cast_weights_together([block.layers() for block in self.blocks], x)
        significance = None
        for block, block_weights in zip(self.blocks, weights):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                # non-reentrant: gradients reach the cast weights passed in (not a positional tensor)
                x, significance = checkpoint(block, x, significance, block_weights, use_reentrant=False)
            else:
                x, significance = block(x, significance, block_weights)
        return self.norm(x)


class SGFormer(nn.Module):
    """SG-Former backbone and classifier. Feature maps are channels-last (B, H, W, C) internally;
    ``forward_features`` returns the final-normed (B, H/32, W/32, C) map."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dims: tuple[int, ...] = (64, 128, 256, 512),
        num_heads: tuple[int, ...] = (2, 4, 8, 16),
        mlp_ratios: tuple[float, ...] = (4, 4, 4, 4),
        depths: tuple[int, ...] = (2, 4, 16, 1),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if not len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(depths) == len(sr_ratios) == 4:
            raise ValueError(
                "SG-Former has four stages: embed_dims, num_heads, mlp_ratios, depths, sr_ratios"
            )
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.pos_grid = (img_h // 4, img_w // 4)  # official: img_size // 4 (56 at 224)

        self.stem = Stem(in_chans, embed_dims[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], embed_dims[0]))
        total = sum(depths)
        drop_paths = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear, as official
        stages, start = [], 0
        for i in range(4):
            stages.append(
                SGFormerStage(
                    embed_dims[i - 1] if i else None,
                    embed_dims[i],
                    block_kinds(depths[i], sr_ratios[i], last_stage=i == 3),
                    norm=i < 3,
                    drop_paths=drop_paths[start : start + depths[i]],
                    num_heads=num_heads[i],
                    sr_ratio=sr_ratios[i],
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    norm_eps=norm_eps,
                )
            )
            start += depths[i]
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=embed_dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)
        ]
        self.norm = nn.LayerNorm(embed_dims[-1], eps=norm_eps)  # official norm4
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """Official scheme: trunc-normal(.02) Linear, fan-out normal convs, unit norms, sin-cos pos_embed."""
        self.apply(_init_module)
        if not self.pos_embed.is_meta:
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed(self.pos_embed.shape[-1], *self.pos_grid))

    # --- timm API ------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^pos_embed|^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
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

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return x + self._pos_embed(x.shape[1], x.shape[2])

    def _pos_embed(self, height: int, width: int) -> torch.Tensor:
        """The learned table as (1, H, W, C), bicubically resampled when the stage-1 grid differs."""
        grid_h, grid_w = self.pos_grid
        table = self.pos_embed.view(1, grid_h, grid_w, -1)
        if (height, width) == (grid_h, grid_w):
            return table
        resized = F.interpolate(
            table.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False
        )
        return resized.permute(0, 2, 3, 1)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Stage outputs (stages 1-3 after their own norm; the last one after the final norm if ``norm``).
        NCHW outputs are channels-last views (no copy); ``output_fmt='NHWC'`` returns the maps as stored."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        x = self._embed(x)
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                intermediates.append(feat.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop stages (and norm / head) not needed for ``indices``; returns the kept absolute indices."""
        take_indices = prune_stages(self, indices, prune_norm, prune_head)
        return take_indices

    def forward_tokens(self, x: torch.Tensor, index: int = -1) -> tuple[torch.Tensor, tuple[int, int]]:
        """Visual-expert hook: tokens (B, H*W, C) of stage ``index`` (row-major) and the grid (H, W); the last
        stage is normalised by the final norm."""
        count = len(self.stages)
        stage_index = index + count if index < 0 else index
        if not 0 <= stage_index < count:
            raise IndexError(f"stage index {index} out of range for {count} stages")
        x = self._embed(x)
        for stage in self.stages[: stage_index + 1]:
            x = stage(x)
        if stage_index == count - 1:
            x = self.norm(x)
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C), (H, W)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self._embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_module(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, PackedLinear, StackedLinear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, GroupNorm1)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------
# official checkpoints and constructor arguments


# one-to-one renames (official -> ours); attention projections are packed separately
_RENAMES: list[tuple[re.Pattern, Any]] = [
    (re.compile(r"^pos_embed$"), lambda m: "pos_embed"),
    (
        re.compile(r"^patch_embed1\.conv\.([024])\.(c|bn)\.(weight|bias)$"),
        lambda m: f"stem.conv{int(m[1]) // 2 + 1}.{'conv' if m[2] == 'c' else 'norm'}.{m[3]}",
    ),
    (re.compile(r"^patch_embed1\.norm\.(weight|bias)$"), lambda m: f"stem.norm.{m[1]}"),
    (
        re.compile(r"^patch_embed([234])\.conv([123])\.(c|bn)\.(weight|bias)$"),
        lambda m: f"stages.{int(m[1]) - 1}.downsample.conv{m[2]}.{'conv' if m[3] == 'c' else 'norm'}.{m[4]}",
    ),
    (
        re.compile(r"^block([1-4])\.(\d+)\.(norm1|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"),
        lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}.{m[4]}",
    ),
    (
        re.compile(r"^block([1-4])\.(\d+)\.mlp\.dwconv\.dwconv\.(weight|bias)$"),
        lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.dwconv.{m[3]}",
    ),
    (
        re.compile(r"^block([1-4])\.(\d+)\.attn\.(sr|lepe_conv|proj|f1|f2|f3)\.(weight|bias)$"),
        lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.{m[3]}.{m[4]}",
    ),
    (
        re.compile(r"^block([1-4])\.(\d+)\.attn\.norm\.(weight|bias)$"),
        lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.sr_norm.{m[3]}",
    ),
    (
        re.compile(r"^block([1-4])\.(\d+)\.attn\.kv1\.(weight|bias)$"),  # HSA only; SGA's kv1 is stacked
        lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.attn.global_kv.{m[3]}",
    ),
    (re.compile(r"^norm([123])\.(weight|bias)$"), lambda m: f"stages.{int(m[1]) - 1}.norm.{m[2]}"),
    (re.compile(r"^norm4\.(weight|bias)$"), lambda m: f"norm.{m[1]}"),
    (re.compile(r"^head\.(weight|bias)$"), lambda m: f"head.{m[1]}"),
]

# packed projections per official attention type: (detecting key, names packed into in_proj, in order)
_PACKED = (
    ("q1", ("q1", "q2", "kv2", "lepe_linear")),  # HSA
    ("f1", ("q", "lepe_linear")),  # SGA (+ kv1/kv2 stacked into seq_kv)
    ("kv", ("q", "kv", "lepe_linear")),  # stage-4 attention
)


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official SG-Former keys -> ours, packing q/kv/lepe projections. Every key must be accounted for."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return state_dict[key]

    prefixes = sorted({m[0] for k in state_dict if (m := re.match(r"^block([1-4])\.(\d+)\.attn", k))})
    for prefix in prefixes:
        stage, block = re.match(r"^block(\d)\.(\d+)", prefix).groups()
        dst = f"stages.{int(stage) - 1}.blocks.{block}.attn"
        for marker, packed_names in _PACKED:
            if f"{prefix}.{marker}.weight" in state_dict:
                names = packed_names
                break
        else:
            raise KeyError(f"{prefix}: not an SG-Former attention (no q1, f1 or kv projection)")
        out[f"{dst}.in_proj.weight"] = torch.cat([take(f"{prefix}.{n}.weight") for n in names])
        has_bias = [f"{prefix}.{n}.bias" in state_dict for n in names]
        if all(has_bias):
            out[f"{dst}.in_proj.bias"] = torch.cat([take(f"{prefix}.{n}.bias") for n in names])
        elif has_bias == [False] * (len(names) - 1) + [True]:
            out[f"{dst}.in_proj.bias"] = take(f"{prefix}.lepe_linear.bias")
        else:
            raise KeyError(f"{prefix}: q/kv projections must all have a bias or none")
        if marker == "f1":
            out[f"{dst}.seq_kv.weight"] = torch.stack(
                [take(f"{prefix}.kv1.weight"), take(f"{prefix}.kv2.weight")]
            )
            if f"{prefix}.kv1.bias" in state_dict:
                out[f"{dst}.seq_kv.bias"] = torch.stack(
                    [take(f"{prefix}.kv1.bias"), take(f"{prefix}.kv2.bias")]
                )

    unknown = []
    for key, value in state_dict.items():
        if key in used:
            continue
        for pattern, rename in _RENAMES:
            if m := pattern.match(key):
                out[rename(m)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(
            f"unrecognised SG-Former checkpoint keys: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}"
        )
    return out


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, h*w, C) square table -> (1, grid_h*grid_w, C), bicubic."""
    side = math.isqrt(pos_embed.shape[1])
    if side * side != pos_embed.shape[1]:
        raise ValueError(f"cannot resample a non-square pos_embed of {pos_embed.shape[1]} tokens")
    table = pos_embed.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos_embed.dtype)


def checkpoint_filter_fn(state_dict: dict, model: SGFormer | None = None) -> dict[str, torch.Tensor]:
    """Unwrap checkpoint containers (``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``), remap
    official keys to ours (our own state dicts pass unchanged), resample ``pos_embed`` to the model's grid."""
    state_dict = unwrap_checkpoint(state_dict)
    if any(k.startswith(("patch_embed", "block")) for k in state_dict):
        state_dict = convert_official_state_dict(state_dict)
    if (
        model is not None
        and "pos_embed" in state_dict
        and state_dict["pos_embed"].shape != model.pos_embed.shape
    ):
        state_dict = dict(state_dict)
        state_dict["pos_embed"] = resample_pos_embed(state_dict["pos_embed"], model.pos_grid)
    return state_dict


# the official SGFormer constructor's defaults (never released; see the module docstring)
_OFFICIAL_DEFAULTS: dict[str, Any] = dict(
    img_size=224,
    patch_size=16,
    in_chans=3,
    num_classes=1000,
    embed_dims=[64, 128, 256, 512],
    num_heads=[1, 2, 4, 8],
    mlp_ratios=[4, 4, 4, 4],
    qkv_bias=False,
    qk_scale=None,
    drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.0,
    norm_layer=nn.LayerNorm,
    depths=[3, 4, 6, 3],
    sr_ratios=[8, 4, 2, 1],
    num_stages=4,
    linear=False,
)


def _layer_norm_eps(norm_layer: Any) -> float:
    if norm_layer is nn.LayerNorm:
        return 1e-5
    if isinstance(norm_layer, partial) and norm_layer.func is nn.LayerNorm and not norm_layer.args:
        return float(norm_layer.keywords.get("eps", 1e-5))
    raise ValueError(f"norm_layer must be nn.LayerNorm or partial(nn.LayerNorm, eps=...), got {norm_layer!r}")


def build_from_official(official_kwargs: dict[str, Any]) -> SGFormer:
    """Our model from the official ``SGFormer(**kwargs)`` arguments (``norm_eps: e`` stands for
    ``norm_layer=partial(nn.LayerNorm, eps=e)``). ``patch_size`` and ``linear`` are unused officially too."""
    unknown = set(official_kwargs) - set(_OFFICIAL_DEFAULTS) - {"norm_eps"}
    if unknown:
        raise TypeError(f"unexpected official SG-Former argument(s): {sorted(unknown)}")
    kw = {**_OFFICIAL_DEFAULTS, **official_kwargs}
    eps = float(kw["norm_eps"]) if "norm_eps" in kw else _layer_norm_eps(kw["norm_layer"])
    if kw["num_stages"] != 4:
        raise ValueError(f"SG-Former has four stages, got num_stages={kw['num_stages']}")
    return SGFormer(
        img_size=kw["img_size"],
        in_chans=kw["in_chans"],
        num_classes=kw["num_classes"],
        embed_dims=tuple(kw["embed_dims"]),
        num_heads=tuple(kw["num_heads"]),
        mlp_ratios=tuple(kw["mlp_ratios"]),
        depths=tuple(kw["depths"]),
        sr_ratios=tuple(kw["sr_ratios"]),
        qkv_bias=kw["qkv_bias"],
        qk_scale=kw["qk_scale"],
        norm_eps=eps,
        proj_drop_rate=kw["drop_rate"],
        attn_drop_rate=kw["attn_drop_rate"],
        drop_path_rate=kw["drop_path_rate"],
    )


register_official("sgformer", build_from_official, checkpoint_filter_fn)


# ----------------------------------------------------------------------------------------------------------
# timm registration


def _cfg(**kwargs) -> dict[str, Any]:
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
        "first_conv": "stem.conv1.conv",
        "classifier": "head",
        "paper_ids": "arXiv:2308.12216",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {"sgformer_s.in1k": _cfg(), "sgformer_m.in1k": _cfg(), "sgformer_b.in1k": _cfg()}
)


def _create_sgformer(variant: str, pretrained: bool = False, **kwargs) -> SGFormer:
    return build_model_with_cfg(
        SGFormer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        **kwargs,
    )


@register_model
def sgformer_s(pretrained: bool = False, **kwargs) -> SGFormer:
    """SG-Former-S: 22.5M params, 4.8 GFLOPs, 83.2% IN-1k."""
    args = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 4, 16, 1))
    return _create_sgformer("sgformer_s", pretrained, **dict(args, **kwargs))


@register_model
def sgformer_m(pretrained: bool = False, **kwargs) -> SGFormer:
    """SG-Former-M: 38.7M params, 7.5 GFLOPs, 84.1% IN-1k."""
    args = dict(embed_dims=(64, 128, 256, 512), num_heads=(2, 4, 8, 16), depths=(2, 6, 28, 2))
    return _create_sgformer("sgformer_m", pretrained, **dict(args, **kwargs))


@register_model
def sgformer_b(pretrained: bool = False, **kwargs) -> SGFormer:
    """SG-Former-B: 78.0M params, 15.6 GFLOPs, 84.7% IN-1k."""
    args = dict(embed_dims=(96, 192, 384, 768), num_heads=(4, 6, 12, 24), depths=(4, 6, 24, 2))
    return _create_sgformer("sgformer_b", pretrained, **dict(args, **kwargs))
