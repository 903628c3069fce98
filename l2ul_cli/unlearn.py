"""Unlearning as the paper's Algorithm 1, composed of parts: anchors (:mod:`.anchors`), the
importance penalty (:mod:`.importance`), the retained space (:mod:`.retention`) and the update
loop (:mod:`.loop`), driven towards a goal (:mod:`.goals`).

:func:`unlearn` changes a model in place until every forget image meets its goal — misclassified
(``forget``) or predicted as its new label (``relabel``) — or the step cap is hit. The goal is
checked before every update on logits of the current weights in eval mode (with BatchNorm frozen
these are the logits the update itself computes, so the check costs no extra pass), so the loop
stops at the first weights that meet it and never takes a step past them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .anchors import AnchorSet, NullProgress, Progress, build_anchors
from .config import AttackConfig, UnlearnConfig
from .errors import NumericalError, UsageError
from .goals import Goal, goal_named
from .importance import ImportancePenalty, mas_importance, mas_importance_batch
from .loop import UpdateLoop
from .memory import Replay, logits_in_parts, rows_that_fit
from .objectives import objective_loss
from .precision import Precision, choose, describe
from .projection import GradientProjector
from .retention import RetainedSpace, retained_space

__all__ = ["ImageSet", "NullProgress", "Progress", "UnlearnResult", "unlearn"]


@dataclass
class ImageSet:
    """Images in [0, 1] on the model's device with what the goal asks of each: ``targets``, the
    label to move away from (forget) or the new label (relabel); ``labels``, the classes the
    attack moves the copies away from (the current labels)."""

    images: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def join(self, other: ImageSet | None) -> ImageSet:
        if other is None:
            return self
        return ImageSet(*(torch.cat([a, b]) for a, b in
                          ((self.images, other.images), (self.targets, other.targets), (self.labels, other.labels))))


@dataclass
class UnlearnResult:
    goal_met: bool
    steps: int
    seconds: dict[str, float]
    logits: torch.Tensor  # the new images' logits after unlearning (eval mode, fp32, CPU)
    keep_logits: torch.Tensor | None = None  # likewise for the earlier requests' images (``keep``)
    lam_final: float | None = None
    adv_attack_success: float | None = None  # fraction of copies the original model puts in their target class
    notes: list[str] = field(default_factory=list)
    projection: str | None = None  # what the updates were kept orthogonal to, if anything
    retained: str = "none"  # which images that was: "retain", "stand_ins", "given" or "none"
    # Share of those images predicted as before the updates. The projection holds them, so a
    # sound run keeps nearly all; a low share means the model moved elsewhere too.
    agreement: float | None = None
    # Per probe set of the health check (:mod:`.health`): {"n_images": n, "agreement": share}.
    probes: dict[str, dict[str, float]] = field(default_factory=dict)
    loss_history: list[float] = field(default_factory=list)  # per step, without the importance penalty
    precision: str = "fp32"  # what the attack and the stand-ins ran in
    adv_weight: float = 0.0  # of the adversarial term at the end: halved on each divergence retry
    extra: dict[str, Any] = field(default_factory=dict)  # a method's own report keys (e.g. LTU's "ltu")
    updated_index: Any = None  # PGU: its index less this request's images (:class:`.index.RetainedIndex`)


@contextmanager
def _timed(seconds: dict[str, float], phase: str):
    t0 = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - t0


def unlearn(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    goal: str | Goal,
    num_classes: int,
    config: UnlearnConfig,
    attack: AttackConfig,
    attack_labels: torch.Tensor | None = None,
    seed: int = 0,
    precision: Precision = "auto",
    progress: Progress | None = None,
    projector: GradientProjector | None = None,
    retain: torch.Tensor | None = None,
    keep: ImageSet | None = None,
    original: nn.Module | None = None,
    space: RetainedSpace | None = None,
) -> UnlearnResult:
    """Change ``model`` in place so that ``images`` meet ``goal``.

    ``targets`` and ``attack_labels`` (default: ``targets``) as in :class:`ImageSet`.
    ``space``: a ready retained space (e.g. from an index, :func:`.retention.index_space`);
    ``projector``: a ready projector; else one from ``retain`` images (``--retain``), else from
    ``config.stand_ins(k)`` stand-ins. ``keep``: earlier requests' images (``--keep``); they
    join the goal check and the anchors, and the importance only with ``config.keep_importance``.
    ``original``: the network before a stream's first request (``--original``); the anchors'
    distillation targets and the penalty's θ̃ come from it, so requests do not add up each
    other's drift.
    """
    goal, progress, generator = goal_named(goal), progress or NullProgress(), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    new = ImageSet(images, targets, attack_labels if attack_labels is not None else targets)
    every = new.join(keep)
    seconds, notes = {"attack": 0.0, "importance": 0.0}, []
    shape = tuple(images.shape[1:])
    attacking = config.adv_loss != "none" and attack.n_adv > 0
    stand_ins = config.stand_ins(len(every)) if projector is None and retain is None and space is None else 0
    # Only the attack and the stand-ins run in reduced precision: no need to time it without them.
    autocast_dtype, how = choose(model, shape, images.device, precision) \
        if attacking or stand_ins else (None, None)
    model.eval()

    anchors = None
    if attacking:
        with _timed(seconds, "attack"):
            anchors = build_anchors(model, every.images, every.labels, num_classes=num_classes, config=config,
                                    attack=attack, generator=generator, autocast_dtype=autocast_dtype,
                                    progress=progress, teacher=original)
    penalty = None
    if config.importance:
        with _timed(seconds, "importance"):
            penalty = _penalty(model, every if config.keep_importance else new, config, original, progress)
    if space is None:
        space = RetainedSpace(projector, None, "given") if projector is not None else retained_space(
            model, config=config, image_shape=shape, num_classes=num_classes, retain=retain, stand_ins=stand_ins,
            seed=seed, autocast_dtype=autocast_dtype, progress=progress, request=every.images)
    if space.phase:
        seconds[space.phase] = space.seconds
    if space.note:
        notes.append(space.note)

    with _timed(seconds, "updates"):
        loop = UpdateLoop(model, config, anchors=anchors, adv_weight=config.adv_weight_for(len(every)),
                          generator=generator, penalty=penalty, projector=space.projector)
        _descend(loop, every, goal, progress, notes)
        with torch.no_grad():
            final = model(every.images).float().cpu()
        agreement = space.agreement(model)
        probes = {space.kind: {"n_images": len(space.images), "agreement": agreement}} if agreement is not None else {}
    n = len(new)
    return UnlearnResult(
        goal_met=bool(goal.met(final, every.targets.cpu()).all()), steps=loop.steps, seconds=seconds,
        logits=final[:n], keep_logits=final[n:] if keep is not None else None,
        lam_final=penalty.lam if penalty is not None else None,
        adv_attack_success=anchors.attack_success if anchors is not None else None, notes=notes,
        projection=space.describe(), retained=space.kind, agreement=agreement, probes=probes,
        loss_history=torch.stack(loop.losses).tolist() if loop.losses else [],
        precision=describe(autocast_dtype, images.device, how), adv_weight=loop.adv_weight,
    )


def _penalty(model: nn.Module, measured: ImageSet, config: UnlearnConfig, original: nn.Module | None,
             progress: Progress) -> ImportancePenalty:
    """The MAS penalty (Eq. 7), its importance measured on ``measured``."""
    progress.start("importance", len(measured))
    estimate = mas_importance_batch if config.importance_estimate == "batch" else mas_importance
    omega = estimate(model, measured.images, progress=progress.advance)
    progress.finish()
    return ImportancePenalty(model, omega, config.lam, anchor=original)


def _check(model: nn.Module, data: ImageSet, step: ImageSet, anchors: AnchorSet | None, idx: torch.Tensor | None,
           goal: Goal, bn: str, rows: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, Replay]:
    """Which images meet the goal, in eval mode. BatchNorm frozen and every image in the step:
    the same pass gives the step's logits of the images and of the anchor rows, in passes of at
    most ``rows`` rows (:func:`.memory.logits_in_parts`; else None: see :func:`_step_pass`)."""
    model.eval()
    if bn == "eval" and step is data:
        batch = data.images if idx is None else torch.cat([data.images, anchors.inputs[idx]])
        logits, replay = logits_in_parts(model, batch, rows)
        lf, la = logits[:len(data)], logits[len(data):]
        return goal.met(lf.detach(), data.targets), lf, la, replay
    with torch.no_grad():
        return goal.met(model(data.images), data.targets), None, None, None


def _step_pass(model: nn.Module, step: ImageSet, anchors: AnchorSet | None, idx: torch.Tensor | None,
               bn: str, rows: int) -> tuple[torch.Tensor, torch.Tensor | None, Replay]:
    """The step's logits. BatchNorm in train mode, as the reference code updates: the images and
    the anchor rows in separate batches, each normalised by its own statistics."""
    if bn == "eval":
        batch = step.images if idx is None else torch.cat([step.images, anchors.inputs[idx]])
        logits, replay = logits_in_parts(model, batch, rows)
        return logits[:len(step)], logits[len(step):], replay
    model.train()
    la = model(anchors.inputs[idx]) if idx is not None else None  # the anchors first, as the reference code
    return model(step.images), la, None


def _rows_per_pass(loop: UpdateLoop, data: ImageSet, notes: list[str]) -> int:
    """Rows one forward and backward pass of an update step may take on this device's free memory;
    a note when a step is split. With BatchNorm in train mode a split would change the batch
    statistics, so a step that does not fit is refused before it is killed for memory."""
    wanted = min(len(data), loop.config.forget_batch_size or len(data)) + loop.batch
    rows = rows_that_fit(loop.model, tuple(data.images.shape[1:]), data.images.device, wanted)
    if rows >= wanted:
        return wanted
    if loop.config.bn != "eval":
        raise UsageError(f"an update step of {wanted} rows does not fit in this device's free memory ({rows} rows do) "
                         "with BatchNorm in train mode; pass --bn eval (its steps are split to fit) or a smaller "
                         "--forget-batch-size")
    notes.append(f"each update step of {wanted} rows ran in passes of {rows} to fit in this device's free memory")
    return rows


def _descend(loop: UpdateLoop, data: ImageSet, goal: Goal, progress: Progress, notes: list[str]) -> None:
    """Step until every image meets the goal or the step cap is hit."""
    config = loop.config
    loop.model.eval()
    rows = _rows_per_pass(loop, data, notes)
    progress.start("updates", config.max_steps, unit="steps")
    try:
        while True:
            idx, step = loop.next_rows(), loop.next_forget(data)
            met, lf, la, replay = _check(loop.model, data, step, loop.anchors, idx, goal, config.bn, rows)
            n_met = int(met.sum())
            if n_met == len(data) or loop.steps >= config.max_steps:
                break
            if lf is None:
                lf, la, replay = _step_pass(loop.model, step, loop.anchors, idx, config.bn, rows)
            loss = objective_loss(lf, step.targets, goal, config.objective, config.margin)
            if idx is not None:
                loss = loop.with_anchors(loss, la, idx, len(step))
            if not torch.isfinite(loss):
                value = loss.item()
                if not loop.can_roll_back():
                    raise NumericalError(f"the loss became {value} at step {loop.steps}; nothing was written (try a "
                                         f"smaller --lr{' or --adv-weight' if idx is not None else ''})")
                notes.append(loop.roll_back(value))
                continue
            loop.step(loss, replay)
            progress.advance(1)
            if note := loop.adapt_lambda(n_met):
                notes.append(note)
    finally:
        progress.finish()
        loop.close()
