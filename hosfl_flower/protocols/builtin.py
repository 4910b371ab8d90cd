"""Imports the package's protocols, each of which registers itself (in the order the run config lists them)."""

from . import hosfl  # noqa: F401
from . import zo_sfl  # noqa: F401
from . import splitfed  # noqa: F401
from . import heron  # noqa: F401
from . import fedavg  # noqa: F401
