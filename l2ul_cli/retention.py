"""The retained space: what every update is kept orthogonal to, whatever its source — images the
user still holds (``--retain``), stand-ins made from the model's BatchNorm statistics, or for a
network without them from dead-leaves images (:mod:`.synthesis`), when there are none (both :func:`retained_space`), or a cached index of
either (:func:`index_space`, :mod:`.index`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .anchors import NullProgress, Progress
from .config import UnlearnConfig
from .evaluate import predict
from .index import RetainedIndex
from .projection import GradientProjector
from .synthesis import BATCH as SYNTH_BATCH
from .synthesis import class_dead_leaves, has_batchnorm, invert_batchnorm

DEAD_LEAVES_STEPS = 50
NO_BATCHNORM = ("the model has no BatchNorm statistics to make stand-in images from: updates were not "
                "projected (pass --retain images of the domain)")


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
                   autocast_dtype: torch.dtype | None = None, progress: Progress | None = None) -> RetainedSpace:
    """From ``retain`` images when given, else from ``stand_ins`` stand-in images (0: none)."""
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    if retain is not None:
        projector = GradientProjector(model, retain, energy=config.retain_energy)
        projector.source = f"{retain.shape[0]} --retain images"
        return RetainedSpace(projector, retain, "retain", "retain", time.perf_counter() - t0)
    if stand_ins <= 0:
        return RetainedSpace(None, None, "none")
    if not has_batchnorm(model) and config.synthetic_source == "auto":
        return RetainedSpace(None, None, "none", note=NO_BATCHNORM)
    images, source = stand_in_images(model, stand_ins, image_shape, num_classes, config, seed=seed,
                                     autocast_dtype=autocast_dtype, progress=progress)
    projector = GradientProjector(model, images, energy=config.retain_energy)
    projector.source = source
    return RetainedSpace(projector, images, "stand_ins", "synthesis", time.perf_counter() - t0)


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
                    progress: Progress | None = None) -> tuple[torch.Tensor, str]:
    """``n`` stand-ins and how they were made: from BatchNorm statistics, or for a network
    without them class-like dead-leaves images (RESULTS.md "Stand-ins for networks without
    BatchNorm"), whose few steps need no more than DEAD_LEAVES_STEPS."""
    progress = progress or NullProgress()
    batchnorm = has_batchnorm(model) and config.synthetic_source == "auto"
    steps = config.synthetic_steps if batchnorm else min(config.synthetic_steps, DEAD_LEAVES_STEPS)
    progress.start("synthesis", steps * -(-n // SYNTH_BATCH), unit="steps")
    if batchnorm:
        images = invert_batchnorm(model, n, image_shape, num_classes, steps=steps, lr=config.synthetic_lr, seed=seed,
                                  autocast_dtype=autocast_dtype, progress=progress.advance)
    else:
        images = class_dead_leaves(model, n, image_shape, num_classes, steps=steps, seed=seed,
                                   autocast_dtype=autocast_dtype, progress=progress.advance)
    progress.finish()
    made = "BatchNorm statistics" if batchnorm else "dead-leaves images made class-like" + (
        "" if has_batchnorm(model) else " (the model has no BatchNorm)")
    return images, f"{n} stand-in images from {made}"
