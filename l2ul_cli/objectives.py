"""The two terms of every update: the unlearning objective on the forget images (L_UL) and the
adversarial term on the anchors (R_Adv, Eq. 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .goals import Goal, goal_named


def objective_loss(logits: torch.Tensor, targets: torch.Tensor, goal: str | Goal, kind: str, margin: float) -> torch.Tensor:
    """L_UL. ``ce``: the paper's (Eq. 3, 4). ``margin``: a per-image hinge on the logit gap that
    is exactly zero once the image is past its goal by ``margin``, so images already forgotten
    stop pulling the weights (−CE is unbounded below). ``indistinguishable``: the hinge of
    :class:`.goals.LossTargetGoal`, on each image's log loss against its target."""
    goal, logits = goal_named(goal), logits.float()
    if kind == "indistinguishable":  # zero once an image's loss is within the tolerance of its target
        return F.relu(goal.gap(logits, targets)).mean()
    if kind == "ce":
        return goal.ce_objective(logits, targets)
    return F.relu(goal.gap(logits, targets) + margin).mean()


def adversarial_loss(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    """R_Adv. ``ce``: CE to the attack targets (Eq. 6). ``kd``: KL to the original model's
    output on the same copies, which keeps its whole decision boundary, not only the argmax."""
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, targets)
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean") * t * t
