"""KV-cache compression after the prefill (LOOK-M and its baselines), for any HF decoder with a DynamicCache.

The generation loop (``mm.generation``) prefills the prompt, then calls ``compress_cache`` once: each row of
the batch keeps a budget of its prompt's entries per layer and KV head, and the cache is rebuilt as a
left-padded ``[B, H_kv, n_max, D]`` tensor with a matching attention mask, so rows of different lengths keep
different counts (the reference code runs at batch 1 only). Decoding then continues at the rows' *logical*
positions (V2PE-aware), never at the compressed length.

Methods (``KV_METHODS``), one interface (``KVMethod.select`` -> kept and evicted indices per KV head):
- ``full``: keep everything (the baseline; also any method at a 100% budget).
- ``lookm``: LOOK-M's text prior. Text tokens and a recent window are always kept (a boolean priority, not an
  additive offset: no bf16 ties); image tokens fill the rest by the attention mass they received from every
  prompt query (fp32, per KV head, summed over the query heads that share it). Evicted image entries are
  merged into their most cosine-similar kept key (``merge``: ``pivotal`` as in the paper's headline script,
  ``averaged``, ``weighted``, or ``none``), keys and values.
- ``h2o``: heavy hitters by accumulated attention, plus a recent window.
- ``snapkv``: scores from the last ``window`` queries only, pooled along the keys; the window is kept.
- ``streaming``: StreamingLLM's attention sinks plus a recent window.
- ``random``: a seeded random subset (a floor for the others).

Scores are computed in a forward hook on each attention module during the prefill, from the module's own
query projection and rotary embedding against the cached (post-RoPE) keys, in query chunks: the prefill
itself stays on SDPA / flash, and no L x L matrix per layer is ever materialised.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MERGES = ("pivotal", "averaged", "weighted", "none")
SCORE_CHUNK_BYTES = 512 * 2**20  # the fp32 attention logits scored at once


@dataclass(frozen=True)
class KVCompression:
    """What to keep after the prefill. ``budget``: a fraction of each row's prompt (0 < b <= 1) or a token
    count (an int > 1), per layer and KV head. ``recent``: the share of the budget that is the most recent
    tokens (LOOK-M and H2O use half: the paper's 10% + 10%). ``window``: SnapKV's observation window and
    pooling ``kernel``; ``sinks``: StreamingLLM's first tokens; ``seed``: ``random``'s draw. ``queries``:
    LOOK-M / H2O score with at most this many prompt queries, evenly spaced and always the last (None: every
    query, as the papers do; scoring with all of them costs 1.5-4.6x the prefill on a CPU, BENCHMARKS.md).
    ``hold_out``: the prompt's last N tokens are left out of the compressed prefill and run on the compressed
    cache, so every answer token (the first included) comes from it: what a follow-up turn sees, and how
    accuracy against the budget is measured (with 0 the first answer token comes from the whole prompt)."""

    method: str = "full"
    budget: float = 1.0
    merge: str = "pivotal"
    recent: float = 0.5
    window: int = 32
    kernel: int = 5
    sinks: int = 4
    seed: int = 0
    queries: int | None = None
    hold_out: int = 0

    def __post_init__(self) -> None:
        if self.method not in KV_METHODS:
            raise ValueError(f"KV compression method {self.method!r}: choose from {sorted(KV_METHODS)}")
        if not (0 < self.budget <= 1 or (self.budget > 1 and float(self.budget).is_integer())):
            raise ValueError(
                f"KV budget must be a fraction in (0, 1] or a whole token count, got {self.budget}"
            )
        if self.merge not in MERGES:
            raise ValueError(f"KV merge {self.merge!r}: choose from {list(MERGES)}")
        if not 0 <= self.recent <= 1:
            raise ValueError(f"KV recent share must be in [0, 1], got {self.recent}")
        if self.hold_out < 0:
            raise ValueError(f"KV hold_out must be >= 0 prompt tokens, got {self.hold_out}")
        if self.queries is not None and self.queries < 1:
            raise ValueError(f"KV scoring queries must be a positive count or None, got {self.queries}")

    def keep_count(self, length: int) -> int:
        """Entries a row of ``length`` prompt tokens keeps (at least one)."""
        n = round(self.budget * length) if self.budget <= 1 else int(self.budget)
        return max(1, min(length, n))

    @property
    def is_full(self) -> bool:
        return self.method == "full" or self.budget == 1.0

    @property
    def scores(self) -> str | None:
        """Which prompt queries the method's scores come from: ``all``, ``window`` or none."""
        return KV_METHODS[self.method].scores


# -- scores ----------------------------------------------------------------------------------------------
def attention_modules(llm: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of an HF decoder (those with a query projection and a layer index)."""
    return [m for m in llm.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]


def _queries(
    module: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """The module's post-RoPE queries ``[B, H, L, D]`` for ``hidden``, through its own projection, query norm
    (Qwen3 / Gemma 3 style) and rotary function."""
    b, length, _ = hidden.shape
    q = module.q_proj(hidden).view(b, length, -1, module.head_dim)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    q = q.transpose(1, 2)
    rotate = sys.modules[type(module).__module__].apply_rotary_pos_emb
    q, _ = rotate(q, q, cos, sin)
    return q


def attention_mass(
    queries: torch.Tensor, keys: torch.Tensor, query_pos: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """fp32 attention mass each key receives, summed over ``queries`` and over the query heads sharing a
    KV head: ``[B, H_kv, L]``. ``queries`` ``[B, H, Q, D]`` sit at columns ``query_pos`` ``[Q]`` (ascending)
    of the prompt; causal, and padding (``mask`` ``[B, L]`` == 0) neither asks nor answers.

    Chunked over queries (``SCORE_CHUNK_BYTES`` of logits at a time); each chunk reads only the keys its
    last query can see (causal: half the work of the square), the causal mask touches only the chunk's
    diagonal block, and the sum over queries is one weighted matmul. Keys are never repeated per query head.
    """
    b, heads, n_q, dim = queries.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    k_t = keys.float().transpose(-1, -2)  # [B, H_kv, D, L]
    key_ok = mask.bool()
    padded = not bool(key_ok.all())
    cols = torch.arange(length, device=keys.device)
    lowest = torch.finfo(torch.float32).min  # finite: a query with no visible key gives zeros, not NaN
    chunk = max(1, SCORE_CHUNK_BYTES // max(1, b * heads * length * 4))
    total = torch.zeros(b, kv_heads, 1, length, dtype=torch.float32, device=keys.device)
    for lo in range(0, n_q, chunk):
        pos = query_pos[lo : lo + chunk]
        c, first, hi = pos.numel(), int(pos[0]), int(pos[-1]) + 1
        q = (queries[:, :, lo : lo + chunk].float() * scaling).reshape(b, kv_heads, group * c, dim)
        logits = torch.matmul(q, k_t[..., :hi]).view(b, kv_heads, group, c, hi)
        # keys after a query: only columns past the chunk's first query can be
        future = cols[None, first:hi] > pos[:, None]  # [c, hi - first]
        logits[..., first:hi].masked_fill_(future, lowest)
        if padded:
            logits.masked_fill_(~key_ok[:, None, None, None, :hi], lowest)
        probs = logits.softmax(-1).view(b, kv_heads, group * c, hi)
        # a padding query contributes nothing; the query heads of a KV head are summed in the same matmul
        asks = key_ok[:, pos].float().repeat(1, group)[:, None, None, :]  # [B, 1, 1, group * c]
        total[..., :hi] += torch.matmul(asks, probs)
    return total[:, :, 0]


class ScoreHooks:
    """Forward hooks that score every layer's cached keys during the prefill (then remove themselves).

    ``scores[layer]``: ``[B, H_kv, L]`` fp32, from ``all`` prompt queries (at most ``max_queries`` of them,
    evenly spaced, the last included) or the last ``window`` ones."""

    def __init__(
        self,
        llm: torch.nn.Module,
        cache: Any,
        mask: torch.Tensor,
        queries: str,
        window: int = 32,
        max_queries: int | None = None,
    ):
        self.cache, self.mask, self.queries, self.window = cache, mask, queries, window
        self.max_queries = max_queries
        self.scores: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in attention_modules(llm)]

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        length = hidden.shape[1]
        if length <= 1 or module.layer_idx in self.scores:  # decode steps are not scored
            return
        start = 0 if self.queries == "all" else max(0, length - self.window)
        pos = torch.arange(start, length, device=hidden.device)
        if self.queries == "all" and self.max_queries and self.max_queries < length:
            pos = (
                torch.linspace(0, length - 1, self.max_queries, device=hidden.device).round().long().unique()
            )
        with torch.no_grad():
            q = _queries(module, hidden[:, pos], cos[:, pos], sin[:, pos])
            keys = self.cache.layers[module.layer_idx].keys
            self.scores[module.layer_idx] = attention_mass(q, keys, pos, self.mask, module.scaling)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# -- selection -------------------------------------------------------------------------------------------
@dataclass
class RowPrompt:
    """One row of the prefilled batch: its real columns (left padding excluded), which of them are image
    tokens, and (for the scored methods) its scores ``[H_kv, L]``."""

    columns: torch.Tensor  # [n] real columns of the row, ascending
    is_image: torch.Tensor  # [n] bool
    scores: torch.Tensor | None  # [H_kv, n] fp32 (already restricted to the real columns)


def _top(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Per head, the ``k`` best of the ``candidates`` (indices into the row) by ``scores`` ``[H, n]``."""
    if k <= 0 or candidates.numel() == 0:
        return candidates.new_zeros(scores.shape[0], 0)
    picked = torch.topk(scores[:, candidates], min(k, candidates.numel()), dim=-1).indices
    return candidates[picked]


class KVMethod:
    """Chooses, per KV head, which of a row's ``n`` entries stay; every head keeps the same count."""

    scores: str | None = None

    def select(self, row: RowPrompt, spec: KVCompression, heads: int) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _same_for_all_heads(index: torch.Tensor, heads: int) -> torch.Tensor:
        return index.sort().values.unsqueeze(0).expand(heads, -1)


class Full(KVMethod):
    def select(self, row, spec, heads):
        return self._same_for_all_heads(torch.arange(len(row.columns), device=row.columns.device), heads)


class Streaming(KVMethod):
    def select(self, row, spec, heads):
        n, keep = len(row.columns), spec.keep_count(len(row.columns))
        sinks = min(spec.sinks, keep)
        index = torch.cat([torch.arange(sinks), torch.arange(n - (keep - sinks), n)])
        return self._same_for_all_heads(index.to(row.columns.device), heads)


class Random(KVMethod):
    def select(self, row, spec, heads):
        n, keep = len(row.columns), spec.keep_count(len(row.columns))
        gen = torch.Generator().manual_seed(spec.seed)
        return self._same_for_all_heads(torch.randperm(n, generator=gen)[:keep].to(row.columns.device), heads)


class H2O(KVMethod):
    scores = "all"

    def select(self, row, spec, heads):
        n, keep = len(row.columns), spec.keep_count(len(row.columns))
        recent = min(keep, int(keep * spec.recent))
        older = torch.arange(n - recent, device=row.columns.device)
        window = torch.arange(n - recent, n, device=row.columns.device).expand(heads, -1)
        heavy = _top(row.scores, older, keep - recent)
        return torch.cat([heavy, window], dim=1).sort(dim=1).values


class SnapKV(KVMethod):
    scores = "window"

    def select(self, row, spec, heads):
        n, keep = len(row.columns), spec.keep_count(len(row.columns))
        window = min(keep, spec.window, n)
        pooled = F.avg_pool1d(row.scores[:, None, :], spec.kernel, stride=1, padding=spec.kernel // 2)[
            :, 0, :n
        ]
        prefix = torch.arange(n - window, device=row.columns.device)
        observed = torch.arange(n - window, n, device=row.columns.device).expand(heads, -1)
        return torch.cat([_top(pooled, prefix, keep - window), observed], dim=1).sort(dim=1).values


class LookM(KVMethod):
    """LOOK-M's text prior: all text tokens and the recent window always stay, image tokens compete for
    what is left; the kept count is ``max(budget - recent, text outside the window) + recent``."""

    scores = "all"

    def select(self, row, spec, heads):
        n, keep = len(row.columns), spec.keep_count(len(row.columns))
        recent = min(keep, int(keep * spec.recent))
        device = row.columns.device
        in_window = torch.arange(n, device=device) >= n - recent
        priority = (~row.is_image) | in_window
        images = torch.nonzero(~priority).flatten()
        slots = max(0, keep - recent - int((~row.is_image & ~in_window).sum()))
        always = torch.nonzero(priority).flatten().expand(heads, -1)
        return torch.cat([always, _top(row.scores, images, slots)], dim=1).sort(dim=1).values


KV_METHODS: dict[str, KVMethod] = {
    "full": Full(),
    "lookm": LookM(),
    "h2o": H2O(),
    "snapkv": SnapKV(),
    "streaming": Streaming(),
    "random": Random(),
}


# -- merging ---------------------------------------------------------------------------------------------
def merge_evicted(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOOK-M's merge of a row's evicted entries into the kept ones, per KV head.

    ``keys`` / ``values`` ``[H, n, D]``; ``kept`` ``[H, m]`` and ``evicted`` ``[H, e]`` index the row.
    Each evicted key goes to its most cosine-similar kept key (its pivot); the kept entry becomes the mean
    of itself and what was merged into it, where what is merged is
    - ``pivotal``: ``(evicted + pivot) / 2``, every evicted entry;
    - ``averaged``: the evicted entry, only those whose best similarity (averaged over heads) is at least
      the mean over the row's evicted entries;
    - ``weighted``: ``similarity * evicted``, with the same filter.
    Values follow their keys' assignment. Returns the kept keys and values ``[H, m, D]``."""
    gather = lambda t, idx: t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    k_kept, v_kept = gather(keys, kept), gather(values, kept)
    if mode == "none" or evicted.shape[1] == 0:
        return k_kept, v_kept
    k_ev, v_ev = gather(keys, evicted).float(), gather(values, evicted).float()
    sim = F.normalize(k_ev, dim=-1) @ F.normalize(k_kept.float(), dim=-1).transpose(1, 2)  # [H, e, m]
    best, pivot = sim.max(dim=-1)  # [H, e]
    use = torch.ones_like(best, dtype=torch.bool)
    if mode in ("averaged", "weighted"):
        per_entry = best.mean(0)  # [e], averaged over heads
        use = (per_entry >= per_entry.mean()).expand_as(best)
    if mode == "pivotal":
        k_src, v_src = (k_ev + gather(k_kept.float(), pivot)) / 2, (v_ev + gather(v_kept.float(), pivot)) / 2
    elif mode == "averaged":
        k_src, v_src = k_ev, v_ev
    else:
        k_src, v_src = best[..., None] * k_ev, best[..., None] * v_ev
    # unused entries go to a spare slot m that is dropped after the reduction
    m = k_kept.shape[1]
    target = torch.where(use, pivot, torch.full_like(pivot, m))[..., None].expand(-1, -1, keys.shape[-1])
    out = []
    for base, src in ((k_kept, k_src), (v_kept, v_src)):
        padded = torch.cat([base.float(), base.new_zeros(base.shape[0], 1, base.shape[-1]).float()], dim=1)
        merged = padded.scatter_reduce(1, target, src, reduce="mean", include_self=True)
        out.append(merged[:, :m].to(base.dtype))
    return out[0], out[1]


# -- the whole cache -------------------------------------------------------------------------------------
@dataclass
class Compressed:
    """After ``compress_cache``: the new attention mask ``[B, n_max]`` and, per row, the entries held per
    layer and KV head before and after."""

    mask: torch.Tensor
    before: list[int]
    after: list[int]


def compress_cache(
    cache: Any,
    mask: torch.Tensor,
    is_image: torch.Tensor,
    specs: list[KVCompression | None],
    scores: dict[int, torch.Tensor] | None = None,
) -> Compressed:
    """Compress every layer of a prefilled ``cache`` in place, row by row (``specs[b]``: None or a full
    budget keeps row b whole). ``mask`` / ``is_image``: ``[B, L]`` of the prompt. Returns the new mask."""
    rows = mask.shape[0]
    columns = [torch.nonzero(mask[b]).flatten() for b in range(rows)]
    before = [len(c) for c in columns]
    kept_per_layer: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    counts: list[int] = before
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values
        heads = keys.shape[1]
        per_row, counts = [], []
        for b in range(rows):
            spec = specs[b]
            cols = columns[b]
            k, v = keys[b][:, cols], values[b][:, cols]  # [H, n, D]
            if spec is None or spec.is_full:
                per_row.append((k, v))
                counts.append(len(cols))
                continue
            method = KV_METHODS[spec.method]
            row_scores = scores[layer_idx][b][:, cols] if method.scores else None
            row = RowPrompt(cols, is_image[b, cols].bool(), row_scores)
            kept = method.select(row, spec, heads)
            if spec.method == "lookm" and spec.merge != "none":
                keep_mask = torch.zeros(heads, len(cols), dtype=torch.bool, device=cols.device)
                keep_mask.scatter_(1, kept, True)
                evicted_mask = ~keep_mask & row.is_image[None, :]
                e = int(evicted_mask[0].sum())
                evicted = torch.nonzero(evicted_mask)[:, 1].view(heads, e)
                k, v = merge_evicted(k, v, kept, evicted, spec.merge)
            else:
                index = kept[..., None].expand(-1, -1, k.shape[-1])
                k, v = k.gather(1, index), v.gather(1, index)
            per_row.append((k, v))
            counts.append(k.shape[1])
        kept_per_layer.append(per_row)
    n_max = max(counts)
    new_mask = torch.zeros(rows, n_max, dtype=mask.dtype, device=mask.device)
    for b, n in enumerate(counts):
        new_mask[b, n_max - n :] = 1
    for layer, per_row in zip(cache.layers, kept_per_layer):
        k0 = layer.keys
        new_k = k0.new_zeros(rows, k0.shape[1], n_max, k0.shape[-1])
        new_v = layer.values.new_zeros(rows, k0.shape[1], n_max, layer.values.shape[-1])
        for b, (k, v) in enumerate(per_row):
            new_k[b, :, n_max - k.shape[1] :] = k
            new_v[b, :, n_max - v.shape[1] :] = v
        layer.keys, layer.values = new_k, new_v
    return Compressed(new_mask, before, counts)


def cache_bytes_per_entry(cache: Any) -> int:
    """Bytes one token's keys and values take across all layers and KV heads."""
    return sum(
        (layer.keys.shape[1] * layer.keys.shape[-1]) * layer.keys.element_size()
        + (layer.values.shape[1] * layer.values.shape[-1]) * layer.values.element_size()
        for layer in cache.layers
    )
