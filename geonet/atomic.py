"""Atomic outputs: write to a temporary sibling, then rename into place.

A crash, an exception or Ctrl-C while writing leaves the output path as it was before (absent, or
the previous complete version); it never holds a half-written file or folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from geonet.errors import InputError

__all__ = ["atomic_dir", "atomic_file", "check_output_dir", "make_dir", "make_parent"]


def make_dir(folder: str | os.PathLike[str], *, option: str = "-o", path: str | os.PathLike[str] | None = None) -> None:
    """Create ``folder`` and its missing parents (``mkdir -p``); ``path`` names the option's value in errors.

    Raises:
        InputError: it cannot be created (permissions, or a file in the way).
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option} {path if path is not None else folder}: cannot create the folder {folder} "
                         f"({exc.strerror or exc}).", fix="choose a writable location.") from None


def make_parent(path: str | os.PathLike[str], *, option: str = "-o") -> None:
    """Create the missing parent folders of an output ``path`` (see :func:`make_dir`)."""
    make_dir(Path(path).parent, option=option, path=path)


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool, option: str = "-o") -> Path:
    """Check that ``path`` can become an output folder.

    Raises:
        InputError: it is a file, its parent folder cannot be created, or it is a non-empty folder and
            ``overwrite`` is False.

    Missing parent folders are created.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{option} {out} is a file, not a folder.", fix="choose a folder path.")
    make_parent(out, option=option)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{option} {out} exists and is not empty.", fix="choose another folder or pass --overwrite.")
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``path`` is
    left untouched.
    """
    out = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (same suffix); on success rename it to ``path``.

    The temporary file keeps ``path``'s suffix (or ``suffix``) so that format drivers chosen by
    extension (GDAL/OGR) pick the right one. On failure it is deleted, with any sidecar files a
    driver created beside it (``.shx``, ``.dbf``, ``-journal``...).
    """
    out = Path(path)
    sfx = suffix if suffix is not None else out.suffix
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}.tmp-", suffix=sfx, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()  # let the writer create it; some drivers refuse to open an existing empty file

    def _cleanup():
        for p in out.parent.glob(f"{tmp.stem}*"):
            with contextlib.suppress(OSError):
                p.unlink()

    try:
        yield tmp
    except BaseException:
        _cleanup()
        raise
    os.replace(tmp, out)
    _cleanup()  # sidecars that were not renamed (none for single-file formats)
