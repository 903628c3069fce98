"""Stand-in images for the training data, made from the model (and at most the request's own images).

BatchNorm layers remember the mean and variance of their inputs over the training set. Images
optimised so that every BatchNorm layer sees those statistics while the classifier is confident
of a chosen class (the recipe of DeepInversion, Yin et al., CVPR 2020) make layers respond as to
training data: good enough to tell :mod:`.projection` which input directions training-like
images use. They are not meant to look like the data.

Networks without BatchNorm (ViT, ConvNeXt: LayerNorm keeps no statistics) get the same
inversion towards statistics measured on the request's images instead (:func:`input_statistics`,
:func:`invert_statistics`), or, as an experiment, :func:`class_dead_leaves`: dead-leaves images
(occluding discs with power-law radii, Baradad et al., NeurIPS 2021) moved a few steps towards a
class.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


BATCH = 256  # images optimised together (the norm layers' statistics are matched per batch)


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers that keep running statistics (track_running_stats)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(_batchnorms(model))


def _channel_statistics(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance over every other dimension."""
    x = x.float().movedim(channel_dim, 1)
    dims = [0] + list(range(2, x.dim()))
    # Two plain reductions: Tensor.var (Welford) took a quarter of each step on a CPU.
    mean = x.mean(dims, keepdim=True)
    return mean.flatten(), (x - mean).square().sum(dims) / (x.numel() // x.shape[1])


def _channel_dim(module: nn.Module, x: torch.Tensor) -> int:
    """Where a norm layer's input keeps its channels: dimension 1 for BatchNorm, GroupNorm and
    the NCHW LayerNorms (timm's and torchvision's ``LayerNorm2d`` family, ConvNeXt), the last
    dimension for token and channels-last LayerNorms (ViT, ConvNeXt blocks)."""
    if not isinstance(module, nn.LayerNorm) or "2d" in type(module).__name__.lower():
        return 1
    return x.dim() - 1 if x.shape[-1] == module.normalized_shape[-1] else 1


def _statistics_hook(distances: list[torch.Tensor], mean: torch.Tensor, var: torch.Tensor) -> Callable:
    """A forward hook that appends the distance of its input's per-channel statistics to ``mean``, ``var``."""

    def hook(module, inputs, _output):
        got_mean, got_var = _channel_statistics(inputs[0], _channel_dim(module, inputs[0]))
        distances.append((got_mean - mean).norm() + (got_var - var).norm())

    return hook


def _norms(model: nn.Module) -> list[nn.Module]:
    """The layers whose input statistics :func:`input_statistics` measures."""
    return _batchnorms(model) + [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]


def input_statistics(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and variance of every BatchNorm's, LayerNorm's and GroupNorm's input over ``images``:
    for a network without BatchNorm, the statistics :func:`invert_statistics` matches instead
    of running ones."""
    sums: dict[nn.Module, list[torch.Tensor]] = {}

    def hook(module, inputs, _output):
        x = inputs[0].double().movedim(_channel_dim(module, inputs[0]), -1)
        x = x.reshape(-1, x.shape[-1])
        got = sums.setdefault(module, [0.0, 0.0, 0])
        got[0], got[1], got[2] = got[0] + x.sum(0), got[1] + x.square().sum(0), got[2] + x.shape[0]

    handles = [m.register_forward_hook(hook) for m in _norms(model)]
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                model(images[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for m, (s1, s2, n) in sums.items():
        mean = s1 / n
        out[m] = (mean.float(), (s2 / n - mean.square()).clamp_min(0).float())
    return out


def _optimise(model: nn.Module, z: torch.Tensor, y: torch.Tensor, distances: list[torch.Tensor], *, steps: int,
              lr: float, tv_weight: float, autocast_dtype: torch.dtype | None,
              progress: Callable[[int], None] | None) -> torch.Tensor:
    """Adam on the pixel logits ``z`` of one batch; the images, sigmoid(z). The parameters need
    no gradient meanwhile (restored after)."""
    requires = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        return _descend_pixels(model, z, y, distances, steps=steps, lr=lr, tv_weight=tv_weight,
                               autocast_dtype=autocast_dtype, progress=progress)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)


def _descend_pixels(model: nn.Module, z: torch.Tensor, y: torch.Tensor, distances: list[torch.Tensor], *, steps: int,
                    lr: float, tv_weight: float, autocast_dtype: torch.dtype | None,
                    progress: Callable[[int], None] | None) -> torch.Tensor:
    z = z.requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    device = z.device
    for _ in range(steps):
        distances.clear()
        x = torch.sigmoid(z)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x).float()
        tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        loss = F.cross_entropy(logits, y) + tv_weight * tv
        if distances:  # the BatchNorm statistics' distances, when there are layers to hook
            loss = loss + torch.stack(distances).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(1)
    return torch.sigmoid(z).detach()


def invert_batchnorm(model: nn.Module, n: int, image_shape: tuple[int, int, int], num_classes: int,
                     **kw) -> torch.Tensor:
    """``n`` images in [0, 1] (classes in turn) whose BatchNorm statistics match the model's
    running ones (:func:`invert_statistics`)."""
    bns = _batchnorms(model)
    if not bns:
        raise ValueError("the model has no BatchNorm statistics to invert")
    return invert_statistics(model, {m: (m.running_mean, m.running_var) for m in bns}, n, image_shape, num_classes, **kw)


def invert_statistics(
    model: nn.Module,
    targets: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]],
    n: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    steps: int = 200,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    seed: int = 0,
    batch_size: int = BATCH,
    autocast_dtype: torch.dtype | None = None,  # e.g. bfloat16 (precision.autocast_dtype)
    progress: Callable[[int], None] | None = None,  # called once per optimisation step
) -> torch.Tensor:
    """``n`` images in [0, 1] (classes in turn) whose inputs to each of ``targets``' layers have
    that layer's per-channel mean and variance.

    Loss per batch: cross-entropy to the chosen classes + Σ over the layers of the L2 distance
    between the batch's per-channel mean/variance and the target ones + a small total-variation
    term. Parameters are not changed; the model is left in eval mode. Under ``autocast_dtype``
    the model runs in that precision; the images and the statistics stay fp32.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    distances: list[torch.Tensor] = []

    handles = [m.register_forward_hook(_statistics_hook(distances, mean.float().to(device), var.float().to(device)))
               for m, (mean, var) in targets.items()]
    model.eval()
    out: list[torch.Tensor] = []

    try:
        start = 0
        while start < n:
            m = min(batch_size, n - start)
            state = gen.get_state()
            try:
                z = (torch.randn((m, *image_shape), generator=gen) * 0.5).to(device)
                out.append(_optimise(model, z, (torch.arange(start, start + m) % num_classes).to(device), distances,
                                     steps=steps, lr=lr, tv_weight=tv_weight, autocast_dtype=autocast_dtype,
                                     progress=progress))
            except torch.cuda.OutOfMemoryError:
                if batch_size <= 8:
                    raise
                batch_size //= 2  # big images on a small GPU: smaller batches
                gen.set_state(state)
                distances.clear()
                torch.cuda.empty_cache()
                continue
            start += m
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


def dead_leaves(n: int, image_shape: tuple[int, int, int], generator: torch.Generator, discs: int = 64,
                smallest: float = 0.03, largest: float = 0.5) -> torch.Tensor:
    """``n`` dead-leaves images in [0, 1]: ``discs`` discs each, later ones on top, radii (as
    a share of the side) with density ∝ r⁻³ between ``smallest`` and ``largest``, one random
    level per channel; the background is the level of a first, covering disc."""
    c, h, w = image_shape
    ys = torch.linspace(0, 1, h).view(1, h, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, w) * (w / h)
    out = torch.rand((n, c, 1, 1), generator=generator).expand(n, c, h, w).clone()
    lo, hi = smallest ** -2, largest ** -2
    for _ in range(discs):  # inverse CDF of r^-3 on [smallest, largest]
        r = (lo + torch.rand(n, generator=generator) * (hi - lo)) ** -0.5
        cy, cx = torch.rand(n, generator=generator), torch.rand(n, generator=generator) * (w / h)
        inside = ((ys - cy.view(n, 1, 1)) ** 2 + (xs - cx.view(n, 1, 1)) ** 2) <= r.view(n, 1, 1) ** 2
        level = torch.rand((n, c, 1, 1), generator=generator)
        out = torch.where(inside.unsqueeze(1), level, out)
    return out


def class_dead_leaves(
    model: nn.Module,
    n: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    steps: int = 50,
    lr: float = 0.05,
    tv_weight: float = 1e-4,
    seed: int = 0,
    batch_size: int = BATCH,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``n`` stand-ins for a network without BatchNorm: dead-leaves images moved by ``steps``
    Adam steps on cross-entropy to a class (classes in turn) and a small total-variation term,
    starting from the images themselves (few steps, small lr: they keep their statistics)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        z = torch.logit(dead_leaves(m, image_shape, gen).clamp(0.02, 0.98)).to(device)
        y = (torch.arange(start, start + m) % num_classes).to(device)
        out.append(_optimise(model, z, y, [], steps=steps, lr=lr, tv_weight=tv_weight,
                             autocast_dtype=autocast_dtype, progress=progress))
    return torch.cat(out)
