"""Installed versions of the libraries a measurement depends on (provenance and cache keys)."""

from __future__ import annotations

import importlib.metadata
import platform


def package_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    """Python's version and each package's installed version (None where it is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out
