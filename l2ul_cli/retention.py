"""The retained space: what every update is kept orthogonal to, whatever its source — images the
user still holds (``--retain``), or when there are none stand-ins made from the model's
BatchNorm statistics or, for a network without them, from the request images' statistics
(:mod:`.synthesis`; both :func:`retained_space`), or a cached index of either (:func:`index_space`,
:mod:`.index`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .anchors import NullProgress, Progress, shifted_copies
from .config import UnlearnConfig
from .evaluate import predict
from .index import RetainedIndex
from .memory import rows_that_fit
from .projection import GradientProjector
from .synthesis import BATCH as SYNTH_BATCH
from .synthesis import class_dead_leaves, has_batchnorm, input_statistics, invert_batchnorm, invert_statistics

DEAD_LEAVES_STEPS = 50
NEIGHBOURS = 4  # shifted copies of each request image whose statistics the stand-ins match
# A weaker retained space than BatchNorm stand-ins or real images give (RESULTS.md "Stand-ins for
# networks without BatchNorm": on a ViT it halved the damage of no projection, not more).
NO_BATCHNORM = ("the model has no BatchNorm statistics: the stand-ins were made without them (mostly from the "
                "request images' own statistics), which keeps less (pass --retain images of the domain to keep more)")
NO_STAND_INS = ("the model has no BatchNorm statistics and there are no images to take statistics from: updates "
                "were not projected (pass --retain images of the domain)")


@dataclass
class RetainedSpace:
    projector: GradientProjector | None
    images: torch.Tensor | None  # the images it was built from: their agreement is the report's health check
    kind: str  # report key of those images: "retain" or "stand_ins"; "none" without a projection
    phase: str | None = None  # the seconds key of its making
    seconds: float = 0.0
    note: str | None = None  # why there is none, when one was wanted

    def describe(self) -> str | None:
        p = self.projector
        return f"{p.source}, energy {p.energy}: {p.summary()}" if p is not None else None

    def agreement(self, model: nn.Module) -> float | None:
        """Share of the images still predicted as before the updates."""
        return self.projector.agreement(model, self.images) if self.images is not None else None


def retained_space(model: nn.Module, *, config: UnlearnConfig, image_shape: tuple[int, ...], num_classes: int,
                   retain: torch.Tensor | None = None, stand_ins: int = 0, seed: int = 0,
                   autocast_dtype: torch.dtype | None = None, progress: Progress | None = None,
                   request: torch.Tensor | None = None) -> RetainedSpace:
    """From ``retain`` images when given, else from ``stand_ins`` stand-in images (0: none);
    ``request``: the request's own images, whose statistics stand-ins for a network without
    BatchNorm may match."""
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    if retain is not None:
        projector = GradientProjector(model, retain, energy=config.retain_energy)
        projector.source = f"{retain.shape[0]} --retain images"
        return RetainedSpace(projector, retain, "retain", "retain", time.perf_counter() - t0)
    if stand_ins <= 0:
        return RetainedSpace(None, None, "none")
    auto_without = not has_batchnorm(model) and config.synthetic_source == "auto"
    if auto_without and request is None:
        return RetainedSpace(None, None, "none", note=NO_STAND_INS)
    images, source = stand_in_images(model, stand_ins, image_shape, num_classes, config, seed=seed,
                                     autocast_dtype=autocast_dtype, progress=progress, request=request)
    projector = GradientProjector(model, images, energy=config.retain_energy)
    projector.source = source
    return RetainedSpace(projector, images, "stand_ins", "synthesis", time.perf_counter() - t0,
                         note=NO_BATCHNORM if auto_without else None)


def index_space(model: nn.Module, index: RetainedIndex, energy: float) -> RetainedSpace:
    """The retained space of a cached index at ``energy``; the index's probe images, predicted by
    ``model`` now (before any update), are the health check's."""
    t0 = time.perf_counter()
    projector = index.projector(model, energy=energy)
    device = next(model.parameters()).device
    probes = index.probes.to(device) if index.probes is not None else None
    if probes is not None:
        projector.predictions = predict(model, probes.split(256), device).argmax(1)
    kind = "retain" if "--retain" in index.source else "stand_ins"
    return RetainedSpace(projector, probes, kind, "index", time.perf_counter() - t0)


def stand_in_images(model: nn.Module, n: int, image_shape: tuple[int, ...], num_classes: int, config: UnlearnConfig,
                    *, seed: int = 0, autocast_dtype: torch.dtype | None = None,
                    progress: Progress | None = None, request: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """``n`` stand-ins and how they were made. ``auto``: from BatchNorm statistics; for a network
    without them, images matched to the norm layers' input statistics on the ``request`` images
    and their shifted copies, or without ``request`` class-like dead-leaves images (few steps: no
    more than DEAD_LEAVES_STEPS)."""
    progress = progress or NullProgress()
    batchnorm = has_batchnorm(model)
    source = config.synthetic_source
    if source == "auto" and not batchnorm:
        source = "forget-statistics"
    targets, why = {}, ""
    if source == "forget-statistics" and request is not None:
        near = torch.cat([request, shifted_copies(request, NEIGHBOURS, 2, torch.Generator().manual_seed(seed))])
        targets = input_statistics(model, near)
        why = "" if targets else " (the model has no norm layers to take statistics at)"
    if source == "forget-statistics" and not targets:
        source = "auto" if batchnorm and request is None else "dead-leaves"
    steps = min(config.synthetic_steps, DEAD_LEAVES_STEPS) if source == "dead-leaves" else config.synthetic_steps
    device = next(model.parameters()).device
    batch = rows_that_fit(model, tuple(image_shape), device, SYNTH_BATCH, autocast_dtype)
    progress.start("synthesis", steps * -(-n // batch), unit="steps")
    kw = dict(steps=steps, seed=seed, autocast_dtype=autocast_dtype, progress=progress.advance, batch_size=batch)
    if source == "auto":
        images = invert_batchnorm(model, n, image_shape, num_classes, lr=config.synthetic_lr, **kw)
        made = "BatchNorm statistics"
    elif source == "dead-leaves":
        images = class_dead_leaves(model, n, image_shape, num_classes, **kw)
        made = "dead-leaves images made class-like" + why
    else:
        images = invert_statistics(model, targets, n, image_shape, num_classes, lr=config.synthetic_lr, **kw)
        made = (f"the norm layers' input statistics on the {request.shape[0]} images to unlearn (the request's and any "
                f"--keep) and {NEIGHBOURS} shifted copies of each")
    progress.finish()
    smaller = f", in batches of {batch} to fit in memory" if batch < min(n, SYNTH_BATCH) else ""
    return images, f"{n} stand-in images from {made}" + ("" if batchnorm else " (the model has no BatchNorm)") + smaller
