"""Per-answer loss weighting: each run of labelled tokens weighs the same, whatever its length."""

import pytest
import torch
import torch.nn.functional as F

from mm.loss import causal_lm_loss


def answer_weighted_loss(logits, labels):
    return causal_lm_loss(logits, labels, "answer")


def test_each_answer_weighs_the_same():
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 5)
    labels = torch.tensor([[-100, -100, 1, 2, 3, -100, 4], [-100, 0, -100, -100, 2, 2, -100]])
    targets = labels[:, 1:].reshape(-1).clamp_min(0)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 5), targets, reduction="none")
    # shifted targets: row 0 has answers of 3 and 1 tokens, row 1 answers of 1 and 2 tokens
    weights = torch.tensor([[0, 1 / 3, 1 / 3, 1 / 3, 0, 1], [1, 0, 0, 0.5, 0.5, 0]])
    expected = (ce.view(2, 6) * weights).sum() / weights.sum()
    assert torch.allclose(answer_weighted_loss(logits, labels), expected)


def test_single_token_answers_match_the_token_mean():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 4)
    labels = torch.tensor([[-100, 2, -100, 3, -100, 1]])
    token_mean = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    assert torch.allclose(answer_weighted_loss(logits, labels), token_mean)


def test_unknown_weighting_is_rejected():
    with pytest.raises(
        ValueError, match="loss weighting must be one of \\('token', 'answer'\\), got 'tokens'"
    ):
        causal_lm_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), "tokens")
