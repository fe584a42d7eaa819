"""The variant decoder (nostalgebraist, 2021): decode a row through the model's last ``k`` blocks, then the
final norm and unembedding, instead of through the final norm alone.

As a lens in the sense of the lens seam, ``transform(resid, rows)`` runs each row's residual through blocks
``max(hidden_index, L - k) .. L - 1`` (a row never re-runs a block it has already passed, so the final row
is decoded as it is, and ``k = L`` turns every row into the model's own prediction). Blocks attend across
positions, so ``tokens`` must be one whole prompt in order (batch one, every position); the lens is not
affine and runs only where ``transform`` runs (locally), never on a remote server.

The blocks are called with the very arguments the model gives them (attention mask, rotary embeddings,
ALiBi, per-layer sliding windows), captured by running the base model once on zeros of the same length: no
per-family code.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from lens_plugins.backends.hf import hf_model
from lens_plugins.core import architectures
from lens_plugins.core import verification
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.rows import Row
from lens_plugins.typecheck import typechecked


class LastBlocksLens:
    """Decode each row through the model's last ``k`` blocks, then its final norm and unembedding."""

    def __init__(self, model, k: int = 1):
        self.hf = hf_model(model)
        self.spec = verification.resolve(self.hf)
        self.layers = architectures.get_path(self.hf, self.spec["layers"])
        self.n_layers = len(self.layers)
        if not 1 <= k <= self.n_layers:
            raise LensValueError(f"k must lie in 1..{self.n_layers} (the model's blocks), got {k}")
        self.k = k
        self.name = f"last {k} block{'s' if k > 1 else ''}"
        self._arguments = {}

    def _layer_arguments(self, seq_len: int, dtype: torch.dtype, device) -> dict[int, tuple]:
        """``{layer: (extra args, kwargs)}`` the model passes to each of the last ``k`` blocks for a prompt of
        ``seq_len`` tokens, cached per length."""
        key = (seq_len, dtype, device)
        if key not in self._arguments:
            captured = {}

            def keep(index):
                def hook(module, args, kwargs):
                    captured[index] = (args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
                return hook

            handles = [self.layers[i].register_forward_pre_hook(keep(i), with_kwargs=True)
                       for i in range(self.n_layers - self.k, self.n_layers)]
            width = self.hf.get_input_embeddings().weight.shape[1]  # OPT embeds narrower, then projects in
            try:
                with torch.no_grad():
                    getattr(self.hf, "base_model", self.hf)(
                        inputs_embeds=torch.zeros(1, seq_len, width, dtype=dtype, device=device), use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
            self._arguments = {key: captured}
        return self._arguments[key]

    @typechecked
    def transform(self, resid: Float[Tensor, "rows tokens d_model"], rows: Sequence[Row]) -> Float[Tensor, "rows tokens d_model"]:
        """Each row run through its remaining blocks among the last ``k`` (``tokens`` = one prompt, in order)."""
        if resid.shape[0] != len(rows):
            raise LensValueError(f"{len(rows)} rows for a residual stack of {resid.shape[0]}")
        dtype = next(self.hf.parameters()).dtype
        arguments = self._layer_arguments(resid.shape[1], dtype, resid.device)
        first = self.n_layers - self.k
        out = resid.float().clone()
        starts = {}
        for r, row in enumerate(rows):
            index = row.hidden_index
            if index is None:
                raise LensValueError(f"row {row.label!r} is not a hidden state between blocks; the last-blocks decoder "
                                 "runs whole blocks, so decode it with the logit lens or drop resid_mid / sublayers")
            starts.setdefault(max(index, first), []).append(r)
        for start, members in starts.items():
            h = resid[members].to(dtype)
            for layer in range(start, self.n_layers):
                args, kwargs = arguments[layer]
                h = architectures.layer_output(self.layers[layer](h, *args, **kwargs))
            out[members] = h.float()
        return out

__all__ = ["LastBlocksLens"]
