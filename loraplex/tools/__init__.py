"""Maintenance tools run from the repository (`python -m loraplex.tools.NAME`)."""
