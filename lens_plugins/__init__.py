"""lens_plugins: the logit lens and its family on TransformerLens caches and inside nnsight traces.

The map (ARCHITECTURE.md has the page):

- ``core/``: torch only, may run on an NDIF server (``core.SHIPPED``): rows, reductions table, request,
  streamed readout, architectures table, lens maps, the pipeline, DLA arithmetic, the in-trace nnsight lens
- ``adapters/transformer_lens.py`` / ``adapters/nnsight.py``: one reader each (row -> hook name; row -> module
  input/output) and the same verbs: ``logit_lens``, ``logit_diff``, ``attribution`` and their ``run_*`` forms
- ``lenses.py`` (``LogitLens``, ``AffineLens``), ``decoder.py``, ``logit_lens.py`` (labelling, one-call guards),
  ``result.py`` / ``attribution.py`` (results), ``tokens.py``, ``plot.py``, ``cli.py``, ``models.py``

Heavy modules load on first use: ``import lens_plugins`` imports neither TransformerLens nor nnsight,
yet ``ActivationCache.lens`` appears as soon as TransformerLens is imported.
"""

import importlib
import sys
import types

from lens_plugins import _import_hooks

__version__ = "0.1.0"

_LAZY = {
    "transformer_lens": ("lens_plugins.adapters.transformer_lens", None),
    "nnsight": ("lens_plugins.adapters.nnsight", None),
    "Decoder": ("lens_plugins.decoder", "Decoder"),
    "LensResult": ("lens_plugins.result", "LensResult"),
    "Attribution": ("lens_plugins.attribution", "Attribution"),
    "LogitDiff": ("lens_plugins.attribution", "LogitDiff"),
    "tokens": ("lens_plugins.tokens", None),
    "logit_lens_from_stack": ("lens_plugins.logit_lens", "logit_lens_from_stack"),
    "Row": ("lens_plugins.core.rows", "Row"),
    "LogitLens": ("lens_plugins.lenses", "LogitLens"),
    "AffineLens": ("lens_plugins.lenses", "AffineLens"),
    "Lens": ("lens_plugins.lenses", "Lens"),
    "load_default_model": ("lens_plugins.models", "load_default_model"),
    "load_hf_model": ("lens_plugins.models", "load_hf_model"),
    "lens_heatmap": ("lens_plugins.plot", "lens_heatmap"),
    "html_report": ("lens_plugins.plot", "html_report"),
    "attention": ("lens_plugins.attention", None),
    "AttentionResult": ("lens_plugins.attention", "AttentionResult"),
    "plot": ("lens_plugins.plot", None),
    "write_report": ("lens_plugins.report", "write_report"),
    "run_report": ("lens_plugins.report", "run_report"),
    "patchscope": ("lens_plugins.patchscopes", "patchscope"),
    "PatchscopeResult": ("lens_plugins.patchscopes", "PatchscopeResult"),
    "FutureLens": ("lens_plugins.future_lens", "FutureLens"),
    "future_lens": ("lens_plugins.future_lens", None),
    "TunedLens": ("lens_plugins.tuned_lens", "TunedLens"),
    "LastBlocksLens": ("lens_plugins.last_blocks_lens", "LastBlocksLens"),
    "evaluate_lenses": ("lens_plugins.evaluate", "evaluate_lenses"),
    "LensEvaluation": ("lens_plugins.evaluate", "LensEvaluation"),
    "decoder_from_checkpoint": ("lens_plugins.checkpoint_decoder", "decoder_from_checkpoint"),
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'lens_plugins' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package's own module type, so that ``lp`` pickles as its server-side face.

    A remote nnsight trace ships the globals its body names, and ``lp.nnsight.logit_lens(model)`` names
    ``lp``. An NDIF server cannot import lens_plugins, so rather than a reference to the package, ``lp``
    pickles as ``core.trace.server_namespace()``: a namespace whose ``nnsight.logit_lens`` (and
    ``logit_diff``, ``attribution``) is the in-trace entry point, shipped by source with the torch-only
    modules of ``core.SHIPPED``, which ``adapters.nnsight`` registers.
    """

    def __reduce__(self):
        from lens_plugins.adapters import nnsight as _registers_the_shipped_modules  # noqa: F401
        from lens_plugins.core import trace

        return (trace.server_namespace, ())


sys.modules[__name__].__class__ = _Package
_import_hooks.install()
