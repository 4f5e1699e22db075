"""Exceptions raised while reading and writing checkpoint files.

All of them are :class:`ValueError` subclasses with a one-line message that names the file,
so a CLI can print ``str(err)`` and exit; no zipfile / pickle traceback is chained to them.

* :class:`CheckpointError` -- common base; catch this to handle every checkpoint problem.
* :class:`CheckpointFormatError` -- the bytes are not a readable checkpoint (empty, random,
  truncated, corrupt zip, unsupported dtype, inconsistent tensor geometry, ...).
* :class:`UnsafeCheckpointError` -- a pickle references a global (a function or class) that
  is not on the tensor allow-list. Nothing from the file was executed.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointFormatError", "CheckpointMismatchError", "UnsafeCheckpointError"]


class CheckpointError(ValueError):
    """Base class of every checkpoint reading/writing error raised by xaijax."""


class CheckpointFormatError(CheckpointError):
    """The file is not a readable checkpoint of the expected format (corrupt, truncated, ...)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint references a global that is not a tensor type; it was not run.

    Attributes:
      global_name: the dotted name of the refused global, e.g. ``"posix.system"``.
    """

    def __init__(self, message: str, global_name: str = "") -> None:
        super().__init__(message)
        self.global_name = global_name


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into.

    The message lists every missing, unexpected and mis-shaped key by name, with a hint when
    the class count or the architecture family looks wrong.
    """
