"""Checkpoints written by ``torch.save``: read safely, whatever training script wrote them.

Only ``torch.load(weights_only=True)`` is used, with a short list of harmless types allowed
through torch's safe-globals mechanism: ``argparse.Namespace`` (the ``args`` of timm's
``train.py`` and of torchvision's reference scripts) and numpy's scalar, array and dtype
reconstruction (timm's ``metric`` may be a numpy float). Anything else is refused, naming the
global the file needs; it is never retried unsafely.

Layouts: a plain state dict; timm ``train.py`` (``state_dict``, optional ``state_dict_ema``,
``arch``, ``args``…); torchvision references (``model``, optional ``model_ema``, ``args``…).
"""

from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import WEIGHT_CHOICES, Weights
from .errors import CheckpointError, first_line

MODEL_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema")
_EMA_COUNTERS = ("n_averaged",)  # torch.optim.swa_utils.AveragedModel's step count, not a weight


def allowed_globals() -> list[Any]:
    """The harmless types a training checkpoint may hold besides tensors and containers."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    dtypes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None)) if n.endswith("DType")] \
        if hasattr(np, "dtypes") else []
    return [argparse.Namespace, multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


@dataclass
class WeightsFound:
    """The weights found in a torch.save file, which of its weights they are, and why."""

    state_dict: dict[str, torch.Tensor]
    weights_used: str  # "model", "ema", or "state_dict" for a plain state dict
    weights_reason: str
    meta: dict[str, Any] = field(default_factory=dict)


def _offending(path: Path, exc: Exception) -> list[str]:
    """The globals the file needs that are not allowed (never by running the pickle)."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError, pickle.UnpicklingError):  # not the zip format
        names = re.findall(r"GLOBAL (\S+)", str(exc))
    return [n for n in names if n not in allowed]


def load_pickle(path: Path, weights: Weights = "auto") -> WeightsFound:
    """Read a torch.save file with only the allowed globals; pick its weights."""
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        bad = _offending(path, exc)
        needs = f"it needs {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''}, which is" if bad else \
            "it holds objects that are"
        raise CheckpointError(
            f"{path}: refused: {needs} not among the harmless types allowed (tensors, containers, "
            "argparse.Namespace, numpy scalars and arrays), and loading it could run code (only weights_only=True "
            "is used); convert it to .safetensors in a trusted environment"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first_line(exc)})") from exc
    return choose_weights(obj, path, weights)


def _tensors(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def choose_weights(obj: Any, path: Path, weights: Weights = "auto") -> WeightsFound:
    """The state dict of a loaded checkpoint object: the model's, or its EMA (``weights``;
    ``auto``: the model's when present, else the EMA)."""
    if weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"weights must be one of {', '.join(WEIGHT_CHOICES)} (got {weights!r})")
    if _tensors(obj):
        if weights == "ema":
            raise CheckpointError(f"{path}: a plain state dict, no EMA weights (state_dict_ema or model_ema)")
        return WeightsFound(obj, "state_dict", "the file is a plain state dict")
    model = next((k for k in MODEL_KEYS if _tensors(obj.get(k))), None) if isinstance(obj, dict) else None
    ema = next((k for k in EMA_KEYS if _tensors(obj.get(k))), None) if isinstance(obj, dict) else None
    if model is None and ema is None:
        raise CheckpointError(f"{path}: no state dict found (expected tensors, or a dict with one of "
                              f"{', '.join(MODEL_KEYS + EMA_KEYS)})")
    if weights == "ema" or (weights == "auto" and model is None):
        if ema is None:
            raise CheckpointError(f"{path}: weights 'ema' asked for, but the file has no EMA weights ({', '.join(EMA_KEYS)})")
        why = f"asked for: '{ema}'" if weights == "ema" else f"auto: the file holds only EMA weights ('{ema}')"
        sd = {k: v for k, v in obj[ema].items() if k not in _EMA_COUNTERS}
        return WeightsFound(sd, "ema", why, meta=training_meta(obj))
    if model is None:
        raise CheckpointError(f"{path}: weights 'model' asked for, but the file holds only EMA weights ('{ema}')")
    why = f"asked for: '{model}'" if weights == "model" else f"auto: the model's weights ('{model}')" + (
        f"; the file also holds EMA weights ('{ema}'), used with weights='ema'" if ema else "")
    return WeightsFound(obj[model], "model", why, meta=training_meta(obj))


def training_meta(obj: dict[str, Any]) -> dict[str, Any]:
    """What a training checkpoint says of its model: the ``arch`` key (timm), else ``args.model``
    (a torchvision name in its references' layout); ``args.model_kwargs`` (timm) if a dict."""
    from .models import TORCHVISION_PREFIX

    args = obj.get("args")
    get = (lambda k: getattr(args, k, None)) if isinstance(args, argparse.Namespace) else \
        (args.get if isinstance(args, dict) else (lambda k: None))
    meta: dict[str, Any] = {}
    name = get("model")
    if isinstance(obj.get("arch"), str) and obj["arch"]:
        meta["arch"] = obj["arch"]
    elif isinstance(name, str) and name:
        torchvision = "model" in obj and "state_dict" not in obj
        meta["arch"] = f"{TORCHVISION_PREFIX}{name}" if torchvision and not name.startswith(TORCHVISION_PREFIX) else name
    kwargs = get("model_kwargs")
    if isinstance(kwargs, dict) and kwargs and all(isinstance(k, str) for k in kwargs):
        meta["model_args"] = dict(kwargs)
    return meta
