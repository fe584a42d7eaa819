"""One module per method: its result type and its backend-free driver (``lens``, ``attribution``,
``patchscope``, ``generation``, ``dola``, ``attention``, ``evaluate``, ``report``); ``result`` is the
``LensResult`` they share. Backends call these; these call a backend only through ``backends.of(model)``."""

__all__ = []
