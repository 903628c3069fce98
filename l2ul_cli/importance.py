"""MAS weight importance (Aljundi et al. 2018) on the forget images, and the penalty of Eq. 7.

Ω_i = mean over images of |∂‖g(x)‖²₂ / ∂θ_i| (Eq. 2), taken per sample: the absolute value is
inside the mean, so a batched gradient would not be the same quantity. Per-sample gradients come
from ``torch.func`` (``vmap`` over ``grad``) in chunks, with a plain per-image loop as a fallback
for models that ``vmap`` cannot trace. The model is measured in eval mode.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def mas_importance(
    model: nn.Module,
    images: torch.Tensor,
    *,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Raw MAS importance per parameter tensor (same shapes as the parameters)."""
    from torch.func import functional_call, grad, vmap

    # Every module's own mode, so a model with e.g. frozen BatchNorm in training gets it back.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    params = {n: p.detach() for n, p in _trainable(model).items()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    n_params = sum(p.numel() for p in params.values())
    if chunk_size is None:
        # Per-sample gradients hold chunk x n_params floats: keep that near 256 MB.
        chunk_size = int(max(1, min(64, 64_000_000 // max(1, n_params))))

    def sq_norm(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return out.float().pow(2).sum()

    per_sample = vmap(grad(sq_norm), in_dims=(None, 0))
    try:
        for start in range(0, images.shape[0], chunk_size):
            x = images[start:start + chunk_size]
            try:
                with warnings.catch_warnings():
                    # torch 2.11 on CUDA warns that adaptive pooling has no batching rule yet (a
                    # slower fallback, the same result): nothing a user of this tool can act on.
                    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
                    grads = per_sample(params, x)
                for n, g in grads.items():
                    total[n] += g.abs().sum(0)
            except (RuntimeError, NotImplementedError):
                # vmap cannot trace every model: the same quantity, one image at a time.
                live = _trainable(model)
                for xi in x:
                    out = model(xi.unsqueeze(0)).float().pow(2).sum()
                    for (n, _), g in zip(live.items(), torch.autograd.grad(out, list(live.values()))):
                        total[n] += g.abs()
            if progress is not None:
                progress(x.shape[0])
    finally:
        for m, mode in modes:  # parents first (modules() order), so each module ends as it was
            m.train(mode)
    return {n: t / images.shape[0] for n, t in total.items()}


def mas_importance_batch(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The reference code's MAS estimate: per batch, the absolute value of the gradient of the
    batch's mean output L2 norm (not squared, not per image), BatchNorm in train mode on a copy
    of the model (so the running statistics of ``model`` stay), weighted by the batch's size."""
    import copy

    net = copy.deepcopy(model).train()
    params = _trainable(net)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size]
        loss = net(x).float().norm(dim=1).mean()
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                total[n] += g.abs() * x.shape[0]
        if progress is not None:
            progress(x.shape[0])
    return {n: t / images.shape[0] for n, t in total.items()}


def normalise(importance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Min-max normalise each tensor to [0, 1] (Algorithm 2). A constant tensor maps to 0."""
    out = {}
    for n, t in importance.items():
        lo, hi = t.min(), t.max()
        span = hi - lo
        out[n] = (t - lo) / span if span > 0 else torch.zeros_like(t)
    return out


class ImportancePenalty:
    """λ Σ_i (1 − Ω̂_i)(θ_i − θ̃_i)²: weights unimportant for the forget images stay put.

    θ̃ is ``model``'s weights now, or ``anchor``'s (the same network before earlier requests)."""

    def __init__(self, model: nn.Module, importance: dict[str, torch.Tensor], lam: float = 1.0,
                 anchor: nn.Module | None = None):
        norm = normalise(importance)
        self.lam = lam
        self.weight = {n: (1.0 - w).detach() for n, w in norm.items()}
        source = dict(anchor.named_parameters()) if anchor is not None else _trainable(model)
        self.anchor = {n: p.detach().clone() for n, p in source.items() if n in self.weight}
        self._diff: dict[str, torch.Tensor] = {}  # θ − θ̃ of add_gradient

    def __call__(self, model: nn.Module) -> torch.Tensor:
        terms = [
            (self.weight[n] * (p - self.anchor[n]).pow(2)).sum()
            for n, p in model.named_parameters()
            if n in self.weight
        ]
        return self.lam * torch.stack(terms).sum()

    @torch.no_grad()
    def add_gradient(self, model: nn.Module) -> None:
        """Add the penalty's gradient, 2λ(1 − Ω̂)(θ − θ̃), to every ``.grad`` already there (the
        others are held still, so add nothing): what backpropagating ``self(model)`` does, in a
        few fused (foreach) kernels instead of several per tensor, which were most of an update
        step's kernel launches on a GPU. θ − θ̃ goes to buffers kept from step to step: a fresh
        allocation of the size of the model each step took half of this on a CPU. The value is
        not computed (see ``__call__``)."""
        live = [(n, p) for n, p in model.named_parameters() if n in self.weight and p.grad is not None]
        if not live:
            return
        diffs = [self._diff.setdefault(n, torch.empty_like(p)) for n, p in live]
        torch._foreach_copy_(diffs, [p.detach() for _, p in live])
        torch._foreach_sub_(diffs, [self.anchor[n] for n, _ in live])
        torch._foreach_addcmul_([p.grad for _, p in live], diffs, [self.weight[n] for n, _ in live], value=2.0 * self.lam)
