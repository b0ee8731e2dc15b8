"""Typed errors for expected faults.

Every expected fault (a bad file, a bad option, a failure while reading data) is raised as a
:class:`GeonetError` whose message is one line that names the file or option and says what to do.
The command line prints that line without a traceback and exits with :attr:`GeonetError.exit_code`:

* ``2`` -- :class:`InputError`: the inputs or options are wrong; this is found before any output is
  written (bad usage, in the sense of ``click.UsageError``).
* ``1`` -- :class:`RunError`: the work started and failed (a corrupt block in a GeoTIFF, a
  non-finite loss, a full disk).

Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

from os import PathLike


class GeonetError(Exception):
    """Base class of every expected geonet fault. ``str(err)`` is a one-line message."""

    exit_code: int = 1

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None, fix: str | None = None):
        self.path = None if path is None else str(path)
        self.fix = fix
        text = " ".join(str(message).split())  # always one line
        if self.path and self.path not in text:
            text = f"{self.path}: {text}"
        if fix:
            text = f"{text} Fix: {' '.join(fix.split())}"
        super().__init__(text)


class InputError(GeonetError):
    """The inputs or options are wrong (exit code 2). Raised before any output is written."""

    exit_code = 2


class RunError(GeonetError):
    """A failure during the work itself (exit code 1)."""

    exit_code = 1
