"""Anchor sets: inputs near the forget images on which every update keeps a teacher's outputs.

The paper's anchors are the adversarial copies (Algorithm 1), each with its attack target. With
distillation (``adv_loss = "kd"``) two more kinds join them, each kept at the original model's
outputs: copies shifted by a pixel or two, which at k = 64 stopped a class from following its
forget images (benchmarks/RESULTS.md, "Shifted copies"), and blends of two images of one class
("Blends"). :func:`build_anchors` returns them as one :class:`AnchorSet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attack import adversarial_set
from .config import AttackConfig, UnlearnConfig
from .evaluate import predict
from .memory import rows_that_fit


class Progress(Protocol):
    """What a phase reports; the CLI draws rich progress bars from it."""

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
class AnchorSet:
    """Rows of anchors: inputs, the class each should keep (attack target or the teacher's
    argmax) and the teacher's logits on them."""

    inputs: torch.Tensor
    targets: torch.Tensor
    teacher: torch.Tensor
    attack_success: float  # share of the adversarial copies the model puts in their target class

    def __len__(self) -> int:
        return self.inputs.shape[0]


def logits_on(model: nn.Module, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """fp32 logits of ``x`` in eval mode, on ``x``'s device, in chunks."""
    return predict(model, x.split(chunk), x.device, out=x.device)


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


def attack_with_retry(model, images, labels, num_classes, attack: AttackConfig, generator, autocast_dtype, progress):
    """Run the attack in chunks no larger than the free memory holds (unless ``attack.batch_size``
    is set); on CUDA out-of-memory halve the chunk and start again."""
    shape = tuple(images.shape[1:])
    batch = attack.chunk_rows(shape, images.device.type)
    if not attack.batch_size:
        batch = rows_that_fit(model, shape, images.device, batch, autocast_dtype, floor=1)
    state = generator.get_state()
    while True:
        try:
            progress.start("attack", images.shape[0] * attack.n_adv)
            return adversarial_set(
                model, images, labels, num_classes, n_adv=attack.n_adv, generator=generator,
                per_copy_targets=attack.per_copy_targets, eps=attack.radius(tuple(images.shape[1:])), step_size=attack.step_size,
                steps=attack.steps, random_start=attack.random_start, start_at=attack.start, batch_size=batch,
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


def build_anchors(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
                  config: UnlearnConfig, attack: AttackConfig, generator: torch.Generator,
                  autocast_dtype: torch.dtype | None = None, progress: Progress | None = None,
                  teacher: nn.Module | None = None) -> AnchorSet:
    """The adversarial copies of ``images`` (moved away from ``labels``) and, with distillation,
    the shifted copies and class blends; ``teacher`` (default: ``model``) gives the outputs to keep."""
    progress = progress or NullProgress()
    x_adv, t_adv, _ = attack_with_retry(model, images, labels, num_classes, attack, generator, autocast_dtype, progress)
    if not config.shuffle_anchors:
        # In order, as the reference code keeps them: the first copy of every image, then the
        # second, ...; so each batch of rows holds copies of every image, not of the first few.
        n = images.shape[0]
        order = torch.arange(x_adv.shape[0], device=x_adv.device).view(n, -1).t().flatten()
        x_adv, t_adv = x_adv[order], t_adv[order]
    own = logits_on(model, x_adv)
    success = float((own.argmax(1) == t_adv).float().mean())
    teacher = teacher if teacher is not None else model
    outputs = logits_on(teacher, x_adv) if teacher is not model else own
    extra = []
    if config.adv_loss == "kd":
        if config.shift_copies:
            extra.append(shifted_copies(images, config.shift_copies, config.shift(tuple(images.shape[1:])), generator))
        if config.mix_copies:
            mixes = class_blends(images, labels, config.mix_copies, generator)
            if mixes is not None:
                extra.append(mixes)
    kept = [logits_on(teacher, x) for x in extra]
    return AnchorSet(torch.cat([x_adv, *extra]), torch.cat([t_adv, *(t.argmax(1) for t in kept)]),
                     torch.cat([outputs, *kept]), success)
