"""Errors the tool knows how to explain.

Every failure a user can cause is raised as an :class:`L2ULError` subclass; the CLI maps them
to one ``error:`` line and an exit code in one place (``cli._run``). Anything else is a bug and
is re-raised with its traceback under ``--debug``.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its type's name when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class L2ULError(Exception):
    """A failure caused by input or environment, explained in one line."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UsageError(L2ULError):
    """Options that contradict each other or cannot be used together."""

    exit_code = 2


class InputError(L2ULError):
    """A path, image, folder or manifest that cannot be used."""


class CheckpointError(L2ULError):
    """A checkpoint that cannot be read, is unsafe, or does not fit the architecture."""


class RunFailed(L2ULError):
    """A run that finished without a result fit to write. Carries its report, which is still
    written and shown."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class GoalNotMet(RunFailed):
    """Unlearning stopped at its step cap before every image reached its goal."""

    exit_code = 3


class DamagedModel(RunFailed):
    """The run changed the model elsewhere beyond the health check's threshold (:mod:`.health`)."""

    exit_code = 4


class NumericalError(L2ULError):
    """The loss became NaN or infinite; nothing is written."""


class Interrupted(L2ULError):
    """Stopped by SIGINT/SIGTERM; nothing is written."""

    exit_code = 130
