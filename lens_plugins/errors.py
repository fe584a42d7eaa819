"""``lp.errors``: every error lens_plugins raises is a ``LensError`` (defined in ``core.errors``, which ships
to NDIF servers too); this module is their public home."""

from lens_plugins.core.errors import *  # noqa: F403
from lens_plugins.core.errors import __all__  # noqa: F401
