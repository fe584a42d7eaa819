"""``cache.lens``: the TransformerLens verbs bound to one ``ActivationCache``, registered on the class
(``lens_plugins._import_hooks``) as soon as TransformerLens is imported, like pandas' accessors.

Each method is the cache-level verb with the cache bound, and carries that verb's signature and docstring,
so ``help(cache.lens.logit_lens)`` in a notebook shows every parameter."""

import functools
import inspect

from torch import Tensor

from lens_plugins.backends.transformer_lens.attention import attention
from lens_plugins.backends.transformer_lens.attribution import attribution, logit_diff
from lens_plugins.backends.transformer_lens.lens import logit_lens
from lens_plugins.backends.transformer_lens.reader import Sublayers, residual_stack
from lens_plugins.backends.transformer_lens.verification import decoder_for
from lens_plugins.decoder import Decoder


def _bound(verb):
    """``verb(cache, ...)`` as a method of ``CacheLens``: the cache bound, the rest of the signature kept."""

    @functools.wraps(verb)
    def method(self, *args, **kwargs):
        return verb(self._cache, *args, **kwargs)

    signature = inspect.signature(verb)
    rest = list(signature.parameters.values())[1:]
    method.__signature__ = signature.replace(
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *rest])
    del method.__wrapped__  # inspect would follow it back to the unbound signature
    return method


class CacheLens:
    """The ``cache.lens`` accessor: lens operations bound to one ``ActivationCache``."""

    def __init__(self, cache):
        self._cache = cache

    logit_lens = _bound(logit_lens)
    attribution = _bound(attribution)
    logit_diff = _bound(logit_diff)
    attention = _bound(attention)

    def decoder(self) -> Decoder:
        """The decoder (final norm, ``W_U``, ``b_U``, soft-cap) of the model this cache came from."""
        return decoder_for(self._cache.model)

    def stack(self, resid_mid: bool = False, sublayers: Sublayers = False) -> tuple[Tensor, list[str]]:
        """The residual stack ``[rows, batch, seq, d_model]`` the lens decodes, with its row labels."""
        return residual_stack(self._cache, resid_mid, sublayers)


class _Accessor:
    """A descriptor like pandas' accessors: ``cache.lens`` builds a ``CacheLens`` on access."""

    def __get__(self, cache, owner=None):
        if cache is None:
            return CacheLens
        return CacheLens(cache)


def register_accessor(cache_class) -> None:
    """Give ``cache_class`` (TransformerLens's ``ActivationCache``) its ``lens`` accessor, once."""
    if not isinstance(cache_class.__dict__.get("lens"), _Accessor):
        cache_class.lens = _Accessor()


__all__ = ["CacheLens", "register_accessor"]
