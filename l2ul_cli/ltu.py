"""LTU, Learning-to-Unlearn (Huang et al., ECCV 2024, arXiv 2407.10494): unlearning by
meta-optimisation with membership-inference feedback and Gradient Harmonization.

Each iteration of :func:`ltu_unlearn`:

1. Meta-tune. A support set of forget images, each with a random wrong label, gives the forget
   loss L_f: cross-entropy to those labels plus the membership models' verdict on the images
   (binary cross-entropy towards "non-member"). Its gradient g_f makes the fast weights
   θ' = θ − inner_lr · g_f, kept in the autograd graph (``create_graph=True``) and used through
   :func:`torch.func.functional_call`, so nothing is copied and the graph is not cut.
2. Meta-test. Query sets from the retain images (disjoint from the support, which holds only
   forget images, and from each other), one per sampling strategy, give the remember loss
   L_r(θ'), cross-entropy to their labels. Its gradient g_r with respect to θ flows back
   through the inner step (second order), or with ``first_order=True`` it is taken with
   respect to θ' and applied to θ (the first-order MAML approximation).
3. Meta-update. Where g_f and g_r conflict (negative dot product) each is projected onto the
   normal plane of the other (PCGrad) before they are added; θ ← θ − lr · (g_f + g_r).

The run stops before the update at which every forget image meets the goal in eval mode, or at
``max_steps``. The model is changed in place.

No official code exists; these choices are ours, not the paper's:

- Random labels are drawn once per image (uniform over the other classes), not per iteration,
  so the support pulls each image in one consistent direction.
- The support is drawn from the forget images that do not meet the goal yet first, then from
  the rest.
- Query strategies: ``random`` (uniform), ``balanced`` (round-robin over the classes present)
  and ``hardest`` (the lowest logit margin under the current weights among 4 × query_size
  random candidates, so that a step does not score the whole retain subset).
- Membership models: one per feature of the logits (``loss``, ``confidence``, ``entropy``,
  ``margin``), each a 1-16-1 tanh MLP on the standardised feature, trained once on the
  original model's outputs with full-batch Adam. Members are the retain subset; non-members
  are the holdout images, or without them augmented retain images (noise and a shift of up
  to two pixels). Both sides are cut to the same count.
- Harmonization is PCGrad on the whole flattened gradient (not per layer) and symmetric: the
  sum then has a non-negative dot product with both gradients.
- The meta-update is plain SGD (no momentum, no weight decay).
- BatchNorm and dropout stay in eval mode throughout: running statistics are untouched, and a
  support of a few relabelled images would give poor batch statistics.
- For a goal that moves images onto targets (``away=False``) the support is labelled with the
  targets and the membership term is off; the paper only forgets.
- For the indistinguishable objective (:class:`.goals.LossTargetGoal`, each image's loss brought
  to a held-out image's) the meta-tune loss is that goal's hinge on the log loss instead of CE to
  random labels, and the membership term pulls the images' membership probability to the
  held-out images' mean rather than to "non-member": the aim is to look held out, not to be
  told apart from the other side. The paper has no such objective.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from . import memory
from .attack import draw_targets
from .errors import NumericalError, UsageError
from .evaluate import predict
from .config import UnlearnConfig
from .goals import FORGET, Goal, LossTargetGoal, goal_named
from .unlearn import ImageSet, UnlearnResult

__all__ = ["FEATURES", "STRATEGIES", "LTUConfig", "LTUResult", "MembershipModel", "MetaGradients", "augment",
           "draw_queries", "harmonize", "ltu_unlearn", "membership_feature", "meta_gradients",
           "train_membership_models"]

FEATURES = ("loss", "confidence", "entropy", "margin")
STRATEGIES = ("random", "balanced", "hardest")


@dataclass
class LTUConfig:
    lr: float = 1e-3  # meta-update (outer) step size
    inner_lr: float = 1e-3  # meta-tune (inner) step size
    max_steps: int = 200
    support_size: int = 8  # forget images per meta-tune step
    query_size: int = 32  # retain images per query set, one set per strategy
    retain_fraction: float = 0.3  # of the given retain images, the share LTU sees
    first_order: bool = False  # True: the first-order approximation of the meta-gradient
    mia_features: tuple[str, ...] = ("loss", "entropy")
    mia_weight: float = 1.0  # of the membership term in the forget loss
    mia_steps: int = 300  # Adam steps training each membership model
    strategies: tuple[str, ...] = STRATEGIES
    remember_weight: float = 1.0  # of g_r against g_f in the meta-update
    harmonize: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if unknown := [f for f in self.mia_features if f not in FEATURES]:
            raise UsageError(f"unknown membership feature(s) {', '.join(unknown)}; choose from {', '.join(FEATURES)}")
        if unknown := [s for s in self.strategies if s not in STRATEGIES]:
            raise UsageError(f"unknown query strategy(ies) {', '.join(unknown)}; choose from {', '.join(STRATEGIES)}")
        if not 0.0 < self.retain_fraction <= 1.0:
            raise UsageError(f"--retain-fraction must be in (0, 1], not {self.retain_fraction}")
        if min(self.support_size, self.query_size, self.max_steps + 1) < 1 or not self.strategies:
            raise UsageError("support and query sizes must be positive and at least one strategy given")


@dataclass
class LTUResult:
    goal_met: bool
    steps: int
    harmonized: int  # steps whose gradients were projected
    conflicts: int  # steps whose forget and remember gradients had a negative dot product
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    logits: torch.Tensor | None = None  # the forget images' logits at the end (eval mode, fp32, CPU)
    retain_agreement: float | None = None  # share of the retain subset predicted as before
    membership_before: float | None = None  # mean membership probability of the forget images
    membership_after: float | None = None
    loss_history: list[tuple[float, float]] = field(default_factory=list)  # (L_f, L_r) per step


# Membership models

def membership_feature(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """Per image, the signal one membership model reads: members tend to have low loss, high
    confidence, low entropy and a large margin. Differentiable in the logits."""
    logits = logits.float()
    if kind == "loss":
        return F.cross_entropy(logits, labels, reduction="none")
    if kind == "confidence":
        return logits.softmax(1).gather(1, labels.view(-1, 1)).squeeze(1)
    if kind == "entropy":
        return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    if kind == "margin":
        return FORGET.gap(logits, labels)
    raise ValueError(f"unknown membership feature {kind!r}")


class MembershipModel(nn.Module):
    """P(member) from one feature of a classifier's logits."""

    def __init__(self, feature: str, mean: float, std: float, hidden: int = 16):
        super().__init__()
        self.feature = feature
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(max(float(std), 1e-6)))
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = (membership_feature(logits, labels, self.feature) - self.mean) / self.std
        return torch.sigmoid(self.net(z.unsqueeze(1)).squeeze(1))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Stand-in non-members: each image shifted by up to two pixels each way, plus noise."""
    shifts = torch.randint(-2, 3, (len(images), 2), generator=generator).tolist()
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    shifted = torch.stack([torch.roll(x, (dy, dx), dims=(-2, -1)) for x, (dy, dx) in zip(images, shifts)])
    return (shifted + 0.05 * noise).clamp(0, 1)


def train_membership_models(
    model: nn.Module, members: torch.Tensor, member_labels: torch.Tensor, nonmembers: torch.Tensor,
    nonmember_labels: torch.Tensor, features: tuple[str, ...], *, steps: int, generator: torch.Generator,
) -> list[MembershipModel]:
    """One model per feature, trained on ``model``'s eval-mode logits of equal numbers of
    members (label 1) and non-members (label 0). Returned frozen, on the images' device."""
    n = min(len(members), len(nonmembers))
    pick_m = torch.randperm(len(members), generator=generator)[:n].to(members.device)
    pick_n = torch.randperm(len(nonmembers), generator=generator)[:n].to(nonmembers.device)
    device = members.device
    logits = torch.cat([predict(model, members[pick_m].split(256), device, device),
                        predict(model, nonmembers[pick_n].split(256), device, device)])
    labels = torch.cat([member_labels[pick_m], nonmember_labels[pick_n]])
    truth = torch.cat([torch.ones(n), torch.zeros(n)]).to(device)
    out = []
    for kind in features:
        value = membership_feature(logits, labels, kind)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, the global generator left as it was
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
            mia = MembershipModel(kind, value.mean().item(), value.std().item() if n > 1 else 1.0).to(device)
        opt = torch.optim.Adam(mia.parameters(), lr=0.05)
        for _ in range(steps):
            loss = F.binary_cross_entropy(mia(logits, labels).clamp(1e-6, 1 - 1e-6), truth)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append(mia.requires_grad_(False).eval())
    return out


def _membership(mias: list[MembershipModel], logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per image, the membership models' mean P(member)."""
    return torch.stack([m(logits, labels) for m in mias]).mean(0)


# The meta step

def draw_queries(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, size: int,
                 strategies: tuple[str, ...], generator: torch.Generator) -> list[torch.Tensor]:
    """One query set of up to ``size`` row indices (CPU) per strategy, the sets disjoint."""
    used = torch.zeros(len(images), dtype=torch.bool)
    labels_cpu = labels.cpu()
    sets = []
    for strategy in strategies:
        free = (~used).nonzero().squeeze(1)
        free = free[torch.randperm(len(free), generator=generator)]
        if strategy == "random":
            pick = free[:size]
        elif strategy == "balanced":
            pick = free[_round_robin(labels_cpu[free])[:size]]
        else:  # hardest: lowest margin among random candidates
            candidates = free[:4 * size]
            margin = FORGET.gap(predict(model, [images[candidates.to(images.device)]], images.device), labels_cpu[candidates])
            pick = candidates[margin.argsort()[:size]]
        used[pick] = True
        sets.append(pick)
    return sets


def _round_robin(labels: torch.Tensor) -> torch.Tensor:
    """An order of the rows that takes one of each class in turn (rows shuffled beforehand)."""
    rank = torch.zeros(len(labels), dtype=torch.long)
    for c in labels.unique():
        rows = labels == c
        rank[rows] = torch.arange(int(rows.sum()))
    return rank.argsort(stable=True)


@dataclass
class MetaGradients:
    forget: list[torch.Tensor]  # g_f: of L_f at θ
    remember: list[torch.Tensor]  # g_r: of L_r at θ' = θ − inner_lr · g_f, with respect to θ (or θ')
    forget_loss: float
    remember_loss: float


def meta_gradients(model: nn.Module, params: dict[str, torch.Tensor], forget_loss, support: torch.Tensor,
                   query: torch.Tensor, query_labels: torch.Tensor, *, inner_lr: float,
                   first_order: bool) -> MetaGradients:
    """Meta-tune on ``support`` (``forget_loss`` maps its logits to L_f), then meta-test on
    ``query``. ``params``: the model's parameters by name, the leaves the gradients are for."""
    names, leaves = list(params), list(params.values())
    lf = forget_loss(functional_call(model, params, (support,)))
    g_f = torch.autograd.grad(lf, leaves, create_graph=not first_order)
    fast = [p - inner_lr * g for p, g in zip(leaves, g_f)]
    if first_order:  # θ' as new leaves: g_r is taken there and applied to θ
        fast = [t.detach().requires_grad_(True) for t in fast]
    lr_ = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (query,)).float(), query_labels)
    g_r = torch.autograd.grad(lr_, fast if first_order else leaves)
    return MetaGradients([g.detach() for g in g_f], [g.detach() for g in g_r], lf.item(), lr_.item())


def harmonize(g_forget: torch.Tensor, g_remember: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The sum of two flat gradients; where they conflict (negative dot product) each is first
    projected onto the normal plane of the other (PCGrad). Returns the sum and whether it did."""
    dot = torch.dot(g_forget, g_remember)
    if dot >= 0:
        return g_forget + g_remember, False
    f = g_forget - dot / g_remember.square().sum().clamp_min(1e-30) * g_remember
    r = g_remember - dot / g_forget.square().sum().clamp_min(1e-30) * g_forget
    return f + r, True


# The run

@dataclass
class _Sets:
    """The images of a run on the model's device, and what each set is for."""

    forget: torch.Tensor
    forget_y: torch.Tensor  # what the goal is judged against (the true labels for forget)
    labels: torch.Tensor  # the forget images' true labels (what the membership models read)
    support_y: torch.Tensor  # the meta-tune labels: random wrong ones, or the goal's targets
    retain: torch.Tensor  # the retain_fraction subset
    retain_y: torch.Tensor


def _prepare(forget_x, forget_y, retain_x, retain_y, goal: Goal, num_classes: int, config: LTUConfig,
             device, generator: torch.Generator) -> _Sets:
    """Move to ``device``, draw the random labels and the retain subset."""
    forget_y = forget_y.to(device)
    labels = LossTargetGoal.split(forget_y)[0] if isinstance(goal, LossTargetGoal) else forget_y
    if goal.away and not isinstance(goal, LossTargetGoal):
        support_y = draw_targets(forget_y, num_classes, 1, generator)[:, 0].to(device)
    else:  # the goal's own targets: new labels, or [label, target loss] rows
        support_y = forget_y
    n = max(1, math.ceil(config.retain_fraction * len(retain_x)))
    keep = torch.randperm(len(retain_x), generator=generator)[:n]
    return _Sets(forget_x.to(device), forget_y, labels, support_y, retain_x[keep].to(device), retain_y[keep].to(device))


def _forget_objective(sets: _Sets, rows: torch.Tensor, goal: Goal, mias: list[MembershipModel], weight: float,
                      member_target: float = 0.0):
    """L_f of the support ``rows``: CE to their support labels (for the indistinguishable goal,
    its hinge on the log loss), plus for a forget goal the membership models' pull towards
    ``member_target`` (0: "non-member")."""
    def loss(logits: torch.Tensor) -> torch.Tensor:
        if isinstance(goal, LossTargetGoal):
            value = F.relu(goal.gap(logits.float(), sets.support_y[rows])).mean()
        else:
            value = F.cross_entropy(logits.float(), sets.support_y[rows])
        if goal.away and mias and weight:
            member = _membership(mias, logits, sets.labels[rows]).clamp(1e-6, 1 - 1e-6)
            value = value + weight * F.binary_cross_entropy(member, torch.full_like(member, member_target))
        return value
    return loss


def _support_rows(met: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``size`` forget rows, those not meeting the goal yet first, each group shuffled."""
    order = torch.randperm(len(met), generator=generator)
    order = order[met.cpu()[order].long().argsort(stable=True)]
    return order[:size]


def _step(model: nn.Module, params: dict[str, torch.Tensor], sets: _Sets, met: torch.Tensor, goal: Goal,
          mias: list[MembershipModel], config: LTUConfig, generator: torch.Generator,
          first_order: bool, member_target: float = 0.0) -> tuple[bool, MetaGradients]:
    """One meta-tune, meta-test and meta-update; returns whether the gradients conflicted."""
    rows = _support_rows(met, config.support_size, generator).to(sets.forget.device)
    queries = torch.cat(draw_queries(model, sets.retain, sets.retain_y, config.query_size, config.strategies, generator))
    queries = queries.to(sets.retain.device)
    grads = meta_gradients(model, params, _forget_objective(sets, rows, goal, mias, config.mia_weight, member_target),
                           sets.forget[rows], sets.retain[queries], sets.retain_y[queries],
                           inner_lr=config.inner_lr, first_order=first_order)
    g_f = torch.cat([g.flatten() for g in grads.forget])
    g_r = config.remember_weight * torch.cat([g.flatten() for g in grads.remember])
    if not (torch.isfinite(g_f).all() and torch.isfinite(g_r).all()):
        raise NumericalError(f"the LTU gradients became non-finite (L_f {grads.forget_loss:.3g}, "
                             f"L_r {grads.remember_loss:.3g}); try a smaller --lr or inner step")
    conflict = bool(torch.dot(g_f, g_r) < 0)
    update = harmonize(g_f, g_r)[0] if config.harmonize else g_f + g_r
    with torch.no_grad():
        for p, u in zip(params.values(), update.split([p.numel() for p in params.values()])):
            p.sub_(config.lr * u.view_as(p))
    return conflict, grads


def ltu_unlearn(
    model: nn.Module, forget_x: torch.Tensor, forget_y: torch.Tensor, retain_x: torch.Tensor,
    retain_y: torch.Tensor, *, holdout_x: torch.Tensor | None = None, holdout_y: torch.Tensor | None = None,
    goal: str | Goal, config: LTUConfig | None = None, device: torch.device | str = "cpu",
) -> LTUResult:
    """Change ``model`` in place until every forget image meets ``goal`` (eval mode) or
    ``config.max_steps`` meta-updates are done. Images in the model's input range;
    ``forget_y``: what the goal is judged against (the true labels for ``forget``). The retain
    and holdout images must not include forget images: the caller keeps the sets apart."""
    config, goal = config or LTUConfig(), goal_named(goal)
    if len(retain_x) == 0 or len(forget_x) == 0:
        raise UsageError("LTU needs forget images and retain images (its meta-test and membership models use them)")
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device).eval()
    t0 = time.perf_counter()
    before = predict(model, forget_x.split(256), device, device)
    sets = _prepare(forget_x, forget_y, retain_x, retain_y, goal, before.shape[1], config, device, generator)
    notes = [f"retain subset: {len(sets.retain)} of {len(retain_x)} images"]
    config = replace(config, query_size=_queries_that_fit(model, sets, config, device, notes))
    if len(sets.retain) < config.query_size * len(config.strategies):
        notes.append(f"query sets cut to the {len(sets.retain)} retain images available")
    mias = _membership_models(model, sets, holdout_x, holdout_y, config, generator, notes)
    retain_before = predict(model, sets.retain.split(256), device).argmax(1)
    member_target = 0.0
    if isinstance(goal, LossTargetGoal) and mias and holdout_x is not None:  # look held out: their mean
        member_target = _mean_membership(mias, predict(model, holdout_x.split(256), device, device),
                                         holdout_y.to(device))
        notes.append(f"membership term pulls towards the held-out images' mean P(member), {member_target:.3f}")
    seconds = {"membership": time.perf_counter() - t0}
    t0 = time.perf_counter()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    steps = harmonized = conflicts = 0
    first_order = config.first_order
    history: list[tuple[float, float]] = []
    while True:
        met = goal.met(predict(model, sets.forget.split(256), device, device), sets.forget_y)
        if bool(met.all()) or steps >= config.max_steps:
            break
        try:
            conflict, grads = _step(model, params, sets, met, goal, mias, config, generator, first_order, member_target)
        except RuntimeError as exc:  # raised before the update: the weights are unchanged
            if first_order or "not implemented" not in str(exc):
                raise
            first_order = True  # e.g. hardswish and hardsigmoid have no second derivative in torch
            notes.append(f"second-order meta-gradient unavailable for this network ({str(exc).splitlines()[0]}); "
                         "the first-order approximation was used")
            continue
        steps, conflicts = steps + 1, conflicts + conflict
        harmonized += int(conflict and config.harmonize)
        history.append((grads.forget_loss, grads.remember_loss))
    seconds["updates"] = time.perf_counter() - t0
    final = predict(model, sets.forget.split(256), device, device)
    if conflicts:
        notes.append(f"gradients conflicted in {conflicts} of {steps} steps; harmonized {harmonized}")
    return LTUResult(
        goal_met=bool(goal.met(final, sets.forget_y).all()), steps=steps, harmonized=harmonized,
        conflicts=conflicts, seconds=seconds, notes=notes, logits=final.cpu(),
        retain_agreement=(predict(model, sets.retain.split(256), device).argmax(1) == retain_before).float().mean().item(),
        membership_before=_mean_membership(mias, before, sets.labels),
        membership_after=_mean_membership(mias, final, sets.labels), loss_history=history,
    )


def _queries_that_fit(model: nn.Module, sets: _Sets, config: LTUConfig, device, notes: list[str]) -> int:
    """Query images per strategy that a meta-step's graph leaves room for in the free memory
    (:func:`.memory.rows_that_fit`). An estimate: the support's forward is counted twice (its
    gradient is differentiated again), each query image once, at the bytes per image the model
    keeps for a first-order backward pass."""
    support, sets_per_step = min(config.support_size, len(sets.forget)), len(config.strategies)
    wanted = 2 * support + sets_per_step * config.query_size
    budget = memory.rows_that_fit(model, tuple(sets.forget.shape[1:]), torch.device(device), wanted, floor=0)
    fit = (budget - 2 * support) // sets_per_step
    if fit < 1:
        raise UsageError(f"an LTU step ({support} support images, twice, and {sets_per_step} query sets) does "
                         f"not fit in this device's free memory ({budget} images' activations do); run it on a device "
                         "with more memory or at a smaller input size")
    if fit < config.query_size:
        notes.append(f"query sets cut from {config.query_size} to {fit} images per strategy to fit in this device's "
                     "free memory")
    return min(fit, config.query_size)


def _membership_models(model: nn.Module, sets: _Sets, holdout_x, holdout_y, config: LTUConfig,
                       generator: torch.Generator, notes: list[str]) -> list[MembershipModel]:
    """The membership models: the retain subset against the holdout images, or against
    augmented copies of itself when there are none."""
    if not config.mia_features:
        return []
    if holdout_x is None or len(holdout_x) == 0:
        nonmembers, nonmember_y = augment(sets.retain, generator), sets.retain_y
        notes.append("membership models: no holdout images, non-members are augmented retain images")
    else:
        nonmembers, nonmember_y = holdout_x.to(sets.retain.device), holdout_y.to(sets.retain.device)
    return train_membership_models(model, sets.retain, sets.retain_y, nonmembers, nonmember_y, config.mia_features,
                                   steps=config.mia_steps, generator=generator)


def _mean_membership(mias: list[MembershipModel], logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    if not mias:
        return None
    with torch.no_grad():
        return _membership(mias, logits, labels).mean().item()


def run_ltu(model: nn.Module, new: ImageSet, retain: torch.Tensor, holdout: ImageSet | None, *, goal: Goal,
            config: UnlearnConfig, seed: int, device: torch.device) -> UnlearnResult:
    """``--method ltu`` as a request runs it: the retain images' labels are the model's own
    predictions (``--retain`` needs none), the learning rate, step cap and retain share come
    from the request's settings, and the result reads as the core's does (report, health check)."""
    cfg = LTUConfig(lr=config.lr, max_steps=config.max_steps, retain_fraction=config.retain_fraction, seed=seed)
    retain_before = predict(model, retain.split(256), device).argmax(1)
    r = ltu_unlearn(model, new.images, new.targets, retain, retain_before, goal=goal, config=cfg, device=device,
                    holdout_x=holdout.images if holdout is not None else None,
                    holdout_y=holdout.labels if holdout is not None else None)
    # Every --retain image, most of which LTU never saw, is the health check's probe.
    agreement = float((predict(model, retain.split(256), device).argmax(1) == retain_before).float().mean())
    return UnlearnResult(
        goal_met=r.goal_met, steps=r.steps, seconds=r.seconds, logits=r.logits, notes=r.notes, retained="retain",
        agreement=agreement, probes={"retain": {"n_images": len(retain), "agreement": agreement}},
        loss_history=[f for f, _ in r.loss_history],
        extra={"ltu": {"harmonized": r.harmonized, "conflicts": r.conflicts, "retain_fraction": cfg.retain_fraction,
                       "membership_before": r.membership_before, "membership_after": r.membership_after,
                       "holdout": len(holdout) if holdout is not None else 0}},
    )
