"""Imports the package's protocols, each of which registers itself."""

from . import (
    cse_fsl,  # noqa: F401
    fedavg,  # noqa: F401
    fsl_sage,  # noqa: F401
    heron,  # noqa: F401
    hosfl,  # noqa: F401
    mu_splitfed,  # noqa: F401
    splitfed,  # noqa: F401
    zo_sfl,  # noqa: F401
)
