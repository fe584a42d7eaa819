"""Rows of a lens: which point of the residual stream (or which sublayer write) a decoded vector comes from.

A row is ``Row(layer, site)``; both backends map the same rows to their own hook points (TransformerLens: a
hook name; nnsight: a module's input or output), so a row plan is written once and read by either. Sites:

- ``embed``: the input of block 0 (the embeddings, positional ones included); ``layer`` is 0
- ``pre``: the input of block ``layer``; ``post``: its output; ``mid``: between its attention and MLP
- ``attn`` / ``mlp``: the residual right after block ``layer``'s attention / MLP (``attn`` is ``mid`` and ``mlp``
  is ``post`` of the same block, labelled as sublayers); ``attn+mlp``: after a parallel block (GPT-J, NeoX)
- ``attn_out`` / ``mlp_out``: what block ``layer``'s attention / MLP writes, decoded alone

``hidden_index`` places a residual row in Hugging Face ``output_hidden_states`` indexing (0 = embeddings,
``i`` = the input of block ``i``, ``n_layers`` = the last block's output before the final norm), the indexing
tuned-lens checkpoints use; sublayer rows have none.
"""

from dataclasses import dataclass

SITES = ("embed", "pre", "mid", "post", "attn", "mlp", "attn+mlp", "attn_out", "mlp_out")
RESIDUAL_SITES = ("embed", "pre", "mid", "post", "attn", "mlp", "attn+mlp")


@dataclass(frozen=True)
class Row:
    layer: int
    site: str

    def __post_init__(self):
        if self.site not in SITES:
            raise ValueError(f"unknown row site {self.site!r}; sites are {list(SITES)}")
        if self.layer < 0 or (self.site == "embed" and self.layer != 0):
            raise ValueError(f"row layer {self.layer} is not valid for site {self.site!r}")

    @property
    def label(self):
        """``embed``, ``3_pre``, ``3_mid``, ``29_post``, ``3_attn``, ``3_mlp``, ``3_attn+mlp``, ``3_attn_out``, ..."""
        return "embed" if self.site == "embed" else f"{self.layer}_{self.site}"

    @property
    def is_residual(self):
        """True for a point of the residual stream, False for a sublayer's own write."""
        return self.site in RESIDUAL_SITES

    @property
    def hidden_index(self):
        """Index in ``output_hidden_states`` (0 = embeddings), or None for a point that has none."""
        if self.site in ("embed", "pre"):
            return self.layer
        if self.site in ("post", "mlp", "attn+mlp"):
            return self.layer + 1
        return None

    @classmethod
    def parse(cls, label):
        """The row a label names: ``parse("3_mid") == Row(3, "mid")``."""
        if label == "embed":
            return cls(0, "embed")
        layer, _, site = label.partition("_")
        if not layer.isdigit() or site not in SITES:
            raise ValueError(f"{label!r} is not a row label: expected 'embed' or '<layer>_<site>' with a site "
                             f"in {list(SITES[1:])}, e.g. '3_pre'")
        return cls(int(layer), site)
