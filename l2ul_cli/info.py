"""What ``l2ul info`` and ``l2ul history`` report about a checkpoint: dicts, rendered by the CLI."""

from __future__ import annotations

import os
from typing import Any


def checkpoint_history(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ledger of requests applied to a checkpoint, and whether its weights still match it."""
    from .checkpoint import read_checkpoint
    from .ledger import continuity

    raw = read_checkpoint(checkpoint)
    ledger = raw.meta.get("ledger") if isinstance(raw.meta.get("ledger"), list) else []
    return {"checkpoint": str(checkpoint), "sha256": raw.sha256, "ledger": ledger,
            "warning": continuity(ledger, raw.state_dict)}


def checkpoint_info(checkpoint: str | os.PathLike, arch: str | None = None, *, weights: str = "auto",
                    model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Architecture, classes, preprocessing, which weights, parameter count and number of requests;
    for an index file (``l2ul index``), what :func:`.index.describe_index` says."""
    from .index import describe_index, is_index
    from .models import load_model

    if is_index(checkpoint):
        return {"command": "info", "kind": "index", **describe_index(checkpoint)}
    m = load_model(checkpoint, arch, weights=weights, model_kwargs=model_kwargs)
    return {"checkpoint": str(checkpoint), "sha256": m.source.sha256, "arch": m.arch,
            "num_classes": m.num_classes, "in_chans": m.in_chans, "class_names": m.class_names,
            "preprocessing": m.preprocessing.to_dict(), "weights": {"used": m.weights_used, "reason": m.weights_reason},
            "parameters": sum(p.numel() for p in m.net.parameters()),
            "requests": len(m.ledger)}
