"""The training loss against torch's own cross-entropy (the oracle), at chunk boundaries."""

import pytest
import torch
import torch.nn.functional as F

from gift_quant.train import cross_entropy as ce
from gift_quant.train.cross_entropy import causal_ce_sum


def _oracle(logits, labels):
    V = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, V),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _check_against_torch(monkeypatch, dtype, chunk_rows, device):
    V = 300
    monkeypatch.setitem(ce.CHUNK_BYTES, device, 4 * V * chunk_rows)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 17, V, generator=gen) * 4).to(device, dtype)
    labels = torch.randint(0, V, (3, 17), generator=gen).to(device)
    labels[0, 5] = labels[2, :4] = -100  # chat data: only some tokens are labels
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, ref = causal_ce_sum(a, labels, -100), _oracle(b, labels)
    (ours * 0.37).backward()
    (ref * 0.37).backward()
    assert ours.dtype == torch.float32
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert a.grad.dtype == dtype
    # the same fp32 gradient up to rounding; in bf16 it is rounded when stored and again when
    # scaled by the backward's incoming gradient (torch's once): within two units in the last
    # place (8 significant bits)
    rtol = {torch.bfloat16: 2**-6, torch.float16: 2**-9}.get(dtype, 1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=1e-7)
    assert a.grad[:, -1].abs().max() == 0  # the last position predicts nothing
    assert a.grad[2, :3].abs().max() == 0  # positions whose next token is no label


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_loss_and_gradient_match_torch(monkeypatch, dtype, chunk_rows):
    _check_against_torch(monkeypatch, dtype, chunk_rows, "cpu")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_loss_and_gradient_match_torch_on_cuda(monkeypatch, dtype, chunk_rows):
    _check_against_torch(monkeypatch, dtype, chunk_rows, "cuda")


def test_every_label_ignored_gives_zero():
    logits = torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = causal_ce_sum(logits, torch.full((2, 4), -100), -100)
    loss.backward()
    assert float(loss) == 0 and logits.grad.abs().max() == 0


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"logits \(2, 4, 10\) and labels \(2, 5\) differ"):
        causal_ce_sum(torch.randn(2, 4, 10), torch.zeros(2, 5, dtype=torch.long), -100)


def test_ignored_and_last_positions_add_nothing_whatever_their_logits_hold():
    """A masked vocabulary entry (-inf) that is never a label, and a NaN in the last position
    (which predicts no label): the loss and gradient stay finite, as torch's do on the shifted
    logits."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 50, generator=gen)
    logits[..., 0] = float("-inf")
    logits[:, -1] = float("nan")
    labels = torch.randint(1, 50, (2, 6), generator=gen)
    labels[1, 3] = -100
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, ref = causal_ce_sum(a, labels, -100), _oracle(b, labels)
    ours.backward()
    ref.backward()
    assert torch.isfinite(ours) and float(ours.detach()) == pytest.approx(
        float(ref.detach()), rel=1e-6
    )
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_a_strided_view_of_the_logits_is_taken_as_is():
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(2, 9, 80, generator=gen)
    labels = torch.randint(0, 40, (2, 9), generator=gen)
    a = wide.clone().requires_grad_()
    b = wide[..., :40].clone().requires_grad_()
    ours = causal_ce_sum(a[..., :40], labels, -100)  # not contiguous
    ref = _oracle(b, labels)
    ours.backward()
    ref.backward()
    assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    torch.testing.assert_close(a.grad[..., :40], b.grad, rtol=1e-5, atol=1e-7)
    assert a.grad[..., 40:].abs().max() == 0


def test_a_second_backward_is_refused_in_one_line():
    logits = torch.randn(1, 3, 5, generator=torch.Generator().manual_seed(3)).requires_grad_()
    loss = causal_ce_sum(logits, torch.tensor([[1, 2, 3]]), -100)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()
