"""What ``lens=`` takes: the ``Lens`` protocol and the identity and affine lenses (``affine``), the tuned lens
(``tuned``), the last-blocks variant decoder (``last_blocks``) and the Future Lens (``future``)."""

from lens_plugins.lenses.affine import AffineLens, Lens, LogitLens

__all__ = ["Lens", "LogitLens", "AffineLens"]
