"""The update loop's state and moves: one step, a rollback when the loss runs away, the
checkpoints it rolls back to, and the λ adaptation. :func:`.unlearn.unlearn` drives it."""

from __future__ import annotations

import torch
from torch import nn

from .anchors import AnchorSet
from .config import UnlearnConfig
from .importance import ImportancePenalty
from .memory import Replay
from .objectives import adversarial_loss
from .projection import GradientProjector


class UpdateLoop:
    """SGD on the trainable parameters, with the penalty's gradient and the projection added to
    every step. Anchor rows are drawn in shuffled batches, reshuffled when they run out."""

    def __init__(self, model: nn.Module, config: UnlearnConfig, *, anchors: AnchorSet | None, adv_weight: float,
                 generator: torch.Generator, penalty: ImportancePenalty | None = None,
                 projector: GradientProjector | None = None):
        self.model, self.config, self.anchors, self.adv_weight = model, config, anchors, adv_weight
        self.penalty, self.projector, self.generator = penalty, projector, generator
        # Parameters the projection holds still need no gradient at all (restored by close()).
        self.held = [p for p in projector.frozen if p.requires_grad] if projector is not None else []
        for p in self.held:
            p.requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        lr = config.projected_lr if projector is not None and config.projected_lr is not None else config.lr
        # Weight decay would pull weights along directions the projection keeps still.
        self.opt = torch.optim.SGD(self.params, lr=lr, momentum=config.momentum,
                                   weight_decay=0.0 if projector is not None else config.weight_decay)
        rows = len(anchors) if anchors is not None else 0
        self.batch = min(config.adv_batch_size, rows)
        self.order = torch.randperm(rows, generator=generator).to(anchors.inputs.device) if rows else None
        self.cursor = 0
        self.forget_cursor = 0
        self.steps = 0
        self.losses: list[torch.Tensor] = []
        self.retries = 0
        self.best_met, self.since_best = -1, 0
        # Two copies of the weights checkpoint_every steps apart; a rollback restores the older,
        # so that it predates the run-up.
        self.saved: list[tuple[int, list[torch.Tensor]]] | None = None  # (after which step, weights), older first
        if config.divergence_retries and self.batch:
            first = [p.detach().clone() for p in self.params]
            self.saved = [(0, first), (0, first)]

    def next_rows(self) -> torch.Tensor | None:
        """Indices of this step's anchor rows (None without anchors)."""
        if not self.batch:
            return None
        if not self.config.shuffle_anchors:  # in order, the last batch of a pass partial
            end = min(self.cursor + self.batch, len(self.anchors))
            idx = torch.arange(self.cursor, end, device=self.anchors.inputs.device)
            self.cursor = end % len(self.anchors)
            return idx
        if self.cursor + self.batch > len(self.anchors):
            self.order = torch.randperm(len(self.anchors), generator=self.generator).to(self.order.device)
            self.cursor = 0
        idx = self.order[self.cursor:self.cursor + self.batch]
        self.cursor += self.batch
        return idx

    def next_forget(self, data):
        """This step's forget images: all of them, or the next batch of forget_batch_size in order
        (the reference code's cycled loader)."""
        size = self.config.forget_batch_size
        if not size or size >= len(data):
            return data
        rows = slice(self.forget_cursor, min(self.forget_cursor + size, len(data)))
        self.forget_cursor = rows.stop % len(data)
        return type(data)(data.images[rows], data.targets[rows], data.labels[rows])

    def with_anchors(self, objective: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor, n_forget: int) -> torch.Tensor:
        """The objective plus the adversarial term on this step's anchor rows: summed, or each
        weighted by its share of the step's rows (config.weighting)."""
        a, c = self.anchors, self.config
        adversarial = self.adv_weight * adversarial_loss(logits, a.targets[idx], a.teacher[idx], c.adv_loss, c.kd_temperature)
        if c.weighting == "share":
            share = n_forget / (n_forget + idx.numel())
            return objective * share + adversarial * (1 - share)
        return objective + adversarial

    def can_roll_back(self) -> bool:
        return self.saved is not None and self.retries < self.config.divergence_retries

    def step(self, loss: torch.Tensor, replay: Replay = None) -> None:
        """One SGD step on ``loss`` plus the penalty, projected; then a checkpoint when due.
        ``replay``: the rest of the backward pass of a step split to fit in memory."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if replay is not None:
            replay()
        if self.penalty is not None:  # its gradient added directly: the same as through autograd, fewer kernels
            self.penalty.add_gradient(self.model)
        if self.projector is not None:
            self.projector.project()
        self.opt.step()
        self.steps += 1
        if self.saved is not None and self.steps % self.config.checkpoint_every == 0:
            self.checkpoint()
        self.losses.append(loss.detach())  # a tensor: no wait for the device every step

    def checkpoint(self) -> None:
        (_, older), (_, newer) = self.saved
        into = older if older is not newer else [torch.empty_like(p) for p in self.params]
        torch._foreach_copy_(into, [p.detach() for p in self.params])
        self.saved = [self.saved[1], (self.steps, into)]

    def roll_back(self, value: float) -> str:
        """Back to the older checkpoint at half the adversarial weight; the note says so."""
        self.retries += 1
        self.adv_weight /= 2
        back_to, weights = self.saved[0]
        with torch.no_grad():
            torch._foreach_copy_(self.params, weights)
        self.saved[1] = self.saved[0]
        self.opt.state.clear()  # the momentum carries the run-up
        return (f"step {self.steps}: the loss became {value}; went back to the weights after step "
                f"{back_to} and halved the adversarial term's weight to {self.adv_weight:g}")

    def adapt_lambda(self, n_met: int) -> str | None:
        """Halve λ when the count of images meeting the goal has not grown for stall_steps steps:
        the penalty can hold the weights so firmly that the goal is never reached (paper, Table 4,
        k ≥ 64)."""
        if n_met > self.best_met:
            self.best_met, self.since_best = n_met, 0
            return None
        self.since_best += 1
        if self.penalty is None or not self.config.adapt_lambda or self.since_best < self.config.stall_steps:
            return None
        self.penalty.lam /= 2
        self.since_best = 0
        return f"step {self.steps}: no progress for {self.config.stall_steps} steps, λ halved to {self.penalty.lam:g}"

    def close(self) -> None:
        self.model.eval()
        for p in self.held:
            p.requires_grad_(True)
