"""File helpers with no heavy imports: atomic writes and hashing.

Kept apart from checkpoint.py so that the CLI's report code (and ``--help``) need not import torch.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from .errors import InputError


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` and move the result into place only if it succeeded."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{target}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise InputError(f"{target}: cannot write in {folder} ({exc.strerror})") from exc
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def usable_path(path: str | os.PathLike, what: str, where: str | None = None) -> Path:
    """``path`` if the system can look it up at all, else :class:`InputError` naming ``where``
    (default: the path, shortened): a name longer than the file system allows or a NUL byte,
    which ``Path.exists`` would raise as OSError or ValueError."""
    p = Path(path)
    try:
        os.stat(p)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        if not isinstance(exc, OSError) or exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            name = str(p) if len(str(p)) <= 200 else f"{str(p)[:200]}…"
            raise InputError(f"{where or name}: unusable {what} path ({reason})") from exc
    return p
