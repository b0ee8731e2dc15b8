"""Running the geonet command line from QGIS: progress from its progress bar, cancellation by Ctrl-C (SIGINT),
its one-line errors as Processing errors.

The geonet executable is the one ``geonet qgis install`` recorded in ``geonet.json`` beside this file;
the ``GEONET_EXECUTABLE`` environment variable overrides it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

#: ``  45%|####      | 9/20 [00:03<00:04, 2.61tile/s]``: tqdm's frame; ``9/20`` is what is read.
_FRAME = re.compile(r"(\d+)/(\d+) \[")
#: Seconds to wait for geonet to stop after Ctrl-C before it is killed.
STOP_TIMEOUT_S = 30


def _config() -> dict:
    p = Path(__file__).with_name("geonet.json")
    return json.loads(p.read_text()) if p.exists() else {}


def executable() -> str:
    """The geonet command: ``GEONET_EXECUTABLE``, else the one recorded at install, else ``geonet`` on PATH."""
    return os.environ.get("GEONET_EXECUTABLE") or _config().get("executable") or "geonet"


def installed_version() -> str:
    return _config().get("version", "")


def _environment() -> dict:
    """QGIS's environment without its Python settings (geonet runs on its own interpreter)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "QGIS_PREFIX", "VIRTUAL_ENV"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Result:
    def __init__(self, returncode, stdout, messages, cancelled):
        self.returncode = returncode
        self.stdout = stdout
        self.messages = messages
        self.cancelled = cancelled

    @property
    def error(self) -> str:
        """geonet's one-line error (``Error: ...``), else the last line it printed."""
        errs = [m for m in self.messages if m.startswith("Error:")]
        if errs:
            return errs[-1]
        return self.messages[-1] if self.messages else f"geonet exited with code {self.returncode}"


def run(args, feedback) -> Result:
    """Run ``geonet ARGS`` and wait for it, reporting to a ``QgsProcessingFeedback``.

    Progress frames move ``feedback``'s progress bar; other stderr lines go to its log. When
    ``feedback.isCanceled()``, geonet gets Ctrl-C (SIGINT; it stops at once and removes its temporary
    files, writing nothing), then is killed after :data:`STOP_TIMEOUT_S` seconds.
    """
    cmd = [executable(), *[str(a) for a in args]]
    feedback.pushCommandInfo(" ".join(cmd))
    kw = {}
    if sys.platform == "win32":
        kw["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_environment(), **kw)
    except OSError as exc:
        return Result(127, "", [f"Error: cannot run {cmd[0]} ({exc.strerror}). Fix: run `geonet qgis install` "
                                "from geonet's environment, or set GEONET_EXECUTABLE."], False)
    messages = []
    out = []

    def read_stderr():
        buf = b""
        while True:
            chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(4096)
            if not chunk:
                break
            buf += chunk
            frames = re.split(rb"[\r\n]", buf)
            buf = frames.pop()
            for f in frames:
                _frame(f.decode("utf-8", "replace").strip())
        if buf:
            _frame(buf.decode("utf-8", "replace").strip())

    def _frame(text):
        if not text:
            return
        m = _FRAME.search(text)
        if m and "|" in text:
            n, total = int(m.group(1)), int(m.group(2))
            if total:
                feedback.setProgress(100.0 * n / total)
            return
        messages.append(text)
        if text.startswith("Error:"):
            feedback.reportError(text)
        else:
            feedback.pushInfo(text)

    def read_stdout():
        out.append(proc.stdout.read().decode("utf-8", "replace"))

    threads = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=read_stdout, daemon=True)]
    for t in threads:
        t.start()
    cancelled = False
    while proc.poll() is None:
        if feedback.isCanceled() and not cancelled:
            cancelled = True
            feedback.pushInfo("cancelling: stopping geonet")
            proc.send_signal(signal.CTRL_BREAK_EVENT if sys.platform == "win32" else signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    return Result(proc.returncode, "".join(out), messages, cancelled)
