"""The readout's tile step compiled into one loop per tile, for local lenses on large inputs.

Eager torch makes one memory pass per quantity (max, exp, three sums, one compare per ranked target);
``torch.compile`` fuses ``readout.fused_tile_step`` into one loop over each tile's logits, which roughly
halves the cost of everything after the unembedding matmul. Compiling takes ~10-20 s once per machine
(inductor caches it on disk), so ``"auto"`` uses it only for work large enough to pay that back, and
falls back to eager, with a warning, where no compiler is available. Remote traces never use it: this
module is not shipped to NDIF servers.
"""

import functools
import os
import warnings

import torch

from lens_plugins.core.readout import fused_tile_step

# Below this many logits (rows x tokens x vocab) a lens takes a few seconds eager: not worth a compile.
AUTO_THRESHOLD = 50_000_000


@functools.cache
def compiled_step():
    """``fused_tile_step`` compiled with dynamic shapes (one compile serves every tile size), or ``None``."""
    try:
        step = torch.compile(fused_tile_step, dynamic=True)
        tile = torch.zeros(2, 3)
        step(tile, tile, torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2, 1))
        return step
    except Exception as error:  # noqa: BLE001 - any compiler failure means: run eager
        warnings.warn(f"torch.compile is unavailable here ({type(error).__name__}: {error}); the lens runs eager, "
                      "about 1.5x slower on large inputs", RuntimeWarning, stacklevel=2)
        return None


def step_for(n_logits: int, fused):
    """The tile step to use: ``fused`` is ``True`` (compile), ``False`` (eager) or ``"auto"`` (compile for
    large work unless ``LENS_PLUGINS_FUSED=0``)."""
    if fused == "auto":
        fused = n_logits >= AUTO_THRESHOLD and os.environ.get("LENS_PLUGINS_FUSED", "1") != "0"
    elif not isinstance(fused, bool):
        raise ValueError(f"fused must be True, False or 'auto', got {fused!r}")
    return compiled_step() if fused else None
