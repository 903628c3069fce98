"""Image sources: a folder (ImageFolder layout or flat) or a CSV manifest, and decoding.

Scanning is pure (paths and labels, no pixels), so it is fast, testable and fails before any
work starts. Decoding converts every mode PIL knows (16-bit, palette, CMYK, RGBA, grey) to
the model's channel count, then applies timm's own eval transform (resize the short side to
``size / crop_pct``, centre crop), giving float tensors in [0, 1].
"""

from __future__ import annotations

import csv
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from .errors import InputError
from .files import usable_path
from .models import Preprocessing

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Sample:
    """One image and what is known of it. ``label`` None: use the model's prediction."""

    path: Path
    label: int | None = None
    new_label: int | None = None
    source: str = ""  # where it came from, for error messages ("fixes.csv:3")
    outside: bool = False  # a manifest path that leads out of the manifest's folder


def outside_note(samples: Sequence[Sample]) -> str | None:
    """The report line for manifest paths outside the manifest's folder (allowed, but said)."""
    out = [s.source for s in samples if s.outside]
    if not out:
        return None
    more = f" and {len(out) - 5} more" if len(out) > 5 else ""
    return f"{len(out)} manifest path(s) lead outside the manifest's folder: {', '.join(out[:5])}{more}"


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS


def resolve_label(name: str, class_names: Sequence[str] | None, num_classes: int, where: str) -> int:
    """A class given by name (when the model has names) or by index."""
    name = name.strip()
    if class_names and name in class_names:
        return list(class_names).index(name)
    if re.fullmatch(r"-?\d+", name):
        idx = int(name)
        if 0 <= idx < num_classes:
            return idx
        raise InputError(f"{where}: label index {idx} is out of range (the model has {num_classes} classes: 0..{num_classes - 1})")
    known = f"; known classes: {', '.join(list(class_names)[:8])}{' …' if len(class_names) > 8 else ''}" if class_names else \
        f"; the model has no class names, so use indices 0..{num_classes - 1}"
    raise InputError(f"{where}: unknown class '{name}'{known}")


def scan_folder(root: str | os.PathLike, class_names: Sequence[str] | None, num_classes: int) -> list[Sample]:
    """Samples of an ImageFolder layout (sub-folder = class) or a flat folder (no labels).

    Unlike torchvision's ImageFolder, a sub-folder's name *is* the class (by name or index),
    so a folder holding only ``4/`` means class 4, not class 0.
    """
    root = usable_path(root, "folder")
    if not root.exists():
        raise InputError(f"{root}: folder not found")
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    # Hidden files (macOS "._x.png" AppleDouble files) are skipped here as in class sub-folders.
    flat = sorted(
        (p for p in root.iterdir() if p.is_file() and is_image(p) and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )
    subdirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: _natural_key(p.name))
    samples: list[Sample] = []
    for d in subdirs:
        files = sorted(
            (p for p in d.rglob("*") if p.is_file() and is_image(p) and not p.name.startswith(".")),
            key=lambda p: _natural_key(str(p.relative_to(d))),
        )
        if not files:
            continue
        label = resolve_label(d.name, class_names, num_classes, str(d))
        samples.extend(Sample(path=p, label=label, source=str(p)) for p in files)
    if samples and flat:
        raise InputError(f"{root}: mixes images at the top level with class sub-folders; use one layout")
    if not samples:
        samples = [Sample(path=p, source=str(p)) for p in flat]
    if not samples:
        raise InputError(f"{root}: no images found (supported extensions: {', '.join(IMG_EXTENSIONS)})")
    return samples


def read_manifest(
    path: str | os.PathLike,
    class_names: Sequence[str] | None,
    num_classes: int,
    *,
    require_new_label: bool,
) -> list[Sample]:
    """Samples of a CSV manifest with columns ``path``, ``new_label`` and optional ``label``.

    Relative paths resolve against the manifest's folder; a path that leads out of it (``..``,
    absolute, a symlink) is allowed and flagged. A UTF-8 BOM and blank lines are accepted;
    anything else malformed names the file and line.
    """
    path = usable_path(path, "manifest")
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    rows = list(csv.reader(text.splitlines()))
    header_at = next((i for i, r in enumerate(rows) if any(c.strip() for c in r)), None)
    if header_at is None:
        raise InputError(f"{path}: empty manifest")
    header = [c.strip() for c in rows[header_at]]
    need = ["path"] + (["new_label"] if require_new_label else [])
    for col in need:
        if col not in header:
            raise InputError(f"{path}:{header_at + 1}: missing column '{col}' (header: {','.join(header)})")
    col = {name: header.index(name) for name in ("path", "new_label", "label") if name in header}
    samples: list[Sample] = []
    seen: dict[Path, int] = {}
    for i, row in enumerate(rows[header_at + 1:], start=header_at + 2):
        if not any(c.strip() for c in row):
            continue
        where = f"{path}:{i}"
        if len(row) != len(header):
            raise InputError(f"{where}: expected {len(header)} fields, found {len(row)}")
        rel = row[col["path"]].strip()
        if not rel:
            raise InputError(f"{where}: empty path")
        p = usable_path(Path(rel) if os.path.isabs(rel) else path.parent / rel, "image", where)
        if p in seen:
            raise InputError(f"{where}: duplicate of line {seen[p]} ({rel})")
        seen[p] = i
        if not p.is_file():
            raise InputError(f"{where}: image not found: {rel}")
        label = resolve_label(row[col["label"]], class_names, num_classes, where) if "label" in col and row[col["label"]].strip() else None
        new = None
        if "new_label" in col and row[col["new_label"]].strip():
            new = resolve_label(row[col["new_label"]], class_names, num_classes, where)
        elif require_new_label:
            raise InputError(f"{where}: empty new_label")
        if new is not None and label is not None and new == label:
            raise InputError(f"{where}: new_label equals the current label ({row[col['label']].strip()})")
        outside = not p.resolve().is_relative_to(path.parent.resolve())
        samples.append(Sample(path=p, label=label, new_label=new, source=where, outside=outside))
    if not samples:
        raise InputError(f"{path}: manifest lists no images")
    return samples


def _convert(img: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode to "L" (one channel) or "RGB" (three)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Transparent pixels become black, as decoders that drop alpha do (docs/lab-notes.md, images).
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
    if channels not in (1, 3):
        raise InputError(f"models with {channels} input channels are not supported (1 or 3)")
    return img.convert("L" if channels == 1 else "RGB")


@functools.lru_cache(maxsize=8)
def eval_transform(pre: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    """timm's own eval transform (resize to size / crop_pct, then crop as its crop mode says),
    without its normalisation: the loaded model normalises inside (:class:`.models.PixelClassifier`).
    It returns uint8 tensors."""
    from timm.data import create_transform

    return create_transform(pre.input_size, is_training=False, interpolation=pre.interpolation,
                            crop_pct=pre.crop_pct, crop_mode=pre.crop_mode, normalize=False)


def load_image(path: Path, pre: Preprocessing) -> torch.Tensor:
    """Decode and convert one image, then timm's eval transform: a CxHxW float tensor in [0, 1]."""
    c, h, w = pre.input_size
    try:
        with Image.open(path) as img:
            # JPEG can decode at a fraction of its size: a huge photo never fills memory.
            img.draft("RGB" if c == 3 else "L", (math.floor(w / pre.crop_pct), math.floor(h / pre.crop_pct)))
            img = _convert(img, c)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: not a readable image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    return eval_transform(pre)(img).float().div_(255.0)  # without normalisation timm gives uint8


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, when the system says."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_planned_memory(rows: int, pre: Preprocessing, where: str, limit: int | None = None) -> None:
    """Refuse a run whose image tensors alone (``rows`` images of ``pre.input_size`` in float32,
    before activations) would take more than half the machine's memory (or ``limit`` bytes):
    better a clear error than a process killed for memory."""
    if limit is None:
        ram = physical_memory()
        limit = ram // 2 if ram else None
    need = rows * math.prod(pre.input_size) * 4
    if limit is not None and need > limit:
        c, h, w = pre.input_size
        raise InputError(f"{rows} images of {c}x{h}x{w} ({where}) would need {need / 2**30:.1f} GiB before any "
                         f"activation, more than the {limit / 2**30:.1f} GiB allowed; pass a smaller --input-size")


def iter_batches(samples: Sequence[Sample], pre: Preprocessing, batch_size: int = 256) -> Iterator[torch.Tensor]:
    for i in range(0, len(samples), batch_size):
        yield torch.stack([load_image(s.path, pre) for s in samples[i:i + batch_size]])


def load_images(samples: Sequence[Sample], pre: Preprocessing) -> torch.Tensor:
    """All images of a (small) set as one NxCxHxW tensor in [0, 1]."""
    return torch.cat(list(iter_batches(samples, pre)), dim=0)
