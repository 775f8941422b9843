"""Training losses: next-token cross entropy over labelled tokens, weighted per token or per answer.

Losses are computed as ``(weighted sum, total weight)`` terms so that several groups of rows (the prefix rows
and the branch groups of branched training) share one mean, exactly as if they were one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from data.templates import IGNORE_INDEX

WEIGHTINGS = ("token", "answer")


def token_weights(labels: torch.Tensor, weighting: str = "token") -> torch.Tensor:
    """The loss weight of each next-token target ``labels[:, 1:]`` (0 where unlabelled).

    ``"token"``: every labelled token weighs 1 (HF's mean). ``"answer"``: every answer (a run of labelled
    tokens) weighs the same, each of its n tokens 1/n, so long answers (captions, boxes) do not drown one-word
    answers. Vectorised: run ids come from a cumulative sum over run starts.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    valid = labels[:, 1:] != IGNORE_INDEX
    if weighting == "token":
        return valid.float()
    starts = valid & ~torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
    run_id = torch.cumsum(starts.flatten().long(), 0).view_as(valid) * valid  # 0: unlabelled
    counts = torch.zeros(int(run_id.numel()) + 1, device=labels.device).scatter_add_(
        0, run_id.flatten(), valid.flatten().float()
    )
    return torch.where(
        valid, 1.0 / counts[run_id].clamp_min(1.0), torch.zeros(valid.shape, device=labels.device)
    )


def shifted_loss_terms(
    logits: torch.Tensor, labels: torch.Tensor, weighting: str = "token"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy of ``logits`` against ``labels`` as (weighted sum, total weight); the
    weights are ``token_weights``."""
    weights = token_weights(labels, weighting)
    targets = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten().clamp_min(0), reduction="none"
    ).view_as(targets)
    return (ce * weights).sum(), weights.sum()


# Logits of at most this many elements exist at once in the fused loss (1 GiB in fp32): Qwen2's 152k
# vocabulary gives chunks of ~1.8k tokens, a tiny vocabulary one chunk for the whole batch.
FUSED_CHUNK_ELEMENTS = 2**28


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T, target_i) without keeping ``[N, vocab]`` logits.

    The logits of one chunk of rows exist at a time; the gradients of ``hidden`` and ``weight`` are
    computed in the forward pass (softmax minus one-hot, times the weight) and scaled in the backward, as
    liger-kernel's fused linear cross entropy does. Logits in the matmul's dtype (bf16 under autocast),
    softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, chunk):  # noqa: D102
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, t, w = (
                hidden[start : start + chunk],
                targets[start : start + chunk],
                weights[start : start + chunk],
            )
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * w).sum()
            if need_h or need_w:
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                grad = grad.mul_(w[:, None]).to(h.dtype)
                if need_h:
                    grad_h[start : start + chunk] = grad @ weight.to(h.dtype)
                if need_w:
                    grad_w.add_((grad.t() @ h).float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def fused_loss_terms(
    hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, weighting: str = "token"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``shifted_loss_terms`` from the LLM's last hidden states ``[B, L, D]``: the LM head runs only on
    positions with a label, and full-vocabulary logits never exist for the whole batch (chunked, gradients
    computed on the fly). Same value and gradients as the LM head + ``shifted_loss_terms``.

    A head with a bias, or whose weight DeepSpeed ZeRO-3 has partitioned (gathered only inside the module's
    own call), runs as a module call on the labelled positions instead (still no logits elsewhere).
    """
    weights = token_weights(labels, weighting)
    valid = weights > 0
    h = hidden[:, :-1][valid]
    targets = labels[:, 1:][valid]
    w = weights[valid]
    weight = lm_head.weight
    if getattr(lm_head, "bias", None) is not None or hasattr(weight, "ds_id"):
        logits = lm_head(h).float()
        ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        return (ce * w).sum(), weights.sum()
    chunk = max(1, FUSED_CHUNK_ELEMENTS // weight.shape[0])
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h = h.to(dtype)
    return _LinearCrossEntropy.apply(h, weight, targets, w, chunk), weights.sum()


def mean_loss(terms: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One mean over several ``shifted_loss_terms`` results."""
    return sum(t for t, _ in terms) / sum(w for _, w in terms).clamp_min(1e-9)


def loss_weight(terms: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The total weight behind ``mean_loss(terms)`` (detached): what several processes' means are weighed by
    to make one mean over their global batch."""
    return sum(w for _, w in terms).detach()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weighting: str = "token") -> torch.Tensor:
    """Next-token cross entropy of one batch (``"token"``: the usual HF mean over labelled tokens)."""
    return mean_loss([shifted_loss_terms(logits, labels, weighting)])
