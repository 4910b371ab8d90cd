"""Imports the package's protocols, each of which registers itself."""

from . import (
    fedavg,  # noqa: F401
    heron,  # noqa: F401
    hosfl,  # noqa: F401
    splitfed,  # noqa: F401
    zo_sfl,  # noqa: F401
)
