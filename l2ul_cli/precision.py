"""The precision of the attack and the stand-in images: ``auto``, ``fp32`` or ``bf16``.

Both only need gradients that point the right way, so they can run under bf16 autocast; the
weight updates always stay fp32 (projected gradients are small). ``auto`` uses bf16 on CUDA GPUs
that support it and fp32 on CPUs: on a CPU with native bf16 (AVX-512 BF16) it made the attack
and stand-ins of the benchmark's ResNet-18 1.6x faster but those of the example lcnet_050, whose
convolutions are depthwise and narrow, 1.7x slower (benchmarks/RESULTS.md), so on a CPU it is
the user's call (``bf16``).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

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


def describe(dtype: torch.dtype | None, device: torch.device) -> str:
    """What the report says about the precision that ran."""
    if dtype is None:
        return "fp32"
    emulated = device.type == "cpu" and not cpu_has_native_bf16()
    return f"{str(dtype).removeprefix('torch.')} autocast (attack, stand-ins){', emulated on this CPU' if emulated else ''}"
