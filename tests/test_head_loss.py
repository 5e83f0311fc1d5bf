"""The last stage's loss on loss tokens only (`mlora_pp.head_loss`) against plain PyTorch:
`F.cross_entropy` over every position of full logits, with an ignore index, as transformers trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from mlora_pp.data import IGNORE_INDEX
from mlora_pp.head_loss import LossTokens, chunk_tokens, linear_cross_entropy
from mlora_pp.memory import SavedTensorMeter
from mlora_pp.model import build_stage
from mlora_pp.tiny import make_tiny_model


def make_labels(rows: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Random targets with a prompt (ignored) at each row's start and padding (ignored) at its end."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows, length), generator=gen)
    for r in range(rows):
        prompt = int(torch.randint(1, length // 2, (1,), generator=gen))
        pad = int(torch.randint(0, length // 3, (1,), generator=gen))
        labels[r, :prompt] = IGNORE_INDEX
        labels[r, length - pad:] = IGNORE_INDEX
    return labels


def plain_loss(logits: torch.Tensor, labels: torch.Tensor, parts, weights) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference: each part's summed cross-entropy over all its positions, weighted and added."""
    total, sums = logits.new_zeros(()), []
    for (start, end), weight in zip(parts, weights):
        ce = F.cross_entropy(logits[start:end, :-1].reshape(-1, logits.shape[-1]), labels[start:end, 1:].reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
        sums.append(ce.detach())
        total = total + ce * weight
    return total, sums


def test_loss_tokens_are_the_labelled_next_positions():
    labels = torch.full((3, 5), IGNORE_INDEX)
    labels[0, 2], labels[0, 4] = 7, 8  # predicted from positions 1 and 3
    labels[1, 0] = 9  # labels[0] never counts: nothing predicts it
    labels[2, 1:4] = torch.tensor([1, 2, 3])
    where = LossTokens.find(labels, [(0, 2), (2, 3)], [0.5, 0.25])
    assert where.positions.tolist() == [0 * 5 + 1, 0 * 5 + 3, 2 * 5 + 0, 2 * 5 + 1, 2 * 5 + 2]
    assert where.targets.tolist() == [7, 8, 1, 2, 3]
    assert where.counts == (2, 3)
    assert where.part_of.tolist() == [0, 0, 1, 1, 1]
    assert where.weights.tolist() == [0.5, 0.5, 0.25, 0.25, 0.25]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_loss_and_input_gradient_equal_cross_entropy_on_full_logits(dtype, chunk):
    rows, length, d, vocab = 5, 11, 24, 97
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(rows, length, d, generator=gen).to(dtype).requires_grad_(True)
    weight = (torch.randn(vocab, d, generator=gen) * 0.3).to(dtype)
    labels = make_labels(rows, length, vocab, seed=2)
    parts, weights = [(0, 2), (2, 3), (3, 5)], [1 / 17, 1 / 5, 1 / 30]

    where = LossTokens.find(labels, parts, weights)
    selected = hidden.reshape(-1, d).index_select(0, where.positions)
    total, losses = linear_cross_entropy(selected, weight, where.targets, where.weights, chunk=chunk)
    (2.5 * total).backward()  # any upstream gradient, not only the 1 of loss.backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    sums = torch.zeros(len(parts)).index_add_(0, where.part_of, losses)

    ref_total, ref_sums = plain_loss((hidden @ weight.t()).float(), labels, parts, weights)
    (2.5 * ref_total).backward()
    torch.testing.assert_close(total.detach(), ref_total.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sums, torch.stack(ref_sums), rtol=1e-6, atol=0)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(ours.float(), hidden.grad.float(), **tol)
    assert not losses.requires_grad


def test_no_loss_token_gives_a_zero_gradient():
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    where = LossTokens.find(torch.full((2, 4), IGNORE_INDEX), [(0, 2)], [1.0])
    total, losses = linear_cross_entropy(hidden.reshape(-1, 8).index_select(0, where.positions),
                                         torch.randn(13, 8), where.targets, where.weights)
    total.backward()
    assert float(total.detach()) == 0.0 and losses.numel() == 0 and where.counts == (0,)
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_without_grad_only_the_losses_are_computed():
    hidden = torch.randn(6, 8, requires_grad=True)
    where = LossTokens.find(torch.randint(0, 13, (1, 7)), [(0, 1)], [1.0])
    weight = torch.randn(13, 8)
    with torch.no_grad():
        total, losses = linear_cross_entropy(hidden, weight, where.targets, where.weights)
    ref = F.cross_entropy(hidden.detach() @ weight.t(), where.targets, reduction="none")
    torch.testing.assert_close(losses, ref)
    assert not total.requires_grad


def test_chunks_hold_a_bounded_number_of_logits():
    assert chunk_tokens(128_256) == 256 * 2**20 // (4 * 128_256)
    assert chunk_tokens(10**12) == 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("head") / "m", layers=2, seed=4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stage_head_loss_equals_transformers_logits_and_cross_entropy(model_dir, dtype):
    """The last stage's loss and input gradient against transformers' own norm and lm_head."""
    stage = build_stage(model_dir, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=stage.dtype).eval()
    vocab = stage.config.vocab_size
    rows, length = 4, 9
    hidden = torch.randn(rows, length, stage.config.hidden_size, generator=torch.Generator().manual_seed(5))
    hidden = hidden.to(stage.dtype).requires_grad_(True)
    labels = make_labels(rows, length, vocab, seed=6)
    parts, weights = [(0, 3), (3, 4)], [1 / 11, 1 / 3]

    total, sums = stage.head_loss(hidden, LossTokens.find(labels, parts, weights))
    total.backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    logits = reference.lm_head(reference.model.norm(hidden)).float()
    ref_total, ref_sums = plain_loss(logits, labels, parts, weights)
    ref_total.backward()
    rtol = 1e-6 if dtype == "float32" else 1e-2
    torch.testing.assert_close(sums, torch.stack(ref_sums), rtol=rtol, atol=0)
    torch.testing.assert_close(ours.float(), hidden.grad.float(), rtol=rtol, atol=1e-7 if dtype == "float32" else 1e-4)


def test_stage_keeps_no_logits_for_backward(model_dir):
    """What autograd keeps from the head: the loss tokens' input gradient [n, d], not [tokens, vocab]
    fp32 log-probabilities of every position as the plain way keeps."""
    stage = build_stage(model_dir)
    d, vocab = stage.config.hidden_size, stage.config.vocab_size
    rows, length = 4, 64
    hidden = torch.randn(rows, length, d).requires_grad_(True)
    labels = make_labels(rows, length, vocab, seed=7)
    where = LossTokens.find(labels, [(0, rows)], [1.0])
    n = sum(where.counts)
    meter = SavedTensorMeter(list(stage.parameters()))
    with meter.measure() as ours:
        stage.head_loss(hidden, where)
    with meter.measure() as plain:
        plain_loss(stage.lm_head(stage.norm(hidden)).float(), labels, [(0, rows)], [1.0])
    assert n < rows * (length - 1)
    # the selected hidden states' norm and the gradient: a few [n, d] tensors, and nothing vocab-wide
    assert ours.bytes <= 4 * n * d * 4
    assert plain.bytes >= rows * (length - 1) * vocab * 4
