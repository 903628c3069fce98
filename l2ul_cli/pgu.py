"""``--method pgu``: Projected-Gradient Unlearning (Hoang et al., WACV 2024; ../shared/papers/pgu-summary.md)
as its code (github hnanhtuan/projected_gradient_unlearning) runs a data-removal request.

What the code does, and this module with it (file names are the code's):
- Core gradient space (utils/unlearn_utils.py ``compute_svd``): for every convolution and linear
  layer, the uncentred covariance of its inputs over the whole training set, one pass, cached.
  Here: the index (:mod:`.index`), built once per checkpoint.
- Retained space (``compute_retain_svd``): that covariance less the forget images' own, taken on
  the current model, decomposed again; the next request starts from it (incremental unlearning).
  Here: :meth:`.RetainedIndex.subtract`; the result is :attr:`PGUResult.reduced_index`.
- γ per layer (unlearn.py ``retained_var``, 0.95 for SmallVGG and ResNet-18, 0.9 for AllCNN):
  the first k directions whose running share of the singular values (√eigenvalues) is at most
  γ; a layer at γ = 1 is not updated at all.
- Update (unlearn.py): plain SGD, no momentum; the gradient (plus weight decay, 0) loses its
  part in those directions; parameters without a projection (biases, normalisation) are held.
- Learning rate: per epoch, exponentially from ``start_lr`` 0.05 to ``end_lr`` 0.01 over 100
  epochs; epoch 0 only evaluates. One step per batch of 128 forget images, in order.
- Objective: mean −log(1 − (p_y − offset)) + 0.2 × mean Σ p log p (softmax p, offset 0.05):
  the label's probability pushed down, the prediction's entropy up.
- BatchNorm: train mode with every BatchNorm module put back in eval (``freeze_norm_stats``):
  running statistics used and never updated, dropout active.
- Stop: after each epoch, the gap held-out accuracy − forget accuracy; once it is positive the
  run stops, keeping whichever of this epoch's and the previous epoch's weights has the smaller
  gap; already positive before any update means there is nothing to do ("unlearning too fast").

Options of this tool: ``objective="ce"`` or ``"margin"`` (:mod:`.objectives`: the goal's −CE, or a
hinge on the logit gap) and ``stop="goal"`` (every forget image meets the goal, e.g. misclassified)
instead of the code's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .anchors import NullProgress, Progress
from .config import UnlearnConfig
from .errors import NumericalError, UsageError
from .evaluate import accuracy, predict
from .goals import Goal, goal_named
from .index import RetainedIndex
from .memory import rows_that_fit
from .objectives import objective_loss
from .projection import GradientProjector
from .unlearn import ImageSet, UnlearnResult

# Share of the forget images' input energy the index may lack before a note says it was likely
# built without them (then subtracting them removes directions the retained images use).
EXCESS_NOTE = 0.05


@dataclass
class PGUConfig:
    gamma: float = 0.95  # unlearn.py retained_var (SmallVGG, ResNet-18 configs)
    gamma_layers: dict[str, float] = field(default_factory=dict)  # per layer name; 1.0: not updated
    start_lr: float = 0.05
    end_lr: float = 0.01
    epochs: int = 100
    batch_size: int = 128
    offset: float = 0.05
    label_weight: float = 1.0  # loss1_w
    entropy_weight: float = 0.2  # loss2_w
    weight_decay: float = 0.0
    # pgu: the code's; ce or margin: the tool's objectives for the goal (:mod:`.objectives`)
    objective: Literal["pgu", "ce", "margin"] = "pgu"
    margin: float = 1.0  # of the margin objective: how far past its goal each image is pushed
    stop: Literal["gap", "goal"] = "gap"  # gap: the code's (needs held-out images); goal: every image meets it
    subtract: bool = True  # False: the index already leaves the forget images out (e.g. built from --retain)

    def gamma_for(self, layer: str) -> float:
        return float(self.gamma_layers.get(layer, self.gamma))


@dataclass
class PGUResult:
    steps: int
    goal_met: bool
    seconds: dict[str, float]
    notes: list[str]
    reduced_index: RetainedIndex  # what --update-index writes for the next request
    epochs: int = 0
    stopped: str = ""  # why the loop ended
    forget_accuracy: float = float("nan")  # after
    heldout_accuracy: float | None = None  # after, with held-out images
    projection: str = ""
    loss_history: list[float] = field(default_factory=list)
    # held-out − forget accuracy before the first epoch and after each (with held-out images)
    gap_history: list[float] = field(default_factory=list)


def pgu_objective(logits: torch.Tensor, labels: torch.Tensor, config: PGUConfig) -> torch.Tensor:
    """The code's loss: the label's probability below ``1 + offset`` of certainty, entropy up."""
    p = F.softmax(logits.float(), dim=1)
    label = -torch.log(1 - (p.gather(1, labels.view(-1, 1)).squeeze(1) - config.offset)).mean()
    negative_entropy = (p * torch.log(p + 1e-15)).sum(1).mean()
    return config.label_weight * label + config.entropy_weight * negative_entropy


def pgu_projector(model: nn.Module, index: RetainedIndex, config: PGUConfig) -> tuple[GradientProjector, list[str]]:
    """The code's projection: per layer the directions γ keeps; layers at γ ≥ 1 held whole."""
    ranks, held, notes = {}, [], []
    for name, space in index.layers.items():
        gamma = config.gamma_for(name)
        if gamma >= 1.0:
            held.append(name)
            continue
        ranks[name] = space.singular_rank(gamma)
        if ranks[name] > space.vectors.shape[1]:
            notes.append(f"layer {name}: γ {gamma} keeps {ranks[name]} directions, the index holds "
                         f"{space.vectors.shape[1]} (built at energy {index.energy}); build it at a higher energy")
    projector = index.projector(model, config.gamma, ranks=ranks)
    modules = dict(model.named_modules())
    projector.frozen += [modules[n].weight for n in held]
    return projector, notes


@torch.no_grad()
def _forget_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, goal: Goal) -> tuple[float, bool]:
    """Accuracy on the forget images and whether each meets the goal (eval mode)."""
    logits = predict(model, x.split(256), x.device, out=x.device)
    return accuracy(logits, y), bool(goal.met(logits, y).all())


def _heldout_accuracy(model: nn.Module, heldout: tuple[torch.Tensor, torch.Tensor] | None, device) -> float | None:
    if heldout is None:
        return None
    x, y = heldout
    return accuracy(predict(model, x.split(256), device), y.cpu())


def _train_frozen_norms(model: nn.Module) -> None:
    """The code's mode for updates: train, with every BatchNorm in eval (statistics frozen)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, projector: GradientProjector, lr: float,
           goal: Goal, config: PGUConfig, rows: int) -> list[float]:
    """One pass over the forget images in batches, one projected SGD step each; the losses.
    ``rows``: most images one forward and backward pass may take (a batch above it accumulates
    its parts' gradients, weighted by their share: every objective here is a mean over images)."""
    _train_frozen_norms(model)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for xb, yb in zip(x.split(config.batch_size), y.split(config.batch_size)):
        model.zero_grad(set_to_none=True)
        loss = 0.0
        for xp, yp in zip(xb.split(rows), yb.split(rows)):
            logits = model(xp)
            part = pgu_objective(logits, yp, config) if config.objective == "pgu" else \
                objective_loss(logits, yp, goal, config.objective, config.margin)
            if not torch.isfinite(part):
                raise NumericalError(f"PGU's loss became {part.item()}; nothing is written")
            (part * (len(xp) / len(xb))).backward()
            loss += part.item() * len(xp) / len(xb)
        with torch.no_grad():
            if config.weight_decay:  # the code adds it before projecting
                for p in params:
                    if p.grad is not None:
                        p.grad.add_(p, alpha=config.weight_decay)
            projector.project()
            for p in params:
                if p.grad is not None:
                    p.sub_(p.grad, alpha=lr)
        losses.append(loss)
    model.zero_grad(set_to_none=True)
    return losses


def _check(goal: Goal, config: PGUConfig) -> None:
    if config.objective == "pgu" and not goal.away:
        raise UsageError(f"PGU's objective moves images away from their label; for '{goal.name}' use the objective "
                         "margin or ce")
    if not (0 < config.gamma <= 1 and all(0 < g <= 1 for g in config.gamma_layers.values())):
        raise UsageError("PGU's γ must be in (0, 1] for every layer")
    if config.epochs < 1 or config.batch_size < 1 or config.start_lr <= 0 or config.end_lr <= 0:
        raise UsageError("PGU needs at least one epoch, a batch of one or more and positive learning rates")


def pgu_unlearn(model: nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor, index: RetainedIndex, *,
                goal: str | Goal = "forget", config: PGUConfig | None = None, device: torch.device | str = "cpu",
                progress: Progress | None = None,
                heldout: tuple[torch.Tensor, torch.Tensor] | None = None) -> PGUResult:
    """Change ``model`` in place by PGU until its stop rule holds or ``config.epochs`` pass.
    ``heldout``: images and labels for the code's stop rule (without them it stops at the goal)."""
    config, goal, progress = config or PGUConfig(), goal_named(goal), progress or NullProgress()
    _check(goal, config)
    x, y = forget_x.to(device), forget_y.to(device)
    seconds, notes = {}, []
    t0 = time.perf_counter()
    reduced = index.subtract(model, x) if config.subtract else index
    if reduced.excess > EXCESS_NOTE:
        notes.append(f"{reduced.excess:.0%} of the forget images' input energy was not in the index: it was "
                     "likely built without them (use it without subtracting, or build it on the training images)")
    projector, more = pgu_projector(model, reduced, config)
    notes += more
    seconds["index"] = time.perf_counter() - t0
    stop = config.stop
    if stop == "gap" and heldout is None:
        stop = "goal"
        notes.append("no held-out images for PGU's stop rule (forget accuracy below held-out accuracy): "
                     "stopped when every forget image met the goal")
    t1 = time.perf_counter()
    batch = min(config.batch_size, len(x))
    rows = rows_that_fit(model, tuple(x.shape[1:]), x.device, batch, floor=1)
    if rows < batch:
        notes.append(f"each PGU batch of {batch} images ran in passes of {rows} to fit in this device's free memory")
    run = _Run(model, x, y, goal, heldout, device, rows)
    was_training = model.training
    progress.start("pgu", config.epochs, unit="epochs")
    try:
        stopped = _loop(run, projector, config, stop, progress)
    finally:
        progress.finish()
        model.train(was_training)
    seconds["updates"] = time.perf_counter() - t1
    acc, met = _forget_accuracy(model, x, y, goal)
    return PGUResult(run.steps, met, seconds, notes, reduced, epochs=run.epochs, stopped=stopped,
                     forget_accuracy=acc, heldout_accuracy=_heldout_accuracy(model, heldout, device),
                     projection=f"{reduced.describe_source()}, γ {config.gamma}: {projector.summary()}",
                     loss_history=run.losses, gap_history=run.gaps)


@dataclass
class _Run:
    """The state of one PGU run: images, counters, every epoch's gap and the previous epoch's weights."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    goal: Goal
    heldout: tuple[torch.Tensor, torch.Tensor] | None
    device: torch.device | str
    rows: int  # most images per forward and backward pass (free memory)
    steps: int = 0
    epochs: int = 0
    losses: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    previous: dict[str, torch.Tensor] | None = None

    def gap(self) -> tuple[float, bool]:
        """Held-out accuracy − forget accuracy (positive: forgotten past the held-out level), and
        whether every forget image meets the goal."""
        acc, met = _forget_accuracy(self.model, self.x, self.y, self.goal)
        held = _heldout_accuracy(self.model, self.heldout, self.device)
        gap = held - acc if held is not None else float("nan")
        self.gaps.append(gap)
        return gap, met


def _loop(run: _Run, projector: GradientProjector, config: PGUConfig, stop: str, progress: Progress) -> str:
    """Epochs of projected steps under the code's learning-rate decay; why it stopped."""
    alpha = (config.end_lr / config.start_lr) ** (1 / config.epochs)
    gap, met = run.gap()
    if (stop == "gap" and gap > 0) or (stop == "goal" and met):
        return "nothing to do: the forget images were already " + (
            "below held-out accuracy" if stop == "gap" else "meeting the goal")
    for epoch in range(1, config.epochs + 1):
        if stop == "gap":
            run.previous = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        losses = _epoch(run.model, run.x, run.y, projector, config.start_lr * alpha ** epoch, run.goal, config,
                        run.rows)
        run.losses += losses
        run.steps += len(losses)
        run.epochs = epoch
        progress.advance(1)
        gap, met = run.gap()
        if stop == "goal" and met:
            return "every forget image meets the goal"
        if stop == "gap" and gap > 0:
            if abs(gap) >= abs(run.gaps[-2]):  # the gap before this epoch
                run.model.load_state_dict(run.previous)
                # Few images move their accuracy in big steps: the weights before the step that
                # crossed the held-out level may have forgotten none of them.
                return (f"forget accuracy fell below held-out accuracy; the previous epoch's weights were closer "
                        f"(with {run.x.shape[0]} images forget accuracy moves in steps of {1 / run.x.shape[0]:.3g})")
            return "forget accuracy fell below held-out accuracy"
    return f"{config.epochs} epochs"


def run_pgu(model: nn.Module, new: ImageSet, index: RetainedIndex, holdout: ImageSet | None, *, goal: Goal,
            config: UnlearnConfig, device: torch.device, progress: Progress | None = None) -> UnlearnResult:
    """``--method pgu`` as a request runs it: γ and the stop rule from the request's settings,
    ``--holdout`` for the code's stop rule; the result reads as the core's (report, health check
    on the index's probe images). With the code's rule the request succeeds when forget accuracy
    fell to the held-out level, not when every image is misclassified."""
    cfg = PGUConfig(gamma=config.gamma, stop=config.pgu_stop)
    probes = index.probes.to(device) if index.probes is not None else None
    before = predict(model, probes.split(256), device).argmax(1) if probes is not None else None
    r = pgu_unlearn(model, new.images, new.labels, index, goal=goal, config=cfg, device=device, progress=progress,
                    heldout=(holdout.images.to(device), holdout.labels.to(device)) if holdout is not None else None)
    by_gap = cfg.stop == "gap" and holdout is not None
    done = (not r.stopped.endswith("epochs")) if by_gap else r.goal_met
    probe_set = {}
    if probes is not None:
        after = predict(model, probes.split(256), device).argmax(1)
        kind = "retain" if "--retain" in index.source else "stand_ins"
        probe_set = {kind: {"n_images": len(probes), "agreement": float((after == before).float().mean())}}
    kind = next(iter(probe_set), "none")
    notes = list(r.notes)
    if by_gap:  # "goal met" then means PGU's rule, not misclassification: say what it left
        notes.append(f"PGU's stop rule ({r.stopped}) ended the run at forget accuracy {r.forget_accuracy:.1%}, "
                     f"--holdout accuracy {r.heldout_accuracy:.1%}; --pgu-stop goal misclassifies every image")
    return UnlearnResult(
        goal_met=done, steps=r.steps, seconds=r.seconds, logits=predict(model, [new.images], device), notes=notes,
        projection=r.projection, retained=kind, agreement=probe_set.get(kind, {}).get("agreement"), probes=probe_set,
        loss_history=r.loss_history, updated_index=r.reduced_index,
        extra={"pgu": {"gamma": cfg.gamma, "stop": "gap" if by_gap else "goal", "stopped": r.stopped,
                       "epochs": r.epochs, "heldout_accuracy": r.heldout_accuracy}},
    )
