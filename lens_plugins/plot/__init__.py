"""Figures: every figure takes a result (``LensResult``, ``Attribution``, ``LogitDiff``, ``AttentionResult``)
and needs no model. ``figures`` has the lens's heatmap, trajectories and the HTML page; ``attribution`` and
``attention`` the figures of those results; ``surfaced`` the surfaced-then-overridden summary; ``early_exit`` the early-exit curve."""

from lens_plugins.plot.attention import head_view, model_view, sink_figure
from lens_plugins.plot.attribution import attribution_bars, attribution_figure, logit_diff_figure
from lens_plugins.plot.figures import *  # noqa: F403
from lens_plugins.plot.early_exit import early_exit_figure
from lens_plugins.plot.surfaced import surfaced_figure
from lens_plugins.plot.figures import __all__ as _figures

__all__ = [*_figures, "head_view", "model_view", "sink_figure", "attribution_bars", "attribution_figure",
           "logit_diff_figure", "surfaced_figure", "early_exit_figure"]
