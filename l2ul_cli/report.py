"""The report of a run: one JSON-ready dict, written atomically, and its rich rendering.

Commands build the dict (so its keys are a contract in one place: the command modules), this
module only writes and draws it. Results go to stdout; the CLI sends progress and logs to stderr.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .checkpoint import atomic_write


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


def render_run(report: dict[str, Any], console: Console) -> None:
    """Terminal summary of ``forget`` / ``relabel``."""
    cmd = report["command"]
    key = "forget_accuracy" if cmd == "forget" else "relabel_accuracy"
    label = "accuracy on the forget images" if cmd == "forget" else "images predicted as their new label"
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
    console.print(table)
    times = " · ".join(f"{k} {v:.2f}s" for k, v in report["seconds"].items())
    console.print(f"images: {report['n_images']} · steps: {report['steps']} · {times}")
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    if ok:
        console.print(f"[green]goal met[/] · wrote {report['output']}")
    else:
        where = f"wrote {report['output']} (--allow-partial)" if report.get("output") else "no checkpoint written"
        console.print(f"[red]goal not met[/] after {report['steps']} steps · {where}")
