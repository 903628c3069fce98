"""The ledger: a record of every request applied to a checkpoint, carried in its metadata.

Each entry says what was done (command, method, settings, number of images, SHA-256 of each
image file — never the images, and their paths only on request) and to which weights. A file
cannot contain its own hash, so entries identify weights by :func:`weights_sha256`, a digest of
the tensors themselves; a checkpoint whose tensors no longer match its last entry was changed
outside l2ul, and the next request starts a new segment that says so.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
from typing import Any, Sequence

import torch

from .data import Sample
from .files import sha256_file


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Digest of names, dtypes, shapes and bytes of every tensor, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _now() -> str:
    """UTC time of the request; ``SOURCE_DATE_EPOCH`` pins it, for bit-identical reruns."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return when.isoformat(timespec="seconds")


def continuity(ledger: list[dict[str, Any]], state_dict: dict[str, torch.Tensor]) -> str | None:
    """None if the weights are those the ledger's last entry wrote; else a warning."""
    if not ledger:
        return None
    last = ledger[-1].get("output_weights_sha256")
    if not isinstance(last, str):
        return "the checkpoint's ledger does not parse; earlier requests cannot be verified"
    if last != weights_sha256(state_dict):
        return "the checkpoint's weights differ from those its ledger's last entry wrote (changed outside l2ul)"
    return None


def make_entry(
    *,
    command: str,
    method: str,
    settings: dict[str, Any],
    samples: Sequence[Sample],
    before: dict[str, Any],
    after: dict[str, Any],
    goal_met: bool,
    input_sha256: str,
    output_weights: dict[str, torch.Tensor],
    request_id: str | None = None,
    record_paths: bool = False,
    new_segment: str | None = None,
) -> dict[str, Any]:
    image_sha = [sha256_file(s.path) for s in samples]
    out_sha = weights_sha256(output_weights)
    if request_id is None:
        # Derived from what was done, so the same request gives the same id (and bytes).
        request_id = hashlib.sha256(f"{command}|{method}|{input_sha256}|{out_sha}|{'|'.join(image_sha)}".encode()).hexdigest()[:12]
    entry: dict[str, Any] = {
        "request_id": request_id,
        "time": _now(),
        "command": command,
        "method": method,
        "settings": settings,
        "n_images": len(samples),
        "image_sha256": image_sha,
        "goal_met": goal_met,
        "before": before,
        "after": after,
        "input_sha256": input_sha256,
        "output_weights_sha256": out_sha,
    }
    if record_paths:
        entry["paths"] = [str(s.path) for s in samples]
    if new_segment:
        entry["new_segment"] = new_segment
    return entry
