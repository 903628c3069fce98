"""The unlearning loop: objectives (Eq. 3, 4), regularisers (Eq. 6, 7) and the stop rule.

:func:`unlearn` changes a model in place until every forget image meets its goal — misclassified
(``forget``) or predicted as its new label (``relabel``) — or the step cap is hit. The goal is
checked before every update on logits of the current weights in eval mode (with BatchNorm frozen
these are the logits the update itself computes, so the check costs no extra pass), so the loop
stops at the first weights that meet it and never takes a step past them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attack import adversarial_set
from .config import AttackConfig, Goal, UnlearnConfig
from .errors import NumericalError
from .importance import ImportancePenalty, mas_importance
from .precision import Precision, choose, describe
from .projection import GradientProjector
from .synthesis import BATCH as SYNTH_BATCH
from .synthesis import has_batchnorm, invert_batchnorm


class Progress(Protocol):
    """What the loop reports; the CLI draws rich progress bars from it."""

    def start(self, phase: str, total: int, unit: str = "images") -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    def start(self, phase: str, total: int, unit: str = "images") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def finish(self) -> None:
        pass


@dataclass
class UnlearnResult:
    goal_met: bool
    steps: int
    seconds: dict[str, float]
    logits: torch.Tensor  # forget images' logits after unlearning (eval mode, fp32, CPU)
    lam_final: float | None = None
    adv_attack_success: float | None = None  # fraction of copies the original model puts in their target class
    notes: list[str] = field(default_factory=list)
    projection: str | None = None  # what the updates were kept orthogonal to, if anything
    loss_history: list[float] = field(default_factory=list)  # per step, without the importance penalty
    precision: str = "fp32"  # what the attack and the stand-ins ran in
    # Share of the stand-ins predicted as before the updates. The projection holds them, so a
    # sound run keeps nearly all; a low share means the model moved elsewhere too.
    stand_in_agreement: float | None = None
    adv_weight: float = 0.0  # of the adversarial term at the end: halved on each divergence retry


def goal_mask(logits: torch.Tensor, targets: torch.Tensor, goal: Goal) -> torch.Tensor:
    """Per image: does the prediction meet the goal? forget: ≠ label; relabel: = new label."""
    pred = logits.argmax(dim=1)
    return pred != targets if goal == "forget" else pred == targets


def _max_other(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(F.one_hot(cls, logits.shape[1]).bool(), float("-inf")).max(dim=1).values


def objective_loss(logits: torch.Tensor, targets: torch.Tensor, goal: Goal, kind: str, margin: float) -> torch.Tensor:
    """L_UL. ``ce``: −CE (forget, Eq. 3) or CE (relabel, Eq. 4). ``margin``: a per-image hinge
    on the logit gap that is exactly zero once the image is past its goal by ``margin``, so
    images already forgotten stop pulling the weights (−CE is unbounded below)."""
    logits = logits.float()
    if kind == "ce":
        ce = F.cross_entropy(logits, targets)
        return -ce if goal == "forget" else ce
    own = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    other = _max_other(logits, targets)
    gap = own - other if goal == "forget" else other - own
    return F.relu(gap + margin).mean()


def adversarial_loss(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """R_Adv. ``ce``: CE to the attack targets (Eq. 6). ``kd``: KL to the original model's
    output on the same copies, which keeps its whole decision boundary, not only the argmax."""
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, targets)
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean") * t * t


def _logits(model: nn.Module, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """fp32 logits of ``x`` in chunks, without gradients."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]).float() for i in range(0, x.shape[0], chunk)])


def _noise_copies(images: torch.Tensor, copies: int, radius: float, generator: torch.Generator) -> torch.Tensor:
    """``copies`` copies of each image moved by ``radius`` (L2) in a random direction, clipped to [0, 1]."""
    x = images.repeat_interleave(copies, dim=0)
    u = torch.randn(x.shape, generator=generator).to(images.device)
    u = u / u.flatten(1).norm(dim=1).view(-1, *([1] * (u.dim() - 1)))
    return (x + u * radius).clamp(0, 1)


def shifted_copies(images: torch.Tensor, copies: int, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """``copies`` copies of each image moved by a random whole-pixel offset of at most ``pixels``
    and at least half that (in the larger of the two directions), edges replicated."""
    least = max(1, -(-pixels // 2))
    offsets = [(dy, dx) for dy in range(-pixels, pixels + 1) for dx in range(-pixels, pixels + 1)
               if max(abs(dy), abs(dx)) >= least]
    pick = torch.randint(0, len(offsets), (images.shape[0] * copies,), generator=generator).tolist()
    padded = F.pad(images, (pixels,) * 4, mode="replicate")
    h, w = images.shape[-2:]
    out = []
    for row, j in enumerate(pick):
        dy, dx = offsets[j]
        out.append(padded[row // copies, :, pixels + dy:pixels + dy + h, pixels + dx:pixels + dx + w])
    return torch.stack(out)


def class_blends(images: torch.Tensor, labels: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor | None:
    """``copies`` blends of each image with another image of the same class (weights 0.3-0.7):
    images of that class which are not the forget images, so the class keeps its place."""
    rows = []
    lab = labels.cpu()
    for i in range(images.shape[0]):
        mates = (lab == lab[i]).nonzero().flatten()
        mates = mates[mates != i]
        if mates.numel() == 0:
            continue
        pick = mates[torch.randint(0, mates.numel(), (copies,), generator=generator)]
        w = (0.3 + 0.4 * torch.rand(copies, generator=generator)).view(-1, 1, 1, 1).to(images.device)
        rows.append(w * images[i] + (1 - w) * images[pick.to(images.device)])
    return torch.cat(rows) if rows else None


def _set_bn_train(model: nn.Module, bn: str) -> None:
    model.train(bn == "train")


def _attack_with_retry(model, images, labels, num_classes, attack: AttackConfig, generator, autocast_dtype, progress):
    """Run the attack; on CUDA out-of-memory halve the chunk and start again."""
    batch = attack.chunk_rows(tuple(images.shape[1:]), images.device.type)
    state = generator.get_state()
    while True:
        try:
            progress.start("attack", images.shape[0] * attack.n_adv)
            return adversarial_set(
                model, images, labels, num_classes, n_adv=attack.n_adv, generator=generator,
                per_copy_targets=attack.per_copy_targets, eps=attack.radius(tuple(images.shape[1:])), step_size=attack.step_size,
                steps=attack.steps, random_start=attack.random_start, batch_size=batch,
                autocast_dtype=autocast_dtype, cuda_graph=attack.cuda_graph, progress=progress.advance,
            )
        except torch.cuda.OutOfMemoryError:
            if batch <= 1:
                raise
            batch = max(1, batch // 2)
            generator.set_state(state)
            torch.cuda.empty_cache()
        finally:
            progress.finish()


def unlearn(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    goal: Goal,
    num_classes: int,
    config: UnlearnConfig,
    attack: AttackConfig,
    attack_labels: torch.Tensor | None = None,
    seed: int = 0,
    precision: Precision = "auto",
    progress: Progress | None = None,
    projector: GradientProjector | None = None,
    kept: int = 0,
    original: nn.Module | None = None,
) -> UnlearnResult:
    """Change ``model`` in place so that ``images`` meet ``goal``.

    ``images`` are in [0, 1] on the model's device. ``targets``: the labels to move away from
    (forget) or the new labels (relabel). ``attack_labels``: the classes the attack moves away
    from (default: ``targets`` for forget; required for relabel — the current labels).
    ``projector``: keep every update orthogonal to the inputs of retained images (``--retain``);
    without one, ``config.stand_ins(k)`` stand-in images made from the model's BatchNorm
    statistics play that part. ``kept``: the last rows of ``images`` are earlier requests'
    images (``--keep``); they join the goal check and the anchors, and the importance only with
    ``config.keep_importance``. ``original``: the same network before the first request of a
    stream (``--original``); the anchors' distillation targets and the importance penalty's θ̃
    come from it instead of from ``model``, so each request pulls back towards the original
    rather than building on the drift of the requests before it.
    """
    if not 0 <= kept < images.shape[0]:
        raise ValueError(f"kept={kept}: at least one of the {images.shape[0]} images must be new")
    progress = progress or NullProgress()
    device = images.device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    seconds = {"attack": 0.0, "importance": 0.0}  # then "synthesis" when made, "updates"
    notes: list[str] = []
    image_shape = tuple(images.shape[1:])
    attacking = config.adv_loss != "none" and attack.n_adv > 0
    n_stand_ins = config.stand_ins(images.shape[0])
    wants_stand_ins = projector is None and n_stand_ins > 0
    synthesising = wants_stand_ins and has_batchnorm(model)
    # Only the attack and the stand-ins run in reduced precision: no need to time it without them.
    autocast_dtype, how = choose(model, image_shape, device, precision) if attacking or synthesising else (None, None)
    model.eval()

    x_adv = t_adv = teacher = None
    adv_success = None
    if attacking:
        t0 = time.perf_counter()
        labels_for_attack = attack_labels if attack_labels is not None else targets
        x_adv, t_adv, _ = _attack_with_retry(model, images, labels_for_attack, num_classes, attack, generator, autocast_dtype, progress)
        teacher = _logits(model, x_adv)
        adv_success = float((teacher.argmax(1) == t_adv).float().mean())
        if original is not None:
            teacher = _logits(original, x_adv)
        # Anchors for the distillation beside the adversarial copies; the original model keeps
        # the class of most of them, and keeping it while the image itself moves keeps the change
        # on the image. Random-direction copies farther out than the attack reaches; copies
        # shifted by a pixel or two, which at k = 64 stopped a class from following its forget
        # images (benchmarks/RESULTS.md, "Shifted copies"); blends of two images of one class,
        # images of that class which are not forget images ("Blends").
        anchors = []
        if config.adv_loss == "kd":
            if config.noise_copies:
                anchors.append(_noise_copies(images, config.noise_copies, attack.radius(image_shape) * config.noise_radius, generator))
            if config.shift_copies:
                anchors.append(shifted_copies(images, config.shift_copies, config.shift(image_shape), generator))
            if config.mix_copies:
                mixes = class_blends(images, labels_for_attack, config.mix_copies, generator)
                if mixes is not None:
                    anchors.append(mixes)
        if anchors:
            t_more = [_logits(original if original is not None else model, x_more) for x_more in anchors]
            x_adv, teacher = torch.cat([x_adv, *anchors]), torch.cat([teacher, *t_more])
            t_adv = torch.cat([t_adv, *(t.argmax(1) for t in t_more)])
        seconds["attack"] = time.perf_counter() - t0

    penalty = None
    if config.importance:
        t0 = time.perf_counter()
        measured = images[:images.shape[0] - kept] if kept and not config.keep_importance else images
        progress.start("importance", measured.shape[0])
        omega = mas_importance(model, measured, progress=progress.advance)
        progress.finish()
        penalty = ImportancePenalty(model, omega, config.lam, anchor=original)
        seconds["importance"] = time.perf_counter() - t0

    if synthesising:
        t0 = time.perf_counter()
        progress.start("synthesis", config.synthetic_steps * -(-n_stand_ins // SYNTH_BATCH), unit="steps")
        stand_ins = invert_batchnorm(model, n_stand_ins, image_shape, num_classes,
                                     steps=config.synthetic_steps, lr=config.synthetic_lr, seed=seed,
                                     autocast_dtype=autocast_dtype,
                                     progress=progress.advance)
        progress.finish()
        projector = GradientProjector(model, stand_ins, energy=config.retain_energy)
        projector.source = f"{n_stand_ins} stand-in images from BatchNorm statistics"
        seconds["synthesis"] = time.perf_counter() - t0
    elif wants_stand_ins:
        notes.append("the model has no BatchNorm statistics to make stand-in images from: updates were not "
                     "projected (pass --retain images of the domain)")

    t0 = time.perf_counter()
    # Parameters the projection holds still need no gradient at all (restored afterwards).
    held = [p for p in projector.frozen if p.requires_grad] if projector is not None else []
    for p in held:
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = config.projected_lr if projector is not None and config.projected_lr is not None else config.lr
    # Weight decay would pull weights along directions the projection keeps still.
    opt = torch.optim.SGD(params, lr=lr, momentum=config.momentum,
                          weight_decay=0.0 if projector is not None else config.weight_decay)
    n_adv_rows = 0 if x_adv is None else x_adv.shape[0]
    adv_bs = min(config.adv_batch_size, n_adv_rows)
    adv_weight = config.adv_weight_for(images.shape[0])
    order = torch.randperm(n_adv_rows, generator=generator).to(device) if n_adv_rows else None
    cursor = 0
    best_met, since_best = -1, 0
    goal_met = False
    steps = 0
    polished = 0  # steps taken since the goal first held
    best: list[torch.Tensor] | None = None  # the latest weights at which it held, while polishing
    losses: list[float] = []
    # Weights to go back to if the loss runs away (divergence_retries): two copies taken
    # checkpoint_every steps apart, and the older one is restored, so that it predates the run-up.
    saved: list[tuple[int, list[torch.Tensor]]] | None = None  # (after which step, weights), older first
    if config.divergence_retries and adv_bs:
        first = [p.detach().clone() for p in params]
        saved = [(0, first), (0, first)]
    retries = 0
    progress.start("updates", config.max_steps, unit="steps")
    try:
        while True:
            idx = None
            if adv_bs:
                if cursor + adv_bs > n_adv_rows:
                    order = torch.randperm(n_adv_rows, generator=generator).to(device)
                    cursor = 0
                idx = order[cursor:cursor + adv_bs]
                cursor += adv_bs
            if config.bn == "eval":
                model.eval()
                batch = images if idx is None else torch.cat([images, x_adv[idx]])
                logits = model(batch)
                lf, la = logits[: images.shape[0]], logits[images.shape[0]:]
                met = goal_mask(lf.detach(), targets, goal)
            else:
                with torch.no_grad():
                    model.eval()
                    met = goal_mask(model(images), targets, goal)
            n_met = int(met.sum())
            if n_met == images.shape[0]:
                goal_met = True
                if polished >= config.polish_steps:
                    break
                # Polishing: the goal holds here; remember these weights in case it does not
                # hold again before max_steps.
                if best is None:
                    best = [torch.empty_like(p) for p in params]
                torch._foreach_copy_(best, [p.detach() for p in params])
            if goal_met:
                polished += 1
            if steps >= config.max_steps:
                if best is not None and n_met < images.shape[0]:
                    with torch.no_grad():
                        torch._foreach_copy_(params, best)
                break
            if config.bn == "train":
                model.train()
                lf = model(images)
                la = model(x_adv[idx]) if idx is not None else None
            loss = objective_loss(lf, targets, goal, config.objective, config.margin)
            if idx is not None:
                loss = loss + adv_weight * adversarial_loss(la, t_adv[idx], teacher[idx], config.adv_loss, config.kd_temperature)
            if not torch.isfinite(loss):
                value = loss.item()
                if saved is None or retries >= config.divergence_retries:
                    raise NumericalError(f"the loss became {value} at step {steps}; nothing was written (try a smaller "
                                         f"--lr{' or --adv-weight' if idx is not None else ''})")
                retries += 1
                adv_weight /= 2
                back_to, weights = saved[0]
                with torch.no_grad():
                    torch._foreach_copy_(params, weights)
                saved[1] = saved[0]
                opt.state.clear()  # the momentum carries the run-up
                notes.append(f"step {steps}: the loss became {value}; went back to the weights after step "
                             f"{back_to} and halved the adversarial term's weight to {adv_weight:g}")
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if penalty is not None:  # its gradient added directly: the same as through autograd, fewer kernels
                penalty.add_gradient(model)
            if projector is not None:
                projector.project()
            opt.step()
            steps += 1
            if saved is not None and steps % config.checkpoint_every == 0:
                (_, older), (_, newer) = saved
                into = older if older is not newer else [torch.empty_like(p) for p in params]
                torch._foreach_copy_(into, [p.detach() for p in params])
                saved = [saved[1], (steps, into)]
            losses.append(loss.detach())  # a tensor: no wait for the device every step
            progress.advance(1)
            # λ adaptation: the importance penalty can hold the weights so firmly that the goal
            # is never reached (paper, Table 4, k ≥ 64); halve λ when progress stalls.
            if n_met > best_met:
                best_met, since_best = n_met, 0
            else:
                since_best += 1
            if penalty is not None and config.adapt_lambda and since_best >= config.stall_steps and not goal_met:
                penalty.lam /= 2
                since_best = 0
                notes.append(f"step {steps}: no progress for {config.stall_steps} steps, λ halved to {penalty.lam:g}")
    finally:
        progress.finish()
        model.eval()
        for p in held:
            p.requires_grad_(True)
    with torch.no_grad():
        final = model(images).float()
    goal_met = bool(goal_mask(final, targets, goal).all())
    stand_in_agreement = projector.agreement(model, stand_ins) if synthesising else None
    seconds["updates"] = time.perf_counter() - t0
    return UnlearnResult(
        goal_met=goal_met, steps=steps, seconds=seconds, logits=final.cpu(),
        lam_final=penalty.lam if penalty is not None else None,
        adv_attack_success=adv_success, notes=notes, loss_history=torch.stack(losses).tolist() if losses else [],
        precision=describe(autocast_dtype, device, how),
        projection=f"{projector.source}, energy {projector.energy}: {projector.summary()}" if projector is not None else None,
        stand_in_agreement=stand_in_agreement, adv_weight=adv_weight,
    )
