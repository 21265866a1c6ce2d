"""Installed versions of the libraries a measurement depends on (provenance and cache keys)."""

from __future__ import annotations

import importlib.metadata
import platform

__version__ = "0.1.0"  # evalsuite's own (pyproject.toml's [project] version)


def package_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Python's version and each package's installed version (None where it is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out
