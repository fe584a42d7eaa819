"""Register ``ActivationCache.lens`` without importing TransformerLens (6 s) at ``import lens_plugins``.

If TransformerLens is already imported the accessor is registered at once; otherwise a meta-path finder
waits for ``transformer_lens.ActivationCache`` to be executed and registers right after it, so an
nnsight-only session never pays for TransformerLens.
"""

import importlib.abc
import importlib.util
import sys

_CACHE_MODULE = "transformer_lens.ActivationCache"


def _register(module) -> None:
    from lens_plugins.backends.transformer_lens.accessor import register_accessor

    register_accessor(module.ActivationCache)


class _RegisterAfterExec(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register(module)


class _ActivationCacheFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _CACHE_MODULE:
            return None
        sys.meta_path.remove(self)  # find the real spec with the other finders, then wrap its loader
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def install() -> None:
    if _CACHE_MODULE in sys.modules:
        _register(sys.modules[_CACHE_MODULE])
    elif not any(isinstance(f, _ActivationCacheFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ActivationCacheFinder())

__all__ = ["install"]
