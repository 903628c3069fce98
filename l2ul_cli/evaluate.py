"""Measuring a classifier on a set of images: accuracy, top-5, per class, confusion, and the
membership-inference and "Streisand" checks of the paper's section 4.3.

Everything takes logits and labels (tensors), so each metric is tested on hand-made numbers;
:func:`predict` is the only function that runs a model.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str,
            out: torch.device | str = "cpu") -> torch.Tensor:
    """Logits (fp32, on ``out``) of every image, in eval mode, batch by batch."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(b.to(device)).float().to(out) for b in batches])
    finally:
        model.train(was)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if labels.numel() else float("nan")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    k = min(k, logits.shape[1])
    return float((logits.topk(k, dim=1).indices == labels.view(-1, 1)).any(1).float().mean()) if labels.numel() else float("nan")


def confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts, rows = true label, columns = prediction."""
    return torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes).view(num_classes, num_classes)


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[int, dict[str, float]]:
    cm = confusion(logits.argmax(1), labels, num_classes)
    out = {}
    for c in range(num_classes):
        n = int(cm[c].sum())
        if n:
            out[c] = {"accuracy": float(cm[c, c]) / n, "n": n}
    return out


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve of a score that should be higher for ``positive``: the
    probability that a random positive outscores a random negative, ties counting half
    (the Mann-Whitney U statistic, from average ranks)."""
    p, n = positive.double().flatten(), negative.double().flatten()
    if p.numel() == 0 or n.numel() == 0:
        return float("nan")
    values, inverse, counts = torch.unique(torch.cat([p, n]), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each distinct value
    r_pos = avg_rank[inverse[: p.numel()]].sum()
    return float((r_pos - p.numel() * (p.numel() + 1) / 2) / (p.numel() * n.numel()))


def loss_histogram(forget_loss: torch.Tensor, heldout_loss: torch.Tensor, bins: int = 28,
                   lo: float = -5.0, hi: float = 2.0) -> dict[str, list]:
    """Counts of log10 loss in fixed bins (losses outside [1e-5, 100] go to the end bins), so
    reports can draw what the loss attack sees without carrying every image's loss."""
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)

    def counts(loss: torch.Tensor) -> list[int]:
        x = loss.double().clamp_min(1e-30).log10().clamp(lo, hi)
        idx = torch.bucketize(x, edges[1:-1], right=True)
        return torch.bincount(idx, minlength=bins).tolist()

    return {"log10_edges": [round(float(e), 6) for e in edges], "forget": counts(forget_loss), "heldout": counts(heldout_loss)}


def membership_inference(
    forget_logits: torch.Tensor, forget_labels: torch.Tensor, heldout_logits: torch.Tensor, heldout_labels: torch.Tensor
) -> dict[str, Any]:
    """AUC of two simple attacks telling forget images (members) from held-out images, and the
    loss histogram behind the first.

    Loss attack: members have lower loss, so the score is −loss. Confidence attack: members get
    a higher top probability. 0.5 means the attacker cannot tell them apart.
    """
    def loss(lg, y):
        return F.cross_entropy(lg.float(), y, reduction="none")

    def conf(lg):
        return lg.float().softmax(1).max(1).values

    f_loss, h_loss = loss(forget_logits, forget_labels), loss(heldout_logits, heldout_labels)
    return {
        "loss_auc": auc(-f_loss, -h_loss),
        "confidence_auc": auc(conf(forget_logits), conf(heldout_logits)),
        "loss_histogram": loss_histogram(f_loss, h_loss),
    }


def auc_interval(value: float, n_members: int, n_nonmembers: int, z: float = 1.96) -> tuple[float, float]:
    """95 % interval of an AUC (Hanley and McNeil, 1982): with few images an AUC of 0.6 can be
    chance, and the report says how wide the noise is."""
    q1, q2 = value / (2 - value), 2 * value * value / (1 + value)
    var = (value * (1 - value) + (n_members - 1) * (q1 - value ** 2) + (n_nonmembers - 1) * (q2 - value ** 2)) \
        / max(1, n_members * n_nonmembers)
    half = z * math.sqrt(max(var, 0.0))
    return max(0.0, value - half), min(1.0, value + half)


def per_image_losses(forget_logits: torch.Tensor, forget_labels: torch.Tensor, heldout_logits: torch.Tensor,
                     heldout_labels: torch.Tensor) -> list[dict[str, float]]:
    """Each forget image's loss and its percentile among the held-out images' losses (the share
    with a loss at most its): near 50 it looks like an image the model never saw; at 1 its loss
    is lower than 99 % of theirs (remembered), at 99 higher (pushed away), and either stands out."""
    f_loss = F.cross_entropy(forget_logits.float(), forget_labels, reduction="none")
    h_loss = torch.sort(F.cross_entropy(heldout_logits.float(), heldout_labels, reduction="none")).values
    below = torch.searchsorted(h_loss, f_loss, right=True).float() / max(1, len(h_loss))
    return [{"loss": float(v), "holdout_percentile": round(float(b) * 100, 1)} for v, b in zip(f_loss, below)]


def streisand(before_labels: torch.Tensor, after_pred: torch.Tensor, num_classes: int) -> dict[str, float]:
    """How the forgotten images' new labels spread (paper Fig. 2): a single "retainer" class
    that collects them would itself reveal which images were removed.

    Returns the normalised entropy of the new-label distribution (1 = spread evenly over the
    classes available, 0 = all in one class), the largest share taken by one class, and the
    chi-square statistic against a uniform spread over the other classes.
    """
    moved = after_pred[after_pred != before_labels]
    if moved.numel() == 0:
        return {"entropy": float("nan"), "max_share": float("nan"), "chi2": float("nan"), "n": 0}
    counts = torch.bincount(moved, minlength=num_classes).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    ent = max(0.0, float(-(nz * nz.log()).sum()))
    k_eff = min(num_classes - 1, int(moved.numel()))
    ent_norm = ent / math.log(k_eff) if k_eff > 1 else float("nan")
    expected = torch.zeros(num_classes, dtype=torch.double)
    for y in before_labels[after_pred != before_labels].tolist():
        expected += 1.0 / (num_classes - 1)
        expected[y] -= 1.0 / (num_classes - 1)
    mask = expected > 0
    chi2 = float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())
    return {"entropy": ent_norm, "max_share": float(p.max()), "chi2": chi2, "n": int(moved.numel())}


def summarize(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, class_names: Sequence[str] | None = None) -> dict:
    """The metrics ``l2ul eval`` reports for one model on labelled images."""
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    pc = per_class_accuracy(logits, labels, num_classes)
    return {
        "accuracy": accuracy(logits, labels),
        "top5_accuracy": topk_accuracy(logits, labels, 5),
        "n_images": int(labels.numel()),
        "per_class": {names[c]: v for c, v in pc.items()},
        "confusion": confusion(logits.argmax(1), labels, num_classes).tolist(),
    }
