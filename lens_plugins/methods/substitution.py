"""Sublayer substitution (Din et al., LREC-COLING 2024, "Jump to Conclusions", the sub-module experiment):
replace one sublayer's contribution (the attention or the MLP of block ``l``) by a linear shortcut of its
input residual, fitted by least squares, run the rest of the model, and measure the share of the model's
final top-1 predictions that survive. The paper finds attention sublayers tolerate it better than MLPs.

``fit_sublayer_shortcuts(model, texts)`` fits every (block, sublayer) map in closed form from Gram matrices
accumulated block by block in float64 (``core.substitution``; memory holds one block of text's activations),
reading a plain forward pass of the Hugging Face model (``backends.hf.sublayer_io``), so it is the same for
either backend. ``sublayer_substitution(model, shortcuts, prompts)`` runs the substitutions through the
backend's ``run_substitution`` (TransformerLens hooks, or one nnsight trace that writes the sublayer's output,
``remote=True`` included), ``chunk`` substituted copies of a prompt per forward pass beside a clean copy.

The first position (the attention sink, whose outsized state would dominate the fit) is left out of the fit
and never substituted, as in ``subspace_ablation``; retention is measured at positions 1 onwards.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_plugins.core import substitution as arithmetic
from lens_plugins.core.errors import LensValueError
from lens_plugins.typecheck import typechecked

SUBLAYERS = arithmetic.SUBLAYERS


@typechecked
@dataclass
class SublayerShortcuts:
    """The least-squares maps ``contribution ~ x @ weight.T + bias`` of each block in ``layers`` and each
    sublayer of ``SUBLAYERS`` ("attn", "mlp"), fitted on ``tokens`` positions; ``r2`` is each map's share of
    its contribution's variance explained on those positions (in-sample)."""

    layers: list[int]
    weight: Float[Tensor, "layer sublayer d_out d_in"]
    bias: Float[Tensor, "layer sublayer d_out"]
    r2: Float[Tensor, "layer sublayer"]
    tokens: int

    def map(self, layer: int, sublayer: str) -> tuple[Tensor, Tensor]:
        """``(weight [d, d], bias [d])`` of one block's sublayer."""
        if layer not in self.layers or sublayer not in SUBLAYERS:
            raise LensValueError(f"no shortcut for block {layer}'s {sublayer!r}: fitted blocks {self.layers}, "
                                 f"sublayers {SUBLAYERS}")
        i, j = self.layers.index(layer), SUBLAYERS.index(sublayer)
        return self.weight[i, j], self.bias[i, j]


def fit_sublayer_shortcuts(model, texts=None, *, layers: Optional[Sequence[int]] = None, seq_len: int = 128,
                           max_blocks: int = 16, ridge: float = 1e-4) -> SublayerShortcuts:
    """Least-squares maps from each sublayer's input residual to its contribution, for blocks ``layers``
    (default: all), fitted on ``texts`` (a text source as in training, ``None`` for the built-in corpus, or
    token blocks ``[blocks, seq]``), at most ``max_blocks`` blocks of ``seq_len`` tokens, positions 1 onwards
    of each. Evaluate on other text than the fit's."""
    from lens_plugins.backends.hf import hf_model, sublayer_io
    from lens_plugins.core.verification import resolve
    from lens_plugins.training.tuned_lens import token_blocks_of

    if max_blocks < 1:
        raise LensValueError(f"max_blocks must be at least 1, got {max_blocks}")
    hf = hf_model(model)  # an undispatched nnsight remote_model loads its weights here, once
    spec = resolve(hf)
    n_layers = hf.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    if not layers or any(not 0 <= layer < n_layers for layer in layers) or len(set(layers)) != len(layers):
        raise LensValueError(f"layers must be distinct blocks in 0 .. {n_layers - 1}, got {layers}")
    blocks = token_blocks_of(model, texts, seq_len)[:max_blocks]
    d = hf.config.hidden_size
    shape = (len(layers), len(SUBLAYERS))
    gram = torch.zeros(*shape, d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(*shape, d + 1, d, dtype=torch.float64)
    y_sq = torch.zeros(*shape, dtype=torch.float64)
    y_sum = torch.zeros(*shape, d, dtype=torch.float64)
    was_training = hf.training
    hf.eval()
    tokens = 0
    try:
        for block in blocks:
            io = sublayer_io(hf, block[None].to(hf.device), layers, spec)
            for i, layer in enumerate(layers):
                for j, sublayer in enumerate(SUBLAYERS):
                    x, y = io[layer, sublayer]
                    x, y = x[0, 1:].float().cpu(), y[0, 1:].float().cpu()
                    arithmetic.accumulate(gram[i, j], cross[i, j], x, y)
                    y_sq[i, j] += y.double().pow(2).sum()
                    y_sum[i, j] += y.double().sum(0)
            tokens += block.shape[0] - 1
    finally:
        hf.train(was_training)
    weight = torch.zeros(*shape, d, d)
    bias = torch.zeros(*shape, d)
    r2 = torch.zeros(*shape)
    for i in range(len(layers)):
        for j in range(len(SUBLAYERS)):
            weight[i, j], bias[i, j] = arithmetic.solve(gram[i, j], cross[i, j], ridge)
            r2[i, j] = arithmetic.r_squared(gram[i, j], cross[i, j], y_sq[i, j], y_sum[i, j], weight[i, j], bias[i, j])
    return SublayerShortcuts(layers=layers, weight=weight, bias=bias, r2=r2, tokens=tokens)


@typechecked
@dataclass
class SubstitutionResult:
    """Per block of ``layers`` and sublayer of ``sublayers``: ``kept [layer, sublayer, token]`` (the final
    top-1 with that sublayer substituted is the clean run's) and ``kl [layer, sublayer, token]`` (``KL(final
    clean || final substituted)``, nats), over every prompt's positions 1 onwards, concatenated."""

    layers: list[int]
    sublayers: list[str]
    kept: Bool[Tensor, "layer sublayer token"]
    kl: Float[Tensor, "layer sublayer token"]

    @property
    def tokens(self) -> int:
        return self.kept.shape[-1]

    def retained(self) -> Tensor:
        """``[layer, sublayer]``: the share of positions whose final top-1 survived the substitution."""
        return self.kept.float().mean(-1)

    def to_dataframe(self):
        """One line per (block, sublayer): ``retained`` and mean ``kl``."""
        import pandas as pd

        retained, kl = self.retained(), self.kl.mean(-1)
        return pd.DataFrame.from_records([
            {"layer": layer, "sublayer": sublayer, "retained": float(retained[i, j]), "kl": float(kl[i, j])}
            for i, layer in enumerate(self.layers) for j, sublayer in enumerate(self.sublayers)])

    def plot(self):
        """Retained share and mean KL per block, a line per sublayer (``plot.substitution``)."""
        from lens_plugins.plot.substitution import substitution_figure

        return substitution_figure(self)


def sublayer_substitution(model, shortcuts: SublayerShortcuts, prompts: Sequence[str], *,
                          layers: Optional[Sequence[int]] = None, sublayers: Sequence[str] = SUBLAYERS,
                          chunk: int = 8, prepend_bos: Optional[bool] = None, **backend_kwargs) -> SubstitutionResult:
    """Substitute each sublayer of ``sublayers`` of each block of ``layers`` (default: every fitted block), one
    at a time, by its shortcut in ``model`` on each prompt, and compare the final top-1 with the clean run's.
    ``chunk`` substitutions share one forward pass (``1 + chunk`` copies of the prompt). ``backend_kwargs`` go
    to the backend's ``run_substitution`` (nnsight: ``remote``, ``backend``, ``paths``)."""
    from lens_plugins import backends
    from lens_plugins.backends._common import prompt_ids
    from lens_plugins.methods.cross_model import tokenizer_of

    layers = list(shortcuts.layers) if layers is None else [int(layer) for layer in layers]
    sublayers = list(sublayers)
    if not layers or not sublayers:
        raise LensValueError("nothing to substitute: give at least one block and one sublayer")
    if any(s not in SUBLAYERS for s in sublayers) or len(set(sublayers)) != len(sublayers):
        raise LensValueError(f"sublayers must be distinct names of {SUBLAYERS}, got {sublayers}")
    if chunk < 1:
        raise LensValueError(f"chunk must be at least 1, got {chunk}")
    if not prompts or isinstance(prompts, str):
        raise LensValueError("prompts must be a non-empty list of strings")
    plan = [(layer, sublayer) for layer in layers for sublayer in sublayers]
    maps = [shortcuts.map(layer, sublayer) for layer, sublayer in plan]  # refuses a block that was not fitted
    backend = backends.of(model)
    tokenizer = tokenizer_of(model)
    token_ids = [torch.tensor([prompt_ids(tokenizer, prompt, prepend_bos)]) for prompt in prompts]
    if any(ids.shape[1] < 2 for ids in token_ids):
        raise LensValueError("every prompt needs at least two tokens: the first (the attention sink) is never substituted")
    kept, kl = [], []
    for ids in token_ids:
        prompt_kept, prompt_kl = [], []
        for start in range(0, len(plan), chunk):
            part = plan[start:start + chunk]
            weight = torch.stack([maps[start + i][0] for i in range(len(part))])
            bias = torch.stack([maps[start + i][1] for i in range(len(part))])
            out = backend.run_substitution(model, ids, part, weight, bias, **backend_kwargs)
            prompt_kept.append(out["top1"][1:, 1:] == out["top1"][:1, 1:])
            prompt_kl.append(out["kl"][:, 1:].float())
        kept.append(torch.cat(prompt_kept))
        kl.append(torch.cat(prompt_kl))
    shape = (len(layers), len(sublayers), -1)
    return SubstitutionResult(layers=layers, sublayers=sublayers, kept=torch.cat(kept, -1).reshape(shape),
                              kl=torch.cat(kl, -1).reshape(shape))

__all__ = ["SUBLAYERS", "SublayerShortcuts", "fit_sublayer_shortcuts", "SubstitutionResult", "sublayer_substitution"]
