"""``geonet qgis install``: the QGIS Processing provider (Detect objects, Evaluate detections)."""

from __future__ import annotations

import click

from geonet.qgis_install import install_plugin, plugin_zip, qgis_profile_dir


@click.group("qgis", short_help="Use geonet from QGIS's Processing toolbox.")
def qgis() -> None:
    """geonet inside QGIS: a "geonet" group in the Processing toolbox that runs this geonet."""


@qgis.command("install", short_help="Install the QGIS plugin into a QGIS profile (or write a zip).")
@click.option("--profile", default="default", show_default=True, help="QGIS user profile name.")
@click.option("--profile-dir", default=None, metavar="DIR", help="QGIS profile folder [default: this platform's, "
              f"e.g. {qgis_profile_dir()}].")
@click.option("--zip", "zip_path", default=None, metavar="FILE.zip",
              help="Write an installable zip instead (QGIS: Plugins > Manage and Install Plugins > Install from ZIP).")
def install(profile, profile_dir, zip_path):
    """Install the geonet plugin for QGIS >= 3.22; it runs the geonet command of this environment."""
    if zip_path:
        out = plugin_zip(zip_path)
        click.echo(f"wrote {out}: in QGIS, Plugins > Manage and Install Plugins > Install from ZIP")
        return
    dest = install_plugin(profile_dir, profile=profile)
    click.echo(f"installed the geonet plugin into {dest}; in QGIS, enable it once in Plugins > Manage and Install "
               "Plugins > Installed; then Processing Toolbox > geonet > Detect objects / Evaluate detections")
