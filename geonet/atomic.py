"""Atomic outputs: write to a temporary sibling, then rename into place.

A crash, an exception or Ctrl-C while writing leaves the output path as it was before (absent, or
the previous complete version); it never holds a half-written file or folder.

Temporary siblings are named ``.<name>.tmp-<pid>-<random>``: a process killed outright (SIGKILL, power
loss) leaves its own behind, and :func:`remove_stale` deletes those whose process is gone -- never the
temporary file of a run still writing. Two runs writing the same output are therefore both safe: each
writes its own temporary file and the last rename wins, with a complete file either way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from geonet.errors import InputError

__all__ = ["atomic_dir", "atomic_file", "check_output_dir", "check_writable", "make_dir", "make_parent",
           "remove_stale"]


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
    """Create the missing parent folders of an output ``path`` (see :func:`make_dir`), and check that the
    folder takes new files (see :func:`check_writable`)."""
    make_dir(Path(path).parent, option=option, path=path)
    check_writable(Path(path).parent, option=option, path=path)


def check_writable(folder: str | os.PathLike[str], *, option: str = "-o", path: str | os.PathLike[str] | None = None
                   ) -> None:
    """Create and delete a temporary file in ``folder``, before any work starts.

    Raises:
        InputError: the folder does not take new files (read-only, permissions, full).
    """
    try:
        fd, name = tempfile.mkstemp(prefix=".geonet-write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise InputError(f"{option} {path if path is not None else folder}: cannot write in {folder} "
                         f"({exc.strerror or exc}).", fix="choose a writable location, or fix its permissions.") from None


def _tmp_prefix(out: Path) -> str:
    return f".{out.stem if out.suffix else out.name}.tmp-"


def remove_stale(path: str | os.PathLike[str]) -> int:
    """Delete the temporary siblings of ``path`` left by geonet processes that no longer run.

    Returns:
        How many files or folders were removed.
    """
    out = Path(path)
    n = 0
    if not out.parent.is_dir():
        return 0
    for tmp in list(out.parent.glob(_tmp_prefix(out) + "*")) + list(out.parent.glob(f".{out.name}.tmp-*")):
        pid = tmp.name.split(".tmp-", 1)[1].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
            n += 1
    return n


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


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
    remove_stale(out)
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and ``path`` is
    left untouched.
    """
    out = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
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
    fd, name = tempfile.mkstemp(prefix=f"{_tmp_prefix(out)}{os.getpid()}-", suffix=sfx, dir=out.parent)
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
