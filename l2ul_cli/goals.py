"""What a request asks of its images: one record per goal instead of ``goal == "forget"`` branches.

A goal knows which predictions meet it, the sign of the paper's objective (Eq. 3 and 4), the
report key and wording of its figure, and the methods that serve it. New objectives (e.g. one
that makes forgotten images look like held-out ones) are new records here, not new branches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import GOAL_METHODS


@dataclass(frozen=True)
class Goal:
    name: str  # the command: "forget" or "relabel"
    away: bool  # True: move the prediction away from the target; False: onto it
    report_key: str  # the report's before/after key for the share of images meeting the goal's target
    label: str  # how the terminal and documents name that share
    unmet: str  # how the error names the share still left, after the figure
    methods: tuple[str, ...]  # the methods (config.METHODS names) that serve this goal

    def met(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per image: does the prediction meet the goal?"""
        pred = logits.argmax(dim=1)
        return pred != targets if self.away else pred == targets

    def ce_objective(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The paper's L_UL: −CE to the label (Eq. 3) or CE to the new label (Eq. 4)."""
        ce = F.cross_entropy(logits, targets)
        return -ce if self.away else ce

    def gap(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per image: how far the logits are from meeting the goal (negative once met)."""
        own = logits.gather(1, targets.view(-1, 1)).squeeze(1)
        other = logits.masked_fill(F.one_hot(targets, logits.shape[1]).bool(), float("-inf")).max(dim=1).values
        return own - other if self.away else other - own

    def report_value(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The report's figure under ``report_key``: accuracy against the targets."""
        return float((logits.argmax(1) == targets).float().mean()) if len(targets) else float("nan")


@dataclass(frozen=True)
class LossTargetGoal(Goal):
    """As if never trained (``--objective indistinguishable``): each image's loss brought to a
    target drawn from images the model never saw, so that forgotten images look like held-out
    ones instead of sitting past the boundary. ``targets`` holds per image [label, target loss];
    an image meets the goal when its loss is within a factor ``tolerance`` of its target."""

    tolerance: float = 1.5

    @staticmethod
    def split(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return targets[:, 0].long(), targets[:, 1].float()

    def log_ratio(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labels, want = self.split(targets)
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        return torch.log(loss + 1e-6) - torch.log(want + 1e-6)  # losses span 1e-5 to 10: compare them in log

    def met(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.log_ratio(logits, targets).abs() <= math.log(self.tolerance)

    def ce_objective(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.log_ratio(logits, targets).pow(2).mean()

    def gap(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.log_ratio(logits, targets).abs() - math.log(self.tolerance)

    def report_value(self, logits: torch.Tensor, targets: torch.Tensor) -> float:
        """The share of images whose loss is within the tolerance of its target."""
        return float(self.met(logits, targets).float().mean()) if len(targets) else float("nan")


FORGET = Goal("forget", True, "forget_accuracy", "accuracy on the forget images", "still correct",
              GOAL_METHODS["forget"])
RELABEL = Goal("relabel", False, "relabel_accuracy", "images predicted as their new label", "relabelled",
               GOAL_METHODS["relabel"])
GOALS: dict[str, Goal] = {g.name: g for g in (FORGET, RELABEL)}
# A forget request with --objective indistinguishable: the command stays "forget".
INDISTINGUISHABLE = LossTargetGoal("forget", True, "indistinguishable_share", "images whose loss looks held-out",
                                   "still distinguishable", ("l2ul", "neggrad", "adv", "adv+imp", "ltu"))


def goal_named(goal: str | Goal) -> Goal:
    """The record for a goal name (records pass through)."""
    return goal if isinstance(goal, Goal) else GOALS[goal]
