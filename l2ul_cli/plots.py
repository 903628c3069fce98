"""PNG figures for the Markdown/HTML reports, drawn from the report dict alone.

matplotlib is optional (the ``plots`` extra): every function returns False and writes nothing
when it is missing, so a report never fails for want of a picture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import atomic_write


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, plt, path: Path) -> bool:
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True


def label_matrix(report: dict[str, Any], path: Path) -> bool:
    """Before→after labels of the request's images (the paper's Fig. 2): a single column that
    collects them all would itself reveal which images were forgotten."""
    plt = _pyplot()
    rows = report.get("images") or []
    if plt is None or not rows:
        return False
    names = sorted({r["label"] for r in rows} | {r["after"] for r in rows})
    index = {n: i for i, n in enumerate(names)}
    counts = [[0] * len(names) for _ in names]
    for r in rows:
        counts[index[r["label"]]][index[r["after"]]] += 1
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * len(names), 1.0 + 0.5 * len(names)))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("after")
    ax.set_ylabel("label before")
    for i, row in enumerate(counts):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center")
    ax.set_title(f"l2ul {report['command']}: labels before → after")
    return _save(fig, plt, path)


def accuracy_bars(report: dict[str, Any], path: Path) -> bool:
    """forget/relabel: each accuracy before and after; eval: accuracy per class."""
    plt = _pyplot()
    if plt is None:
        return False
    if report.get("command") == "eval":
        names = list(report["per_class"])
        fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 1.5), 3.2))
        ax.bar(names, [100 * (report["per_class"][n]["accuracy"] or 0) for n in names], color="tab:blue")
        ax.axhline(100 * report["accuracy"], color="black", lw=1, ls="--", label=f"all: {100 * report['accuracy']:.1f}%")
        ax.tick_params(axis="x", rotation=45)
        ax.legend(loc="lower right")
        ax.set_title(f"accuracy per class · {report['n_images']} images")
    else:
        keys = [k for k in report["before"] if isinstance(report["before"][k], (int, float))]
        if not keys:
            return False
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(keys), 3.2))
        xs = range(len(keys))
        for off, when, colour in ((-0.2, "before", "tab:grey"), (0.2, "after", "tab:blue")):
            vals = [100 * (report[when].get(k) or 0) for k in keys]
            bars = ax.bar([x + off for x in xs], vals, width=0.4, label=when, color=colour)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(list(xs), [k.replace("_", " ") for k in keys])
        ax.legend(loc="upper right")
        ax.set_title(f"l2ul {report['command']} · {report['method']} · {report['n_images']} images")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    return _save(fig, plt, path)


def _mia_panels(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if report.get("command") == "eval":
        mia = report.get("mia") or {}
        return [("", mia)] if "loss_histogram" in mia else []
    ev = report.get("eval") or {}
    return [(when, ev[when]["mia"]) for when in ("before", "after")
            if "loss_histogram" in (ev.get(when) or {}).get("mia", {})]


def loss_histograms(report: dict[str, Any], path: Path) -> bool:
    """Per-image loss of the forget images against held-out images (what a membership-inference
    attacker sees): after a good forget the two overlap or the forget images sit higher."""
    plt = _pyplot()
    panels = _mia_panels(report)
    if plt is None or not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (when, mia) in zip(axes[0], panels):
        h = mia["loss_histogram"]
        edges = h["log10_edges"]
        for key, colour in (("heldout", "tab:grey"), ("forget", "tab:red")):
            total = max(1, sum(h[key]))
            ax.stairs([c / total for c in h[key]], edges, fill=key == "heldout", alpha=0.6 if key == "heldout" else 1,
                      color=colour, label=f"{key} ({sum(h[key])})")
        ax.set_xlabel("log10 cross-entropy loss")
        ax.set_ylabel("share of images")
        ax.set_title(f"{when + ': ' if when else ''}loss AUC {mia['loss_auc']:.2f}")
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, plt, path)


FIGURES = (("labels", "labels before and after", label_matrix),
           ("accuracy", "accuracy", accuracy_bars),
           ("mia", "loss of forget vs held-out images", loss_histograms))
