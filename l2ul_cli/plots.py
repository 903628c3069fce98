"""PNG figures for the Markdown/HTML reports, drawn from the report dict alone, and the one
sentence that reads each of them.

matplotlib is optional (the ``plots`` extra): every drawing returns None when it is missing, so
a report never fails for want of a picture; the sentences need nothing.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from typing import Any

from .goals import GOALS
from .report import _pct


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig, plt) -> bytes:
    """The figure as PNG bytes: the HTML report embeds them, the Markdown one writes them beside."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def label_matrix(report: dict[str, Any]) -> bytes | None:
    """Before→after labels of the request's images (the paper's Fig. 2): a single column that
    collects them all would itself reveal which images were forgotten."""
    plt = _pyplot()
    rows = report.get("images") or []
    if plt is None or not rows:
        return None
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
    return _png(fig, plt)


def accuracy_bars(report: dict[str, Any]) -> bytes | None:
    """forget/relabel: each accuracy before and after; eval: accuracy per class."""
    plt = _pyplot()
    if plt is None:
        return None
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
            return None
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
    return _png(fig, plt)


def _mia_panels(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    if report.get("command") == "eval":
        mia = report.get("mia") or {}
        return [("", mia)] if "loss_histogram" in mia else []
    ev = report.get("eval") or {}
    return [(when, ev[when]["mia"]) for when in ("before", "after")
            if "loss_histogram" in (ev.get(when) or {}).get("mia", {})]


def loss_histograms(report: dict[str, Any]) -> bytes | None:
    """Per-image loss of the forget images against held-out images (what a membership-inference
    attacker sees): after a good forget the two overlap or the forget images sit higher."""
    plt = _pyplot()
    panels = _mia_panels(report)
    if plt is None or not panels:
        return None
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
    return _png(fig, plt)


def _known(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def read_labels(report: dict[str, Any]) -> str | None:
    """Where the request's images went, and whether one class collects them."""
    rows = report.get("images") or []
    if not rows:
        return None
    n = len(rows)
    if not GOALS[report["command"]].away:  # relabel: did each reach its new label?
        hit = sum(r["after"] == r.get("new_label") for r in rows)
        return f"{hit} of {n} images are now predicted as their new label" + ("." if hit == n else f"; {n - hit} are not.")
    moved = [r["after"] for r in rows if r["after"] != r["label"]]
    if not moved:
        return f"None of the {n} images left its label: the model still recognises every one."
    top, count = Counter(moved).most_common(1)[0]
    collects = count >= 2 and count / len(moved) > 0.5
    verdict = (f"{top} collects most of them, which could itself reveal which images were forgotten" if collects
               else "no single class collects them, so their new labels do not give them away")
    return (f"{len(moved)} of {n} images now get a class other than their label, spread over {len(set(moved))} "
            f"class(es) with at most {count / len(moved):.0%} in one: {verdict}.")


def _cost_elsewhere(before: Any, after: Any) -> str:
    """What the --eval accuracy says about the rest of the model."""
    if not (_known(before) and _known(after)):
        return "; pass --eval images to see what the change cost elsewhere"
    drop = 100 * (before - after)
    verdict = ("the change stayed local" if drop <= 1 else "a small cost elsewhere" if drop <= 5
               else "the model lost accuracy elsewhere")
    return f", while accuracy on the --eval images went from {_pct(before)} to {_pct(after)} ({-drop:+.1f} points): {verdict}"


def read_accuracy(report: dict[str, Any]) -> str | None:
    """The goal's accuracy before and after, and the cost on --eval images; eval: the class spread."""
    if report.get("command") == "eval":
        pc = {k: v["accuracy"] for k, v in report["per_class"].items() if _known(v["accuracy"])}
        if not pc:
            return None
        lo, hi = min(pc, key=pc.__getitem__), max(pc, key=pc.__getitem__)
        return (f"Top-1 accuracy {_pct(report['accuracy'])} on {report['n_images']} images; per class it ranges from "
                f"{_pct(pc[lo])} ({lo}) to {_pct(pc[hi])} ({hi}).")
    goal = GOALS[report["command"]]
    forget, key = goal.away, goal.report_key
    what = goal.label if forget else f"share of {goal.label}"
    before, after = report["before"], report["after"]
    return (f"The {what} went from {_pct(before.get(key))} to {_pct(after.get(key))}"
            + _cost_elsewhere(before.get("accuracy"), after.get("accuracy")) + ".")


def read_mia(report: dict[str, Any]) -> str | None:
    """What the loss AUC (forget vs unseen images) tells an attacker, after the run."""
    panels = _mia_panels(report)
    auc = panels[-1][1].get("loss_auc") if panels else None
    if not _known(auc):
        return None
    if abs(auc - 0.5) <= 0.1:
        text = (f"AUC {auc:.2f}: close to 0.5, so an attacker comparing losses can hardly tell the forget images "
                "from unseen ones")
    elif auc > 0.5:
        text = (f"AUC {auc:.2f}: an attacker still tells the forget images from unseen ones — their losses are "
                "lower, as a training image's are; 0.5 would be indistinguishable")
    else:
        text = (f"AUC {auc:.2f}: an attacker separates the forget images from unseen ones better than chance — "
                "their losses are now higher than unseen images', which itself reveals them; 0.5 would be "
                "indistinguishable")
    before = panels[0][1].get("loss_auc") if len(panels) == 2 else None
    return text + (f" (before the run: {before:.2f})." if _known(before) else ".")


# (file suffix, alt text, drawing, its sentence): a figure and its reading come from the same numbers.
FIGURES = (("labels", "labels before and after", label_matrix, read_labels),
           ("accuracy", "accuracy", accuracy_bars, read_accuracy),
           ("mia", "loss of forget vs held-out images", loss_histograms, read_mia))
