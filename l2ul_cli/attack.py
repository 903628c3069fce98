"""Targeted L2-PGD (Madry et al.) in [0, 1] pixel space, batched over instances x copies.

Algorithm 1 of Cha et al. attacks each forget image N_adv times; here every copy of every image
is one row of a single batch (chunked to fit memory), so the attack costs
``ceil(k * N_adv / batch_size) * steps`` forward+backward passes and no Python work per copy
in the steps. Each copy's random start comes from its own seed, so the result does not depend on
the chunk size. Gradients are taken with respect to the inputs only; the model's parameters,
``.grad`` fields and every module's train/eval mode are left as they were.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def draw_targets(
    labels: torch.Tensor, num_classes: int, n_adv: int, generator: torch.Generator, *, per_copy: bool = False
) -> torch.Tensor:
    """For each label, ``n_adv`` attack targets drawn uniformly among the *other* classes.

    Shape ``(len(labels), n_adv)``. Algorithm 1 draws one target per image and attacks it
    ``n_adv`` times (``per_copy=False``); ``per_copy=True`` draws a target for every copy.
    Adding an offset in [1, C-1] modulo C is uniform over the C-1 other classes and never
    returns the label itself (the reference code's draw is biased; this one is not).
    """
    if num_classes < 2:
        raise ValueError("a targeted attack needs at least two classes")
    offsets = torch.randint(1, num_classes, (labels.numel(), n_adv if per_copy else 1), generator=generator)
    return ((labels.view(-1, 1).cpu() + offsets) % num_classes).expand(-1, n_adv).contiguous()


def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _pgd_step(model, x, y, delta, eps, step_size, autocast_dtype, cache=True) -> torch.Tensor:
    """One descent step on the targeted loss, then back into the L2 ball and [0, 1]."""
    delta = delta.detach().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None, cache_enabled=cache):
        logits = model(x + delta)
    # Sum, not mean: each row's gradient is independent of the chunk size.
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, delta)
    with torch.no_grad():
        step = grad / _l2_norm(grad).clamp_min(1e-12)
        delta = delta - step_size * step  # descend: towards the target class
        norm = _l2_norm(delta)
        delta = delta * torch.clamp(eps / norm.clamp_min(1e-12), max=1.0)
        return (x + delta).clamp(0, 1) - x


def _graphed_steps(model, x, y, delta, steps, eps, step_size, autocast_dtype) -> torch.Tensor:
    """``steps`` PGD steps, the first few eagerly on a side stream (CUDA graphs need warm
    kernels and allocator), the rest as replays of one captured step that updates ``delta``
    in place. Autocast's weight cache must be off under capture."""
    state = delta.detach().clone()

    def step() -> None:
        state.copy_(_pgd_step(model, x, y, state, eps, step_size, autocast_dtype, cache=False))

    warm = min(steps, 3)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warm):
            step()
    torch.cuda.current_stream().wait_stream(side)
    if steps > warm:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(steps - warm):
            graph.replay()
    return state


def _start(x: torch.Tensor, noise: torch.Tensor, radii: torch.Tensor, eps: float, start_at: str) -> torch.Tensor:
    """The first perturbation. ``ball``: the Gaussian ``noise`` as a direction, at a uniform
    share ``radii`` of ``eps``. ``noise``: the uniform ``noise`` image itself, the perturbation
    towards it cut to ``eps`` (advertorch's L2 start, which the reference code uses)."""
    if start_at == "noise":
        delta = noise - x
        delta = delta * torch.clamp(eps / _l2_norm(delta).clamp_min(1e-12), max=1.0)
    else:
        radius = radii.view(-1, *([1] * (x.dim() - 1))).to(x.device)
        delta = noise / _l2_norm(noise).clamp_min(1e-12) * radius * eps
    return (x + delta).clamp(0, 1) - x


def pgd_l2_targeted(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    eps: float = 1.0,
    step_size: float = 0.1,
    steps: int = 100,
    random_start: bool = True,
    start_at: str = "ball",
    generator: torch.Generator | None = None,
    batch_size: int = 1024,
    autocast_dtype: torch.dtype | None = None,
    cuda_graph: bool = False,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Move each image towards its target class within an L2 ball of radius ``eps``.

    ``images`` in [0, 1] (N x C x H x W) and ``targets`` (N,) on the model's device. Returns
    adversarial images in [0, 1], same shape and device. ``progress(n)`` is called with the
    number of images finished after each chunk. ``autocast_dtype`` (e.g. bfloat16 on CUDA)
    runs forward/backward in reduced precision; the perturbation itself stays fp32.
    ``start_at``: where a random start lies (:func:`_start`).
    ``cuda_graph`` (CUDA only; ignored elsewhere) replays each chunk's step as one CUDA graph:
    the same kernels without a Python launch per op, which is what bounds a small model.
    """
    # Every module's own mode, so a model with e.g. frozen BatchNorm in training gets it back.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = torch.empty_like(images)
    n = images.shape[0]
    if random_start and eps > 0:
        # One seed and one radius per row, drawn up front: a row's random start does not depend
        # on the chunk size (halved on CUDA out-of-memory), so a seeded run gives the same images.
        row_seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
        radii = torch.rand((n,), generator=generator)
    try:
        for start in range(0, n, batch_size):
            x = images[start:start + batch_size].detach().float()
            y = targets[start:start + batch_size]
            delta = torch.zeros_like(x)
            if random_start and eps > 0:
                rows = range(start, start + x.shape[0])
                draw = torch.rand if start_at == "noise" else torch.randn
                noise = torch.stack([
                    draw(x.shape[1:], generator=torch.Generator().manual_seed(row_seeds[i])) for i in rows
                ]).to(x.device)
                delta = _start(x, noise, radii[start:start + x.shape[0]], eps, start_at)
            if cuda_graph and x.is_cuda:
                delta = _graphed_steps(model, x, y, delta, steps, eps, step_size, autocast_dtype)
            else:
                for _ in range(steps):
                    delta = _pgd_step(model, x, y, delta, eps, step_size, autocast_dtype)
            out[start:start + x.shape[0]] = (x + delta).detach().to(out.dtype)
            if progress is not None:
                progress(x.shape[0])
    finally:
        for m, mode in modes:  # parents first (modules() order), so each module ends as it was
            m.train(mode)
    return out


def adversarial_set(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    n_adv: int,
    generator: torch.Generator,
    per_copy_targets: bool = False,
    **attack_kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N_adv targeted adversarial copies of each image.

    Returns ``(x_adv, target, source)``: ``k * n_adv`` images, their attack targets and the
    index of the image each came from.
    """
    device = images.device
    targets = draw_targets(labels, num_classes, n_adv, generator, per_copy=per_copy_targets).to(device).flatten()
    source = torch.arange(images.shape[0], device=device).repeat_interleave(n_adv)
    x = images.repeat_interleave(n_adv, dim=0)
    x_adv = pgd_l2_targeted(model, x, targets, generator=generator, **attack_kwargs)
    return x_adv, targets, source
