"""Errors raised while reading checkpoint files."""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt, unsafe or of the wrong kind.

    The message always names the file, says what is wrong and, where it helps,
    what to do: ``"<path>: <problem>. <hint>"``. Either write that message
    yourself, ``CheckpointError(f"{path}: ...")``, or let :meth:`for_file`
    compose it and remember the path.
    """

    path: str | None = None

    @classmethod
    def for_file(cls, path: str | os.PathLike[str], problem: str, hint: str = "") -> CheckpointError:
        message = f"{os.fspath(path)}: {problem}"
        if hint:
            message = f"{message}. {hint}"
        error = cls(message)
        error.path = os.fspath(path)
        return error
