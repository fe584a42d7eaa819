"""``lp.transformer_lens``: the TransformerLens backend's verbs (``import lens_plugins.transformer_lens`` works
as a module); the code is in ``lens_plugins/backends/transformer_lens/``."""

from lens_plugins.backends.transformer_lens import *  # noqa: F403
from lens_plugins.backends.transformer_lens import __all__, __getattr__  # noqa: F401
