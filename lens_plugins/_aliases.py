"""Old names kept for one release: a module's ``__getattr__`` that returns the new object with a
``DeprecationWarning`` naming the replacement (PEP 562), so renamed verbs keep working and say where to go."""

import importlib
import warnings


def deprecated_names(module_name: str, moved: dict):
    """A module ``__getattr__`` for ``moved``: ``{old name: (module of the new name, new name)}``."""

    def __getattr__(name):
        if name not in moved:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        target_module, new = moved[name]
        public = target_module.replace("lens_plugins.backends.", "lp.").replace("lens_plugins.", "lp.")
        warnings.warn(f"{module_name.replace('lens_plugins.', 'lp.')}.{name} is deprecated and will be removed in "
                      f"0.3; use {public}.{new}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(target_module), new)

    return __getattr__


__all__ = ["deprecated_names"]
