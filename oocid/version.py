"""The version, in a module of its own: `pyproject.toml` reads it, and a submodule imports it
without the package's `__init__` (which a folder named `oocid` in the working directory can
shadow under `python -m oocid`: a clone's root seen from the folder above it)."""

__version__ = "0.1.0"
