"""How many images a backward pass can take at once on this device.

Stand-ins are optimised in batches of up to 256 images (their statistics are matched per batch).
At 28 px that is nothing; a ResNet-50 at 224 px keeps 124 MiB per image for the backward pass
(63 MiB in bf16), so a batch of 256 wants 16 GiB (31 GiB in fp32), and a 23 GB CPU machine's
process was killed for memory (benchmarks/RESULTS.md "One request at 224×224: memory of the
stand-ins"). The batch is therefore sized from what the model itself keeps per image, measured
once on two tiny batches, and the memory the device has free. An update step of the default
(the forget images and 64 adversarial rows: about 10 GB at 224 px in fp32) is split the same way
(:func:`logits_in_parts`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

Replay = Callable[[], None] | None  # the rest of a step's backward pass when it is split (logits_in_parts)
SHARE = 0.5  # of the free memory a batch's saved activations may take: room for the rest of the step


def free_bytes(device: torch.device) -> int | None:
    """Memory free on ``device`` now: the GPU's free memory, or the system's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def saved_bytes_per_image(model: nn.Module, image_shape: tuple[int, ...], device: torch.device,
                          autocast_dtype: torch.dtype | None = None, forward=None) -> int:
    """Bytes the autograd graph keeps per image for a gradient with respect to the input.

    Counted with saved-tensor hooks on batches of one and of two images: the difference leaves out
    what does not grow with the batch (weights, their reduced-precision copies). ``forward``
    (default: the model's) may add the caller's own hooks' tensors.
    """
    # A model in train mode would fold the random batches into its BatchNorm running statistics.
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        counts = _count_saved(forward or model, image_shape, device, autocast_dtype)
    finally:
        with torch.no_grad():
            for b, kept in buffers:
                b.copy_(kept)
    return max(counts[1] - counts[0], 1)


def _count_saved(forward, image_shape: tuple[int, ...], device: torch.device,
                 autocast_dtype: torch.dtype | None) -> list[int]:
    """The bytes saved for backward by ``forward`` on a batch of one image and on one of two."""
    counts = []
    for n in (1, 2):
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.rand((n, *image_shape), device=device, requires_grad=True)
        amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            forward(x)
        counts.append(total)
    return counts


def rows_that_fit(model: nn.Module, image_shape: tuple[int, ...], device: torch.device, cap: int,
                  autocast_dtype: torch.dtype | None = None, forward=None, floor: int = 8) -> int:
    """The largest batch up to ``cap`` whose saved activations take at most SHARE of the free
    memory (never under ``floor``; ``cap`` when the free memory is unknown)."""
    free = free_bytes(device)
    if free is None:
        return cap
    per = saved_bytes_per_image(model, image_shape, device, autocast_dtype, forward)
    return max(floor, min(cap, int(free * SHARE) // per))


def logits_in_parts(model: nn.Module, batch: torch.Tensor, rows: int) -> tuple[torch.Tensor, Replay]:
    """``model(batch)`` for a loss whose backward pass must fit in passes of ``rows`` rows.

    When the batch fits, the logits with their graph and no replay. Otherwise the logits without a
    graph, as a leaf that requires grad, and ``replay``: called after the loss's backward (which
    stops at the leaf), it runs each part's forward again and backpropagates its share of the
    leaf's gradient, so the parameters get the same gradient as from one pass (the model must be
    deterministic: BatchNorm frozen). One more forward pass per step, only when memory asks for it.
    """
    if batch.shape[0] <= rows:
        return model(batch), None
    parts = batch.split(rows)
    with torch.no_grad():
        leaf = torch.cat([model(p) for p in parts]).requires_grad_(True)

    def replay() -> None:
        for p, g in zip(parts, leaf.grad.split(rows)):
            model(p).backward(g)

    return leaf, replay
