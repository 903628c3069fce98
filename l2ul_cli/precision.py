"""The precision of the attack and the stand-in images: ``auto``, ``fp32`` or ``bf16``.

Both only need gradients that point the right way, so they can run under bf16 autocast; the
weight updates always stay fp32 (projected gradients are small). ``auto`` uses bf16 on CUDA GPUs
that support it. On a CPU with native bf16 (AVX-512 BF16 or AMX) it depends on the model: bf16
made the attack and stand-ins of the benchmark's ResNet-18 1.6x faster but those of the example
lcnet_050, whose convolutions are depthwise and narrow, 1.7x slower (benchmarks/RESULTS.md). So
there :func:`choose` times the attack's pass in both and takes bf16 only where it clearly pays;
elsewhere on a CPU ``auto`` is fp32.
"""

from __future__ import annotations

import math
import time
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX (torch's own CPU capability probes; False if this torch lacks them)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(device: torch.device, precision: Precision = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got '{precision}')")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


MIN_GAIN = 1.25  # bf16 must be this much faster than fp32 for auto to take it on a CPU


def choose(model: nn.Module, image_shape: tuple[int, ...], device: torch.device, precision: Precision = "auto",
           *, batch: int | None = None) -> tuple[torch.dtype | None, str | None]:
    """The autocast dtype for ``precision``, and how auto chose where it measured.

    ``auto`` on a CPU with native bf16: one warm-up and the best of three forward passes with
    the input gradient (the attack's pass) on ``batch`` images of ``image_shape``, in fp32 and
    in bf16; bf16 if it is at least :data:`MIN_GAIN` times faster. The default batch is 128
    images of 28x28x1 or as many pixels (at least 8 images): smaller batches understate bf16's
    gain (ResNet-18: 1.1x at 32 images, 1.6x at 128 as in the attack). Under half a second for
    that ResNet-18 on 2 cores, small next to an attack of thousands of such passes."""
    dtype = autocast_dtype(device, precision)
    if precision != "auto" or device.type != "cpu" or not cpu_has_native_bf16():
        return dtype, None
    if batch is None:
        batch = max(8, min(128, round(128 * 784 / math.prod(image_shape))))
    x = torch.rand((batch, *image_shape), generator=torch.Generator().manual_seed(0)).to(device)
    fp32 = _pass_seconds(model, x, None)
    bf16 = _pass_seconds(model, x, torch.bfloat16)
    gain = fp32 / bf16
    chosen = torch.bfloat16 if gain >= MIN_GAIN else None
    return chosen, f"auto: bf16 timed at {gain:.2f}x fp32's speed on this CPU"


def _pass_seconds(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None, repeats: int = 3) -> float:
    modes = [(m, m.training) for m in model.modules()]  # each module's own, as the attack keeps them
    model.eval()
    best = float("inf")
    try:
        for i in range(repeats + 1):  # the first is a warm-up (kernel selection, allocation)
            t0 = time.perf_counter()
            xi = x.clone().requires_grad_(True)
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(xi)
            torch.autograd.grad(F.log_softmax(logits.float(), 1)[:, 0].sum(), xi)
            if i:
                best = min(best, time.perf_counter() - t0)
    finally:
        for m, training in modes:
            m.training = training
    return best


def describe(dtype: torch.dtype | None, device: torch.device, how: str | None = None) -> str:
    """What the report says about the precision that ran (``how``: :func:`choose`'s note)."""
    said = "fp32"
    if dtype is not None:
        emulated = device.type == "cpu" and not cpu_has_native_bf16()
        said = f"{str(dtype).removeprefix('torch.')} autocast (attack, stand-ins){', emulated on this CPU' if emulated else ''}"
    return f"{said} ({how})" if how else said
