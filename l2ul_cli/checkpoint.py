"""Reading and writing checkpoints, safely.

Reads ``.safetensors``, ``torch.save`` files (``.pt/.pth/.bin/.pth.tar``…; only through
``torch.load(weights_only=True)`` and a few harmless types, :mod:`.pickled`: a pickle that would
run code is refused, never retried unsafely) and timm-style folders (``config.json`` + ``model.safetensors``). Writes are atomic
(temp file in the target folder + ``os.replace``) so a crash never leaves half a checkpoint.

l2ul's own settings travel in the safetensors metadata under the key ``l2ul`` as one JSON
document: architecture, number of classes and channels, class names, preprocessing and the
ledger of earlier requests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, InputError
from .errors import first_line as _first_line
from .files import atomic_write, sha256_file, usable_path
from .pickled import Weights, WeightsFound, load_pickle

META_KEY = "l2ul"
META_VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")  # .tar: timm train.py's model_best.pth.tar
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format; a pickle (protocol 2+) of the old format
_PREFIXES = ("module.", "_orig_mod.")
# Metadata is untrusted input: a JSON document of at most this many characters and levels
# (l2ul writes 4 levels; a ledger of thousands of requests stays far below the size).
MAX_META_CHARS = 64 << 20
MAX_META_DEPTH = 32
MAX_CLASSES = 1 << 20
# Constructor arguments that would make timm or torchvision read or fetch other files.
FORBIDDEN_MODEL_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                        "weights", "progress", "features_only")


@dataclass
class RawCheckpoint:
    """Tensors and whatever settings the file carried, before any model is built."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""
    weights_used: str = "state_dict"  # "model" or "ema" of a training checkpoint (pickled.choose_weights)
    weights_reason: str = "the file holds one set of weights"


def clean_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes left by DataParallel/DDP (``module.``) and torch.compile
    (``_orig_mod.``), in any order and nesting."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        k = str(key)
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = value
    return out


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types and OSError
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
    meta: dict[str, Any] = {}
    if META_KEY in raw_meta:
        try:
            meta = _parse_json(raw_meta[META_KEY], f"{path}: metadata '{META_KEY}'")
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError:
            meta = {"_unparsable": True}
    return tensors, meta


def _parse_json(text: str, where: str) -> Any:
    """``json.loads`` within the size and depth limits; ValueError if it does not parse."""
    if len(text) > MAX_META_CHARS:
        raise CheckpointError(f"{where}: {len(text):,} characters, more than the {MAX_META_CHARS:,} allowed")
    too_deep = CheckpointError(f"{where}: nested more than {MAX_META_DEPTH} levels deep")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise too_deep from None
    if _deeper_than(obj, MAX_META_DEPTH):
        raise too_deep
    return obj


def _deeper_than(obj: Any, limit: int) -> bool:
    """Whether lists/objects nest more than ``limit`` levels (iteratively: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return False


def validate_meta(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """Check the types and sizes of the metadata keys l2ul reads (preprocessing's values are
    checked where they are read, :meth:`.models.Preprocessing.from_dict`)."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: metadata '{key}' {what}")

    arch = meta.get("arch")
    if arch is not None and not (isinstance(arch, str) and 0 < len(arch) <= 200):
        raise bad("arch", "must be an architecture name (a string of 1 to 200 characters)")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) <= MAX_CLASSES and
                                  all(isinstance(n, str) and len(n) <= 1000 for n in names)):
        raise bad("class_names", f"must be a list of at most {MAX_CLASSES:,} strings of at most 1000 characters")
    if meta.get("weights") not in (None, "model", "ema"):
        raise bad("weights", "must be model or ema")
    for key in ("preprocessing", "model_args"):
        if key in meta and not isinstance(meta[key], dict):
            raise bad(key, "must be an object")
    args = meta.get("model_args") or {}
    if len(args) > 64 or any(k in FORBIDDEN_MODEL_ARGS for k in args):
        raise bad("model_args", f"must hold at most 64 arguments, none of {', '.join(FORBIDDEN_MODEL_ARGS)}")
    ledger = meta.get("ledger")
    if ledger is not None and not isinstance(ledger, list):
        raise bad("ledger", "must be a list of requests")
    for i, entry in enumerate(ledger or []):
        if not isinstance(entry, dict):
            raise bad(f"ledger[{i}]", "must be an object")
        for key in ("before", "after", "settings"):
            if key in entry and not isinstance(entry[key], dict):
                raise bad(f"ledger[{i}].{key}", "must be an object")
        for key in ("input_sha256", "output_weights_sha256", "request_id", "command", "method", "time"):
            if key in entry and not isinstance(entry[key], str):
                raise bad(f"ledger[{i}].{key}", "must be a string")
    return meta


def _read_folder(path: Path, weights: Weights) -> tuple[WeightsFound, Path]:
    config_path = path / "config.json"
    file = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if file is None:
        raise CheckpointError(f"{path}: folder has no model.safetensors or pytorch_model.bin")
    found = _read_file(file, weights)
    if config_path.is_file():
        try:
            cfg = _parse_json(config_path.read_text(encoding="utf-8"), str(config_path))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({_first_line(exc)})") from exc
        if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k, {}), dict) for k in ("pretrained_cfg", "model_args")):
            raise CheckpointError(f"{config_path}: expected an object (with 'pretrained_cfg' and 'model_args' objects)")
        found.meta = {**_meta_from_timm_config(cfg), **found.meta}
    return found, file


def _meta_from_timm_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Map a timm/Hugging Face ``config.json`` (as timm's ``save_for_hf`` writes it) onto l2ul's
    metadata keys. ``model_args`` are the arguments the model was built with; an ``img_size``
    among them is the input size (``pretrained_cfg`` keeps the default one's)."""
    meta: dict[str, Any] = {}
    if "architecture" in cfg:
        meta["arch"] = cfg["architecture"]
    names = cfg.get("label_names") or cfg.get("pretrained_cfg", {}).get("label_names")
    if isinstance(names, list):
        meta["class_names"] = [str(n) for n in names]
    pcfg = cfg.get("pretrained_cfg", {})
    pre = {k: pcfg[k] for k in ("input_size", "mean", "std", "crop_pct", "interpolation") if k in pcfg}
    args = cfg.get("model_args") or {}
    if args:
        meta["model_args"] = args
    side = args.get("img_size")
    if isinstance(side, int) or (isinstance(side, list) and len(side) == 2):
        size = pre.get("input_size")
        chans = args.get("in_chans", size[0] if isinstance(size, list) and size else 3)
        pre["input_size"] = [chans, *([side, side] if isinstance(side, int) else side)]
    if pre:
        meta["preprocessing"] = pre
    return meta


def _read_file(p: Path, weights: Weights) -> WeightsFound:
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file")
    if p.suffix == ".safetensors":
        sd, meta = _read_safetensors(p)
        if weights == "ema" and meta.get("weights") != "ema":  # l2ul records where its weights came from
            raise CheckpointError(f"{p}: a safetensors file holds one set of weights; weights 'ema' needs a "
                                  "training checkpoint with EMA weights (state_dict_ema or model_ema)")
        return WeightsFound(sd, "state_dict", "the file holds one set of weights" + (
            ", made from EMA weights" if meta.get("weights") == "ema" else ""), meta)
    with open(p, "rb") as f:
        head = f.read(4)
    if p.suffix in PICKLE_SUFFIXES or head.startswith(_TORCH_MAGIC):
        return load_pickle(p, weights)
    raise CheckpointError(
        f"{p}: unknown checkpoint type (supported: .safetensors, {', '.join(PICKLE_SUFFIXES)} or any file "
        "torch.save wrote, or a folder with config.json + model.safetensors)"
    )


def read_checkpoint(path: str | os.PathLike, weights: Weights = "auto") -> RawCheckpoint:
    """Read tensors and metadata from any supported checkpoint layout. ``weights``: of a
    training checkpoint holding both, the model's (``model``), its EMA (``ema``), or ``auto``
    (the model's when present, else the EMA); which was used, and why, is in the result."""
    p = Path(path)
    if not usable_path(p, "checkpoint").exists():
        raise InputError(f"{p}: checkpoint not found")
    if p.is_dir():
        found, file = _read_folder(p, weights)
    else:
        found, file = _read_file(p, weights), p
    sd = clean_state_dict(found.state_dict)
    if not sd:
        raise CheckpointError(f"{p}: holds no tensors")
    return RawCheckpoint(path=p, state_dict=sd, meta=validate_meta(found.meta, p), sha256=sha256_file(file),
                         weights_used=found.weights_used, weights_reason=found.weights_reason)


def write_checkpoint(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write a safetensors checkpoint atomically with l2ul metadata; returns its SHA-256."""
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage (tied weights): give each its own copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    header = {"format": "pt", META_KEY: json.dumps({"version": META_VERSION, **meta}, sort_keys=True)}

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=header)
        _sort_metadata_in_place(tmp)

    atomic_write(path, write)
    return sha256_file(path)


def _sort_metadata_in_place(path: str) -> None:
    """Rewrite the header with its metadata keys sorted, so equal inputs give equal bytes.

    safetensors keeps ``__metadata__`` in a Rust HashMap, whose key order changes from call to
    call: the same tensors and metadata gave two different files (seen as a same-seed test that
    failed about one run in three). Sorting keeps the header's length, so only it is rewritten.
    """
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw)
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        # Same separators and escaping as the writer, so the text has the same length.
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # never expected; leave the (valid) file as written
            return
        f.seek(8)
        f.write(text.ljust(size, b" "))
