"""Shared by the op and module tests: the float64 reference of the fused op and the tolerance rule.

Reference: `F.cross_entropy` on logits materialized from the same inputs cast to float64, each row
multiplied by its sample weight, "mean" = Σ / (number of non-ignored rows, at least 1).
Tolerance (flash-attention's rule): the op's error against the float64 reference is at most twice the
error of the same plain PyTorch computation in the input dtype, plus a floor of 4 machine epsilons of the
reference's scale for the cases where plain PyTorch happens to be (almost) exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_inputs(n, d, c, dtype=torch.float32, *, bias=False, weighted=True, ignore_every=5, scale=1.0, seed=0):
    """hidden [n, d], weight [c, d], target [n] (every `ignore_every`-th row -100), s [n] or None, bias [c] or None."""
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * scale).to(dtype)
    weight = (torch.randn(c, d, generator=gen) / d ** 0.5).to(dtype)
    target = torch.randint(0, c, (n,), generator=gen)
    if ignore_every:
        target[::ignore_every] = -100
    s = torch.rand(n, generator=gen) * 2 if weighted else None
    b = (torch.randn(c, generator=gen) * 0.5).to(dtype) if bias else None
    return hidden, weight, target, s, b


def plain(hidden, weight, target, s, bias, *, dtype, eps=0.0, reduction="mean", upstream=None, ignore_index=-100,
          softcap=None, z_loss=0.0, class_weight=None):
    """Loss and gradients (hidden, weight, bias, sample weight) of plain PyTorch with every input cast to dtype:
    materialized logits (soft-capped c·tanh(z/c) when softcap), `F.cross_entropy(weight=class_weight)` per
    row, + z_loss·logsumexp², × s; "mean" divides by the rows' Σ class_weight[y] (else their count)."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = None if bias is None else bias.detach().to(dtype).requires_grad_()
    sw = (torch.ones(h.shape[0], dtype=dtype, device=h.device) if s is None else s.detach().to(dtype)).requires_grad_()
    cw = None if class_weight is None else class_weight.detach().to(dtype)
    logits = h @ w.t() if b is None else torch.addmm(b, h, w.t())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(logits, target, weight=cw, reduction="none", ignore_index=ignore_index,
                           label_smoothing=eps)
    valid = target != ignore_index
    if z_loss:
        rows = rows + z_loss * torch.where(valid, torch.logsumexp(logits, 1), 0) ** 2
    rows = rows * sw
    if cw is None:
        denom = valid.sum().clamp(min=1)
    else:
        denom = cw[target.clamp(min=0)][valid].sum()
    loss = {"mean": lambda: rows.sum() / denom, "sum": rows.sum, "none": lambda: rows}[reduction]()
    inputs = [t for t in (h, w, b, sw) if t is not None]
    grads = torch.autograd.grad(loss, inputs, None if upstream is None else upstream.to(dtype))
    grads = list(grads)
    db = grads.pop(2) if b is not None else None
    return loss.detach(), grads[0], grads[1], db, grads[-1]


EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float64: 2.0 ** -52}


def assert_close_rel(name, ours, ref, plain_value, dtype):
    """ours vs the float64 reference, allowed 2× plain PyTorch's own error in `dtype` + 4 eps of the scale."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    if not ref.numel():
        return
    err = float((ours.double() - ref.double()).abs().max())
    plain_err = float((plain_value.double() - ref.double()).abs().max())
    floor = 4 * EPS[dtype] * float(ref.double().abs().max())
    assert err <= 2 * plain_err + floor + 1e-300, (
        f"{name}: error {err:.3g} > 2 × plain PyTorch's {plain_err:.3g} + {floor:.3g}")
