"""Installing the geonet QGIS plugin (``geonet qgis install``): a Processing provider that runs this geonet.

The plugin (``geonet/qgis_plugin/``) imports only QGIS and the standard library; it runs the geonet
command of *this* environment in a subprocess, whose path is recorded in the plugin's ``geonet.json``.
So QGIS's Python needs none of geonet's dependencies (torch, rasterio...).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import geonet
from geonet.atomic import atomic_file
from geonet.errors import InputError

__all__ = ["PLUGIN_SOURCE", "default_executable", "qgis_profile_dir", "install_plugin", "plugin_zip"]

#: The plugin's files in this package.
PLUGIN_SOURCE = Path(__file__).with_name("qgis_plugin")
_FILES = ("__init__.py", "plugin.py", "provider.py", "algorithms.py", "runner.py", "metadata.txt")


def default_executable() -> Path | None:
    """The ``geonet`` command beside this interpreter (a venv's ``bin/``), else the one on ``PATH``."""
    here = Path(sys.executable).parent / ("geonet.exe" if sys.platform == "win32" else "geonet")
    if here.exists():
        return here
    found = shutil.which("geonet")
    return Path(found) if found else None


def qgis_profile_dir(profile: str = "default") -> Path:
    """QGIS 3's folder of user profile ``profile`` on this platform (it need not exist yet)."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "QGIS" / "QGIS3" / "profiles" / profile


def _files(executable: str | os.PathLike[str] | None) -> dict[str, str]:
    """The plugin's files by name, with ``geonet.json`` recording ``executable`` (default: :func:`default_executable`)."""
    exe = Path(executable) if executable else default_executable()
    if exe is None:
        raise InputError("cannot find the geonet command.", fix="run `geonet qgis install` from geonet's environment.")
    if not exe.exists():
        raise InputError(f"the geonet command {exe} does not exist.",
                         fix="run `geonet qgis install` from the environment geonet is installed in.")
    out = {name: (PLUGIN_SOURCE / name).read_text(encoding="utf-8") for name in _FILES}
    out["metadata.txt"] = out["metadata.txt"].replace("version=0.0.0", f"version={geonet.__version__}")
    out["geonet.json"] = json.dumps({"executable": str(exe.resolve()), "version": geonet.__version__}, indent=2)
    return out


def install_plugin(profile_dir: str | os.PathLike[str] | None = None, *, executable: str | os.PathLike[str] | None = None,
                   profile: str = "default") -> Path:
    """Copy the plugin into ``<profile_dir>/python/plugins/geonet`` (replacing an older copy).

    Args:
        profile_dir: a QGIS profile folder (default: :func:`qgis_profile_dir` of ``profile``).
        executable: the geonet command the plugin runs (default: :func:`default_executable`).

    Returns:
        The plugin folder. QGIS lists it in Plugins > Manage and Install Plugins > Installed, where it is
        enabled once (QGIS keeps that choice).

    Raises:
        InputError: no geonet command found, or the profile folder cannot be written.
    """
    files = _files(executable)
    dest = Path(profile_dir or qgis_profile_dir(profile)) / "python" / "plugins" / "geonet"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            with atomic_file(dest / name) as tmp:
                tmp.write_text(text, encoding="utf-8")
    except PermissionError:
        raise InputError(f"cannot write the QGIS plugin folder {dest}.",
                         fix="pass --profile-dir with a writable QGIS profile, or --zip to build an installable zip.") from None
    return dest


def plugin_zip(path: str | os.PathLike[str], *, executable: str | os.PathLike[str] | None = None) -> Path:
    """Write the plugin as a zip for QGIS's Plugins > Install from ZIP (folder ``geonet/`` inside).

    Raises:
        InputError: as :func:`install_plugin`.
    """
    files = _files(executable)
    out = Path(path)
    with atomic_file(out) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name, text in files.items():
                z.writestr(f"geonet/{name}", text)
    return out
