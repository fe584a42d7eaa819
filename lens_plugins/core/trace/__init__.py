"""The in-trace half of every nnsight method: code that runs inside ``with model.trace(...)`` or
``model.generate(...)``, locally or on an NDIF server.

``reader`` maps rows to a Hugging Face model's module inputs and outputs; one module per method (``lens``,
``attribution``, ``generation``, ``dola``, ``decoder_lens``, ``patchscope``, ``attention``, ``activation_patching``, ...) reads with it and
decodes with the rest of core; ``namespace`` is the one leaf naming them for the server. Shipped by source
with the rest of core (``lens_plugins.core.SHIPPED``).
"""

__all__ = []
