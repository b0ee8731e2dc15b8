"""The ``geonet`` click group: ``--version``, ``-v/-q``, and one-line errors with exit codes.

Expected faults (:class:`geonet.errors.GeonetError`) and click's own usage errors print one line,
``Error: ...``, on stderr with no traceback: exit code 2 for bad usage or bad inputs, 1 for a failure
during the work. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import click

import geonet
from geonet import interrupt
from geonet.errors import GeonetError


class GeonetGroup(click.Group):
    """A click group whose errors are one line each (see module docstring)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        _watch_sigint()
        try:
            try:
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            except Exception:
                if interrupt.requested():  # Ctrl-C raised inside a C library (Arrow, GDAL) surfaces as its error
                    raise KeyboardInterrupt from None
                raise
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = ""
            if exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except GeonetError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo("Interrupted.", err=True)
            if interrupt.requested():
                # A real Ctrl-C: temporary files are gone (atomic writers clean up on the way here). Leave without
                # the interpreter's shutdown, which joins leftover reader threads and waits for nothing useful.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(130)
            sys.exit(130)
        except OSError as exc:
            if exc.errno is None:
                raise
            name = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"Error: {name}{exc.strerror}", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _on_sigint(signum, frame):
    interrupt.request()  # checked again by long loops, in case this KeyboardInterrupt is swallowed
    raise KeyboardInterrupt


def _watch_sigint() -> None:
    """Note Ctrl-C (:mod:`geonet.interrupt`) before raising KeyboardInterrupt as Python does (only where Python's
    own handler is in place)."""
    import signal
    import threading

    interrupt.clear()
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def _setup_logging(verbose: int, quiet: int) -> None:
    level = logging.WARNING - 10 * verbose + 10 * quiet
    level = max(logging.DEBUG, min(logging.CRITICAL, level))
    logger = logging.getLogger("geonet")
    logger.setLevel(level)
    if not any(getattr(h, "_geonet", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("geonet: %(levelname)s: %(message)s"))
        handler._geonet = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    for h in logger.handlers:
        h.setLevel(level)


@click.group(cls=GeonetGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(geonet.__version__, "--version", prog_name="geonet")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("-q", "--quiet", count=True, help="Less log output (-q errors only).")
def cli(verbose: int, quiet: int) -> None:
    """geonet: find objects in aerial and satellite imagery with a RetinaNet.

    \b
    geonet check --imagery tiles/ --labels pools.shp     pre-flight report
    geonet chip  --imagery tiles/ --labels pools.shp -o chips/
    geonet train --imagery tiles/ --labels pools.shp -o runs/pools
    geonet detect scene.tif --model runs/pools/best.pt -o out.geojson
    geonet evaluate out.geojson --truth pools.shp -o report/
    """
    _setup_logging(verbose, quiet)


def _register() -> None:
    from geonet.cli.anchors import anchors
    from geonet.cli.check import check
    from geonet.cli.chip import chip
    from geonet.cli.detect import detect
    from geonet.cli.evaluate import evaluate
    from geonet.cli.qgis import qgis
    from geonet.cli.train import train

    for command in (check, chip, anchors, train, detect, evaluate, qgis):
        cli.add_command(command)


_register()


if __name__ == "__main__":  # python -m geonet.cli.main
    cli()
