"""geonet's command line (installed as ``geonet.cli``). Each command is a thin wrapper over a library function."""
