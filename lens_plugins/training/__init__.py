"""Fitting lenses: the shared loop (``loop``: corpus, blocks, optimiser, resumable checkpoints) and the tuned
lens's losses and trainer (``tuned_lens``)."""

__all__ = []
