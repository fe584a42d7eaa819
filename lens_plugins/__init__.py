"""lens_plugins: the logit lens and its family on TransformerLens caches and inside nnsight traces.

The map (ARCHITECTURE.md has the page): ``core/`` (torch only, may run on an NDIF server; ``core/trace/`` is
the in-trace half of every nnsight method), ``backends/`` (``transformer_lens``, ``nnsight``: one module per
method each, the same names; ``lp.transformer_lens`` and ``lp.nnsight`` are their verbs), ``methods/`` (result
types and backend-free drivers), ``lenses/`` (what ``lens=`` takes), ``training/``, ``plot/``, ``models/``,
``cli/``. Every error is an ``lp.LensError``.

Heavy modules load on first use: ``import lens_plugins`` imports neither TransformerLens nor nnsight,
yet ``ActivationCache.lens`` appears as soon as TransformerLens is imported.
"""

import importlib
import sys
import types

from lens_plugins import _import_hooks

__version__ = "0.1.0"

_LAZY = {
    "transformer_lens": ("lens_plugins.transformer_lens", None),
    "nnsight": ("lens_plugins.nnsight", None),
    "errors": ("lens_plugins.errors", None),
    "LensError": ("lens_plugins.core.errors", "LensError"),
    "RemoteLensError": ("lens_plugins.core.errors", "RemoteLensError"),
    "backends": ("lens_plugins.backends", None),
    "Decoder": ("lens_plugins.decoder", "Decoder"),
    "LensResult": ("lens_plugins.methods.result", "LensResult"),
    "Attribution": ("lens_plugins.methods.attribution", "Attribution"),
    "LogitDiff": ("lens_plugins.methods.attribution", "LogitDiff"),
    "tokens": ("lens_plugins.tokens", None),
    "logit_lens_from_stack": ("lens_plugins.methods.lens", "logit_lens_from_stack"),
    "Row": ("lens_plugins.core.rows", "Row"),
    "LogitLens": ("lens_plugins.lenses.affine", "LogitLens"),
    "AffineLens": ("lens_plugins.lenses.affine", "AffineLens"),
    "Lens": ("lens_plugins.lenses.affine", "Lens"),
    "load_default_model": ("lens_plugins.models", "load_default_model"),
    "load_hf_model": ("lens_plugins.models", "load_hf_model"),
    "lens_heatmap": ("lens_plugins.plot", "lens_heatmap"),
    "html_report": ("lens_plugins.plot", "html_report"),
    "attention": ("lens_plugins.methods.attention", None),
    "AttentionUnavailableError": ("lens_plugins.core.errors", "AttentionUnavailableError"),
    "AttentionResult": ("lens_plugins.methods.attention", "AttentionResult"),
    "plot": ("lens_plugins.plot", None),
    "write_report": ("lens_plugins.methods.report", "write_report"),
    "run_report": ("lens_plugins.methods.report", "run_report"),
    "patchscope": ("lens_plugins.methods.patchscope", "patchscope"),
    "PatchscopeResult": ("lens_plugins.methods.patchscope", "PatchscopeResult"),
    "FutureLens": ("lens_plugins.lenses.future", "FutureLens"),
    "future_lens": ("lens_plugins.lenses.future", None),
    "TunedLens": ("lens_plugins.lenses.tuned", "TunedLens"),
    "LastBlocksLens": ("lens_plugins.lenses.last_blocks", "LastBlocksLens"),
    "evaluate_lenses": ("lens_plugins.methods.evaluate", "evaluate_lenses"),
    "LensEvaluation": ("lens_plugins.methods.evaluate", "LensEvaluation"),
    "decoder_from_checkpoint": ("lens_plugins.models.checkpoint", "decoder_from_checkpoint"),
    "JacobianLens": ("lens_plugins.lenses.jacobian", "JacobianLens"),
    "EditResult": ("lens_plugins.methods.jacobian", "EditResult"),
    "surfaced": ("lens_plugins.methods.surfaced", "surfaced"),
    "SurfacedResult": ("lens_plugins.methods.surfaced", "SurfacedResult"),
    "anomaly": ("lens_plugins.methods.anomaly", None),
    "trajectory_features": ("lens_plugins.methods.anomaly", "trajectory_features"),
    "TrajectoryFeatures": ("lens_plugins.methods.anomaly", "TrajectoryFeatures"),
    "AnomalyDetector": ("lens_plugins.methods.anomaly", "AnomalyDetector"),
    "fit_shortcuts": ("lens_plugins.methods.early_exit", "fit_shortcuts"),
    "shortcut_scores": ("lens_plugins.methods.early_exit", "shortcut_scores"),
    "early_exit": ("lens_plugins.methods.early_exit", "early_exit"),
    "vision": ("lens_plugins.methods.vision", None),
    "image_lens_figure": ("lens_plugins.plot.vision", "image_lens_figure"),
    "fit_mapping": ("lens_plugins.methods.cross_model", "fit_mapping"),
    "CrossModelMap": ("lens_plugins.methods.cross_model", "CrossModelMap"),
    "cross_model_scores": ("lens_plugins.methods.cross_model", "cross_model_scores"),
    "CrossModelScores": ("lens_plugins.methods.cross_model", "CrossModelScores"),
    "causal_basis": ("lens_plugins.methods.causal_checks", "causal_basis"),
    "CausalBasis": ("lens_plugins.methods.causal_checks", "CausalBasis"),
    "subspace_ablation": ("lens_plugins.methods.causal_checks", "subspace_ablation"),
    "SubspaceAblation": ("lens_plugins.methods.causal_checks", "SubspaceAblation"),
    "fit_sublayer_shortcuts": ("lens_plugins.methods.substitution", "fit_sublayer_shortcuts"),
    "SublayerShortcuts": ("lens_plugins.methods.substitution", "SublayerShortcuts"),
    "sublayer_substitution": ("lens_plugins.methods.substitution", "sublayer_substitution"),
    "SubstitutionResult": ("lens_plugins.methods.substitution", "SubstitutionResult"),
    "patching": ("lens_plugins.methods.activation_patching", "patching"),
    "PatchingResult": ("lens_plugins.methods.activation_patching", "PatchingResult"),
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
    pickles as ``core.trace.namespace.server_namespace()``: a namespace whose ``nnsight.logit_lens`` (and
    every other in-trace verb) is the in-trace entry point, shipped by source with the torch-only modules of
    ``core.SHIPPED``, which ``backends.nnsight`` registers.
    """

    def __reduce__(self):
        from lens_plugins.backends.nnsight import _run as _registers_the_shipped_modules  # noqa: F401
        from lens_plugins.core.trace import namespace

        return (namespace.server_namespace, ())


sys.modules[__name__].__class__ = _Package
_import_hooks.install()
