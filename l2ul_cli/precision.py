"""Reduced precision where the hardware runs it natively.

The attack and the stand-in images only need gradients that point the right way, so they can run
under bf16 autocast; the weight updates stay fp32 (projected gradients are small). bf16 pays only
where it is native: CUDA GPUs that support it, and CPUs with AVX-512 BF16 or AMX, on which
oneDNN runs bf16 convolutions. Elsewhere it is emulated and slower, so fp32 is kept.
"""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX (torch's own CPU capability probes; False if this torch lacks them)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """bfloat16 when ``amp`` and ``device`` runs it natively, else None (fp32)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    return None
