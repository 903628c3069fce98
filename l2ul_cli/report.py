"""The report of a run: one JSON-ready dict, written atomically, and its rich rendering.

Commands build the dict (so its keys are a contract in one place: the command modules), this
module only writes and draws it. Results go to stdout; the CLI sends progress and logs to stderr.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from .files import atomic_write
from .health import describe

# The report's keys for the images the projection holds, and how the output names them.
HELD_SETS = (("retain", "--retain images"), ("stand_ins", "stand-in images"))


def _clean(obj: Any) -> Any:
    """JSON has no NaN: write null instead, so every parser accepts the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(_clean(report), indent=2, sort_keys=False)


def write_json(path: str | os.PathLike, report: dict[str, Any]) -> None:
    text = to_json(report) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _pct(v: Any) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}%"


def _wrote(paths: Sequence[str], console: Console) -> None:
    """One line naming every file the command wrote, so none has to be looked for."""
    if paths:
        console.print("wrote: " + ", ".join(str(p) for p in paths), markup=False, highlight=False, soft_wrap=True)


def render_run(report: dict[str, Any], console: Console, wrote: Sequence[str] = ()) -> None:
    """Terminal summary of ``forget`` / ``relabel``; ``wrote``: the files written, checkpoint first."""
    from .goals import GOALS  # torch: not imported for `--help` (config.GOAL_METHODS)

    cmd = report["command"]
    goal = GOALS[cmd]
    key, label = goal.report_key, goal.label
    ok = report["goal_met"]
    title = f"l2ul {cmd} · {report['method']} · {report['device']}"
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row(label, _pct(report["before"].get(key)), _pct(report["after"].get(key)))
    for name, title_ in (("accuracy", "accuracy on --eval images"),):
        if name in report["before"] or name in report["after"]:
            table.add_row(title_, _pct(report["before"].get(name)), _pct(report["after"].get(name)))
    for key, what in HELD_SETS:
        if key in report:
            table.add_row(f"{what} predicted as before", _pct(1.0), _pct(report[key]["agreement"]))
    console.print(table)
    times = " · ".join(f"{k} {v:.2f}s" for k, v in report["seconds"].items())
    console.print(f"images: {report['n_images']} · steps: {report['steps']} · {times}")
    if report.get("precision"):
        console.print(f"precision: {report['precision']}")
    if (report.get("weights") or {}).get("used") in ("model", "ema"):  # a training checkpoint's choice
        console.print(f"weights: {report['weights']['used']} ({report['weights']['reason']})")
    if report.get("projection"):
        console.print(f"updates kept orthogonal to {report['projection']}")
    if ind := report.get("indistinguishable"):
        b, a = ind["before"], ind["after"]
        console.print(f"as if never trained ({'met' if ind['met'] else 'not met'}): forget accuracy "
                      f"{_pct(a['forget_accuracy'])} against --holdout {_pct(ind['holdout_accuracy'])} ± "
                      f"{ind['binomial_noise'] * 100:.1f} points; loss AUC {b['loss_auc']:.3f} → {a['loss_auc']:.3f}, "
                      f"confidence AUC {b['confidence_auc']:.3f} → {a['confidence_auc']:.3f} (0.5 ± 0.05 wanted)")
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    if report.get("health"):
        console.print(describe(report["health"]), style="red" if report["healthy"] is False else None, markup=False,
                      soft_wrap=True)
    if not report.get("output"):
        where = " · no checkpoint written"
    else:
        where = " · checkpoint kept (--allow-partial)" if not ok or report.get("healthy") is False else ""
    console.print(("[green]goal met[/]" if ok else f"[red]goal not met[/] after {report['steps']} steps") + where)
    _wrote(wrote, console)


def render_eval(report: dict[str, Any], console: Console, wrote: Sequence[str] = ()) -> None:
    """Terminal summary of ``eval``; ``wrote``: the report files written."""
    table = Table(title=f"l2ul eval · {report['arch']} · {report['n_images']} images · {report['device']}", header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("top-1 accuracy", _pct(report["accuracy"]))
    table.add_row("top-5 accuracy", _pct(report["top5_accuracy"]))
    if "compare" in report:
        c = report["compare"]
        table.add_row(f"accuracy of {Path(c['checkpoint']).name}", _pct(c["accuracy"]))
        table.add_row("prediction agreement", _pct(c["agreement"]))
        table.add_row("images whose prediction changed", str(len(c["changed"])))
    if "mia" in report:
        m = report["mia"]
        table.add_row("forget images: accuracy", _pct(report["forget"]["forget_accuracy"]))
        if "reference_accuracy" in report["forget"]:
            table.add_row(f"{m.get('reference', '--images')} images: accuracy", _pct(report["forget"]["reference_accuracy"]))
        lo, hi = m.get("loss_auc_interval", (None, None))
        table.add_row(f"MIA loss AUC vs {m.get('reference', '--images')} (0.5 = indistinguishable)",
                      f"{m['loss_auc']:.3f}" + (f" ({lo:.2f}-{hi:.2f})" if lo is not None else ""))
        table.add_row("MIA confidence AUC", f"{report['mia']['confidence_auc']:.3f}")
        s = report["forget"]["streisand"]
        if s.get("n"):
            table.add_row("new labels: normalised entropy / top share", f"{s['entropy']:.2f} / {_pct(s['max_share'])}")
    console.print(table)
    pc = Table(title="per class", header_style="bold")
    pc.add_column("class")
    pc.add_column("accuracy", justify="right")
    pc.add_column("n", justify="right")
    for name, v in report["per_class"].items():
        pc.add_row(name, _pct(v["accuracy"]), str(v["n"]))
    console.print(pc)
    rows = (report.get("forget") or {}).get("images") or []
    if rows:  # the forget images that stand out most: their loss furthest from the unseen images' median
        odd = sorted(rows, key=lambda r: -abs(r["holdout_percentile"] - 50))[:5]
        console.print("forget images that stand out most (loss percentile among the reference images; 50 = "
                      "typical of unseen images): " + ", ".join(f"{Path(r['path']).name} {r['holdout_percentile']:.0f}"
                                                               for r in odd))
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    _wrote(wrote, console)


def render_history(report: dict[str, Any], console: Console) -> None:
    ledger = report["ledger"]
    if not ledger:
        console.print(f"{report['checkpoint']}: no l2ul requests recorded")
        return
    from .goals import GOALS  # torch: not imported for `--help` (config.GOAL_METHODS)

    t = Table(title=f"ledger of {report['checkpoint']}", header_style="bold")
    for col in ("#", "request", "time (UTC)", "command", "method", "images", "goal met", "before → after"):
        t.add_column(col)
    for i, e in enumerate(ledger, 1):
        key = GOALS[e["command"]].report_key if e.get("command") in GOALS else "forget_accuracy"
        change = f"{_pct(e.get('before', {}).get(key))} → {_pct(e.get('after', {}).get(key))}"
        mark = " (new segment)" if e.get("new_segment") else ""
        t.add_row(str(i), str(e.get("request_id", "?")) + mark, str(e.get("time", "?")), str(e.get("command", "?")),
                  str(e.get("method", "?")), str(e.get("n_images", "?")), "yes" if e.get("goal_met") else "no", change)
    console.print(t)
    if report.get("warning"):
        console.print(f"[yellow]warning:[/] {report['warning']}")


def render_info(report: dict[str, Any], console: Console) -> None:
    t = Table(title=report["checkpoint"], show_header=False)
    t.add_column("")
    t.add_column("")
    pre = report["preprocessing"]
    names = report["class_names"]
    t.add_row("architecture", report["arch"])
    t.add_row("classes", f"{report['num_classes']}" + (f": {', '.join(names[:10])}{' …' if len(names) > 10 else ''}" if names else " (no names)"))
    t.add_row("input", f"{pre['input_size'][0]}×{pre['input_size'][1]}×{pre['input_size'][2]}, mean {pre['mean']}, std {pre['std']}, crop {pre['crop_pct']}")
    if report.get("weights"):
        t.add_row("weights", f"{report['weights']['used']} ({report['weights']['reason']})")
    t.add_row("parameters", f"{report['parameters']:,}")
    t.add_row("l2ul requests", str(report["requests"]))
    t.add_row("sha256", report["sha256"])
    console.print(t)


def render_index(report: dict[str, Any], console: Console, wrote: Sequence[str] = ()) -> None:
    """``l2ul index``'s summary and ``l2ul info`` of an index file: the same rows."""
    t = Table(title=report.get("output") or report.get("index"), show_header=False)
    t.add_column("")
    t.add_column("")
    t.add_row("made from", str(report["source"]) + (f", less {report['forgotten']} forgotten" if report.get("forgotten") else ""))
    t.add_row("checkpoint sha256", str(report["checkpoint_sha256"]))
    t.add_row("directions kept", f"{report['directions']:,} of {report['dimensions']:,} input dimensions over "
                                 f"{report['layers']} layers (energy {report['energy']})")
    t.add_row("probe images", f"{report['probes']} (the health check of requests using it)")
    t.add_row("size", f"{report['bytes'] / 2**20:.1f} MiB")
    if report.get("images_per_second"):
        t.add_row("indexed at", f"{report['images_per_second']} images/s")
    console.print(t)
    if report.get("seconds"):
        console.print(" · ".join(f"{k} {v:.2f}s" for k, v in report["seconds"].items()))
    if wrote:
        console.print("wrote: " + ", ".join(wrote))
