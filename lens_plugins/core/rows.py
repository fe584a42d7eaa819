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

from lens_plugins.core.errors import LensIndexError, LensKeyError, LensTypeError, LensValueError

SITES = ("embed", "pre", "mid", "post", "attn", "mlp", "attn+mlp", "attn_out", "mlp_out")


@dataclass(frozen=True)
class Row:
    layer: int
    site: str

    def __post_init__(self):
        if self.site not in SITES:
            raise LensValueError(f"unknown row site {self.site!r}; sites are {list(SITES)}")
        if self.layer < 0 or (self.site == "embed" and self.layer != 0):
            raise LensValueError(f"row layer {self.layer} is not valid for site {self.site!r}")

    @property
    def label(self):
        """``embed``, ``3_pre``, ``3_mid``, ``29_post``, ``3_attn``, ``3_mlp``, ``3_attn+mlp``, ``3_attn_out``, ..."""
        return "embed" if self.site == "embed" else f"{self.layer}_{self.site}"

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
            raise LensValueError(f"{label!r} is not a row label: expected 'embed' or '<layer>_<site>' with a site "
                             f"in {list(SITES[1:])}, e.g. '3_pre'")
        return cls(int(layer), site)


def plan(n_layers, resid_mid=False, sublayers=False, parallel=False):
    """The rows of a lens, in stream order, the same for every backend.

    Default: the embeddings, each block's input, the last block's output ("embed", "1_pre", ...,
    "<L-1>_post"); ``resid_mid`` adds the residual between each block's attention and MLP ("0_mid", ...).
    ``sublayers=True``: the residual after each attention and MLP ("0_attn", "0_mlp", ...; one
    "0_attn+mlp" row per parallel block, which has no residual between them); ``sublayers="outputs"``:
    each attention and MLP write alone ("0_attn_out", "0_mlp_out", ...), then "<L-1>_post" as reference.
    """
    if sublayers not in (False, True, "outputs"):
        raise LensValueError(f"sublayers={sublayers!r}: pass True (residual after each sublayer) or 'outputs' "
                         "(each attention / MLP write decoded alone)")
    if resid_mid and sublayers:
        raise LensValueError("resid_mid and sublayers both choose the rows: pass one of them")
    if resid_mid and parallel:
        raise LensValueError("this model's blocks are parallel (attention and MLP read the same input), so there is "
                         "no residual between them: drop resid_mid=True")
    rows = [Row(0, "embed")]
    for layer in range(n_layers):
        if sublayers == "outputs":
            rows += [Row(layer, "attn_out"), Row(layer, "mlp_out")]
        elif sublayers and parallel:
            rows.append(Row(layer, "attn+mlp"))
        elif sublayers:
            rows += [Row(layer, "attn"), Row(layer, "mlp")]
        else:
            rows += ([Row(layer, "pre")] if layer else []) + ([Row(layer, "mid")] if resid_mid else [])
    if not sublayers or sublayers == "outputs":
        rows.append(Row(n_layers - 1, "post"))
    return rows


def select(rows, layers):
    """The rows ``layers`` picks (indices into ``rows``, negative from the end, or labels), in stream
    order; ``None`` picks all. The last row is always kept: every divergence and the final top-1 refer to it."""
    n = len(rows)
    if layers is None:
        return list(rows)
    if isinstance(layers, (int, str)):
        layers = [layers]
    labels = [row.label for row in rows]
    chosen = set()
    for layer in layers:
        if isinstance(layer, str):
            if layer not in labels:
                if "." in layer:
                    raise LensValueError(
                        f"layers={layer!r} looks like a module path, but layers= selects rows (indices or labels "
                        f"such as 3 or '3_pre'); give module paths as paths={{'layers': {layer!r}, "
                        "'final_norm': ..., 'lm_head': ...}")
                raise LensKeyError(f"layers: no row labelled {layer!r}; the rows are {labels}")
            chosen.add(labels.index(layer))
        elif isinstance(layer, int) and not isinstance(layer, bool) and -n <= layer < n:
            chosen.add(layer % n)
        else:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise LensTypeError(f"layers: {layer!r} is neither a row index nor a row label such as '3_pre'")
            raise LensIndexError(f"layers: layer {layer!r} is out of range: the stack has rows 0..{n - 1} "
                             f"({labels[0]} .. {labels[-1]}), negative indices count from the end")
    return [rows[i] for i in sorted(chosen | {n - 1})]

__all__ = ["SITES", "Row", "plan", "select"]
