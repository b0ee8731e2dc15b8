"""Ctrl-C as a flag that long loops check at safe points, so that it cannot be lost.

Python raises ``KeyboardInterrupt`` wherever the main thread is when SIGINT arrives. Raised inside a finaliser or
a weakref callback it is printed and swallowed, and the work carries on (training saw this once in CI). The
command line's SIGINT handler calls :func:`request` before it raises; detection calls :func:`check` at every batch
(:mod:`geonet.pipeline`), which raises ``KeyboardInterrupt`` there if the first one was lost. Training has its own
deferred handler (:class:`geonet.training.callbacks.DeferredInterrupt`).
"""

from __future__ import annotations

import threading

__all__ = ["request", "requested", "check", "clear"]

_requested = threading.Event()


def request() -> None:
    """Note that the user asked to stop (called from a SIGINT handler)."""
    _requested.set()


def requested() -> bool:
    """Whether a stop was asked for since the last :func:`clear`."""
    return _requested.is_set()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a stop was asked for.

    Raises:
        KeyboardInterrupt: after :func:`request`.
    """
    if _requested.is_set():
        raise KeyboardInterrupt


def clear() -> None:
    """Forget an earlier request (at the start of a command)."""
    _requested.clear()
