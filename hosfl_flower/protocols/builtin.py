"""Imports the package's protocols, each of which registers itself."""

from . import hosfl  # noqa: F401
