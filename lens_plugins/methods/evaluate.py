"""Held-out evaluation of lenses: per row, KL(final || lens), cross-entropy to the next token, perplexity.

``evaluate_lenses(model, texts, [lp.LogitLens(), tuned])`` runs the frozen model once per block of text,
passes the same residual stack through every lens's ``transform`` and scores each row over the whole
vocabulary with ``core.vocab_loss`` (tile by tile, in float32). The numbers are token averages over every
position of every block (cross-entropy: every position that has a next token in its block), so two lenses
are compared on exactly the same tokens.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from lens_plugins.backends.hf import decoder_tensors, hf_model, residual_rows
from lens_plugins.core.rows import plan, select
from lens_plugins.core import vocab_loss
from lens_plugins.core.lenses import check_fits, check_output, made_for
from lens_plugins.core.pipeline import check_decoder
from lens_plugins.core.errors import LensValueError
from lens_plugins.progress import bar as progress_bar
from lens_plugins.training import loop as train
from lens_plugins.training.tuned_lens import token_blocks_of

METRICS = ("kl", "cross_entropy", "perplexity")


@dataclass
class LensEvaluation:
    """Per-lens, per-row held-out scores (token means). ``kl`` is KL(final || lens) in nats."""

    lens_names: list[str]
    row_labels: list[str]
    kl: Tensor  # [lens, row]
    cross_entropy: Tensor  # [lens, row]
    tokens: int
    predicted_tokens: int

    @property
    def perplexity(self) -> Tensor:
        return self.cross_entropy.exp()

    def to_dataframe(self):
        """One line per (lens, row): ``lens``, ``row``, ``kl``, ``cross_entropy``, ``perplexity``."""
        import pandas as pd

        records = [
            {"lens": lens, "row": row, "kl": float(self.kl[i, j]), "cross_entropy": float(self.cross_entropy[i, j]),
             "perplexity": float(self.perplexity[i, j])}
            for i, lens in enumerate(self.lens_names) for j, row in enumerate(self.row_labels)
        ]
        return pd.DataFrame.from_records(records)

    def table(self, metric: str = "kl"):
        """Rows x lenses DataFrame of one metric (``kl``, ``cross_entropy`` or ``perplexity``)."""
        import pandas as pd

        if metric not in METRICS:
            raise LensValueError(f"unknown metric {metric!r}: choose one of {METRICS}")
        values = getattr(self, metric)
        return pd.DataFrame(values.T.numpy(), index=pd.Index(self.row_labels, name="row"), columns=self.lens_names)

    def plot(self, metrics: Union[str, Sequence[str]] = ("kl", "cross_entropy")):
        """A line per lens across rows, one panel per metric (``kl``, ``cross_entropy``, ``perplexity``):
        ``plot.lens_comparison_figure`` of ``to_dataframe()``."""
        from lens_plugins.plot.figures import lens_comparison_figure

        return lens_comparison_figure(self.to_dataframe(), (metrics,) if isinstance(metrics, str) else metrics)


def covers(lens, row, n_layers: int) -> bool:
    """Whether ``lens`` maps ``row``: its own ``covers(row, n_layers)`` when it has one, else every row."""
    own = getattr(lens, "covers", None)
    return True if own is None else bool(own(row, n_layers))


def lens_name(lens) -> str:
    return getattr(lens, "name", None) or type(lens).__name__


def evaluate_lenses(
    model,
    texts: Union[train.TextSource, Tensor],
    lenses: Sequence,
    *,
    names: Optional[Sequence[str]] = None,
    seq_len: int = 256,
    max_blocks: Optional[int] = None,
    vocab_chunk: Optional[int] = 4096,
    token_chunk: Optional[int] = 1024,
    progress: bool = False,
    resid_mid: bool = False,
    layers: Optional[Sequence[Union[int, str]]] = None,
) -> LensEvaluation:
    """Score ``lenses`` (objects with ``transform(resid, rows)``, e.g. ``LogitLens()``, a ``TunedLens``, a
    ``LastBlocksLens``, a ``JacobianLens``) on ``texts``: a text source as in training, or token blocks
    ``[blocks, seq]`` such as ``tuned.heldout_blocks``. ``max_blocks`` caps the blocks read. Rows a lens has no
    map for (its ``covers(row, n_layers)`` is false: the Jacobian lens's embeddings row) score NaN. A lens made for another model
    (``core.lenses.check_fits``), a non-finite decoder or a lens output holding NaN/inf is refused, as on every
    lens entry point.

    Args:
        model: a Hugging Face, nnsight or TransformerLens model.
        texts: a list of strings, a .txt / .jsonl path, ``None`` (the built-in corpus) or token blocks.
        lenses: the lenses to compare.
        names: their names in the tables; default from each lens's type.
        seq_len: tokens per block when ``texts`` is text.
        max_blocks: at most this many blocks.
        vocab_chunk: vocabulary columns per tile.
        token_chunk: vectors per tile.
        progress: a progress bar over blocks (``lens_plugins.progress``).
        resid_mid: also score each block's ``{l}_mid`` row (between attention and MLP), in stream order; a lens
            with no map there (a tuned lens without mid translators) scores NaN on those rows.
        layers: score only these rows (indices or labels, as ``layers=`` of every lens call; the last row is
            always kept); default every row.

    Returns:
        A ``LensEvaluation``: per lens and row, KL to the final layer, cross-entropy and perplexity
        (``table``, ``to_dataframe``, ``plot``).

    Raises:
        LensValueError: no lens, names that clash, a lens made for another model, non-finite outputs.
    """
    lenses = list(lenses)
    if not lenses:
        raise LensValueError("no lens to evaluate: pass e.g. [lp.LogitLens(), tuned_lens]")
    names = [lens_name(lens) for lens in lenses] if names is None else list(names)
    if len(names) != len(lenses):
        raise LensValueError(f"{len(names)} names for {len(lenses)} lenses")
    if len(set(names)) != len(names):
        raise LensValueError(f"lens names must differ (got {names}): pass names=[...]")
    hf = hf_model(model)
    blocks = token_blocks_of(model, texts, seq_len)
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    decoder = decoder_tensors(hf)
    check_decoder(decoder)
    for lens in lenses:
        check_fits(made_for(lens), hf.config.hidden_size, hf.config.num_hidden_layers, decoder)
    n_layers = hf.config.num_hidden_layers
    rows = select(plan(n_layers, resid_mid=resid_mid), layers)
    n_rows = len(rows)
    # A lens that has no map for some rows (a Jacobian lens has none for the embeddings) says so with
    # ``covers(row, n_layers)``; those rows score NaN ("not defined"), not another lens's numbers.
    covered = [[r for r, row in enumerate(rows) if covers(lens, row, n_layers)] for lens in lenses]
    kl_sum = torch.zeros(len(lenses), n_rows, dtype=torch.float64)
    ce_sum = torch.zeros(len(lenses), n_rows, dtype=torch.float64)
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad(), progress_bar(progress, len(blocks), "evaluating lenses", "block") as shown:
            for block in blocks:
                stack = residual_rows(hf, block[None], rows)[:, 0]  # [rows, seq, d]
                reference = vocab_loss.reference_summary(decoder.normalize(stack[-1]), decoder, vocab_chunk,
                                                         token_chunk)
                next_ids = torch.cat([block[1:], torch.tensor([-1])])
                for i, lens in enumerate(lenses):
                    scored = covered[i]
                    picked = [rows[r] for r in scored]
                    mapped = lens.transform(stack[scored].float(), picked)
                    check_output(mapped, picked)
                    normed = decoder.normalize(mapped)
                    for j, r in enumerate(scored):
                        kl, ce = vocab_loss.kl_and_cross_entropy(normed[j], reference, next_ids, decoder,
                                                                 vocab_chunk, token_chunk)
                        kl_sum[i, r] += kl.double().sum()
                        ce_sum[i, r] += ce[:-1].double().sum()
                shown.update(1)
    finally:
        hf.train(was_training)
    for i, scored in enumerate(covered):
        missing = [r for r in range(n_rows) if r not in scored]
        kl_sum[i, missing] = ce_sum[i, missing] = float("nan")
    n_tokens = blocks.numel()
    n_predicted = blocks.shape[0] * (blocks.shape[1] - 1)
    return LensEvaluation(lens_names=names, row_labels=[row.label for row in rows],
                          kl=(kl_sum / n_tokens).float(), cross_entropy=(ce_sum / n_predicted).float(),
                          tokens=n_tokens, predicted_tokens=n_predicted)

__all__ = ["METRICS", "LensEvaluation", "covers", "lens_name", "evaluate_lenses"]
