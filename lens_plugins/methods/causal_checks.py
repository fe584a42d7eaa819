"""Causal checks of a lens (Belrose et al. 2023, section on causal basis extraction): does the lens read
features the model itself uses?

``causal_basis(model, lens, row)`` finds, over a corpus's states at one residual row, the ``k`` orthonormal
directions whose mean-ablation most changes the lens's prediction there (``core.causal_basis.extract``:
greedy, each direction orthogonal to those before). ``subspace_ablation(model, {name: basis}, prompts)``
then mean-ablates each lens's basis at that row *in the model* (every position but the first; TransformerLens
hooks or an nnsight trace, ``run_ablation`` of each backend) and measures per position the effect on the
model's own final distribution, ``KL(final clean || final ablated)``, beside the effect on the lens's own
prediction at the row, ``KL(lens(h) || lens(ablated h))``; ``k`` random orthonormal directions, ablated the
same way, are the control. A faithful lens's basis moves the model's output far more than random directions
do, and the two effects rise together.

The basis is fitted on states read with forward hooks on the Hugging Face model inside either backend
(``backends.hf.residual_stack``); the ablation runs on the model's backend.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor

from lens_plugins.core import causal_basis as arithmetic
from lens_plugins.core.errors import LensValueError
from lens_plugins.core.rows import Row
from lens_plugins.typecheck import typechecked

CONTROLS = ("causal basis", "random")


@typechecked
@dataclass
class CausalBasis:
    """The causal basis of a lens at row ``label``: ``basis`` (orthonormal rows, most effective first),
    ``gains`` (mean KL on the lens of ablating each direction alone, over the fit states) and ``mean`` (the
    fit states' mean, what an ablated component is set to), from ``tokens`` states."""

    label: str
    basis: Float[Tensor, "k d_model"]
    gains: Float[Tensor, " k"]
    mean: Float[Tensor, " d_model"]
    tokens: int


def lens_logprobs(lens, decoder, label: str):
    """``h [n, d] -> [n, vocab]`` log-probabilities of ``lens`` at row ``label`` through ``decoder``
    (differentiable in ``h``)."""
    row = Row.parse(label)

    def logprobs(hidden: Tensor) -> Tensor:
        return decoder.unembed(decoder.normalize(lens.transform(hidden[None].float(), [row])[0])).log_softmax(-1)

    return logprobs


def _fit_states(model, label: str, texts, max_tokens: int, seq_len: int) -> Tensor:
    """``[n, d]`` states at row ``label`` over ``texts`` (positions 1 onwards of each block)."""
    from lens_plugins.methods.cross_model import read_rows, residual_rows
    from lens_plugins.training.tuned_lens import token_blocks_of

    labels = [row.label for row in residual_rows(model)]
    if label not in labels:
        raise LensValueError(f"row {label!r} is not a residual row of this model: one of {labels[0]!r} .. {labels[-1]!r}")
    states, n = [], 0
    for block in token_blocks_of(model, texts, seq_len):
        if n >= max_tokens:
            break
        states.append(read_rows(model, block.tolist(), [label])[0, 1:])
        n += states[-1].shape[0]
    return torch.cat(states)[:max_tokens]


def decoder_of(model):
    """The model's decoder (``DecoderTensors``), from its backend (a bridge's own module tree included)."""
    from lens_plugins import backends

    return backends.of(model).decoder_for(model)


def causal_basis(model, lens, row: str, texts=None, *, k: int = 4, max_tokens: int = 256, seq_len: int = 64,
                 steps: int = 30, lr: float = 0.1, seed: int = 0) -> CausalBasis:
    """The ``k``-direction causal basis of ``lens`` (``lp.LogitLens()``, a ``TunedLens``, a ``JacobianLens``,
    any lens) at residual row ``row`` ("12_pre"), over ``max_tokens`` states of ``texts`` (``None``: the
    built-in corpus; token blocks ``[blocks, seq]`` too), ``steps`` Adam steps of rate ``lr`` per direction."""
    hidden = _fit_states(model, row, texts, max_tokens, seq_len)
    decoder = decoder_of(model)
    generator = torch.Generator().manual_seed(seed)
    basis, gains = arithmetic.extract(hidden, lens_logprobs(lens, decoder, row), k, steps, lr, generator)
    return CausalBasis(label=row, basis=basis, gains=gains, mean=hidden.mean(0), tokens=int(hidden.shape[0]))


@typechecked
@dataclass
class SubspaceAblation:
    """Per lens, control (``CONTROLS``: its causal basis, then ``k`` random directions) and position (positions
    1 onwards of every prompt, concatenated): ``model_effect`` = KL of the model's final distribution, clean to
    ablated at row ``label``; ``lens_effect`` = KL of the lens's own prediction at that row."""

    lens_names: list[str]
    label: str
    k: int
    model_effect: Float[Tensor, "lens control token"]
    lens_effect: Float[Tensor, "lens control token"]

    def summary(self):
        """Per lens and control: mean effects, and the Spearman correlation of the two over positions."""
        import pandas as pd
        from scipy.stats import spearmanr

        records = []
        for i, name in enumerate(self.lens_names):
            for c, control in enumerate(CONTROLS):
                model, lens = self.model_effect[i, c], self.lens_effect[i, c]
                records.append({"lens": name, "ablated": control, "model_kl": float(model.mean()),
                                "lens_kl": float(lens.mean()),
                                "spearman": float(spearmanr(model.numpy(), lens.numpy()).statistic)})
        return pd.DataFrame.from_records(records)

    def model_ratio(self) -> Float[Tensor, " lens"]:
        """Per lens: the mean model effect of its causal basis over that of the random directions."""
        return self.model_effect[:, 0].mean(-1) / self.model_effect[:, 1].mean(-1)

    def plot(self):
        """Effect on the lens (x) against effect on the model (y), per position, per lens and control."""
        from lens_plugins.plot.causal_checks import subspace_ablation_figure

        return subspace_ablation_figure(self)


def subspace_ablation(model, bases: Mapping[str, tuple], prompts: Sequence[str], *, seed: int = 0,
                      prepend_bos: Optional[bool] = None, **backend_kwargs) -> SubspaceAblation:
    """Mean-ablate each lens's causal basis, and ``k`` random orthonormal directions (one draw, ``seed``, for
    every lens), at the basis's row in ``model`` on each prompt; ``bases`` is ``{name: (lens, CausalBasis)}``
    with one row and one ``k``. ``backend_kwargs`` go to the backend's ``run_ablation`` (nnsight:
    ``remote``, ``backend``, ``paths``)."""
    from lens_plugins import backends
    from lens_plugins.backends._common import prompt_ids
    from lens_plugins.methods.cross_model import tokenizer_of

    if not bases:
        raise LensValueError("bases is empty: pass {name: (lens, causal_basis(model, lens, row))}")
    labels = {basis.label for _, basis in bases.values()}
    ks = {basis.basis.shape[0] for _, basis in bases.values()}
    if len(labels) != 1 or len(ks) != 1:
        raise LensValueError(f"every basis must be of one row and one k, got rows {sorted(labels)} and k {sorted(ks)}")
    label, k = labels.pop(), ks.pop()
    backend = backends.of(model)
    decoder = decoder_of(model)
    tokenizer = tokenizer_of(model)
    token_ids = [torch.tensor([prompt_ids(tokenizer, prompt, prepend_bos)]) for prompt in prompts]
    if any(ids.shape[1] < 2 for ids in token_ids):
        raise LensValueError("every prompt needs at least two tokens: the first (the attention sink) is never ablated")
    d = next(iter(bases.values()))[1].basis.shape[1]
    control = arithmetic.random_basis(k, d, torch.Generator().manual_seed(seed))
    model_effect = torch.zeros(len(bases), 2, sum(ids.shape[1] - 1 for ids in token_ids))
    lens_effect = torch.zeros_like(model_effect)
    for i, (lens, basis) in enumerate(bases.values()):
        logprobs = lens_logprobs(lens, decoder, label)
        for c, directions in enumerate((basis.basis, control)):
            start = 0
            for ids in token_ids:
                out = backend.run_ablation(model, ids, label, directions, basis.mean, **backend_kwargs)
                hidden = out["hidden"][1:]
                with torch.no_grad():
                    effect = arithmetic.kl(logprobs(hidden), logprobs(arithmetic.ablate(hidden, directions, basis.mean)))
                n = hidden.shape[0]
                model_effect[i, c, start:start + n] = out["effect"][1:]
                lens_effect[i, c, start:start + n] = effect
                start += n
    return SubspaceAblation(lens_names=list(bases), label=label, k=k, model_effect=model_effect,
                            lens_effect=lens_effect)

__all__ = ["CONTROLS", "CausalBasis", "lens_logprobs", "decoder_of", "causal_basis", "SubspaceAblation", "subspace_ablation"]
