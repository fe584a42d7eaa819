"""``lp.nnsight``: the nnsight backend's verbs (``import lens_plugins.nnsight`` works as a module); the code
is in ``lens_plugins/backends/nnsight/``."""

from lens_plugins.backends.nnsight import *  # noqa: F403
from lens_plugins.backends.nnsight import __all__, __getattr__  # noqa: F401
