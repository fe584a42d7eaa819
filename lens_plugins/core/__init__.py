"""The torch-only core of lens_plugins: what may run on an NDIF server.

Every module here imports nothing but torch, the standard library and other core modules (the in-trace
lens also imports nnsight, which a server has, inside its functions), carries no decorators but
``dataclass`` and Python's own (``property``, ``classmethod``), and takes everything as arguments,
because nnsight ships these modules by source and rebuilds them on the server. What ships is this folder:
``SHIPPED`` below is derived from it (no list kept by hand), ``lens_plugins.backends.nnsight`` registers
exactly these with ``nnsight.register``, and ``tests/test_shipping.py`` holds each to the import rule.

- ``errors``: the ``LensError`` family (raised on the server too)
- ``rows``: ``Row(layer, site)``, the row plan (``plan``) and row selection (``select``)
- ``reductions``: the reductions table (names, result fields, metrics, plot styles)
- ``defaults``: the defaults every verb shares (``TOP_K``, tile sizes)
- ``request``: the lens request (reductions, positions, token ids, token sets), validated once
- ``readout``: the streamed kernel (final norm, unembedding, reductions tile by tile)
- ``architectures``: Hugging Face families keyed by ``model_type``, module paths, the decoder's tensors
- ``lenses``: a lens's per-row affine map (``apply_affine``)
- ``pipeline``: read rows with a backend's reader, check, apply the lens, decode and reduce
- ``dla``: frozen-norm direct logit attribution arithmetic, head split, neurons, promoted / suppressed tokens
- ``track``: tokens worth tracking (``auto_tokens=N``): candidates from every row's top-k, the fade score
- ``dola``: DoLa's premature-layer choice and contrastive scores
- ``decoder_lens``: the DecoderLens arithmetic (encoder rows decoded by the decoder)
- ``patching``: Patchscopes' write arithmetic (mappings, batching of (row, position) pairs)
- ``activation_patching``: activation patching (cells per batch item, the copy from the source, the metric)
- ``vocab_loss``: memory-bounded KL / cross-entropy over the vocabulary with its gradient (training)
- ``future``: Future Lens arithmetic (pairing ``t`` with ``t + N - 1``, the bigram baseline)
- ``trace/``: the in-trace half of every nnsight method (``trace/__init__.py`` lists them)
"""

import pkgutil
from pathlib import Path


def _modules(folder, prefix):
    """Every module under ``folder`` (packages first, then their modules), named relative to core."""
    found = []
    for info in pkgutil.iter_modules([str(folder)]):
        found.append(prefix + info.name)
        if info.ispkg:
            found.extend(_modules(Path(folder) / info.name, f"{prefix}{info.name}."))
    return found


SHIPPED = tuple(_modules(Path(__file__).parent, ""))

__all__ = ["SHIPPED"]
