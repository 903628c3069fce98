"""Human-readable reports: ``--markdown`` with its figures as PNG files beside, ``--html`` as one
self-contained file (figures and thumbnails embedded), so it can be sent alone.

The content is built once as a list of blocks from the report dict; Markdown and HTML are two
small renderers of the same blocks, so the two formats never say different things.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__
from .goals import GOALS
from .files import atomic_write
from .health import describe
from .plots import FIGURES
from .report import HELD_SETS, _pct

# ("title", text) · ("h", text) · ("p", text) · ("pre", text) · ("ul", [text]) · ("table", header, rows)
# · ("img", alt, file name, PNG bytes); a table cell is text or a Thumb.
Block = tuple[Any, ...]

THUMB = 64  # thumbnail box in pixels: enough to recognise an image, small enough to embed dozens


@dataclass(frozen=True)
class Thumb:
    """An image cell: its file name, and a small PNG of it (None when the file cannot be read)."""

    name: str
    png: bytes | None


def thumbnail(path: str | os.PathLike, size: int = THUMB) -> bytes | None:
    """The image fit into ``size``×``size`` as PNG bytes; small images are scaled up with hard pixels
    so a 28-pixel digit stays legible."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im if im.mode in ("L", "RGB", "RGBA") else im.convert("RGBA")
            scale = size / max(im.size)
            shape = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(shape, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
    except (OSError, ValueError):
        return None
    return buf.getvalue()


def _run_blocks(report: dict[str, Any]) -> list[Block]:
    cmd = report["command"]
    status = "goal met" if report["goal_met"] else "**goal not met**"
    out_line = f"output: `{report['output']}`" + (f" (sha256 `{report['output_sha256'][:16]}…`)" if report.get("output_sha256") else "")
    blocks: list[Block] = [
        ("p", f"{status} · method `{report['method']}` · {report['n_images']} images · {report['steps']} steps · "
              f"device {report['device']}" + (f" · {report['precision']}" if report.get("precision") else "")),
        ("ul", [f"input: `{report['input']}` (sha256 `{report['input_sha256'][:16]}…`)", out_line]),
        *([("p", describe(report["health"]))] if report.get("health") else []),
        ("table", ["", "before", "after"],
         [[k.replace("_", " "), _pct(report["before"].get(k)), _pct(report["after"].get(k))]
          for k in sorted(set(report["before"]) | set(report["after"]))]),
    ]
    if report.get("projection"):
        blocks.append(("p", f"updates kept orthogonal to {report['projection']}"
                            + "".join(f"; {_pct(report[key]['agreement'])} of the {what} keep their prediction"
                                      for key, what in HELD_SETS if key in report)))
    ev = report.get("eval") or {}
    mia = [(w, ev[w]["mia"]) for w in ("before", "after") if "mia" in (ev.get(w) or {})]
    if mia:
        blocks += [("h", "Membership inference (forget vs --eval images; 0.5 = indistinguishable)"),
                   ("table", ["", "loss AUC", "confidence AUC"],
                    [[w, f"{m['loss_auc']:.3f}", f"{m['confidence_auc']:.3f}"] for w, m in mia])]
    blocks += [("h", "Time per phase"), ("table", ["phase", "seconds"], [[k, f"{v:.2f}"] for k, v in report["seconds"].items()])]
    onto = not GOALS[cmd].away  # relabel: each image has a new label to reach
    header = ["image", "label", "before", "after"] + (["new label"] if onto else [])
    rows = [[Thumb(Path(r["path"]).name, thumbnail(r["path"])), r["label"], r["before"], r["after"]]
            + ([r["new_label"]] if onto else []) for r in report["images"]]
    blocks += [("h", "Images"), ("table", header, rows)]
    if report.get("notes"):
        blocks += [("h", "Notes"), ("ul", list(report["notes"]))]
    return blocks


def _eval_blocks(report: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [
        ("p", f"{report['n_images']} images · top-1 {_pct(report['accuracy'])} · top-5 {_pct(report['top5_accuracy'])}"),
        ("table", ["class", "accuracy", "n"], [[name, _pct(v["accuracy"]), str(v["n"])] for name, v in report["per_class"].items()]),
    ]
    if "mia" in report:
        blocks += [("h", "Membership inference (forget vs held-out; 0.5 = indistinguishable)"),
                   ("ul", [f"loss AUC {report['mia']['loss_auc']:.3f}, confidence AUC {report['mia']['confidence_auc']:.3f}",
                           f"accuracy on the forget images {_pct(report['forget']['forget_accuracy'])}"])]
    if "compare" in report:
        c = report["compare"]
        blocks += [("h", f"Compared with `{c['checkpoint']}`"),
                   ("ul", [f"its accuracy {_pct(c['accuracy'])}, agreement {_pct(c['agreement'])}, {len(c['changed'])} images changed"])]
    if report.get("notes"):
        blocks += [("h", "Notes"), ("ul", list(report["notes"]))]
    return blocks


def figure_paths(path: Path) -> list[tuple[str, Path]]:
    """The PNG files a Markdown document at ``path`` writes beside itself, by figure suffix."""
    return [(suffix, path.with_name(f"{path.stem}-{suffix}.png")) for suffix, *_ in FIGURES]


def _provenance(report: dict[str, Any]) -> list[Block]:
    """Which l2ul wrote the document, when, and the command that produced the report."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks: list[Block] = [("p", f"written by l2ul {__version__} on {when}")]
    if report.get("command_line"):
        blocks.append(("pre", report["command_line"]))
    return blocks


def _figures(report: dict[str, Any], stem: str) -> list[Block]:
    """Each figure (when matplotlib is there) and the sentence that reads it (always)."""
    blocks: list[Block] = []
    for suffix, alt, draw, read in FIGURES:
        png, text = draw(report), read(report)
        if png:
            blocks.append(("img", alt, f"{stem}-{suffix}.png", png))
        if text:
            blocks.append(("p", text))
    if not blocks:
        return []
    return [("h", "Figures" if any(b[0] == "img" for b in blocks) else "Readings")] + blocks


def build(report: dict[str, Any], path: Path) -> list[Block]:
    """The document's blocks; figure files are named after ``path`` but nothing is written."""
    blocks: list[Block] = [("title", f"l2ul {report['command']}"), *_provenance(report)]
    blocks += _run_blocks(report) if report["command"] in GOALS else _eval_blocks(report)
    return blocks + _figures(report, path.stem)


def _md_cell(cell: Any) -> str:
    return f"`{cell.name}`" if isinstance(cell, Thumb) else str(cell)


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind == "title":
            out += [f"# {b[1]}", ""]
        elif kind == "h":
            out += [f"## {b[1]}", ""]
        elif kind == "p":
            out += [b[1], ""]
        elif kind == "pre":
            out += ["```text", b[1], "```", ""]
        elif kind == "ul":
            out += [f"- {item}" for item in b[1]] + [""]
        elif kind == "table":
            out += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]] + [""]
        elif kind == "img":
            out += [f"![{b[1]}]({b[2]})", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the blocks use: `code` and **bold**."""
    t = html.escape(str(text))
    t = re.sub(r"`([^`]*)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]*)\*\*", r"<strong>\1</strong>", t)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _html_cell(cell: Any) -> str:
    """A thumbnail cell shows the image above its name; any other cell is inline text."""
    if not isinstance(cell, Thumb):
        return _inline(cell)
    name = html.escape(cell.name, quote=True)
    img = f'<img class="thumb" src="{_data_uri(cell.png)}" alt="{name}">' if cell.png else ""
    return f"{img}<code>{name}</code>"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:0.5rem 0 1rem}td,th{border:1px solid #ccc;padding:0.25rem 0.6rem;"
        "text-align:right}td:first-child,th:first-child{text-align:left}code{background:#f3f3f3;padding:0 0.2rem}"
        "img{max-width:100%;display:block;margin:0.5rem 0 1rem}img.thumb{margin:0 0 0.2rem;image-rendering:pixelated}"
        "pre{background:#f3f3f3;padding:0.5rem;white-space:pre-wrap;word-break:break-all}")


def to_html(blocks: list[Block]) -> str:
    title = next((b[1] for b in blocks if b[0] == "title"), "l2ul report")
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind == "title":
            out.append(f"<h1>{_inline(b[1])}</h1>")
        elif kind == "h":
            out.append(f"<h2>{_inline(b[1])}</h2>")
        elif kind == "p":
            out.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
            body = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            out.append(f'<img src="{_data_uri(b[3])}" alt="{html.escape(b[1], quote=True)}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_document(path: str | os.PathLike, report: dict[str, Any], fmt: str) -> list[str]:
    """Write the report as ``fmt`` ("markdown" or "html") atomically, a Markdown report's figures
    as PNG files beside it; returns the paths written, the document first."""
    path = Path(path)
    blocks = build(report, path)
    figures = [(path.with_name(b[2]), b[3]) for b in blocks if b[0] == "img"] if fmt == "markdown" else []
    for png, data in figures:
        atomic_write(png, lambda tmp, data=data: Path(tmp).write_bytes(data))
    text = to_markdown(blocks) if fmt == "markdown" else to_html(blocks)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return [str(path)] + [str(png) for png, _ in figures]
