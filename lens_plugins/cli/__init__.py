"""The ``lens-plugins`` command: ``main`` (the lens, the report) and ``train_lens`` (``train-lens``)."""

__all__ = []
