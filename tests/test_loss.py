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


@pytest.mark.parametrize("weighting", ["token", "answer"])
@pytest.mark.parametrize("chunk_elements", [7 * 11, 2**28])  # several chunks of 7 rows, or one chunk
def test_fused_loss_equals_the_head_then_the_loss(monkeypatch, weighting, chunk_elements):
    """The fused loss (LM head only on labelled positions, chunked, gradients computed in the forward) gives
    the value and the gradients of the LM head's full logits followed by ``shifted_loss_terms``."""
    from mm import loss as loss_module

    monkeypatch.setattr(loss_module, "FUSED_CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(3)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(3, 9, 6, requires_grad=True)
    labels = torch.randint(0, 11, (3, 9))
    labels[:, :3] = -100
    labels[1, 5:7] = -100
    labels[2] = -100  # a row without labels
    total, weight = loss_module.shifted_loss_terms(head(hidden), labels, weighting)
    total.backward()
    want_h, want_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    fused_total, fused_weight = loss_module.fused_loss_terms(hidden, head, labels, weighting)
    fused_total.backward()
    assert torch.allclose(fused_total, total, atol=1e-5) and torch.equal(fused_weight, weight)
    assert torch.allclose(hidden.grad, want_h, atol=1e-6)
    assert torch.allclose(head.weight.grad, want_w, atol=1e-6)
    assert hidden.grad[2].abs().sum() == 0 and hidden.grad[:, -1].abs().sum() == 0  # no label, no gradient


def test_fused_loss_under_bf16_autocast_and_a_frozen_head():
    """bf16 autocast (how training runs on GPUs): logits in bf16, softmax in fp32, within bf16 rounding of
    the full-logits loss; a frozen head gets no gradient and the hidden states still do."""
    from mm.loss import fused_loss_terms, shifted_loss_terms

    torch.manual_seed(4)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 12, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = shifted_loss_terms(head(hidden), labels)
        got, _ = fused_loss_terms(hidden, head, labels)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-2)
    got.backward()
    assert head.weight.grad is None and hidden.grad.dtype == torch.float32 and hidden.grad.abs().sum() > 0


def test_loss_weight_survives_accelerates_fp32_output_conversion():
    """Under mixed precision accelerate rebuilds the model's output from its fields (``convert_to_fp32``):
    ``loss_weight`` is a field of ``VLMOutput``, so every rank still has the weight of its mean."""
    from accelerate.utils.operations import convert_to_fp32

    from mm.model import VLMOutput

    out = convert_to_fp32(
        VLMOutput(loss=torch.tensor(2.5, dtype=torch.bfloat16), loss_weight=torch.tensor(7.0))
    )
    assert isinstance(out, VLMOutput) and out.loss.dtype == torch.float32
    assert out.loss_weight == 7.0
