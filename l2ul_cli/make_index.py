"""``l2ul index``: a checkpoint's retained space, built once (:mod:`.index`) from images the user
still holds (``--retain``) or from stand-ins made from its BatchNorm statistics, for the
``--index`` of every later request on it or on its l2ul descendants."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .anchors import NullProgress, Progress
from .config import INDEX_ENERGY, INDEX_STAND_INS, UnlearnConfig
from .data import iter_batches
from .errors import UsageError
from .index import build_index, save_index
from .models import LoadedModel, load_model
from .paths import check_paths
from .precision import choose
from .threads import Threads, use_threads

PROBE_BYTES = 16 << 20  # of probe images kept in the index for the health check, at most 256


def make_index(checkpoint: str | os.PathLike, out: str | os.PathLike, *, retain: Sequence[str | os.PathLike] = (),
               stand_ins: int | None = None, max_images: int | None = None, energy: float = INDEX_ENERGY,
               device: str = "auto", seed: int = 0, force: bool = False, progress: Progress | None = None,
               threads: Threads | None = None, **load_kw: Any) -> dict[str, Any]:
    """Build and write the index of ``checkpoint``; returns the report dict. ``load_kw``: as
    :func:`.models.load_model` takes them (arch, input_size, mean, std, weights…)."""
    from .workflow import check_output, resolve_device

    threads_used = use_threads(threads)
    progress = progress or NullProgress()
    if retain and stand_ins is not None:
        raise UsageError("give --retain or --stand-ins, not both: the index holds one kind of images")
    if not 0 < energy <= 1:
        raise UsageError(f"--energy must be in (0, 1] (got {energy})")
    t0 = time.perf_counter()
    dev, ckpt, out = resolve_device(device), Path(checkpoint), Path(out)
    check_paths({"CHECKPOINT": [ckpt], "--retain": retain}, {"--out": out})
    loaded = load_model(ckpt, device=dev, **load_kw)
    check_output(out, ckpt, force, "index")
    seconds = {"load": time.perf_counter() - t0}
    t0 = time.perf_counter()
    if retain:
        batches, n, source = _retained(loaded, retain, max_images, seed)
    else:
        batches, n, source = _stand_ins(loaded, stand_ins or INDEX_STAND_INS, seed, dev, progress)
        seconds["synthesis"] = time.perf_counter() - t0
    probes: list[torch.Tensor] = []
    index = build_index(loaded.model, _keeping_probes(batches, probes, _probe_count(loaded), dev), energy=energy,
                        progress=progress, source=source, sha256=loaded.source.sha256, total=n)
    index.probes = torch.cat(probes)
    seconds["index"] = index.seconds
    t0 = time.perf_counter()
    sha = save_index(out, index)
    seconds["write"] = time.perf_counter() - t0
    kept = sum(s.vectors.shape[1] for s in index.layers.values())
    return {"command": "index", "checkpoint": str(ckpt), "checkpoint_sha256": loaded.source.sha256,
            "output": str(out), "index_sha256": sha, "images": index.images, "source": source, "energy": energy,
            "layers": len(index.layers), "directions": kept, "dimensions": sum(s.dim for s in index.layers.values()),
            "probes": int(index.probes.shape[0]), "bytes": out.stat().st_size, "device": str(dev),
            "threads": threads_used, "seconds": seconds,
            "images_per_second": round(index.images / index.seconds, 1) if index.seconds > 0 else None}


def _retained(loaded: LoadedModel, retain, max_images: int | None, seed: int) -> tuple[Iterator[torch.Tensor], int, str]:
    """The --retain images in batches (a seeded subset of ``max_images``), decoded as consumed."""
    from .workflow import _retain_samples

    samples = _retain_samples(loaded, retain)
    if max_images is not None and len(samples) > max_images:
        pick = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:max_images]
        samples = [samples[i] for i in sorted(pick.tolist())]
    return iter_batches(samples, loaded.preprocessing, 64), len(samples), f"{len(samples)} --retain images"


def _stand_ins(loaded: LoadedModel, n: int, seed: int, dev, progress: Progress) -> tuple[Iterator[torch.Tensor], int, str]:
    from .retention import stand_in_images
    from .synthesis import has_batchnorm

    if not has_batchnorm(loaded.model):
        raise UsageError("the model has no BatchNorm statistics to make stand-in images from: pass --retain "
                         "images of the domain")
    shape = loaded.preprocessing.input_size
    autocast_dtype, _ = choose(loaded.model, shape, dev, "auto")
    images, source = stand_in_images(loaded.model, n, shape, loaded.num_classes, UnlearnConfig(), seed=seed,
                                     autocast_dtype=autocast_dtype, progress=progress)
    return iter(images.split(64)), n, source


def _probe_count(loaded: LoadedModel) -> int:
    """Up to 256 probe images, fewer when large (at most PROBE_BYTES in fp16)."""
    per_image = 2 * math.prod(loaded.preprocessing.input_size)
    return max(1, min(256, PROBE_BYTES // per_image))


def _keeping_probes(batches: Iterable[torch.Tensor], probes: list[torch.Tensor], limit: int,
                    dev: torch.device) -> Iterator[torch.Tensor]:
    """The batches on ``dev``, keeping the first ``limit`` images in ``probes`` (fp16, CPU)."""
    for b in batches:
        room = limit - sum(len(p) for p in probes)
        if room > 0:
            probes.append(b[:room].detach().cpu().half())
        yield b.to(dev)
