"""Nothing the user gave is ever overwritten: every path a command reads against every path it
will write, checked before any work.

Options map to paths (``{"--images": [folder], "CHECKPOINT": [file]}``; ``{"--report": file}``).
A write is refused when it resolves (symlinks, ``..``, hard links) to a read path, to a read
folder itself or to an existing file inside a read folder (a forget image), or to another write.
No heavy imports: the CLI calls this before torch is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from .errors import UsageError

PathLike = str | os.PathLike


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError, ValueError):  # a name too long, a symlink loop, a NUL byte
        return Path(os.path.abspath(p))


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except (OSError, ValueError):
        return False


def _same(a: Path, b: Path) -> bool:
    """The same file: the same resolved name, or (when both exist) the same inode on the same
    device, which also catches hard links."""
    if _resolved(a) == _resolved(b):
        return True
    if not (_exists(a) and _exists(b)):
        return False
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _inside(write: Path, folder: Path) -> bool:
    """An existing file under ``folder`` (a write there would replace an input of the folder)."""
    try:
        is_dir = folder.is_dir()
        is_file = write.is_file()
    except (OSError, ValueError):
        return False
    return is_dir and is_file and _resolved(write).is_relative_to(_resolved(folder))


def _flat(reads: Mapping[str, Sequence[PathLike | None]]) -> list[tuple[str, Path]]:
    return [(opt, Path(p)) for opt, paths in reads.items() for p in paths if p is not None]


def check_paths(reads: Mapping[str, Sequence[PathLike | None]], writes: Mapping[str, PathLike | None]) -> None:
    """Raise :class:`UsageError` naming both options when a write would replace a read path or
    another write. ``None`` entries (options not given) are skipped."""
    planned = [(opt, Path(p)) for opt, p in writes.items() if p is not None]
    for opt, path in planned:
        for r_opt, r_path in _flat(reads):
            if _same(path, r_path):
                raise UsageError(f"{opt} {path} is also {r_opt}: it would overwrite the input")
            if _inside(path, r_path):
                raise UsageError(f"{opt} {path} is a file of {r_opt} {r_path}: it would overwrite the input")
    for i, (opt, path) in enumerate(planned):
        for other, o_path in planned[i + 1:]:
            if _same(path, o_path):
                raise UsageError(f"{opt} {path} is also {other}: the two would overwrite each other")


def documents_writes(markdown: PathLike | None, html: PathLike | None) -> dict[str, Path]:
    """The documents' writes: the HTML report alone (its figures are embedded), the Markdown
    report and the figure files beside it."""
    from .document import figure_paths

    out = {"--html": Path(html)} if html is not None else {}
    if markdown is not None:
        p = Path(markdown)
        out.update({"--markdown": p, **{f"--markdown (figure {suffix})": png for suffix, png in figure_paths(p)}})
    return out
