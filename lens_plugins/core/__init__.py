"""The torch-only core of lens_plugins: what may run on an NDIF server.

Every module here imports nothing but torch, the standard library and other core modules (the in-trace
lens also imports nnsight, which a server has, inside its functions), carries no decorators but
``dataclass`` and Python's own (``property``, ``classmethod``), and takes everything as arguments,
because nnsight ships these modules by source and rebuilds them on the server. ``SHIPPED`` below is the one statement of what ships:
``lens_plugins.adapters.nnsight`` registers exactly these with ``nnsight.register``, the README lists
them, and ``tests/test_shipping.py`` holds each to the import rule.

- ``rows``: ``Row(layer, site)``, the row plan (``plan``) and row selection (``select``)
- ``reductions``: the reductions table (names, result fields, metrics, plot styles)
- ``request``: the lens request (reductions, positions, token ids, token sets), validated once
- ``readout``: the streamed kernel (final norm, unembedding, reductions tile by tile)
- ``architectures``: Hugging Face families keyed by ``model_type``, module paths, the decoder's tensors
- ``lenses``: a lens's per-row affine map (``apply_affine``)
- ``pipeline``: read rows with a backend's reader, check, apply the lens, decode and reduce
- ``dla``: frozen-norm direct logit attribution arithmetic, head split
- ``trace``: the nnsight reader (row -> module input/output) and the in-trace entry points
- ``dola``: DoLa's premature-layer choice and contrastive scores
- ``dola_trace``: DoLa decoding inside one ``model.generate`` trace (each step's token forced to DoLa's)
- ``generation``: the lens over generated text, every step of one ``model.generate`` trace
- ``decoder_lens``: the DecoderLens of an encoder-decoder model (encoder rows decoded by the decoder)
- ``patching``: Patchscopes' write arithmetic (mappings, batching of (row, position) pairs)
- ``vocab_loss``: memory-bounded KL / cross-entropy over the vocabulary with its gradient (training)
- ``future``: Future Lens arithmetic
"""

SHIPPED = ("rows", "reductions", "request", "readout", "architectures", "lenses", "pipeline", "dla", "trace", "dola",
           "patching", "vocab_loss", "future", "dola_trace", "generation", "decoder_lens")
