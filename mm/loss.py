"""Training losses: next-token cross entropy over labelled tokens, weighted per token or per answer.

Losses are computed as ``(weighted sum, total weight)`` terms so that several groups of rows (the prefix rows
and the branch groups of branched training) share one mean, exactly as if they were one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from data.templates import IGNORE_INDEX

WEIGHTINGS = ("token", "answer")


def shifted_loss_terms(
    logits: torch.Tensor, labels: torch.Tensor, weighting: str = "token"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross entropy of ``logits`` against ``labels`` as (weighted sum, total weight).

    ``"token"``: every labelled token weighs 1 (HF's mean). ``"answer"``: every answer (a run of labelled
    tokens) weighs the same, each of its n tokens 1/n, so long answers (captions, boxes) do not drown one-word
    answers. Vectorised: run ids come from a cumulative sum over run starts.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten().clamp_min(0), reduction="none"
    ).view_as(targets)
    if weighting == "token":
        weights = valid.float()
    else:
        starts = valid & ~torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
        run_id = torch.cumsum(starts.flatten().long(), 0).view_as(valid) * valid  # 0: unlabelled
        counts = torch.zeros(int(run_id.numel()) + 1, device=labels.device).scatter_add_(
            0, run_id.flatten(), valid.flatten().float()
        )
        weights = torch.where(valid, 1.0 / counts[run_id].clamp_min(1.0), torch.zeros_like(ce))
    return (ce * weights).sum(), weights.sum()


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
